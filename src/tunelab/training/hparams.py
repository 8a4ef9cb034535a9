"""Hyperparameters: the "auto" rules and their resolved values, every default in one place."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from tunelab.data.stats import auto_n_epochs  # the OpenAI cookbook rule, shared with the data report

Auto = Literal["auto"]

# Base learning rate per method; the job's learning_rate_multiplier scales it ("auto" = 1.0).
# Measured on the lab data with SmolLM2-135M: LoRA r16, lr 2e-4, batch 2 took the validation
# loss from 3.01 to 2.50 in 3 epochs. Full fine-tuning moves every weight, so 10x lower.
BASE_LEARNING_RATE = {"lora": 2e-4, "full": 2e-5}

# batch_size "auto": as many examples as fit this many tokens per optimizer step, but never
# fewer than MIN_STEPS_PER_EPOCH steps per epoch (small files need steps more than big batches).
AUTO_TOKENS_PER_STEP = 1024
MIN_STEPS_PER_EPOCH = 5
MAX_AUTO_BATCH_SIZE = 64


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved hyperparameters, as reported in the job and in ``final/tunelab.json``."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    method: Literal["lora", "full"]
    lora_rank: int
    lora_alpha: int
    lora_dropout: float

    def as_dict(self) -> dict:
        """The reported form: the lora_* values only for a LoRA run."""
        out = asdict(self)
        if self.method == "full":
            for key in ("lora_rank", "lora_alpha", "lora_dropout"):
                del out[key]
        return out


def resolve(
    *,
    n_epochs: int | Auto,
    batch_size: int | Auto,
    learning_rate_multiplier: float | Auto,
    lora_rank: int,
    lora_alpha: int,
    lora_dropout: float,
    n_examples: int,
    mean_tokens: float,
) -> Hyperparameters:
    """Validate the requested values and replace every "auto".

    Args:
        n_examples: training examples (after dropping those with nothing to train on).
        mean_tokens: their mean length in tokens.

    Raises:
        ValueError: a value is out of range; the message names the field.
    """
    _check(n_epochs == "auto" or (_is_int(n_epochs) and n_epochs >= 1),
           "n_epochs", n_epochs, "an integer >= 1 or 'auto'")
    _check(batch_size == "auto" or (_is_int(batch_size) and batch_size >= 1),
           "batch_size", batch_size, "an integer >= 1 or 'auto'")
    _check(learning_rate_multiplier == "auto" or (_is_number(learning_rate_multiplier) and learning_rate_multiplier > 0),
           "learning_rate_multiplier", learning_rate_multiplier, "a number > 0 or 'auto'")
    _check(_is_int(lora_rank) and lora_rank >= 0, "lora_rank", lora_rank, "an integer >= 0 (0 = full fine-tuning)")
    _check(_is_int(lora_alpha) and lora_alpha > 0, "lora_alpha", lora_alpha, "an integer > 0")
    _check(_is_number(lora_dropout) and 0 <= lora_dropout < 1, "lora_dropout", lora_dropout, "a number in [0, 1)")

    method: Literal["lora", "full"] = "lora" if lora_rank > 0 else "full"
    multiplier = 1.0 if learning_rate_multiplier == "auto" else float(learning_rate_multiplier)
    return Hyperparameters(
        n_epochs=auto_n_epochs(n_examples) if n_epochs == "auto" else int(n_epochs),
        batch_size=auto_batch_size(n_examples, mean_tokens) if batch_size == "auto" else int(batch_size),
        learning_rate_multiplier=multiplier,
        learning_rate=BASE_LEARNING_RATE[method] * multiplier,
        method=method,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=float(lora_dropout),
    )


def auto_batch_size(n_examples: int, mean_tokens: float) -> int:
    """Examples per step: ~AUTO_TOKENS_PER_STEP tokens, at least MIN_STEPS_PER_EPOCH steps per epoch."""
    by_tokens = int(AUTO_TOKENS_PER_STEP // max(mean_tokens, 1.0))
    by_steps = n_examples // MIN_STEPS_PER_EPOCH
    return max(1, min(by_tokens, by_steps, MAX_AUTO_BATCH_SIZE))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check(ok: bool, field: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field} must be {expected}, got {value!r}")
