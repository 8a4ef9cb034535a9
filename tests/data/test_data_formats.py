"""The three formats in their valid shapes, and reading a checked file for training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.data.helpers import WriteJsonl, chat, chats
from tunelab.data.formats import iter_chat_examples, iter_preference_examples
from tunelab.data.validate import validate_file

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def tool_chat(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "system", "content": "You can look up the weather."},
            {"role": "user", "content": [{"type": "text", "text": f"Weather in city {i}?"}], "name": "ada"},
            {"role": "assistant", "content": None, "tool_calls": [CALL], "weight": 0},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'},
            {"role": "assistant", "content": [{"type": "text", "text": f"It is -3 in city {i}."}], "weight": 1},
        ],
        "tools": TOOLS,
        "parallel_tool_calls": False,
    }


def legacy_function_chat(i: int) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": f"Add {i} and 1."},
            {"role": "assistant", "content": None, "function_call": {"name": "add", "arguments": f'{{"a": {i}}}'}},
            {"role": "function", "name": "add", "content": str(i + 1)},
            {"role": "assistant", "content": f"{i + 1}."},
        ]
    }


def preference(i: int) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": f"Say {i} nicely."}], "tools": TOOLS},
        "preferred_output": [{"role": "assistant", "content": f"Here is {i}, with pleasure!"}],
        "non_preferred_output": [{"role": "assistant", "content": f"{i}."}],
    }


@pytest.mark.parametrize(
    ("make", "fmt"),
    [
        (chat, "chat"),
        (tool_chat, "chat"),
        (legacy_function_chat, "chat"),
        (preference, "preference"),
        (lambda i: {"prompt": f"{i} + {i} =", "completion": f" {2 * i}"}, "prompt_completion"),
    ],
    ids=["chat", "tools", "legacy-function", "preference", "prompt-completion"],
)
def test_valid_files(write_jsonl: WriteJsonl, make: Any, fmt: str) -> None:
    report = validate_file(write_jsonl([make(i) for i in range(10)]), encodings=("cl100k_base", "o200k_base"))
    assert report.valid, report.errors
    assert report.format == fmt and report.examples == 10
    assert set(report.tokens) == {"cl100k_base", "o200k_base"}
    assert report.tokens["cl100k_base"].assistant.min > 0


def test_bom_crlf_and_blank_lines_are_handled_silently(write_jsonl: WriteJsonl) -> None:
    path = write_jsonl([*chats(5), "", *chats(5, start=5), "   "], prefix=b"\xef\xbb\xbf")
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    report = validate_file(path)
    assert report.valid and report.examples == 10 and report.warnings == []
    assert [line for line, _ in iter_chat_examples(path)] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11]


def test_iter_chat_examples_yields_the_examples(write_jsonl: WriteJsonl) -> None:
    examples = [tool_chat(i) for i in range(3)]
    path = write_jsonl(examples, prefix=b"\xef\xbb\xbf")
    assert list(iter_chat_examples(path)) == list(enumerate(examples, start=1))


def test_iter_chat_examples_converts_prompt_completion(write_jsonl: WriteJsonl) -> None:
    path = write_jsonl([{"prompt": "2+2=", "completion": "4"}])
    assert list(iter_chat_examples(path)) == [
        (1, {"messages": [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}]})
    ]


def test_iter_chat_examples_refuses_what_it_cannot_read(write_jsonl: WriteJsonl) -> None:
    with pytest.raises(ValueError, match=r":2: invalid JSON"):
        list(iter_chat_examples(write_jsonl([chat(), "{oops"])))
    with pytest.raises(ValueError, match="preference file"):
        list(iter_chat_examples(write_jsonl([preference(0)])))


def test_iter_preference_examples(write_jsonl: WriteJsonl) -> None:
    path = write_jsonl([preference(0), preference(1)])
    assert [example for _, example in iter_preference_examples(path)] == [preference(0), preference(1)]


def test_a_missing_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        validate_file(tmp_path / "nope.jsonl")


def older_spelling(i: int) -> dict[str, Any]:
    new = preference(i)
    return {
        "input": new["input"],
        "preferred_completion": new["preferred_output"],
        "non_preferred_completion": new["non_preferred_output"],
    }


def test_the_older_preference_spelling_is_read_as_the_current_one(write_jsonl: WriteJsonl) -> None:
    path = write_jsonl([older_spelling(i) for i in range(10)])
    report = validate_file(path, encodings=("cl100k_base",))
    assert report.valid, report.errors
    assert report.format == "preference"
    assert [example for _, example in iter_preference_examples(path)] == [preference(i) for i in range(10)]


def test_both_spellings_of_one_output_is_an_error(write_jsonl: WriteJsonl) -> None:
    both = preference(0) | {"preferred_completion": preference(0)["preferred_output"]}
    report = validate_file(write_jsonl([both] + [preference(i) for i in range(1, 10)]), encodings=())
    assert not report.valid
    assert report.errors[0].line == 1 and "not both" in report.errors[0].message
