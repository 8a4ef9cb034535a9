"""Counting with the base model's own tokenizer and chat template (the bundled SmolLM2)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.data.helpers import WriteJsonl, chat, chats
from tunelab.data.counting import ModelCounter
from tunelab.data.formats import Conversation
from tunelab.data.validate import validate_file

pytestmark = pytest.mark.slow  # loads transformers and the bundled tokenizer


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from tunelab.models.bundled import BundledModelMissing, bundled_model_dir

    cache = Path(os.environ.get("TUNELAB_CACHE_DIR", "~/.cache/tunelab")).expanduser()
    try:
        return bundled_model_dir(cache)
    except BundledModelMissing as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def test_counts_are_what_the_template_tokenizes_to(tokenizer: Any) -> None:
    messages = chat(3)["messages"]
    total, assistant = ModelCounter(tokenizer).count(Conversation(messages))
    ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert total == len(ids)
    # The trained turn: its content and the template's end-of-turn marker.
    reply = tokenizer(messages[-1]["content"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert assistant == len(reply)


def test_only_weighted_turns_count_as_assistant_tokens(tokenizer: Any) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help you today?", "weight": 0},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue.", "weight": 1},
    ]
    counter = ModelCounter(tokenizer)
    _, assistant = counter.count(Conversation(messages))
    _, both = counter.count(Conversation([{k: v for k, v in m.items() if k != "weight"} for m in messages]))
    assert 0 < assistant < both


def test_validate_with_the_model(write_jsonl: WriteJsonl, tokenizer: Any) -> None:
    path = write_jsonl(chats(10))
    report = validate_file(path, tokenizer=tokenizer, max_tokens=20)
    assert set(report.tokens) == {"cl100k_base", "model"}
    expected = len(tokenizer.apply_chat_template(chat(0)["messages"], tokenize=True, return_dict=True)["input_ids"])
    assert report.tokens["model"].total.min == expected
    [warning] = report.warnings
    assert warning.code == "too_long" and "(model tokens)" in warning.message


def test_a_template_failure_is_a_warning(write_jsonl: WriteJsonl, tokenizer: Any) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_call = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]}
    report = validate_file(write_jsonl([*chats(10), with_call]), tokenizer=tokenizer)
    assert report.valid
    assert [w.code for w in report.warnings] == ["chat_template_failed"]
    assert report.warnings[0].line == 11
    assert report.tokens["model"].histogram.counts and sum(report.tokens["model"].histogram.counts) == 10
    assert sum(report.tokens["cl100k_base"].histogram.counts) == 11


def test_cli_model_option(write_jsonl: WriteJsonl, model_dir: Path, tmp_path: Path) -> None:
    from tunelab.cli_data import app
    from tunelab.models.bundled import BUNDLED_ID

    path = write_jsonl(chats(10))
    for model in (BUNDLED_ID, str(model_dir)):
        result = CliRunner().invoke(
            app, ["validate", str(path), "--model", model, "--json", "--data-dir", str(tmp_path / "data")]
        )
        assert result.exit_code == 0, result.output
        [report] = json.loads(result.stdout)["files"]
        assert set(report["tokens"]) == {"cl100k_base", "model"}
        assert report["max_tokens"] == 8192  # the model's context length
