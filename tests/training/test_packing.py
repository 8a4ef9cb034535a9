"""Packing without cross-talk: a packed row gives each example the loss it has alone."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.tokenize import tokenize_chat
from tunelab.training.packing import example_of_tokens, pack, token_losses

from .conftest import CHATS, chat

# fp32 on CPU: a block-causal mask over a long row vs a plain causal mask over a short one only
# changes the summation order inside attention and matmuls. Measured max difference per token
# on SmolLM2-135M: 1.2e-5; allowed: 1e-4 absolute per token (cross-talk moves losses by > 1).
TOLERANCE = 1e-4


def per_example_losses(model, examples, max_row_tokens) -> list[torch.Tensor]:
    """Token losses of each example, in order, from rows packed with ``max_row_tokens``."""
    out: list[torch.Tensor] = []
    for row in pack(examples, max_row_tokens):
        losses, _ = token_losses(model, row)
        example_of = example_of_tokens(row)
        out += [losses[example_of == i] for i in range(int(example_of.max()) + 1)]
    return out


@pytest.fixture(
    scope="module",
    params=[
        pytest.param(("tiny", "sdpa"), id="tiny-sdpa"),
        pytest.param(("tiny", "eager"), id="tiny-eager"),
        pytest.param(("bundled", "sdpa"), id="smollm2-sdpa", marks=pytest.mark.slow),
        pytest.param(("bundled", "eager"), id="smollm2-eager", marks=pytest.mark.slow),
    ],
)
def model(request):
    """The tiny random llama (fast) and the real bundled model (slow), with both CPU attention kernels."""
    from transformers import AutoModelForCausalLM

    which, attention = request.param
    path = request.getfixturevalue("tiny_dir" if which == "tiny" else "bundled_dir")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attention).eval()


@torch.no_grad()
def test_packed_row_gives_the_same_per_example_loss_as_one_by_one(model, tokenizer):
    examples = [tokenize_chat(tokenizer, chat(q, a)["messages"]) for q, a in CHATS[:4]]

    packed = per_example_losses(model, examples, max_row_tokens=10_000)
    alone = per_example_losses(model, examples, max_row_tokens=1)  # one example per row

    assert len(pack(examples, 10_000)) == 1 and len(pack(examples, 1)) == len(examples)
    for p, a, e in zip(packed, alone, examples, strict=True):
        assert p.shape == a.shape == (e.n_trained,)
        torch.testing.assert_close(p, a, rtol=0, atol=TOLERANCE)


@torch.no_grad()
def test_without_restarting_positions_examples_would_see_each_other(model, tokenizer):
    # The control: the same row with positions 0..T-1 is a single sequence, and losses change.
    examples = [tokenize_chat(tokenizer, chat(q, a)["messages"]) for q, a in CHATS[:2]]
    row = pack(examples, 10_000)[0]
    packed, _ = token_losses(model, row)
    glued, _ = token_losses(model, row | {"position_ids": torch.arange(row["input_ids"].shape[1])[None]})
    n_first = examples[0].n_trained
    torch.testing.assert_close(packed[:n_first], glued[:n_first], rtol=0, atol=TOLERANCE)  # nothing before it
    assert (packed[n_first:] - glued[n_first:]).abs().max() > 100 * TOLERANCE


def test_rows_hold_at_most_max_row_tokens_unless_one_example_is_longer(tokenizer):
    examples = [tokenize_chat(tokenizer, chat(q, a)["messages"]) for q, a in CHATS]
    limit = 2 * max(map(len, examples))
    rows = pack(examples, limit)
    assert 1 < len(rows) < len(examples)
    assert all(row["input_ids"].shape[1] <= limit for row in rows)
    assert sum(row["input_ids"].shape[1] for row in rows) == sum(map(len, examples))  # no padding
