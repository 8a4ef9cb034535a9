"""Every warning code: files that are valid but probably not what the user meant."""

from __future__ import annotations

from typing import Any

from tests.data.helpers import WriteJsonl, chat, chats
from tunelab.data.counting import TiktokenCounter
from tunelab.data.formats import Conversation
from tunelab.data.validate import validate_file


def codes(report: Any) -> list[str]:
    return [w.code for w in report.warnings]


def test_a_plain_file_has_no_warnings(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl(chats(12)))
    assert report.valid and report.warnings == []


def test_too_long_says_how_many_tokens_are_lost(write_jsonl: WriteJsonl) -> None:
    long = chat(99)
    long["messages"][1]["content"] = "Tell me about the sea. " * 40
    path = write_jsonl([*chats(3), long, *chats(7, start=3)])
    length = TiktokenCounter("cl100k_base").count(Conversation(long["messages"]))[0]
    short = TiktokenCounter("cl100k_base").count(Conversation(chat(0)["messages"]))[0]
    limit = short + 10
    report = validate_file(path, max_tokens=limit)
    assert report.valid and codes(report) == ["too_long"]
    warning = report.warnings[0]
    assert warning.line == 4
    assert f"losing {length - limit:,} tokens" in warning.message
    assert f"line 4: {length - limit:,} lost" in warning.message
    # Training sees at most max_tokens of each example.
    stats = report.tokens["cl100k_base"]
    assert stats.trained_tokens_per_epoch == validate_file(path).tokens["cl100k_base"].trained_tokens_per_epoch - (
        length - limit
    )
    assert validate_file(path, max_tokens=length).warnings == []


def test_duplicate_examples_name_both_lines(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl([*chats(10), chat(2), chat(2), chat(7)]))
    assert report.valid and codes(report) == ["duplicate_example"]
    warning = report.warnings[0]
    assert warning.line == 11
    assert warning.message.startswith("3 examples exactly repeat an earlier one")
    assert "line 11 = line 3, line 12 = line 3, line 13 = line 8" in warning.message


def test_empty_assistant_turn(write_jsonl: WriteJsonl) -> None:
    empty = chat(50)
    empty["messages"][2]["content"] = "  "
    report = validate_file(write_jsonl([*chats(4), empty, *chats(6, start=4)]))
    assert report.valid and codes(report) == ["empty_assistant"]
    assert report.warnings[0].line == 5
    assert "1 example with an empty assistant message (line 5)" in report.warnings[0].message


def test_empty_completion_is_an_empty_assistant_turn(write_jsonl: WriteJsonl) -> None:
    lines = [{"prompt": f"{i}?", "completion": f"{i}!"} for i in range(10)] + [{"prompt": "x", "completion": ""}]
    report = validate_file(write_jsonl(lines))
    assert codes(report) == ["empty_assistant"]


def test_the_same_reply_in_most_examples(write_jsonl: WriteJsonl) -> None:
    examples = chats(10)
    for example in examples[3:]:
        example["messages"][2]["content"] = "I cannot help with that."
    report = validate_file(write_jsonl(examples))
    assert report.valid and codes(report) == ["repeated_assistant"]
    assert report.warnings[0].line == 4
    assert report.warnings[0].message.startswith("7 of 10 examples end with the same assistant reply")


def test_the_same_reply_in_half_the_examples_is_fine(write_jsonl: WriteJsonl) -> None:
    examples = chats(10)
    for example in examples[5:]:
        example["messages"][2]["content"] = "I cannot help with that."
    assert validate_file(write_jsonl(examples)).warnings == []


def test_system_prompts_that_differ_only_in_whitespace(write_jsonl: WriteJsonl) -> None:
    examples = chats(10)
    examples[6]["messages"][0]["content"] = "You are a helpful  assistant.\n"
    examples[8]["messages"][0]["content"] = "You are a helpful  assistant.\n"  # the same variant again
    examples[9]["messages"][0]["content"] = "You are a different assistant."
    report = validate_file(write_jsonl(examples))
    assert report.valid and codes(report) == ["system_whitespace"]
    assert report.warnings[0].line == 7
    assert "1 system prompt differs from an earlier one only in whitespace" in report.warnings[0].message
    assert "line 7 vs line 1" in report.warnings[0].message


def test_warnings_come_in_a_fixed_order(write_jsonl: WriteJsonl) -> None:
    examples = chats(10)
    for example in examples:
        example["messages"][2]["content"] = ""
    examples[1]["messages"][0]["content"] = " You are a helpful assistant."
    examples.append(examples[0])
    report = validate_file(write_jsonl(examples), max_tokens=20)
    assert codes(report) == [
        "too_long",
        "duplicate_example",
        "empty_assistant",
        "repeated_assistant",
        "system_whitespace",
    ]


class WordTokenizer:
    """A stand-in for a Hugging Face tokenizer: a chat template of plain text, one token per word.

    Like real templates, it cannot render an assistant turn without content.
    """

    def apply_chat_template(
        self, messages: list[dict[str, Any]], *, tools: Any, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert not tokenize
        turns = [f"<{m['role']}> " + m["content"] + " <end>" for m in messages]
        return " ".join(turns + (["<assistant>"] if add_generation_prompt else []))

    def __call__(self, text: str, *, add_special_tokens: bool) -> dict[str, list[str]]:
        return {"input_ids": text.split()}


def test_model_counts_and_template_failures(write_jsonl: WriteJsonl) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    with_call = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]}]}
    report = validate_file(write_jsonl([*chats(10), with_call]), tokenizer=WordTokenizer(), max_tokens=100)
    assert report.valid and codes(report) == ["chat_template_failed"]
    assert report.warnings[0].line == 11
    model = report.tokens["model"]
    # "<system> You are a helpful assistant. <end> <user> What is i plus i? <end> <assistant> It is 2i. <end>"
    assert (model.total.min, model.total.max) == (19, 19)
    assert (model.assistant.min, model.assistant.max) == (4, 4)  # "It is 2i. <end>"
    assert sum(model.histogram.counts) == 10 and sum(report.tokens["cl100k_base"].histogram.counts) == 11
