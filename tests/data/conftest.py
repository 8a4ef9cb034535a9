"""Fixtures for the data-layer tests: small JSONL files written on the fly."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.helpers import LAB, Line, WriteJsonl, encode_line


@pytest.fixture
def write_jsonl(tmp_path: Path) -> WriteJsonl:
    """write_jsonl(lines, name="data.jsonl", prefix=b"") -> Path; dicts are JSON-encoded."""

    def write(lines: list[Line], name: str = "data.jsonl", prefix: bytes = b"") -> Path:
        path = tmp_path / name
        path.write_bytes(prefix + b"".join(encode_line(line) + b"\n" for line in lines))
        return path

    return write


@pytest.fixture
def lab_dir() -> Path:
    if not (LAB / "lab_client.py").is_file():
        pytest.skip("../shared/lab is not available")
    return LAB.resolve()
