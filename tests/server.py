"""The real server on a free port, driven by the real openai SDK and plain HTTP (integration tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from openai import AzureOpenAI, OpenAI

from tests.conftest import KEY, free_port


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
        return (
            f"{self.url}/subscriptions/sub/resourceGroups/rg/providers/"
            f"Microsoft.CognitiveServices/accounts/acct/deployments/{name}"
        )

    def deploy(self, name: str, model: str, timeout: float = 120) -> dict:
        """PUT a deployment the way the lab does and wait until it is provisioned."""
        url, headers = self.deployment_url(name), {"Authorization": f"Bearer {self.key}"}
        body = {
            "sku": {"name": "standard", "capacity": 1},
            "properties": {"model": {"format": "OpenAI", "name": model, "version": "1"}},
        }
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


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    # The built-in engine unless a test asks for another (a .venv-vllm beside the checkout would
    # otherwise make "auto" start vLLM for every test server and for every worker's eval runs).
    return {**os.environ, "TUNELAB_API_KEY": KEY, "TUNELAB_SERVING_ENGINE": "builtin", **(extra or {})}


def start_worker(data_dir: Path, *, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    """A `tunelab worker` on ``data_dir``'s store, in its own process group (stop it with killpg)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tunelab", "worker", "--data-dir", str(data_dir)],
        env=_env(env),
        stdout=(log or data_dir.parent / "worker.log").open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_server(data_dir: Path, *, worker: bool = True, env: dict[str, str] | None = None) -> Server:
    port = free_port()
    log = data_dir.parent / f"{data_dir.name}-server.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    if not worker:
        cmd.append("--no-worker")
    full_env = _env(env)
    proc = subprocess.Popen(cmd, env=full_env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            if requests.get(f"{url}/health", timeout=1).ok:
                return Server(url, KEY, data_dir, proc, log)
        except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy starting
            time.sleep(0.2)
    stop_server(Server(url, KEY, data_dir, proc, log))
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def start_server_with_model(
    data_dir: Path, model_dir: Path, model_id: str, *, env: dict[str, str] | None = None, worker: bool = True
) -> Server:
    """A server on a new data dir where ``model_dir`` is registered as base model ``model_id``
    (``tunelab models add``, as a user would)."""
    data_dir.mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "tunelab",
            "models",
            "add",
            str(model_dir),
            "--id",
            model_id,
            "--data-dir",
            str(data_dir),
        ],
        check=True,
        capture_output=True,
    )
    return start_server(data_dir, env=env, worker=worker)


def stop_server(server: Server) -> None:
    try:
        os.killpg(server.proc.pid, signal.SIGTERM)  # the server and its embedded worker
        server.proc.wait(timeout=20)
    except ProcessLookupError:  # already gone (a test stopped or killed it)
        pass
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.proc.pid, signal.SIGKILL)
