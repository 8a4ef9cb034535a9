"""Validating a fine-tuning file: the one implementation behind the CLI, uploads and job start.

    report = validate_file(Path("train.jsonl"), encodings=("cl100k_base",))
    report.valid, report.summary(), report.to_dict()

The file is streamed. A large file is cut into byte ranges scanned by worker processes (one
per core): tokenizing is the bulk of the work, and tiktoken's own batch threads lose to
processes on many short strings.
"""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.context
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.encodings import RANK_FILES, EncodingUnavailable, get_encoding
from tunelab.data.formats import detect_format, parse_line
from tunelab.data.lines import iter_lines, split_points
from tunelab.data.merge import MergedScan, merge_scans, warnings_of
from tunelab.data.report import FileReport, Issue, TokenStats
from tunelab.data.scan import RangeScan, ScanJob, scan_range
from tunelab.data.stats import auto_n_epochs, distribution, histogram

MIN_EXAMPLES = 10
"""Fewest examples a fine-tuning file may hold (as the OpenAI API requires)."""
BYTES_PER_WORKER = 8 * 1024 * 1024
"""Below this much data per worker, starting a process costs more than it saves."""
BYTES_PER_STOP_CHECK = 1024 * 1024
"""With ``should_stop``, the file is scanned in ranges of about this size, asking between them."""


class Stopped(Exception):
    """``validate_file``'s ``should_stop`` said to stop; the file was not scanned to its end."""


def validate_file(
    path: Path,
    *,
    encodings: Sequence[str] = ("cl100k_base",),
    tokenizer: Any = None,
    max_tokens: int | None = None,
    n_epochs: int | None = None,
    max_errors: int = 20,
    workers: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> FileReport:
    """Check a JSONL fine-tuning file and count its tokens; never fails on the file's content.

    Args:
        path: the file (chat, preference or prompt/completion JSONL).
        encodings: tiktoken encodings to count with (cl100k_base, o200k_base).
        tokenizer: the base model's Hugging Face tokenizer, with a chat template, or None. Its
            counts (what training sees) are keyed "model" and checked against ``max_tokens``.
        max_tokens: the context length; longer examples get a ``too_long`` warning. None: no check.
        n_epochs: planned epochs for the trained-token totals; None: ``auto_n_epochs``.
        max_errors: errors listed in the report; the rest are only counted.
        workers: processes to scan with; None: one per core for large files, else 1.
        should_stop: asked about every megabyte (the file is then scanned in this process, range
            by range); True stops the scan.

    Raises:
        EncodingUnavailable: an unknown encoding name.
        OSError: the file cannot be read (missing, a directory, no permission).
        Stopped: ``should_stop`` returned True.
    """
    for name in encodings:
        if name not in RANK_FILES:
            raise EncodingUnavailable(f"unknown encoding {name!r}: choose one of {', '.join(RANK_FILES)}")
    if max_errors < 1:
        raise ValueError("max_errors must be at least 1")
    size = os.path.getsize(path)  # raises for a missing file before any work starts
    file_format, format_line = _first_format(path)
    n_workers = 1 if should_stop is not None else workers or _default_workers(size)
    points = split_points(path, max(1, size // BYTES_PER_STOP_CHECK) if should_stop is not None else n_workers)
    jobs = [
        ScanJob(path, start, end, file_format, format_line, tuple(encodings), tokenizer, max_tokens, max_errors)
        for start, end in itertools.pairwise(points)
    ]
    merged = merge_scans(_run(jobs, n_workers, should_stop), max_errors)
    context_counter = "model" if tokenizer is not None else (encodings[-1] if encodings else None)
    return _report(path, file_format, merged, max_tokens, n_epochs, max_errors, context_counter)


def _first_format(path: Path) -> tuple[str | None, int | None]:
    """The format of the first example whose keys announce one, and its line."""
    for raw in iter_lines(path):
        if raw.too_long or not raw.data.strip():
            continue
        example, problem = parse_line(raw)
        if problem is None and isinstance(example, dict):
            fmt = detect_format(example)
            if fmt is not None:
                return fmt, raw.number
    return None, None


def _default_workers(size: int) -> int:
    cores = len(os.sched_getaffinity(0)) if sys.platform == "linux" else (os.cpu_count() or 1)
    return max(1, min(cores, size // BYTES_PER_WORKER))


def _run(jobs: list[ScanJob], workers: int, should_stop: Callable[[], bool] | None) -> list[RangeScan]:
    if workers == 1:
        scans: list[RangeScan] = []
        for job in jobs:
            if should_stop is not None and should_stop():
                raise Stopped(f"stopped after {len(scans)} of {len(jobs)} parts of {job.path}")
            scans.append(scan_range(job))
        return scans
    with ProcessPoolExecutor(max_workers=workers, mp_context=_process_context(jobs[0])) as pool:
        return list(pool.map(scan_range, jobs))


def _process_context(job: ScanJob) -> multiprocessing.context.BaseContext:
    # fork starts a worker in milliseconds with the encodings already loaded, but is unsafe in a
    # process with other threads (the server; a tokenizer's thread pool): spawn there.
    if sys.platform == "linux" and threading.active_count() == 1 and job.tokenizer is None:
        for name in job.encodings:
            get_encoding(name)  # loaded once here, inherited by every worker
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _report(
    path: Path,
    file_format: str | None,
    merged: MergedScan,
    max_tokens: int | None,
    n_epochs: int | None,
    max_errors: int,
    context_counter: str | None,
) -> FileReport:
    valid_examples = len(merged.example_lines)
    epochs = n_epochs if n_epochs is not None else auto_n_epochs(valid_examples)
    file_errors = []
    if merged.examples == 0:
        file_errors.append(Issue(None, "empty_file", "the file holds no examples"))
    elif merged.examples < MIN_EXAMPLES:
        file_errors.append(
            Issue(None, "too_few_examples", f"{merged.examples} examples: at least {MIN_EXAMPLES} are needed")
        )
    # The line-numbered errors first: they say what to fix ("too few examples" follows from them).
    errors = (merged.errors + file_errors)[:max_errors]
    return FileReport(
        path=path,
        format=file_format,
        examples=merged.examples,
        errors=errors,
        errors_omitted=merged.error_count + len(file_errors) - len(errors),
        warnings=warnings_of(merged, max_tokens=max_tokens, context_counter=context_counter),
        tokens=_token_stats(merged, max_tokens, epochs),
        n_epochs=epochs,
        max_tokens=max_tokens,
    )


def _token_stats(merged: MergedScan, max_tokens: int | None, epochs: int) -> dict[str, TokenStats]:
    stats = {}
    for name, totals in merged.totals.items():
        counted = totals >= 0  # the model's template may have failed on some examples
        if not counted.any():
            continue
        total, assistant = totals[counted], merged.assistants[name][counted]
        per_epoch = int(np.minimum(total, max_tokens).sum() if max_tokens is not None else total.sum())
        stats[name] = TokenStats(
            total=distribution(total),
            assistant=distribution(assistant),
            trained_tokens_per_epoch=per_epoch,
            trained_tokens=per_epoch * epochs,
            histogram=histogram(total),
            truncated_examples=int((total > max_tokens).sum()) if max_tokens is not None else 0,
        )
    return stats
