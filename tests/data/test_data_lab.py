"""cl100k_base counts equal the lab's own functions; offline encodings match tiktoken's."""

from __future__ import annotations

import ast
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiktoken
import tiktoken_ext.openai_public

from tunelab.data.counting import TiktokenCounter
from tunelab.data.encodings import (
    RANK_FILES,
    EncodingUnavailable,
    get_encoding,
    install_tiktoken_cache,
)
from tunelab.data.formats import Conversation
from tunelab.data.validate import validate_file

LAB_FUNCTIONS = ("num_tokens_from_messages", "num_assistant_tokens_from_messages")


def lab_functions(lab_dir: Path) -> dict[str, Callable[..., int]]:
    """The lab's two counting functions, taken from its source, bound to cl100k_base."""
    tree = ast.parse((lab_dir / "lab_client.py").read_text(encoding="utf-8"))
    defs = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in LAB_FUNCTIONS]
    assert len(defs) == 2
    namespace: dict[str, Any] = {"encoding": get_encoding("cl100k_base")}
    code = compile(ast.Module(body=defs, type_ignores=[]), str(lab_dir / "lab_client.py"), "exec")
    exec(code, namespace)  # noqa: S102 - the lab's own functions, from its source
    return {name: namespace[name] for name in LAB_FUNCTIONS}


@pytest.mark.parametrize("name", ["training_set.jsonl", "validation_set.jsonl"])
def test_counts_equal_the_labs_on_its_files(lab_dir: Path, name: str) -> None:
    lab = lab_functions(lab_dir)
    path = lab_dir / name
    dataset = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    counter = TiktokenCounter("cl100k_base")
    lab_total = [lab["num_tokens_from_messages"](ex["messages"]) for ex in dataset]
    lab_assistant = [lab["num_assistant_tokens_from_messages"](ex["messages"]) for ex in dataset]
    ours = [counter.count(Conversation(ex["messages"])) for ex in dataset]
    assert ours == list(zip(lab_total, lab_assistant, strict=True))

    report = validate_file(path)
    assert report.valid
    for dist, values in (
        (report.tokens["cl100k_base"].total, lab_total),
        (report.tokens["cl100k_base"].assistant, lab_assistant),
    ):
        assert (dist.min, dist.max) == (min(values), max(values))
        assert dist.mean == pytest.approx(np.mean(values)) and dist.median == np.median(values)


def test_counts_equal_the_labs_on_varied_messages(lab_dir: Path) -> None:
    """String contents with names, several turns, odd whitespace and unicode."""
    lab = lab_functions(lab_dir)
    counter = TiktokenCounter("cl100k_base")
    rng = random.Random(11)
    words = ["hello", "  spaced  ", "naïve", "東京", "😀", "don't", "x\n\ny", "\t", "1234567", "<|endoftext|>", ""]
    for _ in range(300):
        messages = []
        for role in ["system", "user", "assistant"] * rng.randint(1, 3):
            message = {"role": role, "content": " ".join(rng.choice(words) for _ in range(rng.randint(0, 12)))}
            if rng.random() < 0.3:
                message["name"] = rng.choice(["ada", "bob_2", "Zoë"])
            messages.append(message)
        if "<|endoftext|>" in json.dumps(messages):
            continue  # the lab's encode() refuses special tokens; we count them as text
        expected = (lab["num_tokens_from_messages"](messages), lab["num_assistant_tokens_from_messages"](messages))
        assert counter.count(Conversation(messages)) == expected


def test_encodings_are_tiktokens_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same rank URL and hash as tiktoken's constructors, same regex and special tokens."""
    requested: dict[str, tuple[str, str | None]] = {}

    def record(url: str, expected_hash: str | None = None) -> dict[bytes, int]:
        requested[url.rsplit("/", 1)[-1].removesuffix(".tiktoken")] = (url, expected_hash)
        return {}

    with monkeypatch.context() as patch:
        patch.setattr(tiktoken_ext.openai_public, "load_tiktoken_bpe", record)
        constructors = {name: tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]() for name in RANK_FILES}
    for name, rank_file in RANK_FILES.items():
        assert requested[name] == (rank_file.url, rank_file.sha256)
        encoding = get_encoding(name)
        assert encoding._pat_str == constructors[name]["pat_str"]
        assert encoding._special_tokens == constructors[name]["special_tokens"]
        assert encoding.encode("hello world") == encoding.encode_ordinary("hello world")
    assert get_encoding("cl100k_base").encode("hello world") == [15339, 1917]
    assert get_encoding("o200k_base").encode("hello world") == [24912, 2375]


def test_unknown_encoding() -> None:
    with pytest.raises(EncodingUnavailable, match="unknown encoding 'p50k_base'"):
        get_encoding("p50k_base")


def test_install_tiktoken_cache_serves_plain_tiktoken_offline(tmp_path: Path) -> None:
    cache = install_tiktoken_cache(tmp_path / "tiktoken")
    assert cache == tmp_path / "tiktoken" and len(list(cache.iterdir())) == 2
    script = (
        "import tiktoken, tiktoken.load as load\n"
        "def offline(url): raise SystemExit('tried to download ' + url)\n"
        "load.read_file = offline\n"
        "print(tiktoken.get_encoding('cl100k_base').encode('hello world'),"
        " tiktoken.get_encoding('o200k_base').encode('hello world'))\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
    result = subprocess.run(
        [sys.executable, "-c", script], check=False, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[15339, 1917] [24912, 2375]"


def test_a_corrupt_cache_file_is_replaced(tmp_path: Path) -> None:
    cache = install_tiktoken_cache(tmp_path)
    [target] = [p for p in cache.iterdir() if p.stat().st_size < 2_000_000]  # cl100k_base
    target.write_bytes(b"garbage")
    install_tiktoken_cache(cache)
    assert target.stat().st_size > 1_000_000


def test_empty_tiktoken_cache_dir_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.data import encodings

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    with pytest.raises(EncodingUnavailable, match="TIKTOKEN_CACHE_DIR is empty"):
        encodings._tiktoken_cache_dir()


def test_get_encoding_is_plain_tiktokens_encoding() -> None:
    assert get_encoding("cl100k_base") is tiktoken.get_encoding("cl100k_base")
