"""What validating one file produces: issues, token statistics, and the report that holds them.

The same report is printed by ``tunelab data validate``, stored by the server with every
fine-tune upload, and read when a job starts; ``FileReport.to_dict`` is its JSON form.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Issue:
    """One error or warning found in a file."""

    line: int | None
    """1-based line of the example, or None for a problem with the whole file."""
    code: str
    """Stable snake_case code (see docs/data-validation.md)."""
    message: str
    """What is wrong, for a person to read."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return self.message if self.line is None else f"line {self.line}: {self.message}"


@dataclass(frozen=True)
class Distribution:
    """Summary of per-example token counts."""

    min: int
    max: int
    mean: float
    median: float
    p5: float
    """5th percentile (linear interpolation, as numpy's default)."""
    p95: float


@dataclass(frozen=True)
class Histogram:
    """Counts of examples per token-count bin: bin i holds edges[i] <= n < edges[i+1]."""

    edges: list[int]
    """len(counts) + 1 bin edges; the last bin also holds the maximum."""
    counts: list[int]


@dataclass(frozen=True)
class TokenStats:
    """Token statistics of one file under one tokenizer."""

    total: Distribution
    """Tokens per example, everything the model reads."""
    assistant: Distribution
    """Tokens per example in trained assistant turns (weight 1), what the loss is computed on."""
    trained_tokens_per_epoch: int
    """Sum over examples of min(total, max_tokens): what one epoch trains on after truncation."""
    trained_tokens: int
    """trained_tokens_per_epoch times the planned number of epochs."""
    histogram: Histogram
    """Distribution of total tokens per example."""
    truncated_examples: int = 0
    """Examples longer than max_tokens, which training cuts (0 when no context is checked)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FileReport:
    """The validation report of one file (see ``validate_file``)."""

    path: Path
    format: str | None
    """"chat", "preference", "prompt_completion", or None when no example was recognisable."""
    examples: int
    """Non-blank lines, valid or not."""
    errors: list[Issue] = field(default_factory=list)
    """The first errors, in line order (file-level errors last); at most ``max_errors``."""
    errors_omitted: int = 0
    """How many further errors were found but not listed."""
    warnings: list[Issue] = field(default_factory=list)
    """One entry per warning code, naming the first lines it concerns."""
    tokens: dict[str, TokenStats] = field(default_factory=dict)
    """Per tokenizer ("cl100k_base", "o200k_base", "model"), over the valid examples."""
    n_epochs: int | None = None
    """Planned epochs: the ones asked for, or the auto rule applied to the example count."""
    max_tokens: int | None = None
    """Context length examples are checked against (None: not checked)."""

    @property
    def valid(self) -> bool:
        return not self.errors and self.errors_omitted == 0

    def primary_tokens(self) -> tuple[str, TokenStats] | None:
        """The statistics to show first: the model's (what training sees), else the first asked for."""
        if "model" in self.tokens:
            return "model", self.tokens["model"]
        return next(iter(self.tokens.items()), None)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: path, format, examples, valid, errors, warnings, tokens, and extras."""
        return {
            "path": str(self.path),
            "format": self.format,
            "examples": self.examples,
            "valid": self.valid,
            "errors": [issue.to_dict() for issue in self.errors],
            "errors_omitted": self.errors_omitted,
            "warnings": [issue.to_dict() for issue in self.warnings],
            "tokens": {name: stats.to_dict() for name, stats in self.tokens.items()},
            "n_epochs": self.n_epochs,
            "max_tokens": self.max_tokens,
        }

    def summary(self) -> str:
        """One line for a person, e.g. "line 3: invalid JSON (...); 2 more errors"."""
        if not self.valid:
            more = len(self.errors) - 1 + self.errors_omitted
            tail = f"; {more} more error{'s' if more != 1 else ''}" if more else ""
            return f"{self.errors[0]}{tail}"
        parts = [f"valid {self.format} file: {self.examples:,} examples"]
        primary = self.primary_tokens()
        if primary is not None:
            name, stats = primary
            parts.append(f"{stats.trained_tokens:,} {name} tokens over {self.n_epochs} epochs")
        if self.warnings:
            n = len(self.warnings)
            parts.append(f"{n} warning{'s' if n != 1 else ''} ({', '.join(w.code for w in self.warnings)})")
        return ", ".join(parts)
