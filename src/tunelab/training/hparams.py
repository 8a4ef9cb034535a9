"""Hyperparameters: what a job asks for (``JobSpec``), the "auto" rules, and the resolved values.

Every default lives here. The API builds a ``JobSpec`` from the request (``CreateJobRequest.to_spec``),
the store keeps it as JSON on the job, the worker hands it to the recipe, and the recipe resolves it
against the training data (``resolve``) into ``Hyperparameters``, which the job then reports.
Pure: no torch, so the API may import it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from tunelab.data.stats import auto_n_epochs  # the OpenAI cookbook rule, shared with the data report
from tunelab.models.folder import LoraSettings

Auto = Literal["auto"]
AUTO: Auto = "auto"
Method = Literal["lora", "full"]
Objective = Literal["supervised", "dpo"]
"""What the job optimises: the API's ``method.type`` (supervised fine-tuning or DPO)."""

# Base learning rate per method; the job's learning_rate_multiplier scales it ("auto" = 1.0).
# Measured on the lab data with SmolLM2-135M: LoRA r16, lr 2e-4, batch 2 took the validation
# loss from 3.01 to 2.50 in 3 epochs. Full fine-tuning moves every weight, so 10x lower.
BASE_LEARNING_RATE: dict[Method, float] = {"lora": 2e-4, "full": 2e-5}
# DPO moves the policy away from a reference it starts equal to; its rates are lower than SFT's
# (TRL's default is 1e-6, for full DPO). Measured on the bundled model (CPU): LoRA 5e-5, beta 0.1,
# 16 pairs, batch 4, one epoch took the held-out margin (preferred minus rejected summed log-prob,
# 4 pairs) from -2.75 to +1.18.
DPO_BASE_LEARNING_RATE: dict[Method, float] = {"lora": 5e-5, "full": 5e-6}
DEFAULT_BETA = 0.1  # TRL's and OpenAI's default
MAX_BETA = 2.0  # OpenAI's bound
DEFAULT_LORA = LoraSettings(rank=16, alpha=32, dropout=0.0)

# batch_size "auto": as many examples as fit this many tokens per optimizer step, but never
# fewer than MIN_STEPS_PER_EPOCH steps per epoch (small files need steps more than big batches).
AUTO_TOKENS_PER_STEP = 1024
MIN_STEPS_PER_EPOCH = 5
MAX_AUTO_BATCH_SIZE = 64


