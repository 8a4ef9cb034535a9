"""Faults against the real `tunelab serve`: its worker killed (idle, or mid-epoch with kill -9), the
server killed mid-upload, SIGTERM. Training runs on the tiny random model (registered with
`tunelab models add`), so each job takes seconds."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import SAMPLES
from tests.server import Server, start_server, stop_server

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# One training thread: bitwise-equal losses need the same thread count in both runs.
FAULT_ENV = {"TUNELAB_TRAIN_THREADS": "1", "TUNELAB_RESUME_EVERY": "0", "TUNELAB_WORKER_POLL_SECONDS": "0.5"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def wait_for(what: str, check, timeout: float = 180):
    deadline = time.time() + timeout
    while not (value := check()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def ready(server: Server) -> bool:
    try:
        return requests.get(f"{server.url}/ready", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def with_tiny_model(data_dir: Path, tiny_dir: Path) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "tunelab", "models", "add", str(tiny_dir), "--id", "tiny", "--data-dir", str(data_dir)],
        check=True,
        capture_output=True,
    )
    return data_dir


@pytest.fixture
def serving(tmp_path, tiny_dir):
    server = start_server(with_tiny_model(tmp_path / "data", tiny_dir), env=FAULT_ENV)
    yield server
    stop_server(server)


def upload(server: Server) -> str:
    with (SAMPLES / "training_set.jsonl").open("rb") as f:
        return server.openai().files.create(file=f, purpose="fine-tune").id


def results(server: Server, job) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(server.openai().files.content(job.result_files[0]).text)))


def test_sigterm_stops_the_worker_before_the_server_exits(serving):
    wait_for("a live worker", lambda: ready(serving))
    (worker,) = children(serving.proc.pid)
    # training yields the CPU to the API (TUNELAB_WORKER_NICE, 10 by default)
    assert os.getpriority(os.PRIO_PROCESS, worker) == min(19, os.getpriority(os.PRIO_PROCESS, serving.proc.pid) + 10)
    os.kill(serving.proc.pid, signal.SIGTERM)  # the server alone, as a service manager does
    serving.proc.wait(timeout=60)
    assert not alive(worker), "the worker outlived its server"  # before: uvicorn re-raised and skipped the cleanup
    assert "Application shutdown complete" in serving.log.read_text()


def test_a_killed_worker_is_restarted_and_the_queued_job_runs(serving):
    wait_for("a live worker", lambda: ready(serving))
    (first,) = children(serving.proc.pid)
    os.kill(first, signal.SIGKILL)
    second = wait_for("a new worker", lambda: [p for p in children(serving.proc.pid) if p != first])
    assert second
    wait_for("the new worker to beat", lambda: ready(serving))
    job = serving.openai().fine_tuning.jobs.create(
        model="tiny", training_file=upload(serving), hyperparameters={"n_epochs": 1}
    )
    done = serving.wait_job(job.id, timeout=300)
    assert done.status == "succeeded", done.error
    assert "embedded worker" in serving.log.read_text() and "killed by SIGKILL" in serving.log.read_text()


def test_kill_9_mid_epoch_goes_on_from_the_last_save_with_the_same_losses(serving):
    client = serving.openai()
    training_file = upload(serving)
    params = dict(model="tiny", training_file=training_file, seed=7, hyperparameters={"n_epochs": 20, "batch_size": 1})
    killed = client.fine_tuning.jobs.create(**params)  # 12 examples: 240 steps, saved after each

    def worker_and_step():
        events = list(client.fine_tuning.jobs.list_events(killed.id, limit=100).data)
        steps = [e.data["step"] for e in events if e.type == "metrics"]
        started = [e.message for e in events if "started on worker" in e.message]
        return (started[0].rsplit(":", 1)[1], max(steps)) if started and steps and max(steps) >= 5 else None

    pid, step = wait_for("step 5", worker_and_step)
    os.kill(int(pid), signal.SIGKILL)
    done = serving.wait_job(killed.id, timeout=600)
    assert done.status == "succeeded", done.error

    messages = [e.message for e in client.fine_tuning.jobs.list_events(killed.id, limit=1000).data]
    assert any("was killed by SIGKILL; it is restarted" in m for m in messages), messages[:20]
    resumed = [int(m) for m in re.findall(r"Training resumed at step (\d+):", "\n".join(messages))]
    # From its last save, not from the start. The kill may land between step `step`'s metrics
    # event and its save: then the job goes on at that step again, never earlier.
    assert resumed and resumed[0] >= step >= 5
    assert resumed[0] < 240

    straight = serving.wait_job(client.fine_tuning.jobs.create(**params).id, timeout=600)
    assert straight.status == "succeeded", straight.error
    assert [r["step"] for r in results(serving, done)] == [str(s) for s in range(1, 241)]
    assert results(serving, done) == results(serving, straight)  # bitwise, every step and column


def test_kill_9_of_the_server_mid_upload_loses_nothing_else(tmp_path):
    server = start_server(tmp_path / "data", worker=False)
    try:
        client = server.openai()
        kept = sorted([upload(server), upload(server)])
        job = client.fine_tuning.jobs.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file=kept[0])
        boundary = "tunelabfaultboundary"
        sent = threading.Event()

        def body():
            yield (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="half.jsonl"\r\n'
                "Content-Type: application/octet-stream\r\n\r\n"
            ).encode()
            for i in range(10_000):
                if i == 20:
                    sent.set()
                yield (b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 1000)
                time.sleep(0.01)

        def post():
            with contextlib.suppress(requests.RequestException):  # the server dies under it
                requests.post(
                    f"{server.url}/v1/files",
                    headers={"api-key": server.key, "content-type": f"multipart/form-data; boundary={boundary}"},
                    data=body(),
                    timeout=60,
                )

        uploader = threading.Thread(target=post, daemon=True)
        uploader.start()
        assert sent.wait(timeout=60)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(timeout=30)
        uploader.join(timeout=60)
    finally:
        stop_server(server)

    server = start_server(tmp_path / "data", worker=False)
    try:
        client = server.openai()
        assert sorted(f.id for f in client.files.list()) == kept
        assert all(f.status == "processed" for f in client.files.list())
        assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
        assert not list((tmp_path / "data" / "files").glob(".upload-*"))
    finally:
        stop_server(server)
