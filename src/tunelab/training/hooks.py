"""How the recipe talks to its caller: the hooks it calls and the values it hands them.

Pure (no torch), so the worker can implement the hooks without importing the trainer.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from tunelab.training.hparams import Hyperparameters


class Stop(enum.Enum):
    """What ``TrainHooks.should_stop`` answers before each step."""

    GO_ON = "go_on"
    CANCEL = "cancel"
    """Stop now; nothing is kept."""
    PAUSE = "pause"
    """Stop now, keeping a state that the next ``train`` of the same spec goes on from."""


@dataclass(frozen=True)
class StepMetrics:
    """One optimizer step's numbers; the valid_* ones only on the steps that measured them."""

    step: int
    total_steps: int
    train_loss: float
    train_mean_token_accuracy: float
    learning_rate: float
    """The rate this step ran with (the scheduler's value before its ``step``)."""
    tokens_per_second: float
    """Tokens (prompt and answer) forwarded and backpropagated per second in this step."""
    valid_loss: float | None = None
    """On a fixed sample of the validation file, about ten times a run."""
    valid_mean_token_accuracy: float | None = None
    full_valid_loss: float | None = None
    """On the whole validation file, at each epoch end."""
    full_valid_mean_token_accuracy: float | None = None
    # DPO only. A reward is beta x (policy - reference) summed log-prob of an output; accuracy is
    # the share of pairs whose preferred output has the higher reward; margin = chosen - rejected.
    # DPO's *_loss is the mean pair loss, its *_mean_token_accuracy that of the preferred outputs.
    train_reward_accuracy: float | None = None
    train_chosen_reward: float | None = None
    train_rejected_reward: float | None = None
    train_reward_margin: float | None = None
    valid_reward_accuracy: float | None = None
    valid_chosen_reward: float | None = None
    valid_rejected_reward: float | None = None
    valid_reward_margin: float | None = None
    full_valid_reward_accuracy: float | None = None
    full_valid_chosen_reward: float | None = None
    full_valid_rejected_reward: float | None = None
    full_valid_reward_margin: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """The numbers that were measured (None ones left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}

    def results_row(self) -> dict[str, Any]:
        """The OpenAI ``results.csv`` columns and checkpoint metrics: no learning rate or throughput."""
        return {
            k: v for k, v in self.as_dict().items() if k not in ("total_steps", "learning_rate", "tokens_per_second")
        }

    def message(self) -> str:
        """The job event that reports the step, e.g. ``Step 3/10: training loss=1.2345``."""
        text = f"Step {self.step}/{self.total_steps}: training loss={self.train_loss:.4f}"
        if self.train_reward_accuracy is not None:
            text += f", reward accuracy={self.train_reward_accuracy:.2f}"
        if self.valid_loss is not None:
            text += f", validation loss={self.valid_loss:.4f}"
        if self.full_valid_loss is not None:
            text += f", full validation loss={self.full_valid_loss:.4f}"
        return text


@dataclass
class Checkpoint:
    """A deployable epoch checkpoint on disk."""

    step: int
    epoch: int
    path: Path
    metrics: dict[str, float]


class TrainHooks(Protocol):
    """The recipe's caller (the worker): it hears about progress and decides whether to go on."""

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        """Something a person watching the job should read (``level``: info or warn)."""

    def started(self, resolved: Hyperparameters, total_steps: int) -> None:
        """Training starts (or resumes) with these resolved hyperparameters."""

    def step(self, metrics: StepMetrics) -> None:
        """An optimizer step finished."""

    def checkpoint(self, ckpt: Checkpoint) -> None:
        """A new kept checkpoint is on disk."""

    def checkpoint_deleted(self, ckpt: Checkpoint) -> None:
        """An old checkpoint was rotated out and deleted."""

    def should_stop(self) -> Stop:
        """Asked before every step."""
