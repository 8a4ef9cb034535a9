"""Chat → input_ids/labels: loss only on trained assistant turns, end-of-turn token included."""

from __future__ import annotations

import copy

import pytest

from tunelab.data.tokenize import IGNORE_INDEX, TemplateError, token_pieces, tokenize_chat

from .conftest import SYSTEM


def trained_text(tokenizer, example) -> str:
    return tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )


def test_labels_cover_the_answer_and_its_end_of_turn_token(tokenizer):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the biggest ocean?"},
        {"role": "assistant", "content": "The Pacific."},
    ]
    example = tokenize_chat(tokenizer, messages)

    assert trained_text(tokenizer, example) == "The Pacific.<|im_end|>"
    assert tokenizer.eos_token_id in [label for label in example.labels if label != IGNORE_INDEX]
    # input_ids are exactly what the chat template gives at inference time
    assert example.input_ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    # labels are either ignored or the input token itself (the model shifts them)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example.input_ids, example.labels, strict=True))


def test_weight_zero_turns_take_no_loss(tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Bad answer", "weight": 0},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Good answer", "weight": 1},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "Also good"},
    ]
    example = tokenize_chat(tokenizer, messages)

    assert trained_text(tokenizer, example) == "Good answer<|im_end|>Also good<|im_end|>"
    # every token of the weight-0 turn, its end-of-turn token included, is ignored
    bad = tokenizer("Bad answer<|im_end|>", add_special_tokens=False)["input_ids"]
    start = next(i for i in range(len(example.input_ids)) if example.input_ids[i : i + len(bad)] == bad)
    assert example.labels[start : start + len(bad)] == [IGNORE_INDEX] * len(bad)


def test_all_turns_weight_zero_means_nothing_to_train(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0}]
    assert tokenize_chat(tokenizer, messages).n_trained == 0


def test_other_template_families_are_masked_from_the_template(tokenizer):
    # A template with different markers and no trailing newline: nothing ChatML is hardcoded.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}### {{ m['role'] }}:\n{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}\n\n{% endfor %}{% if add_generation_prompt %}### assistant:\n{% endif %}"
    )
    messages = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A!"}]
    assert trained_text(tok, tokenize_chat(tok, messages)) == "A!<|im_end|>"


def test_templates_that_rewrite_earlier_turns_are_refused(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # renders the last message differently from the others, so prefixes do not match
    tok.chat_template = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    messages = [
        {"role": "user", "content": "Q?"},
        {"role": "assistant", "content": "A!"},
        {"role": "user", "content": "Q2?"},
        {"role": "assistant", "content": "A2!"},
    ]
    with pytest.raises(TemplateError, match="message 1"):
        tokenize_chat(tok, messages)


def test_truncation_cuts_the_end(tokenizer):
    messages = [{"role": "user", "content": "Hi " * 50}, {"role": "assistant", "content": "Hello"}]
    full = tokenize_chat(tokenizer, messages)
    cut = tokenize_chat(tokenizer, messages, max_length=20)
    assert cut.truncated and not full.truncated
    assert cut.input_ids == full.input_ids[:20] and cut.labels == full.labels[:20]
    assert cut.n_trained == 0


def test_token_pieces_tile_the_rendered_chat_and_mark_what_tokenize_chat_trains(tokenizer):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Say hi 👋 twice"},
        {"role": "assistant", "content": "Skipped", "weight": 0},
        {"role": "user", "content": "Again"},
        {"role": "assistant", "content": "hi 👋 hi 👋"},  # an emoji spans several byte-level tokens
    ]
    pieces = token_pieces(tokenizer, messages)
    example = tokenize_chat(tokenizer, messages)

    assert "".join(text for text, _ in pieces) == tokenizer.apply_chat_template(messages, tokenize=False)
    assert [trained for _, trained in pieces] == [label != IGNORE_INDEX for label in example.labels]
    assert "".join(text for text, trained in pieces if trained) == "hi 👋 hi 👋<|im_end|>"
