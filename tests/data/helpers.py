"""Small builders for the data-layer tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

SHARED = Path(__file__).parents[2] / ".." / "shared"
LAB = SHARED / "lab"

Line = dict[str, Any] | list[Any] | str | bytes
WriteJsonl = Callable[..., Path]
"""The write_jsonl fixture: write_jsonl(lines, name="data.jsonl", prefix=b"") -> Path."""


def chat(i: int = 0, system: str = "You are a helpful assistant.") -> dict[str, Any]:
    """A valid chat example, different for each i."""
    return {
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": f"What is {i} plus {i}?"},
            {"role": "assistant", "content": f"It is {2 * i}."},
        ]
    }


def chats(n: int = 10, start: int = 0) -> list[dict[str, Any]]:
    return [chat(i) for i in range(start, start + n)]


def encode_line(line: Line) -> bytes:
    """Bytes as given, text as UTF-8, anything else as JSON."""
    if isinstance(line, bytes):
        return line
    if isinstance(line, str):
        return line.encode("utf-8")
    return json.dumps(line, ensure_ascii=False).encode("utf-8")