@dataclass(frozen=True)
class JobSpec:
    """The hyperparameters a job asks for; "auto" and None are resolved when training starts."""

    n_epochs: int | Auto = AUTO
    """Passes over the training file; "auto": 3, adjusted so examples x epochs is in [100, 25000]."""
    batch_size: int | Auto = AUTO
    """Examples per optimizer step; "auto": ~1024 tokens per step, at least 5 steps per epoch."""
    learning_rate_multiplier: float | Auto = AUTO
    """Times the method's base LR (LoRA 2e-4, full 2e-5; DPO: 5e-5, 5e-6); "auto" = 1.0."""
    lora_rank: int | None = None
    """LoRA rank; 0 = full fine-tuning; None = 16."""
    lora_alpha: int | None = None
    """LoRA scaling numerator (scale = alpha / rank); None = 32."""
    lora_dropout: float | None = None
    """Dropout on the LoRA input; None = 0."""
    objective: Objective = "supervised"
    """"supervised" (next-token loss on the assistant turns) or "dpo" (preference pairs)."""
    beta: float | Auto | None = None
    """DPO only: how far the policy may move from the reference, in (0, 2]; "auto"/None = 0.1."""

    @property
    def method(self) -> Method:
        return "full" if self.lora_rank == 0 else "lora"

    def with_lora(self, lora: LoraSettings) -> JobSpec:
        """The spec that trains an adapter of this shape (a LoRA model fine-tuned further)."""
        return replace(self, lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        """Read a stored spec; keys it does not know (from older versions) are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved hyperparameters, as reported in the job and in ``final/tunelab.json``."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float
    learning_rate: float
    method: Method
    lora_rank: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: tuple[str, ...] | None = None
    """The projection names LoRA adapts (known once the model is wrapped); None for full runs."""
    objective: Objective = "supervised"
    beta: float | None = None
    """The DPO beta; None for supervised runs."""

    def as_dict(self) -> dict[str, Any]:
        """The reported form: the lora_* values only for a LoRA run, beta only for DPO; the
        objective is the job's ``method.type``, not a hyperparameter."""
        out = asdict(self)
        del out["objective"]
        if self.objective != "dpo":
            del out["beta"]
        if self.method == "full":
            for key in ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules"):
                del out[key]
        elif self.lora_target_modules is not None:
            out["lora_target_modules"] = list(self.lora_target_modules)
        else:
            del out["lora_target_modules"]
        return out

    def as_spec(self) -> JobSpec:
        """A spec that resolves to these values again (what a resumed job runs with)."""
        lora = self.method == "lora"
        return JobSpec(
            n_epochs=self.n_epochs,
            batch_size=self.batch_size,
            learning_rate_multiplier=self.learning_rate_multiplier,
            lora_rank=self.lora_rank if lora else 0,
            lora_alpha=self.lora_alpha if lora else None,
            lora_dropout=self.lora_dropout if lora else None,
            objective=self.objective,
            beta=self.beta,
        )


def resolve(spec: JobSpec, *, n_examples: int, mean_tokens: float) -> Hyperparameters:
    """Validate the requested values and replace every "auto" and None.

    Args:
        n_examples: training examples (after dropping those with nothing to train on); for DPO, pairs.
        mean_tokens: their mean length in tokens (a pair: both its sequences).

    Raises:
        ValueError: a value is out of range; the message names the field.
    """
    lora_rank = DEFAULT_LORA.rank if spec.lora_rank is None else spec.lora_rank
    lora_alpha = DEFAULT_LORA.alpha if spec.lora_alpha is None else spec.lora_alpha
    lora_dropout = DEFAULT_LORA.dropout if spec.lora_dropout is None else spec.lora_dropout
    _check(
        spec.n_epochs == AUTO or (_is_int(spec.n_epochs) and spec.n_epochs >= 1),
        "n_epochs",
        spec.n_epochs,
        "an integer >= 1 or 'auto'",
    )
    _check(
        spec.batch_size == AUTO or (_is_int(spec.batch_size) and spec.batch_size >= 1),
        "batch_size",
        spec.batch_size,
        "an integer >= 1 or 'auto'",
    )
    multiplier = spec.learning_rate_multiplier
    _check(
        multiplier == AUTO or (_is_number(multiplier) and multiplier > 0),
        "learning_rate_multiplier",
        multiplier,
        "a number > 0 or 'auto'",
    )
    _check(_is_int(lora_rank) and lora_rank >= 0, "lora_rank", lora_rank, "an integer >= 0 (0 = full fine-tuning)")
    _check(_is_int(lora_alpha) and lora_alpha > 0, "lora_alpha", lora_alpha, "an integer > 0")
    _check(_is_number(lora_dropout) and 0 <= lora_dropout < 1, "lora_dropout", lora_dropout, "a number in [0, 1)")
    _check(spec.objective in ("supervised", "dpo"), "method.type", spec.objective, "'supervised' or 'dpo'")
    beta = None
    if spec.objective == "dpo":
        beta = DEFAULT_BETA if spec.beta in (None, AUTO) else spec.beta
        _check(_is_number(beta) and 0 < beta <= MAX_BETA, "beta", beta, f"a number in (0, {MAX_BETA:g}] or 'auto'")
    else:
        _check(spec.beta is None, "beta", spec.beta, "left unset for supervised fine-tuning (it is a DPO setting)")

    method: Method = "lora" if lora_rank > 0 else "full"
    scale = 1.0 if multiplier == AUTO else float(multiplier)
    base_rate = (DPO_BASE_LEARNING_RATE if spec.objective == "dpo" else BASE_LEARNING_RATE)[method]
    return Hyperparameters(
        n_epochs=auto_n_epochs(n_examples) if spec.n_epochs == AUTO else int(spec.n_epochs),
        batch_size=auto_batch_size(n_examples, mean_tokens) if spec.batch_size == AUTO else int(spec.batch_size),
        learning_rate_multiplier=scale,
        learning_rate=base_rate * scale,
        method=method,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=float(lora_dropout),
        objective=spec.objective,
        beta=None if beta is None else float(beta),
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
