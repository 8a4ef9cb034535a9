"""Merging the scans of a file's byte ranges, and turning the evidence into warnings.

Line numbers in a RangeScan count from its range's start; here they become line numbers in
the file. Whole-file properties (duplicates, a reply most examples share) are computed here,
over compact per-example digests rather than the examples themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from tunelab.data.report import Issue
from tunelab.data.scan import FIRST_LINES, RangeScan, Tally

REPEATED_REPLY_SHARE = 0.5
"""A reply ending more than this share of the examples is "identical across most examples"."""


@dataclass
class MergedScan:
    """A whole file's scan: RangeScan's content with file line numbers and numpy arrays."""

    examples: int = 0
    errors: list[Issue] = field(default_factory=list)
    error_count: int = 0
    example_lines: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    example_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    reply_hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    totals: dict[str, np.ndarray] = field(default_factory=dict)
    assistants: dict[str, np.ndarray] = field(default_factory=dict)
    too_long: Tally = field(default_factory=Tally)
    empty_reply: Tally = field(default_factory=Tally)
    template_failed: Tally = field(default_factory=Tally)
    system_variants: Tally = field(default_factory=Tally)


def merge_scans(scans: list[RangeScan], max_errors: int) -> MergedScan:
    """Merge the scans of consecutive ranges, in file order."""
    merged = MergedScan()
    first_prompts: dict[int, tuple[int, int]] = {}  # normalised digest -> (exact digest, first line)
    variants: set[int] = set()  # exact digests already reported
    example_lines = []
    offset = 0
    for scan in scans:
        merged.examples += scan.examples
        merged.error_count += scan.error_count
        room = max(0, max_errors - len(merged.errors))
        merged.errors += [_shift(e, offset) for e in scan.errors[:room]]
        example_lines.append(np.frombuffer(scan.example_lines, np.int64) + offset)
        _extend(merged.too_long, scan.too_long, offset)
        _extend(merged.empty_reply, scan.empty_reply, offset)
        _extend(merged.template_failed, scan.template_failed, offset)
        for exact, (normal, line) in scan.system_prompts.items():  # in line order
            first = first_prompts.setdefault(normal, (exact, line + offset))
            if first[0] != exact and exact not in variants:
                variants.add(exact)
                merged.system_variants.add(line + offset, first[1])
        offset += scan.lines
    merged.example_lines = _concat(example_lines, np.int64)
    merged.example_hashes = _concat([s.example_hashes for s in scans], np.uint64)
    merged.reply_hashes = _concat([s.reply_hashes for s in scans], np.uint64)
    for name in scans[0].totals if scans else ():
        merged.totals[name] = _concat([s.totals[name] for s in scans], np.int64)
        merged.assistants[name] = _concat([s.assistants[name] for s in scans], np.int64)
    return merged


def _shift(issue: Issue, offset: int) -> Issue:
    return issue if issue.line is None else replace(issue, line=issue.line + offset)


def _concat(parts: list[Any], dtype: type) -> np.ndarray:
    """Concatenate arrays or array.array buffers of one dtype."""
    return np.concatenate([np.frombuffer(p, dtype) for p in parts]) if parts else np.zeros(0, dtype)


def _extend(into: Tally, tally: Tally, offset: int) -> None:
    into.count += tally.count
    into.amount += tally.amount
    for line, amount in tally.first:
        if len(into.first) < FIRST_LINES:
            into.first.append((line + offset, amount))


def warnings_of(merged: MergedScan, *, max_tokens: int | None, context_counter: str | None) -> list[Issue]:
    """One warning per condition found, in a fixed order."""
    found: list[Issue] = []
    tally = merged.too_long
    if tally.count:
        where = ", ".join(f"line {line}: {lost:,} lost" for line, lost in tally.first)
        found.append(
            Issue(
                tally.first[0][0],
                "too_long",
                f"{_examples(tally.count)} longer than the {max_tokens:,}-token context "
                f"({context_counter} tokens) will be truncated, losing {tally.amount:,} tokens in all "
                f"({where}{_more(tally)})",
            )
        )
    found += _duplicates(merged)
    tally = merged.empty_reply
    if tally.count:
        found.append(
            Issue(
                tally.first[0][0],
                "empty_assistant",
                f"{_examples(tally.count)} with an empty assistant message ({_lines(tally)})",
            )
        )
    found += _repeated_reply(merged)
    tally = merged.system_variants
    if tally.count:
        where = ", ".join(f"line {line} vs line {earlier}" for line, earlier in tally.first)
        found.append(
            Issue(
                tally.first[0][0],
                "system_whitespace",
                f"{tally.count} system prompt{' differs' if tally.count == 1 else 's differ'} from an "
                f"earlier one only in whitespace ({where}{_more(tally)})",
            )
        )
    tally = merged.template_failed
    if tally.count:
        found.append(
            Issue(
                tally.first[0][0],
                "chat_template_failed",
                f"the model's chat template cannot render {_examples(tally.count)} ({_lines(tally)}); "
                "their model token counts are left out",
            )
        )
    return found


def _duplicates(merged: MergedScan) -> list[Issue]:
    hashes, lines = merged.example_hashes, merged.example_lines
    if len(hashes) < 2:
        return []
    order = np.lexsort((lines, hashes))  # by digest, then line
    hashes, lines = hashes[order], lines[order]
    repeat = np.zeros(len(hashes), bool)
    repeat[1:] = hashes[1:] == hashes[:-1]
    if not repeat.any():
        return []
    # The line of each group's first example, carried forward over the group.
    group_start = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(hashes))))
    pairs = sorted(zip(lines[repeat].tolist(), lines[group_start][repeat].tolist(), strict=True))
    count = len(pairs)
    where = ", ".join(f"line {line} = line {first}" for line, first in pairs[:FIRST_LINES])
    more = ", ..." if count > FIRST_LINES else ""
    return [
        Issue(
            pairs[0][0],
            "duplicate_example",
            f"{_examples(count)} exactly repeat an earlier one ({where}{more})",
        )
    ]


def _repeated_reply(merged: MergedScan) -> list[Issue]:
    replies = merged.reply_hashes
    if len(replies) < 2:
        return []
    values, counts = np.unique(replies, return_counts=True)
    top = int(counts.argmax())
    count = int(counts[top])
    if count < 2 or count <= REPEATED_REPLY_SHARE * len(replies):
        return []
    first = int(merged.example_lines[np.flatnonzero(replies == values[top])[0]])
    return [
        Issue(
            first,
            "repeated_assistant",
            f"{count} of {len(replies)} examples end with the same assistant reply (first at line "
            f"{first}): the model may learn to give only that answer",
        )
    ]


def _examples(count: int) -> str:
    return f"{count:,} example{'s' if count != 1 else ''}"


def _lines(tally: Tally) -> str:
    return (
        "line"
        + ("s " if len(tally.first) > 1 else " ")
        + ", ".join(str(line) for line, _ in tally.first)
        + _more(tally)
    )


def _more(tally: Tally) -> str:
    return ", ..." if tally.count > len(tally.first) else ""
