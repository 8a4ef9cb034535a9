"""The ``tunelab`` command: serve, worker, models, data, eval."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console

from tunelab.cli_data import app as data_app
from tunelab.cli_engines import app as engines_app
from tunelab.cli_eval import app as eval_app
from tunelab.config import Settings

app = typer.Typer(
    help="Fine-tune and serve open-weight language models behind an OpenAI-compatible API.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The model catalogue: base models you can fine-tune and serve.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")
app.add_typer(engines_app, name="engines")
console = Console(stderr=True)

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", help="Data folder (env TUNELAB_DATA_DIR, default ~/.tunelab).")
]


def _openmp_for(role: Literal["serve", "train"], settings: Settings, *, beside_worker: bool = False) -> None:
    """Set OpenMP's wait policy for this process's role; OpenMP reads it once, when torch loads.

    Spinning (active) threads are fastest on cores nothing else uses, but beside another busy torch
    process every barrier waits for a descheduled sibling: 4-10x slower on 2 cores. So a process
    that shares the CPU (the server beside its embedded worker, a worker) waits passively, and a
    server alone (--no-worker) spins (docs/serving.md has the measurements).
    """
    if role == "serve":
        policy = settings.serve_wait_policy
        if policy == "auto":
            policy = "passive" if beside_worker else "active"
    else:
        policy = settings.train_wait_policy
    os.environ["OMP_WAIT_POLICY"] = policy.upper()


def _settings(data_dir: Path | None) -> Settings:
    return Settings(data_dir=data_dir) if data_dir else Settings()


def _store(settings: Settings):
    from tunelab.models.catalog import ensure_bundled
    from tunelab.store import Store

    settings.data_path.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    ensure_bundled(store)
    return store


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: DataDir = None,
    worker: Annotated[bool, typer.Option("--worker/--no-worker", help="Run an embedded training worker.")] = True,
) -> None:
    """Run the API server (and, by default, a training worker beside it, restarted if it dies)."""
    import uvicorn

    from tunelab.api.app import create_app
    from tunelab.store.keys import bootstrap_admin_key
    from tunelab.supervisor import WorkerSupervisor

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = _settings(data_dir)
    _openmp_for("serve", settings, beside_worker=worker)
    store = _store(settings)
    generated = bootstrap_admin_key(settings, store)
    if generated:
        console.print(f"[bold]Generated admin API key[/bold] (shown once; only its hash is kept): {generated}")
    supervisor = WorkerSupervisor(settings, store) if worker else None

    @contextlib.asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        # uvicorn re-raises SIGTERM once it has shut down, so code after uvicorn.run never runs
        # on a SIGTERM: the worker is stopped here, in the lifespan's shutdown, which does run.
        if supervisor is not None:
            supervisor.start()
        try:
            yield
        finally:
            if supervisor is not None:
                await asyncio.to_thread(supervisor.stop)

    app_ = create_app(settings, lifespan=lifespan, supervisor=supervisor)
    uvicorn.run(
        app_,
        host=host,
        port=port,
        log_level="info",
        # after this long, in-flight requests (and so their generations) are cancelled
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_seconds),
    )


@app.command("worker")
def worker_cmd(
    data_dir: DataDir = None,
    parent_pid: Annotated[int | None, typer.Option(hidden=True, help="Exit when this process is gone.")] = None,
) -> None:
    """Run a training worker: claims queued jobs from the store and trains them.

    Started by torchrun (on one machine or several), it is one worker whose jobs train on all of
    torchrun's ranks: rank 0 claims them (docs/training.md#several-machines).
    """
    from tunelab.training.distributed import Crew, under_torchrun
    from tunelab.training.tracking import quiet_http_retries
    from tunelab.training.worker import Worker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = _settings(data_dir)
    _openmp_for("train", settings)
    if settings.worker_nice:  # before any thread starts: threads (OpenMP's too) inherit it
        os.nice(settings.worker_nice)
    crew = Crew(settings.device) if under_torchrun() else None
    if crew is not None and not crew.group.is_main:
        crew.follow()  # ranks 1..N-1 never touch the store
        return
    _store(settings)
    quiet_http_retries()
    try:
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: quit at once
            Worker(settings, parent_pid=parent_pid, crew=crew).run_forever()
    finally:
        if crew is not None:
            crew.leave()
    if crew is not None and crew.broken:
        raise typer.Exit(1)  # torchrun restarts the group


@models_app.command("list")
def models_list(data_dir: DataDir = None) -> None:
    """List every model: base, fine-tuned and checkpoints."""
    for row in _store(_settings(data_dir)).models():
        typer.echo(f"{row.id}\t{row.kind}\t{row.path or '(bundled)'}")


@models_app.command("add")
def models_add(
    path: Annotated[Path, typer.Argument(help="A local Hugging Face model folder (config.json, weights, tokenizer).")],
    model_id: Annotated[str, typer.Option("--id", help="The id clients will use.")],
    data_dir: DataDir = None,
) -> None:
    """Register a local HF-format folder as a base model."""
    from tunelab.models.catalog import add_local

    try:
        row = add_local(_store(_settings(data_dir)), path, model_id)
    except ValueError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    typer.echo(f"added {row.id} -> {row.path}")


@models_app.command("path")
def models_path(model_id: str, data_dir: DataDir = None) -> None:
    """Print a base model's local HF folder (importing the bundled model if needed)."""
    from tunelab.models.catalog import ModelNotFound, base_model_dir

    settings = _settings(data_dir)
    try:
        typer.echo(str(base_model_dir(_store(settings), model_id, settings.cache_path)))
    except ModelNotFound:
        console.print(f"[red]error:[/red] no base model {model_id!r} (see `tunelab models list`)")
        raise typer.Exit(2) from None


