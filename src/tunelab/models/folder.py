"""What a local model folder tells: its context length, the tokens that end a turn, its LoRA settings.

One reading of each, shared by the trainer, the serving engine and the data checks, so that a
model's context length or EOS tokens cannot mean two things in two places. Also the one device
resolver: where ``TUNELAB_DEVICE`` says a model loads.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"


def model_folder(path: Path) -> Path:
    """``path``, if it is a Hugging Face model folder; ValueError otherwise."""
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def context_length(model_dir: Path) -> int | None:
    """The model's context window (``max_position_embeddings`` of its config.json); None if it has none."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@functools.lru_cache(maxsize=8)
def tokenizer_of(model_dir: Path) -> Any:
    """The folder's Hugging Face tokenizer, loaded once per process (the API counts files with it)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def hidden_size(model_dir: Path) -> int | None:
    """The width of the model's hidden states (``hidden_size`` of its config.json): LoRA's rank can be
    no larger. None if the config has none."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    value = config.get("hidden_size") or config.get("n_embd") or config.get("d_model")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def eos_ids(generation_config: Any, tokenizer: Any) -> list[int]:
    """Every token that ends a turn: the generation config's EOS ids plus the tokenizer's."""
    configured = generation_config.eos_token_id if generation_config is not None else None
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return sorted(set(ids))


def method_of(folder: Path) -> Literal["lora", "full"]:
    """A PEFT adapter folder is a LoRA model; anything else is a whole (fully fine-tuned) model."""
    return "lora" if (folder / ADAPTER_CONFIG).is_file() else "full"


@dataclass(frozen=True)
class LoraSettings:
    """The LoRA shape of an adapter: what a job that trains it further must keep."""

    rank: int
    alpha: int
    dropout: float

    @classmethod
    def of_adapter(cls, adapter_dir: Path) -> LoraSettings:
        """Read a PEFT adapter folder's ``adapter_config.json``.

        Raises:
            OSError: no adapter config there.
            ValueError, KeyError: it is not a LoRA config.
        """
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        return cls(rank=int(config["r"]), alpha=int(config["lora_alpha"]), dropout=float(config["lora_dropout"]))


def resolve_device(setting: str) -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    Raises:
        ValueError: another name, or CUDA asked for where there is none; the message says what to set.
    """
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {setting!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {setting!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} was asked for but CUDA is not available; use device 'auto' or 'cpu'")
    return device
