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
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from tunelab.training.fsdp import FULL

FILENAME = "resume.pt"
FORMAT = 2
"""1: parameters and optimizer state in module order (before FSDP); 2: both keyed by name."""


@dataclass
class LoopState:
    """The step loop's counters and its kept checkpoints (``recipe.Checkpoint``, oldest first)."""

    step: int = 0
    trained_tokens: int = 0
    kept: list[Any] = field(default_factory=list)


def state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop: LoopState,
    hyperparameters: dict,
) -> dict[str, Any]:
    """What ``save`` writes. Every rank of a job calls it: under FSDP it gathers the shards.

    The weights and the optimizer state are whole tensors keyed by parameter name (torch's
    distributed state-dict API), so a job paused on N sharded ranks can go on with another layout.
    """
    weights, optimizer_state = get_state_dict(model, optimizer, options=FULL)
    return {
        "format": FORMAT,
        "trainable": weights,
        "optimizer": optimizer_state,
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


def save(folder: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically and durably: a file that exists is complete, also after a power cut."""
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

    Every rank of a job calls it (each reads the file; under FSDP each keeps its shards).

    The kept checkpoints come back as (step, epoch, path, metrics) tuples.
    """
    state = torch.load(folder / FILENAME, map_location="cpu", weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError("it was written by an older tunelab")
    if state["hyperparameters"] != hyperparameters:
        raise ValueError("it was saved with other hyperparameters")
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["trainable"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(full_state_dict=True, ignore_frozen_params=True),
    )
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    loop = state["loop"]
    return LoopState(loop["step"], loop["trained_tokens"], [tuple(k) for k in loop["kept"]])


def remove(folder: Path) -> None:
    (folder / FILENAME).unlink(missing_ok=True)
