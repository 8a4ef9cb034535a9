"""Shared test fixtures: paths, the bundled and a tiny model, a throwaway PostgreSQL server.

No SDK or HTTP client here, so unit tests run without them; the server harness is tests/server.py.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_LAB = REPO.parent / "shared" / "lab"
SAMPLES = REPO / "src" / "tunelab" / "samples"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "test-key"


@pytest.fixture(scope="session", autouse=True)
def _isolated_default_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test reads or writes the user's ~/.tunelab: the default data dir is a temporary one.

    (The per-user model cache, ~/.cache/tunelab, is shared on purpose: the bundled model is imported once.)
    """
    patch = pytest.MonkeyPatch()
    patch.setenv("TUNELAB_DATA_DIR", str(tmp_path_factory.mktemp("default-data-dir")))
    yield
    patch.undo()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- models: the bundled one, and a tiny random llama with its tokenizer -----------------------------
@pytest.fixture(scope="session")
def bundled_dir() -> Path:
    from tunelab.models.bundled import BundledModelMissing, bundled_model_dir

    try:
        return bundled_model_dir(Path("~/.cache/tunelab").expanduser())
    except BundledModelMissing as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer(bundled_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_dir)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory, bundled_dir: Path, tokenizer) -> Path:
    """A 2-layer random-init llama with the bundled tokenizer: the recipe's mechanics in milliseconds."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# -- PostgreSQL: a real server in a temporary folder -----------------------------------------------------
def _postgres_binary(name: str) -> str | None:
    """``name`` on PATH, else in Debian's versioned folder (the client packages put only wrappers on PATH)."""
    for folder in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (folder / name).is_file():
            return str(folder / name)
    return shutil.which(name)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server (initdb + pg_ctl, fsync off); its SQLAlchemy URL."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install 'tunelab[postgres]')")
    initdb, pg_ctl = _postgres_binary("initdb"), _postgres_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
    root = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the cluster as the postgres user
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to own the cluster")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    port, data = free_port(), root / "data"
    subprocess.run(
        [*as_owner, initdb, "-D", str(data), "-U", "tunelab", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run(
        [*as_owner, pg_ctl, "-D", str(data), "-w", "-l", str(root / "server.log"), "-o", options, "start"],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg://tunelab@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def new_database(server_url: str, name: str) -> str:
    """CREATE DATABASE ``name`` on the server; its URL."""
    import psycopg

    with psycopg.connect(server_url.replace("postgresql+psycopg", "postgresql") + "/postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return f"{server_url}/{name}"
