"""The report's JSON form and one-line summary, and the statistics behind them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.data.helpers import WriteJsonl, chats
from tunelab.data.stats import auto_n_epochs, distribution, histogram
from tunelab.data.validate import validate_file

STATS_KEYS = {"min", "max", "mean", "median", "p5", "p95"}


def test_to_dict_has_the_documented_schema(write_jsonl: WriteJsonl) -> None:
    path = write_jsonl([*chats(10), "not json"])
    report = validate_file(path, encodings=("cl100k_base", "o200k_base"), max_tokens=4096)
    data = json.loads(json.dumps(report.to_dict()))  # JSON-serialisable as is
    assert {"path", "format", "examples", "valid", "errors", "warnings", "tokens"} <= data.keys()
    assert data["path"] == str(path) and data["format"] == "chat" and data["examples"] == 11
    assert data["valid"] is False
    assert data["errors"] == [{"line": 11, "code": "invalid_json", "message": report.errors[0].message}]
    assert data["warnings"] == []
    assert set(data["tokens"]) == {"cl100k_base", "o200k_base"}
    for stats in data["tokens"].values():
        assert set(stats["total"]) == STATS_KEYS and set(stats["assistant"]) == STATS_KEYS
        assert stats["trained_tokens"] == stats["trained_tokens_per_epoch"] * data["n_epochs"]
        assert sum(stats["histogram"]["counts"]) == 10
    assert data["n_epochs"] == 10 and data["max_tokens"] == 4096


def test_warnings_in_json_have_line_code_message(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl([*chats(10), chats(1)[0]]))
    [warning] = report.to_dict()["warnings"]
    assert set(warning) == {"line", "code", "message"} and warning["code"] == "duplicate_example"


def test_summary_of_a_valid_file(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl(chats(20)), n_epochs=2)
    per_epoch = report.tokens["cl100k_base"].trained_tokens_per_epoch
    assert report.summary() == f"valid chat file: 20 examples, {2 * per_epoch:,} cl100k_base tokens over 2 epochs"


def test_summary_names_the_first_error(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl([*chats(2), '{"messages": [1 2]}', *chats(8), "[]", "[]"]))
    assert report.summary() == "line 3: invalid JSON (Expecting ',' delimiter) at column 17; 2 more errors"


def test_summary_of_a_file_level_error(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl(chats(3)))
    assert report.summary() == "3 examples: at least 10 are needed"


def test_summary_leads_with_the_line_errors_before_the_file_level_ones(write_jsonl: WriteJsonl) -> None:
    # A short file whose first line is broken: the line to fix comes first, not "too few examples".
    report = validate_file(write_jsonl(['{"messages": [}', *chats(1)]))
    assert report.summary().startswith("line 1: invalid JSON")
    assert report.summary().endswith("; 1 more error")
    assert [e.code for e in report.errors][-1] == "too_few_examples"


def test_a_scan_that_is_told_to_stop_raises_stopped(write_jsonl: WriteJsonl, monkeypatch) -> None:
    from tunelab.data import validate

    monkeypatch.setattr(validate, "BYTES_PER_STOP_CHECK", 200)  # several parts even for a small file
    path = write_jsonl(chats(40))
    asked = []
    with pytest.raises(validate.Stopped):
        validate_file(path, should_stop=lambda: asked.append(1) or len(asked) > 2)
    assert len(asked) == 3
    # Scanned part by part it gives the report of one scan.
    assert validate_file(path, should_stop=lambda: False).to_dict() == validate_file(path).to_dict()


def test_trained_tokens_use_the_auto_epochs(write_jsonl: WriteJsonl) -> None:
    report = validate_file(write_jsonl(chats(10)))
    assert report.n_epochs == 10
    stats = report.tokens["cl100k_base"]
    assert stats.trained_tokens == 10 * stats.trained_tokens_per_epoch


@pytest.mark.parametrize(
    ("examples", "epochs"),
    [
        (0, 25),
        (1, 25),
        (3, 25),
        (4, 25),
        (5, 20),
        (10, 10),
        (33, 3),
        (34, 3),
        (100, 3),
        (8333, 3),
        (8334, 2),
        (12_501, 1),
        (30_000, 1),
    ],
)
def test_auto_n_epochs_is_the_cookbook_rule(examples: int, epochs: int) -> None:
    assert auto_n_epochs(examples) == epochs


def test_distribution_matches_numpy() -> None:
    values = np.array([5, 1, 9, 3, 3, 8, 2])
    d = distribution(values)
    assert (d.min, d.max, d.mean, d.median) == (1, 9, float(np.mean(values)), 3.0)
    assert d.p5 == pytest.approx(np.percentile(values, 5)) and d.p95 == pytest.approx(np.percentile(values, 95))


def test_histogram_bins_cover_every_value() -> None:
    values = np.array([47, 47, 50, 62, 55, 48])
    h = histogram(values)
    assert h.edges[0] == 47 and h.edges[-1] == 63 and sum(h.counts) == len(values)
    assert histogram(np.array([7, 7, 7])).counts == [3]
