"""The three example formats, how one line is parsed and checked, and reading a checked file.

- chat: {"messages": [...], "tools"?: [...], "parallel_tool_calls"?: bool}
- preference (DPO): {"input": {"messages": [...], "tools"?: [...]}, "preferred_output": [assistant
  message], "non_preferred_output": [assistant message]}; the older spellings
  ``preferred_completion`` / ``non_preferred_completion`` are read as the two outputs.
- prompt_completion: {"prompt": str, "completion": str}

A file holds one format: the first recognisable example decides it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.checks import Problem, check_message, check_messages, check_tools
from tunelab.data.lines import MAX_LINE_BYTES, RawLine, iter_lines

CHAT = "chat"
PREFERENCE = "preference"
PROMPT_COMPLETION = "prompt_completion"
FORMATS = (CHAT, PREFERENCE, PROMPT_COMPLETION)
PREFERENCE_ALIASES = {"preferred_completion": "preferred_output", "non_preferred_completion": "non_preferred_output"}
"""Older names of the two outputs of a preference example, read as the current ones."""


@dataclass(slots=True)  # not frozen: one is built per example, and frozen ones build 4x slower
class Conversation:
    """A checked example in the shape tokenizers count: chat messages and tool definitions.

    Preference examples count as their input followed by the preferred output; prompt/completion
    examples as a user message followed by an assistant message.
    """

    messages: list[dict[str, Any]]
    tools: list[Any] | None = None


def detect_format(example: dict[str, Any]) -> str | None:
    """The format an example's keys announce, whether or not the example is valid."""
    if "messages" in example:
        return CHAT
    if any(key in example for key in ("input", "preferred_output", "non_preferred_output", *PREFERENCE_ALIASES)):
        return PREFERENCE
    if "prompt" in example or "completion" in example:
        return PROMPT_COMPLETION
    return None


def parse_line(raw: RawLine) -> tuple[Any, Problem | None]:
    """Decode and parse one non-blank line: (value, None), or (None, the problem)."""
    if raw.too_long:
        return None, ("line_too_long", f"line longer than {MAX_LINE_BYTES // 2**20} MiB, not read")
    try:
        text = raw.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw.data[exc.start : exc.start + 1].hex()
        return None, (
            "invalid_utf8",
            f"invalid UTF-8 at byte offset {raw.offset + exc.start} (byte 0x{bad}: {exc.reason})",
        )
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, ("invalid_json", f"invalid JSON ({exc.msg}) at column {exc.colno}")
    except (ValueError, RecursionError) as exc:  # e.g. nesting too deep, a 5,000-digit number
        return None, ("invalid_json", f"invalid JSON ({type(exc).__name__}: {str(exc)[:80]})")


def check_example(example: dict[str, Any], fmt: str) -> tuple[Conversation | None, list[Problem]]:
    """Check an example of format ``fmt``; return its Conversation when it has no problems."""
    if fmt == CHAT:
        problems = check_messages(example["messages"], "messages", need_trained=True) + check_tools(example)
        if problems:
            return None, problems
        return Conversation(example["messages"], example.get("tools")), []
    if fmt == PREFERENCE:
        example, problems = preference_example(example)
        problems = problems or _check_preference(example)
        if problems:
            return None, problems
        source = example["input"]
        return Conversation(source["messages"] + example["preferred_output"], source.get("tools")), []
    problems = _check_prompt_completion(example)
    if problems:
        return None, problems
    return Conversation(prompt_completion_messages(example)), []


def missing_format_problem(file_format: str | None) -> Problem:
    """The problem of an object whose keys announce no format, worded for the file's format."""
    if file_format == PREFERENCE:
        return ("invalid_preference", 'no "input", "preferred_output" or "non_preferred_output"')
    if file_format == PROMPT_COMPLETION:
        return ("invalid_prompt_completion", 'no "prompt" or "completion"')
    return ("missing_messages", 'no "messages": not a chat example')


def preference_example(example: dict[str, Any]) -> tuple[dict[str, Any], list[Problem]]:
    """The example with the older output names (``PREFERENCE_ALIASES``) renamed to the current ones.

    Returns the example unchanged when it uses the current names; a problem when it gives both
    spellings of one output.
    """
    if not any(old in example for old in PREFERENCE_ALIASES):
        return example, []
    out = dict(example)
    for old, new in PREFERENCE_ALIASES.items():
        if old not in out:
            continue
        if new in out:
            return example, [("invalid_preference", f'give "{new}" or its older name "{old}", not both')]
        out[new] = out.pop(old)
    return out, []


def _check_preference(example: dict[str, Any]) -> list[Problem]:
    source = example.get("input")
    if not isinstance(source, dict):
        return [("missing_messages", '"input" must be an object with "messages"')]
    problems = check_messages(source.get("messages"), "input.messages", need_trained=False)
    problems += check_tools(source, "input.")
    for key in ("preferred_output", "non_preferred_output"):
        output = example.get(key)
        if not isinstance(output, list) or len(output) != 1:
            problems.append(("invalid_preference", f'"{key}" must be a list of one assistant message'))
            continue
        message = output[0]
        if isinstance(message, dict) and message.get("role") != "assistant":
            problems.append(("invalid_preference", f'"{key}[0]" must be an assistant message'))
            continue
        problems += check_message(message, f"{key}[0]", set())
    return problems


def _check_prompt_completion(example: dict[str, Any]) -> list[Problem]:
    return [
        ("invalid_prompt_completion", f'"{key}" must be a string')
        for key in ("prompt", "completion")
        if not isinstance(example.get(key), str)
    ]


def prompt_completion_messages(example: dict[str, Any]) -> list[dict[str, Any]]:
    """A prompt/completion example as the chat messages the trainer sees."""
    return [
        {"role": "user", "content": example["prompt"]},
        {"role": "assistant", "content": example["completion"]},
    ]


def iter_chat_examples(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, example) of a validated chat or prompt/completion file.

    Chat examples come as written (BOM stripped, blank lines skipped); prompt/completion examples
    are converted to {"messages": [user, assistant]} so that the trainer sees one shape.

    Raises:
        ValueError: a line that does not parse, or a preference file (see
            ``iter_preference_examples``); validate the file first.
    """
    for line, example, fmt in _iter_parsed(path):
        if fmt == PREFERENCE:
            raise ValueError(f"{path} is a preference file: read it with iter_preference_examples")
        if fmt == PROMPT_COMPLETION:
            yield line, {"messages": prompt_completion_messages(example)}
        else:
            yield line, example


def iter_preference_examples(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, example) of a validated preference file, examples as written except that
    the older output names are renamed (``preference_example``).

    Raises:
        ValueError: a line that does not parse, or an example of another format.
    """
    for line, example, fmt in _iter_parsed(path):
        if fmt != PREFERENCE:
            raise ValueError(f"{path}:{line}: not a preference example")
        renamed, problems = preference_example(example)
        if problems:
            raise ValueError(f"{path}:{line}: {problems[0][1]}")
        yield line, renamed


def _iter_parsed(path: Path) -> Iterator[tuple[int, dict[str, Any], str | None]]:
    for raw in iter_lines(path):
        if not raw.data.strip() and not raw.too_long:
            continue
        example, problem = parse_line(raw)
        if problem is not None:
            raise ValueError(f"{path}:{raw.number}: {problem[1]}")
        if not isinstance(example, dict):
            raise ValueError(f"{path}:{raw.number}: not a JSON object")  # noqa: TRY004 - bad data
        yield raw.number, example, detect_format(example)
