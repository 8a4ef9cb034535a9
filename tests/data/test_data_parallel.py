"""Scanning in byte ranges, in worker processes, gives the report of a single scan."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from tests.data.helpers import Line, WriteJsonl, chat, chats
from tunelab.data.lines import iter_lines, split_points
from tunelab.data.validate import validate_file


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 50])
def test_ranges_hold_every_line_once(tmp_path: Path, parts: int) -> None:
    path = tmp_path / "lines.jsonl"
    lines = [b"x" * (i * 5 % 13) for i in range(1, 41)]  # some empty, the last not
    path.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines))  # no final newline
    points = split_points(path, parts)
    assert points[0] == 0 and points[-1] == path.stat().st_size and points == sorted(points)
    read = [raw.data for start, end in itertools.pairwise(points) for raw in iter_lines(path, start, end)]
    assert read == lines


def test_workers_give_the_same_report(write_jsonl: WriteJsonl) -> None:
    examples: list[Line] = []
    for i in range(300):
        examples.append(chat(i % 280))  # duplicates in the last part, of lines in the first
        if i % 37 == 5:
            examples.append("{broken")
        if i % 101 == 50:
            examples.append(chat(i, system="You are a  helpful assistant."))
        if i % 60 == 7:
            examples.append(chat(i, system="You are a helpful assistant. " * 20))
    path = write_jsonl([*examples, *chats(3)])
    single = validate_file(path, encodings=("cl100k_base", "o200k_base"), workers=1, max_tokens=100, max_errors=5)
    parallel = validate_file(path, encodings=("cl100k_base", "o200k_base"), workers=3, max_tokens=100, max_errors=5)
    assert parallel.to_dict() == single.to_dict()
    assert {w.code for w in single.warnings} == {"too_long", "duplicate_example", "system_whitespace"}
    assert single.errors_omitted == 3
