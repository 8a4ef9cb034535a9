"""Test harness: the real server process on a free port, driven by the real openai SDK."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from openai import AzureOpenAI, OpenAI

REPO = Path(__file__).resolve().parents[1]
SHARED_LAB = REPO.parent / "shared" / "lab"
SAMPLES = REPO / "src" / "tunelab" / "samples"
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    key: str
    data_dir: Path
    proc: subprocess.Popen
    log: Path

    def openai(self, key: str | None = None) -> OpenAI:
        return OpenAI(base_url=f"{self.url}/v1", api_key=key or self.key, max_retries=0)

    def azure(self, api_version: str = "2024-05-01-preview") -> AzureOpenAI:
        return AzureOpenAI(azure_endpoint=self.url, api_key=self.key, api_version=api_version, max_retries=0)

    def deployment_url(self, name: str) -> str:
        return (f"{self.url}/subscriptions/sub/resourceGroups/rg/providers/"
                f"Microsoft.CognitiveServices/accounts/acct/deployments/{name}")

    def deploy(self, name: str, model: str, timeout: float = 120) -> dict:
        """PUT a deployment the way the lab does and wait until it is provisioned."""
        url, headers = self.deployment_url(name), {"Authorization": f"Bearer {self.key}"}
        body = {"sku": {"name": "standard", "capacity": 1},
                "properties": {"model": {"format": "OpenAI", "name": model, "version": "1"}}}
        r = requests.put(url, params={"api-version": "2023-05-01"}, headers=headers, json=body)
        assert r.status_code in (200, 201), r.text
        deadline = time.time() + timeout
        while r.json()["properties"]["provisioningState"] == "Creating" and time.time() < deadline:
            time.sleep(0.3)
            r = requests.get(url, params={"api-version": "2023-05-01"}, headers=headers)
        return r.json()

    def wait_training(self, job_id: str, timeout: float = 600) -> None:
        """Wait until the job has trained its first step."""
        jobs, deadline = self.openai().fine_tuning.jobs, time.time() + timeout
        while not any(e.type == "metrics" for e in jobs.list_events(job_id)):
            assert time.time() < deadline, "the job never started training"
            time.sleep(0.5)

    def wait_job(self, job_id: str, timeout: float = 600):
        client = self.openai()
        deadline = time.time() + timeout
        while True:
            job = client.fine_tuning.jobs.retrieve(job_id)
            if job.status in ("succeeded", "failed", "cancelled") or time.time() > deadline:
                return job
            time.sleep(1)


def start_server(data_dir: Path, *, worker: bool = True, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    log = data_dir.parent / f"{data_dir.name}-server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    if not worker:
        cmd.append("--no-worker")
    full_env = {**os.environ, "TUNELAB_API_KEY": KEY, **(env or {})}
    proc = subprocess.Popen(cmd, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return Server(url, KEY, data_dir, proc, log)
        except requests.ConnectionError:
            time.sleep(0.2)
    stop_server(Server(url, KEY, data_dir, proc, log))
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)  # the server and its embedded worker
        server.proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(server.proc.pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("srv") / "data")
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def client(server: Server) -> OpenAI:
    return server.openai()


@pytest.fixture(scope="session")
def lab_files(client: OpenAI) -> tuple[str, str]:
    """The bundled sample data uploaded once: (training file id, validation file id)."""
    ids = []
    for name in ("training_set.jsonl", "validation_set.jsonl"):
        with (SAMPLES / name).open("rb") as f:
            ids.append(client.files.create(file=f, purpose="fine-tune").id)
    return ids[0], ids[1]


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
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
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
    subprocess.run([*as_owner, initdb, "-D", str(data), "-U", "tunelab", "--auth=trust", "-E", "UTF8", "--no-sync"],
                   check=True, capture_output=True)
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    subprocess.run([*as_owner, pg_ctl, "-D", str(data), "-w", "-l", str(root / "server.log"), "-o", options, "start"],
                   check=True, capture_output=True)
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
