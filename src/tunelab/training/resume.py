"""A paused job's training state: enough to go on at the next step as if it had never stopped.

One file, ``resume.pt`` in the job's output folder, written when a job is paused (or its worker
shuts down), at every epoch end and every ``TUNELAB_RESUME_EVERY`` seconds (so that a worker
killed outright loses at most that much), and read when the job runs again. It holds what the
step loop cannot rebuild from the job spec: the trainable weights, the optimizer and
LR-scheduler state, the RNG state, and the loop's counters. Everything else (data order,
validation sample) is a function of the seed.
On CPU a paused and resumed run gives bitwise the same losses as one that never paused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FILENAME = "resume.pt"


@dataclass
class LoopState:
    """The step loop's counters and its kept checkpoints (``recipe.Checkpoint``, oldest first)."""

    step: int = 0
    trained_tokens: int = 0
    kept: list[Any] = field(default_factory=list)


def save(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop: LoopState,
    hyperparameters: dict,
) -> Path:
    """Write the state atomically and durably: a file that exists is complete, also after a power cut."""
    state = {
        "trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "loop": {
            "step": loop.step,
            "trained_tokens": loop.trained_tokens,
            "kept": [(c.step, c.epoch, str(c.path), c.metrics) for c in loop.kept],
        },
        "hyperparameters": hyperparameters,
    }
    path, tmp = folder / FILENAME, folder / (FILENAME + ".tmp")
    with tmp.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def exists(folder: Path) -> bool:
    return (folder / FILENAME).is_file()


def load(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    hyperparameters: dict,
) -> LoopState:
    """Restore the state into a freshly built model/optimizer/scheduler; ValueError if it is not this run's.

    The kept checkpoints come back as (step, epoch, path, metrics) tuples.
    """
    state = torch.load(folder / FILENAME, map_location="cpu", weights_only=True)
    if state["hyperparameters"] != hyperparameters:
        raise ValueError("it was saved with other hyperparameters")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(state["trainable"]):
        raise ValueError("it holds other trainable weights than this model has")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    loop = state["loop"]
    return LoopState(loop["step"], loop["trained_tokens"], [tuple(k) for k in loop["kept"]])


def remove(folder: Path) -> None:
    (folder / FILENAME).unlink(missing_ok=True)