keys_app = typer.Typer(help="API keys: create (shown once), list, revoke.", no_args_is_help=True)
projects_app = typer.Typer(
    help="Projects: each key sees only its project's files, jobs and models.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")
app.add_typer(projects_app, name="projects")


def _keyring(data_dir: Path | None):
    from tunelab.store.keys import KeyRing

    settings = _settings(data_dir)
    return KeyRing.of(settings, _store(settings))


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="What the key is for.")],
    project: Annotated[
        str | None, typer.Option(help="Its project id (`tunelab projects list`); none: an admin key.")
    ] = None,
    role: Annotated[
        str, typer.Option(help="owner, member or inference (chat only); admin without --project.")
    ] = "member",
    data_dir: DataDir = None,
) -> None:
    """Create a key and print it once (only its hash is kept)."""
    from tunelab.store.keys import PROJECT_ROLES, Role

    ring = _keyring(data_dir)
    if project is None:
        chosen = Role.ADMIN
    elif role not in [str(r) for r in PROJECT_ROLES]:
        console.print(f"[red]error:[/red] --role must be one of {', '.join(PROJECT_ROLES)} for a project key")
        raise typer.Exit(2)
    else:
        chosen = Role(role)
        found = ring.project(project)
        if found is None or found.archived_at is not None:
            console.print(f"[red]error:[/red] no active project {project!r} (see `tunelab projects list`)")
            raise typer.Exit(2)
    row, key = ring.create(role=chosen, project_id=project, name=name)
    console.print(f"created {row.id} ({chosen}{', ' + project if project else ''}); the key, shown once:")
    typer.echo(key)


@keys_app.command("list")
def keys_list(
    project: Annotated[str | None, typer.Option(help="A project's keys; none: the admin keys.")] = None,
    data_dir: DataDir = None,
) -> None:
    """List live keys (redacted)."""
    ring = _keyring(data_dir)
    for row in ring.keys(project_id=project, admin=project is None):
        typer.echo(f"{row.id}\t{row.role}\t{row.redacted_value}\t{row.name}")


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDir = None) -> None:
    """Revoke a key: requests with it get 401 from now on."""
    if not _keyring(data_dir).revoke(key_id):
        console.print(f"[red]error:[/red] no live key {key_id!r}")
        raise typer.Exit(2)
    typer.echo(f"revoked {key_id}")


@projects_app.command("create")
def projects_create(name: str, data_dir: DataDir = None) -> None:
    """Create a project; prints its id."""
    typer.echo(_keyring(data_dir).create_project(name).id)


@projects_app.command("list")
def projects_list(data_dir: DataDir = None) -> None:
    for row in _keyring(data_dir).projects(include_archived=True):
        typer.echo(f"{row.id}\t{'archived' if row.archived_at else 'active'}\t{row.name}")
