"""Streaming a JSONL file line by line, in bounded memory, over the whole file or a byte range.

Lines are split on b"\\n" only, as JSONL defines them. A line longer than ``MAX_LINE_BYTES`` is
skipped in blocks rather than read whole, so that one pathological line cannot exhaust memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

BOM = b"\xef\xbb\xbf"
MAX_LINE_BYTES = 32 * 1024 * 1024
"""Longest example we parse; far beyond any model's context, small enough to hold in memory."""
_BLOCK = 1024 * 1024


@dataclass(slots=True)  # not frozen: one is built per line, and frozen ones build 4x slower
class RawLine:
    """One line of the file, undecoded."""

    number: int
    """1-based, counted from the start of the range read (see ``iter_lines``)."""
    offset: int
    """Byte offset in the file of ``data``'s first byte."""
    data: bytes
    """The line without its line ending; empty when ``too_long``."""
    too_long: bool = False
    """The line exceeded MAX_LINE_BYTES and was skipped."""


def iter_lines(path: Path, start: int = 0, end: int | None = None) -> Iterator[RawLine]:
    """Yield the lines that begin in the byte range [start, end) of ``path``.

    ``start`` must be 0 or the first byte of a line (see ``split_points``). A UTF-8 byte order
    mark at the start of the file is dropped. Line numbers count from 1 at ``start``.
    """
    with open(path, "rb") as f:
        f.seek(start)
        pos = start
        number = 0
        while end is None or pos < end:
            data = f.readline(MAX_LINE_BYTES + 1)
            if not data:
                return
            number += 1
            offset = pos
            pos += len(data)
            if len(data) > MAX_LINE_BYTES and not data.endswith(b"\n"):
                pos += _skip_line(f)
                yield RawLine(number, offset, b"", too_long=True)
                continue
            if offset == 0 and data.startswith(BOM):
                data = data[len(BOM) :]
                offset = len(BOM)
            yield RawLine(number, offset, data.rstrip(b"\r\n"))


def read_lines(path: Path, numbers: set[int], max_chars: int = 2000) -> dict[int, str]:
    """The text of the given 1-based lines (an error report shows the offending line).

    Stops after the last line asked for. Undecodable bytes are replaced; a line longer than
    ``max_chars`` characters is cut there and ends with "…".
    """
    found: dict[int, str] = {}
    if not numbers:
        return found
    last = max(numbers)
    for raw in iter_lines(path):
        if raw.number in numbers:
            text = "<line too long to read>" if raw.too_long else raw.data[: max_chars * 4].decode("utf-8", "replace")
            found[raw.number] = text if len(text) <= max_chars else text[:max_chars] + "…"
        if raw.number >= last:
            break
    return found


def split_points(path: Path, parts: int) -> list[int]:
    """Offsets that cut ``path`` into ``parts`` byte ranges, each starting at a line start.

    Returns ``parts + 1`` non-decreasing offsets, first 0 and last the file size; a range may be
    empty when lines are long.
    """
    size = os.path.getsize(path)
    points = [0]
    with open(path, "rb") as f:
        for i in range(1, parts):
            guess = size * i // parts
            if guess <= points[-1]:
                points.append(points[-1])
                continue
            # Start one byte early: if that byte is a newline, guess itself starts a line.
            f.seek(guess - 1)
            points.append(guess - 1 + _skip_line(f))
    points.append(size)
    return points


def _skip_line(f: BinaryIO) -> int:
    """Read through the next newline (or the end), in blocks; return the bytes read."""
    skipped = 0
    while True:
        block = f.readline(_BLOCK)
        skipped += len(block)
        if not block or block.endswith(b"\n"):
            return skipped
