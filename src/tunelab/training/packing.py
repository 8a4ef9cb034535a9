"""Padding-free packing: many short examples in one row, attention never crossing examples.

transformers does the work. ``DataCollatorWithFlattening`` concatenates examples into one row
with ``position_ids`` restarting at 0 for each example (and the first label of each example
masked, so no token predicts across a boundary). When a model gets ``position_ids`` and no
``attention_mask``, ``transformers.masking_utils`` detects the restarts and builds a block-causal
mask (sdpa, eager) — or flash-attention uses them as sequence boundaries. ``use_cache=False`` is
required: with a KV cache the detection is skipped. tests/training/test_packing.py checks that a
packed row gives the same per-example loss as each example alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import DataCollatorWithFlattening

from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample

_flatten = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


def pack(examples: Sequence[TokenizedExample], max_row_tokens: int) -> list[dict[str, torch.Tensor]]:
    """Pack examples, in order, into rows of at most ``max_row_tokens`` tokens.

    An example longer than that gets a row of its own.

    Returns:
        rows of ``input_ids``, ``labels`` and ``position_ids``, each of shape (1, T).
    """
    return pack_groups([[e] for e in examples], max_row_tokens)


def pack_groups(groups: Sequence[Sequence[TokenizedExample]], max_row_tokens: int) -> list[dict[str, torch.Tensor]]:
    """``pack``, keeping the examples of each group in one row (a DPO pair: its two sequences).

    A group longer than ``max_row_tokens`` gets a row of its own.
    """
    rows: list[list[TokenizedExample]] = []
    size = 0
    for group in groups:
        length = sum(map(len, group))
        if not rows or size + length > max_row_tokens:
            rows.append([])
            size = 0
        rows[-1].extend(group)
        size += length
    return [_flatten([{"input_ids": e.input_ids, "labels": e.labels} for e in row]) for row in rows]


def token_losses(model: torch.nn.Module, row: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward one packed row; the loss and correctness of every trained token.

    Logits are computed only where a label follows (``logits_to_keep``), which skips most of the
    LM head on prompt tokens.

    Returns:
        (losses, correct), both of shape (K,) for the K trained tokens of the row: float cross
        entropy, and bool "argmax prediction equals the label".
    """
    targets = row["labels"][0, 1:]  # (T-1,): position t predicts token t+1
    keep = (targets != IGNORE_INDEX).nonzero().squeeze(-1)  # (K,)
    out = model(
        input_ids=row["input_ids"],
        position_ids=row["position_ids"],
        logits_to_keep=keep,
        use_cache=False,
    )
    logits = out.logits[0].float()  # (K, V)
    labels = targets[keep]  # (K,)
    losses = F.cross_entropy(logits, labels, reduction="none")
    return losses, logits.argmax(-1) == labels


def example_of_tokens(row: dict[str, torch.Tensor]) -> torch.Tensor:
    """For each trained token of a packed row, in ``token_losses`` order, the index of its example.

    Returns:
        shape (K,), values in [0, examples in the row).
    """
    trained_at = (row["labels"][0, 1:] != IGNORE_INDEX).nonzero().squeeze(-1) + 1  # (K,) label positions
    starts = (row["position_ids"][0] == 0).cumsum(0)  # (T,) 1-based example number of each token
    return starts[trained_at] - 1
