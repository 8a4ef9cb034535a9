"""Every error code, each from a small file: ten valid examples and one bad line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.data.helpers import Line, WriteJsonl, chat, chats
from tunelab.data import lines as lines_module
from tunelab.data.validate import validate_file

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}


def with_messages(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"messages": list(messages), **extra}


USER = {"role": "user", "content": "Weather in Oslo?"}
ANSWER = {"role": "assistant", "content": "Cold."}

BAD_LINES: list[tuple[str, Line]] = [
    ("invalid_json", '{"messages": [}'),
    ("invalid_json", "[" * 100_000),  # deeper than the JSON parser's recursion limit
    ("not_an_object", "[1, 2, 3]"),
    ("not_an_object", '"just a string"'),
    ("missing_messages", {"conversation": []}),
    ("missing_messages", {"messages": []}),
    ("missing_messages", {"messages": "hello"}),
    ("invalid_message", with_messages("hello", ANSWER)),
    ("invalid_message", with_messages({"role": "user", "content": "hi", "name": 7}, ANSWER)),
    ("unrecognized_role", with_messages({"role": "bot", "content": "hi"}, ANSWER)),
    ("unrecognized_role", with_messages({"content": "hi"}, ANSWER)),
    ("unrecognized_role", with_messages({"role": ["user"], "content": "hi"}, ANSWER)),
    ("unrecognized_key", with_messages({"role": "user", "content": "hi", "lang": "en"}, ANSWER)),
    ("unrecognized_key", with_messages(USER, {"role": "assistant", "content": "x", "tool_call_id": "a"})),
    ("missing_content", with_messages({"role": "user"}, ANSWER)),
    ("missing_content", with_messages(USER, {"role": "assistant"})),
    ("missing_content", with_messages(USER, {"role": "assistant", "content": None})),
    ("invalid_content", with_messages({"role": "user", "content": 42}, ANSWER)),
    ("invalid_content", with_messages({"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, ANSWER)),
    ("invalid_weight", with_messages(USER, {"role": "assistant", "content": "x", "weight": 2})),
    ("invalid_weight", with_messages(USER, {"role": "assistant", "content": "x", "weight": True})),
    ("no_trained_assistant", with_messages(USER)),
    ("no_trained_assistant", with_messages(USER, {"role": "assistant", "content": "x", "weight": 0})),
    ("invalid_tool_call", with_messages(USER, {"role": "assistant", "tool_calls": []})),
    ("invalid_tool_call", with_messages(USER, {"role": "assistant", "tool_calls": [{**CALL, "type": "tool"}]})),
    ("invalid_tool_call", with_messages(USER, {"role": "assistant", "tool_calls": [{**CALL, "id": None}]})),
    (
        "invalid_tool_call",  # arguments must be a JSON *string*
        with_messages(
            USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}]}
        ),
    ),
    (
        "invalid_tool_call",
        with_messages(
            USER, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{oops"}}]}
        ),
    ),
    ("invalid_tool_call", with_messages(USER, {"role": "assistant", "function_call": {"name": "f"}})),
    ("orphan_tool_message", with_messages(USER, {"role": "tool", "tool_call_id": "call_9", "content": "5"}, ANSWER)),
    ("orphan_tool_message", with_messages(USER, {"role": "tool", "content": "5"}, ANSWER)),
    (
        "orphan_tool_message",  # answers a call made only later
        with_messages(
            USER,
            {"role": "tool", "tool_call_id": "call_1", "content": "5"},
            {"role": "assistant", "tool_calls": [CALL]},
        ),
    ),
    ("invalid_tools", with_messages(USER, ANSWER, tools="get_weather")),
    ("invalid_tools", with_messages(USER, ANSWER, tools=[{"type": "function", "function": {}}])),
    ("invalid_tools", with_messages(USER, ANSWER, parallel_tool_calls="yes")),
]


@pytest.mark.parametrize(("code", "bad"), BAD_LINES, ids=[f"{c}-{i}" for i, (c, _) in enumerate(BAD_LINES)])
def test_error_code_names_the_line(write_jsonl: WriteJsonl, code: str, bad: Line) -> None:
    lines: list[Line] = [*chats(2), bad, *chats(8, start=2)]
    report = validate_file(write_jsonl(lines))
    assert not report.valid
    assert [(e.line, e.code) for e in report.errors] == [(3, code)], report.errors
    assert report.examples == 11
    # The other ten examples are still checked and counted.
    assert report.tokens["cl100k_base"].total.min > 0


def test_invalid_utf8_gives_the_byte_offset(write_jsonl: WriteJsonl) -> None:
    good = b'{"messages": [{"role": "user", "content": "caf\xc3\xa9"}, {"role": "assistant", "content": "ok"}]}'
    bad = b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'
    path = write_jsonl([*chats(2), bad, good, *chats(8, start=2)])
    report = validate_file(path)
    [error] = report.errors
    offset = path.read_bytes().index(b"caf\xe9") + 3
    assert (error.line, error.code) == (3, "invalid_utf8")
    assert f"byte offset {offset}" in error.message and "0xe9" in error.message


def test_line_too_long_is_skipped_not_read(write_jsonl: WriteJsonl, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lines_module, "MAX_LINE_BYTES", 300)
    monkeypatch.setattr(lines_module, "_BLOCK", 64)  # skip the long line in several blocks
    huge = {"messages": [{"role": "user", "content": "x" * 2000}, ANSWER]}
    report = validate_file(write_jsonl([*chats(2), huge, *chats(8, start=2)]))
    assert [(e.line, e.code) for e in report.errors] == [(3, "line_too_long")]
    assert report.examples == 11


def test_several_errors_in_one_example_are_all_reported(write_jsonl: WriteJsonl) -> None:
    bad = with_messages({"role": "user", "content": 1, "x": 2}, {"role": "assistant", "weight": 5})
    report = validate_file(write_jsonl([bad, *chats(10)]))
    # An invalid weight is not reported again as "no assistant message with weight 1".
    assert {e.code for e in report.errors} == {
        "invalid_content",
        "unrecognized_key",
        "invalid_weight",
        "missing_content",
    }
    assert {e.line for e in report.errors} == {1}


def test_errors_are_capped_with_a_count_of_the_rest(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl(["not json"] * 25), max_errors=4)
    assert [e.line for e in report.errors] == [1, 2, 3, 4]
    assert report.errors_omitted == 21
    assert report.to_dict()["errors_omitted"] == 21
    assert report.summary() == "line 1: invalid JSON (Expecting value) at column 1; 24 more errors"


@pytest.mark.parametrize(
    "content",
    [b"", b"\n\n  \n", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n"],
    ids=["empty", "blank-lines", "bom-only", "bom-newline"],
)
def test_empty_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    report = validate_file(path)
    assert [(e.line, e.code) for e in report.errors] == [(None, "empty_file")]
    assert report.examples == 0 and report.format is None and report.tokens == {}
    assert report.summary() == "the file holds no examples"


def test_fewer_than_ten_examples(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl(chats(9)))
    assert [(e.line, e.code) for e in report.errors] == [(None, "too_few_examples")]
    assert "9 examples" in report.errors[0].message
    assert validate_file(write_jsonl(chats(10))).valid


def test_minimum_counts_examples_not_blank_lines(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl([*chats(9), "", "   "]))
    assert [e.code for e in report.errors] == ["too_few_examples"]


def test_mixed_formats_keep_the_first_format(write_jsonl: WriteJsonl) -> None:
    lines: list[Line] = [
        *chats(5),
        {"prompt": "2+2=", "completion": "4"},
        *chats(5, start=5),
        {"input": {"messages": [USER]}, "preferred_output": [ANSWER], "non_preferred_output": [ANSWER]},
    ]
    report = validate_file(write_jsonl(lines))
    assert report.format == "chat"
    assert [(e.line, e.code) for e in report.errors] == [(6, "mixed_formats"), (12, "mixed_formats")]
    assert "prompt_completion example in a chat file (line 1 set the format)" in report.errors[0].message


def test_format_is_set_by_the_first_recognisable_example(write_jsonl: WriteJsonl) -> None:
    lines: list[Line] = [
        "garbage",
        [1],
        *[{"prompt": f"{i}+{i}=", "completion": str(2 * i)} for i in range(10)],
        chat(),
    ]
    report = validate_file(write_jsonl(lines))
    assert report.format == "prompt_completion"
    assert [(e.line, e.code) for e in report.errors] == [
        (1, "invalid_json"),
        (2, "not_an_object"),
        (13, "mixed_formats"),
    ]
    assert "line 3 set the format" in report.errors[-1].message


def test_an_unrecognisable_object_is_worded_for_the_file_format(write_jsonl: WriteJsonl) -> None:
    pc = [{"prompt": f"{i}", "completion": "x"} for i in range(10)]
    report = validate_file(write_jsonl([*pc, {"text": "hello"}]))
    assert [(e.line, e.code) for e in report.errors] == [(11, "invalid_prompt_completion")]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ({"prompt": 5, "completion": "x"}, "invalid_prompt_completion"),
        ({"prompt": "x"}, "invalid_prompt_completion"),
    ],
)
def test_prompt_completion_errors(write_jsonl: WriteJsonl, bad: Line, code: str) -> None:
    pc = [{"prompt": f"{i}", "completion": "x"} for i in range(10)]
    report = validate_file(write_jsonl([*pc, bad]))
    assert [(e.line, e.code) for e in report.errors] == [(11, code)]


def preference(i: int = 0, **changes: Any) -> dict[str, Any]:
    example = {
        "input": {"messages": [{"role": "user", "content": f"Say {i} nicely."}]},
        "preferred_output": [{"role": "assistant", "content": f"Here is {i}, with pleasure!"}],
        "non_preferred_output": [{"role": "assistant", "content": f"{i}."}],
    }
    return {**example, **changes}


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (preference(preferred_output=[ANSWER, ANSWER]), "invalid_preference"),
        (preference(non_preferred_output={"role": "assistant", "content": "x"}), "invalid_preference"),
        (preference(preferred_output=[USER]), "invalid_preference"),
        (preference(input={"messages": []}), "missing_messages"),
        (preference(input="Say hi"), "missing_messages"),
        (preference(input={"messages": [{"role": "robot", "content": "x"}]}), "unrecognized_role"),
        (preference(preferred_output=[{"role": "assistant"}]), "missing_content"),
        ({"preferred_output": [ANSWER]}, "missing_messages"),
    ],
)
def test_preference_errors(write_jsonl: WriteJsonl, bad: Line, code: str) -> None:
    report = validate_file(write_jsonl([*[preference(i) for i in range(10)], bad]))
    assert report.format == "preference"
    assert [(e.line, e.code) for e in report.errors] == [(11, code)]


def test_any_bytes_get_a_report(tmp_path: Path) -> None:
    import random

    rng = random.Random(7)
    pieces = [
        b"{",
        b"}",
        b"[",
        b"]",
        b'"messages"',
        b'"role"',
        b":",
        b",",
        b"\n",
        b"\xff",
        b"\xef\xbb\xbf",
        b'"content"',
        b"null",
        b"1e999999",
        b"\\ud800",
        b'"',
        b"\r\n",
        b"  ",
    ]
    for i in range(200):
        blob = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        if i % 3 == 0:
            blob = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        path = tmp_path / f"fuzz{i}.jsonl"
        path.write_bytes(blob)
        report = validate_file(path)
        assert isinstance(report.to_dict(), dict) and report.summary()


def test_mutated_examples_never_raise(write_jsonl: WriteJsonl) -> None:
    import json
    import random

    rng = random.Random(3)
    values: list[Any] = [None, 0, 1, 2, True, "", "x", [], {}, [{}], [{"type": "text"}], {"name": 1}]
    lines: list[Line] = []
    for i in range(300):
        example = json.loads(json.dumps(chat(i)))
        example["tools"] = [{"type": "function", "function": {"name": "f"}}]
        example["messages"].append({"role": "assistant", "tool_calls": [json.loads(json.dumps(CALL))]})
        example["messages"].append({"role": "tool", "tool_call_id": "call_1", "content": "x"})
        message = rng.choice(example["messages"])
        message[rng.choice(["role", "content", "name", "weight", "tool_calls", "tool_call_id"])] = rng.choice(values)
        lines.append(example)
    report = validate_file(write_jsonl(lines), max_errors=1000)
    assert report.examples == 300
    assert report.errors
