"""``tunelab data validate``: output, JSON schema and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.data.helpers import WriteJsonl, chats
from tunelab.cli_data import app, histogram_lines
from tunelab.data.report import Histogram

runner = CliRunner()


def test_valid_files_exit_0_with_a_readable_report(write_jsonl: WriteJsonl) -> None:
    path = write_jsonl(chats(12))
    result = runner.invoke(app, ["validate", str(path), "--encoding", "cl100k_base", "--encoding", "o200k_base"])
    assert result.exit_code == 0, result.output
    assert f"{path}: valid, chat format, 12 examples" in result.output
    assert "cl100k_base total" in result.output and "o200k_base total" in result.output
    assert "8 epochs planned" in result.output  # auto: 100 // 12
    assert "█" in result.output  # the histogram


def test_any_invalid_file_exits_1(write_jsonl: WriteJsonl) -> None:
    good = write_jsonl(chats(10), name="good.jsonl")
    bad = write_jsonl([*chats(10), "{"], name="bad.jsonl")
    result = runner.invoke(app, ["validate", str(good), str(bad)])
    assert result.exit_code == 1
    assert "invalid_json" in result.output and "bad.jsonl: invalid" in result.output


def test_markup_in_the_data_is_printed_as_is(write_jsonl: WriteJsonl) -> None:
    bad = {"messages": [{"role": "[/bold]", "content": "x"}, {"role": "assistant", "content": "y"}]}
    result = runner.invoke(app, ["validate", str(write_jsonl([*chats(10), bad], name="[red]x.jsonl"))])
    assert result.exit_code == 1
    assert 'role "[/bold]"' in result.output and "[red]x.jsonl" in result.output


def test_json_output_has_the_documented_schema(write_jsonl: WriteJsonl) -> None:
    good = write_jsonl(chats(10), name="good.jsonl")
    bad = write_jsonl([*chats(10), "[]", chats(1)[0]], name="bad.jsonl")
    result = runner.invoke(app, ["validate", str(good), str(bad), "--json", "--encoding", "cl100k_base,o200k_base"])
    assert result.exit_code == 1
    files = json.loads(result.stdout)["files"]
    assert [f["path"] for f in files] == [str(good), str(bad)]
    assert [f["valid"] for f in files] == [True, False]
    assert files[1]["errors"] == [{"line": 11, "code": "not_an_object", "message": "an example must be a JSON object"}]
    assert files[1]["warnings"][0]["code"] == "duplicate_example"
    for f in files:
        assert {"path", "format", "examples", "valid", "errors", "warnings", "tokens"} <= f.keys()
        assert set(f["tokens"]) == {"cl100k_base", "o200k_base"}
        assert set(f["tokens"]["o200k_base"]["assistant"]) == {"min", "max", "mean", "median", "p5", "p95"}


def test_max_tokens_and_epochs(write_jsonl: WriteJsonl) -> None:
    path = write_jsonl(chats(10))
    result = runner.invoke(app, ["validate", str(path), "--json", "--max-tokens", "20", "--n-epochs", "2"])
    assert result.exit_code == 0
    [report] = json.loads(result.stdout)["files"]
    assert report["max_tokens"] == 20 and report["n_epochs"] == 2
    assert report["warnings"][0]["code"] == "too_long"
    assert report["tokens"]["cl100k_base"]["trained_tokens"] == 2 * 10 * 20


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["validate", "missing.jsonl"], "error: missing.jsonl: no such file"),
        (["validate", "{file}", "--encoding", "p50k_base"], "error: unknown encoding 'p50k_base'"),
        (["validate", "{file}", "--model", "no/such-model"], "error: unknown model 'no/such-model'"),
        (["validate", "{dir}"], "error: {dir}: not a file"),
    ],
    ids=["missing-file", "unknown-encoding", "unknown-model", "directory"],
)
def test_usage_errors_exit_2_in_one_line(
    write_jsonl: WriteJsonl, tmp_path: Path, args: list[str], message: str
) -> None:
    path = write_jsonl(chats(10))
    args = [a.format(file=path, dir=tmp_path) for a in args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.startswith(message.format(dir=tmp_path)) and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


def test_a_folder_without_config_is_not_a_model(write_jsonl: WriteJsonl, tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(write_jsonl(chats(10))), "--model", str(tmp_path)])
    assert result.exit_code == 2 and "not a Hugging Face model folder" in result.stderr


def test_histogram_lines() -> None:
    lines = histogram_lines(Histogram(edges=[10, 20, 30, 40], counts=[2, 0, 4]), width=8)
    assert lines == ["10 - 19 | ████ 2", "20 - 29 |  0", "30 - 39 | ████████ 4"]
