"""Scanning one byte range of a file: errors, per-example token counts, and warning evidence.

``scan_range`` is a plain top-level function over picklable inputs, so ``validate_file`` can
run it in worker processes over parts of a large file and merge the ``RangeScan`` results. All
line numbers in a RangeScan count from the start of its range.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.checks import Problem, content_text, is_trained
from tunelab.data.counting import ModelCounter, TiktokenCounter
from tunelab.data.formats import (
    Conversation,
    check_example,
    detect_format,
    missing_format_problem,
    parse_line,
)
from tunelab.data.lines import RawLine, iter_lines
from tunelab.data.report import Issue

FIRST_LINES = 5
"""Lines named in a warning message."""
_SYSTEM_PROMPTS_TRACKED = 100_000
"""Distinct system prompts compared for whitespace variants; enough for real data, bounded."""


@dataclass(frozen=True)
class ScanJob:
    """What one scan needs: the range of the file, and how to check and count."""

    path: Path
    start: int
    end: int | None
    file_format: str | None
    """The format of the file's first recognisable example, or None if none was found."""
    format_line: int | None
    """Its line in the file, for the message of a mixed-format error."""
    encodings: tuple[str, ...]
    tokenizer: Any
    """A Hugging Face tokenizer with a chat template, or None."""
    max_tokens: int | None
    max_errors: int


@dataclass
class Tally:
    """How often a warning condition held, and the first (line, amount) pairs where it did."""

    count: int = 0
    amount: int = 0
    """Summed amounts, e.g. tokens lost to truncation."""
    first: list[tuple[int, int]] = field(default_factory=list)

    def add(self, line: int, amount: int = 0) -> None:
        self.count += 1
        self.amount += amount
        if len(self.first) < FIRST_LINES:
            self.first.append((line, amount))


@dataclass
class RangeScan:
    """What scanning one range found. Per-example arrays cover valid examples, in line order."""

    lines: int = 0
    """Lines in the range, blank ones included."""
    examples: int = 0
    """Non-blank lines."""
    errors: list[Issue] = field(default_factory=list)
    error_count: int = 0
    example_lines: array[int] = field(default_factory=lambda: array("q"))
    example_hashes: array[int] = field(default_factory=lambda: array("Q"))
    """64-bit digests of the valid examples' bytes, for exact duplicates."""
    reply_hashes: array[int] = field(default_factory=lambda: array("Q"))
    """64-bit digests of each valid example's last trained assistant text."""
    totals: dict[str, array[int]] = field(default_factory=dict)
    """Per counter, total tokens per valid example (-1 where the counter could not count)."""
    assistants: dict[str, array[int]] = field(default_factory=dict)
    too_long: Tally = field(default_factory=Tally)
    empty_reply: Tally = field(default_factory=Tally)
    template_failed: Tally = field(default_factory=Tally)
    system_prompts: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Digest of each distinct system prompt -> (digest with whitespace normalised, first line)."""


def digest(data: bytes) -> int:
    """A 64-bit digest that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def scan_range(job: ScanJob) -> RangeScan:
    """Check and count every line that begins in the job's byte range."""
    counters: list[TiktokenCounter | ModelCounter] = [TiktokenCounter(name) for name in job.encodings]
    if job.tokenizer is not None:
        counters.append(ModelCounter(job.tokenizer))
    scan = RangeScan(totals={c.name: array("q") for c in counters}, assistants={c.name: array("q") for c in counters})
    seen_system: set[int] = set()
    for raw in iter_lines(job.path, job.start, job.end):
        scan.lines = raw.number
        if not raw.too_long and not raw.data.strip():
            continue  # blank lines are skipped, as by the trainer
        scan.examples += 1
        conversation, problems = _check_line(raw, job)
        if conversation is None:
            _error(scan, job, raw.number, problems)
            continue
        scan.example_lines.append(raw.number)
        scan.example_hashes.append(digest(raw.data))
        _count(scan, job, counters, raw.number, conversation)
        _note_turns(scan, raw.number, conversation, seen_system)
    return scan


def _check_line(raw: RawLine, job: ScanJob) -> tuple[Conversation | None, list[Problem]]:
    example, problem = parse_line(raw)
    if problem is None and not isinstance(example, dict):
        problem = ("not_an_object", "an example must be a JSON object")
    if problem is not None:
        return None, [problem]
    fmt = detect_format(example)
    if fmt is None:
        return None, [missing_format_problem(job.file_format)]
    if job.file_format is not None and fmt != job.file_format:
        message = f"a {fmt} example in a {job.file_format} file (line {job.format_line} set the format)"
        return None, [("mixed_formats", message)]
    return check_example(example, fmt)


def _error(scan: RangeScan, job: ScanJob, line: int, problems: list[Problem]) -> None:
    for code, message in problems:
        scan.error_count += 1
        if len(scan.errors) < job.max_errors:
            scan.errors.append(Issue(line, code, message))


def _count(
    scan: RangeScan,
    job: ScanJob,
    counters: list[TiktokenCounter | ModelCounter],
    line: int,
    conversation: Conversation,
) -> None:
    for i, counter in enumerate(counters):
        counts = counter.count(conversation)
        if counts is None:
            scan.template_failed.add(line)
            counts = (-1, -1)
        total, assistant = counts
        scan.totals[counter.name].append(total)
        scan.assistants[counter.name].append(assistant)
        # The context is checked with the last counter: the model's own when there is one.
        if i == len(counters) - 1 and job.max_tokens is not None and total > job.max_tokens:
            scan.too_long.add(line, total - job.max_tokens)


def _note_turns(scan: RangeScan, line: int, conversation: Conversation, seen_system: set[int]) -> None:
    """Evidence for the empty_assistant, repeated_assistant and system_whitespace warnings."""
    reply = ""
    empty = False
    for message in conversation.messages:
        role = message["role"]
        if role == "assistant":
            content = message.get("content")
            text = content if type(content) is str else content_text(content)
            if not text or text.isspace():
                empty = empty or (message.get("tool_calls") is None and message.get("function_call") is None)
            if is_trained(message):
                reply = text
        elif role == "system":
            _note_system_prompt(scan, line, content_text(message.get("content")), seen_system)
    if empty:
        scan.empty_reply.add(line)
    scan.reply_hashes.append(digest(reply.encode("utf-8", "surrogatepass")))


def _note_system_prompt(scan: RangeScan, line: int, text: str, seen: set[int]) -> None:
    # hash() is enough to skip prompts this process has already looked at.
    key = hash(text)
    if key in seen or len(seen) >= _SYSTEM_PROMPTS_TRACKED:
        return
    seen.add(key)
    normal = digest(" ".join(text.split()).encode("utf-8", "surrogatepass"))
    scan.system_prompts[digest(text.encode("utf-8", "surrogatepass"))] = (normal, line)
