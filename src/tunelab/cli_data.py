"""``tunelab data``: check fine-tuning files and count their tokens before uploading them.

The checks are ``tunelab.data.validate.validate_file``, the same the server runs on every
upload and at job start; this module only resolves options and prints the reports.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Column, Table

from tunelab.data.encodings import ENCODING_NAMES, EncodingUnavailable
from tunelab.data.report import FileReport, Histogram, TokenStats
from tunelab.data.validate import validate_file

app = typer.Typer(
    help="Check fine-tuning data files (chat, preference, prompt/completion JSONL) and count their tokens.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)

EXIT_INVALID = 1
EXIT_USAGE = 2
_BAR_WIDTH = 40


@app.callback()
def _group() -> None:
    # A callback keeps "validate" a subcommand even while it is the only one.
    """Check fine-tuning data files and count their tokens."""


class UsageError(Exception):
    """A command-line mistake: reported in one line, exit status 2."""


@app.command()
def validate(
    paths: Annotated[list[Path], typer.Argument(metavar="PATH...", help="JSONL files to check.")],
    model: Annotated[
        str | None,
        typer.Option(
            "--model",
            help="Base model (id or local HF folder): count tokens with its chat template, as training "
            "does, and check examples against its context length.",
        ),
    ] = None,
    encodings: Annotated[
        list[str] | None,
        typer.Option(
            "--encoding",
            help=f"tiktoken encoding to count with: {' or '.join(ENCODING_NAMES)} (repeat for several). "
            "Default cl100k_base.",
        ),
    ] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", min=1, help="Context length to check against (default: the model's)."),
    ] = None,
    n_epochs: Annotated[
        int | None, typer.Option("--n-epochs", min=1, help="Planned epochs (default: the auto rule).")
    ] = None,
    max_errors: Annotated[int, typer.Option("--max-errors", min=1, help="Errors listed per file.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            help="Data folder whose model catalogue --model ids are looked up in "
            "(env TUNELAB_DATA_DIR, default ~/.tunelab).",
        ),
    ] = None,
) -> None:
    """Check files; exit 0 when all are valid, 1 when any has errors, 2 for usage errors."""
    try:
        names = _encoding_names(encodings)
        for path in paths:
            if not path.is_file():
                raise UsageError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
        tokenizer, context = _load_model(model, data_dir) if model else (None, None)
        reports = [
            validate_file(
                path,
                encodings=names,
                tokenizer=tokenizer,
                max_tokens=max_tokens or context,
                n_epochs=n_epochs,
                max_errors=max_errors,
            )
            for path in paths
        ]
    except (UsageError, EncodingUnavailable, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(EXIT_USAGE) from None
    if as_json:
        print(json.dumps({"files": [report.to_dict() for report in reports]}, indent=2))
    else:
        console = Console()
        for report in reports:
            _print_report(console, report)
    raise typer.Exit(0 if all(report.valid for report in reports) else EXIT_INVALID)


def _encoding_names(options: list[str] | None) -> tuple[str, ...]:
    # Accept "--encoding a --encoding b" and "--encoding a,b".
    names = [name.strip() for option in options or ["cl100k_base"] for name in option.split(",") if name.strip()]
    for name in names:
        if name not in ENCODING_NAMES:
            raise UsageError(f"unknown encoding {name!r}: choose {' or '.join(ENCODING_NAMES)}")
    return tuple(dict.fromkeys(names))


def _load_model(model: str, data_dir: Path | None) -> tuple[Any, int | None]:
    """The tokenizer and context length of a model: a local HF folder, or an id in the catalogue."""
    from transformers import AutoTokenizer  # heavy: only when a model is asked for

    from tunelab.models.folder import context_length, model_folder

    path = Path(model).expanduser()
    try:
        folder = model_folder(path) if path.is_dir() else _catalogue_folder(model, data_dir)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None:
        raise UsageError(f"{model}: the tokenizer has no chat template")
    return tokenizer, context_length(folder)


def _catalogue_folder(model_id: str, data_dir: Path | None) -> Path:
    from tunelab.config import Settings
    from tunelab.models.bundled import BundledModelMissing
    from tunelab.models.catalog import ModelNotFound, ensure_bundled, model_source
    from tunelab.store import Store

    settings = Settings(data_dir=data_dir) if data_dir else Settings()
    settings.data_path.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    ensure_bundled(store)
    try:
        return model_source(store, model_id, settings.cache_path).model_dir
    except ModelNotFound:
        raise UsageError(
            f"unknown model {model_id!r}: give a local HF folder or a model id (tunelab models list)"
        ) from None
    except BundledModelMissing as exc:
        raise UsageError(str(exc)) from exc


def _print_report(console: Console, report: FileReport) -> None:
    verdict = "[green]valid[/green]" if report.valid else "[red]invalid[/red]"
    # Messages quote the user's data, so everything from the report is escaped from rich markup.
    console.print(
        f"\n[bold]{escape(str(report.path))}[/bold]: {verdict}, {report.format or 'unknown'} format, "
        f"{report.examples:,} examples",
        soft_wrap=True,
    )
    if report.errors:
        table = Table("line", "code", "error", box=box.SIMPLE_HEAD)
        for issue in report.errors:
            table.add_row("-" if issue.line is None else str(issue.line), issue.code, escape(issue.message))
        console.print(table)
        if report.errors_omitted:
            console.print(f"  ... and {report.errors_omitted:,} more errors")
    for issue in report.warnings:
        console.print(
            f"[yellow]warning[/yellow] {issue.code}: {escape(issue.message)}", highlight=False, soft_wrap=True
        )
    primary = report.primary_tokens()
    if primary is not None:
        _print_tokens(console, report, *primary)


def _print_tokens(console: Console, report: FileReport, name: str, stats: TokenStats) -> None:
    """The statistics table, then the epochs and histogram of the primary tokenizer's counts."""
    table = Table(
        Column("tokens per example", no_wrap=True),
        "min",
        "max",
        "mean",
        "median",
        "p5",
        "p95",
        "per epoch",
        box=box.SIMPLE_HEAD,
    )
    for row_name, row in report.tokens.items():
        for label, dist in ((f"{row_name} total", row.total), ("  assistant", row.assistant)):
            table.add_row(
                label,
                f"{dist.min:,}",
                f"{dist.max:,}",
                f"{dist.mean:,.1f}",
                f"{dist.median:,.1f}",
                f"{dist.p5:,.1f}",
                f"{dist.p95:,.1f}",
                f"{row.trained_tokens_per_epoch:,}" if dist is row.total else "",
            )
    console.print(table)
    context = f"; context {report.max_tokens:,} tokens" if report.max_tokens else ""
    console.print(f"{report.n_epochs} epochs planned: {stats.trained_tokens:,} {name} tokens trained in all{context}")
    console.print(f"{name} tokens per example:")
    for line in histogram_lines(stats.histogram):
        console.print(f"  {line}", highlight=False)


def histogram_lines(histogram: Histogram, width: int = _BAR_WIDTH) -> list[str]:
    """Text bars, one per bin: "  47 -   49 | ████ 2"."""
    most = max(histogram.counts) or 1
    digits = len(f"{histogram.edges[-1]:,}")
    lines = []
    for low, high, count in zip(histogram.edges, histogram.edges[1:], histogram.counts, strict=False):
        bar = "█" * round(width * count / most)
        lines.append(f"{low:>{digits},} - {high - 1:>{digits},} | {bar} {count:,}")
    return lines
