"""A job on 2 processes through the real server (``TUNELAB_TRAIN_PROCS=2``, gloo on CPU) and the SDK.

Its losses equal a one-process run of the same spec; it deploys and answers (sharded with FSDP:
tests/api/test_torchrun_worker.py); pause/resume goes on
with the same losses; a killed rank fails the job at once, never hangs it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.api.test_faults import children, wait_for
from tests.conftest import SAMPLES
from tests.server import Server, start_server_with_model, stop_server
from tests.training.conftest import RecordingHooks
from tests.training.test_distributed import LOSS_RTOL
from tunelab.training.hparams import JobSpec
from tunelab.training.recipe import TrainSpec, train

pytestmark = pytest.mark.integration
ENV = {"TUNELAB_TRAIN_PROCS": "2", "TUNELAB_WORKER_POLL_SECONDS": "0.5", "TUNELAB_RESUME_EVERY": "0"}
TRAINING = SAMPLES / "training_set.jsonl"
HP = {"n_epochs": 1, "batch_size": 4}


@pytest.fixture(scope="module")
def serving(tmp_path_factory, tiny_dir) -> Server:
    server = start_server_with_model(tmp_path_factory.mktemp("ddp") / "data", tiny_dir, "tiny", env=ENV)
    yield server
    stop_server(server)


@pytest.fixture(scope="module")
def training_file(serving) -> str:
    with TRAINING.open("rb") as f:
        return serving.openai().files.create(file=f, purpose="fine-tune").id


def losses(server: Server, job_id: str) -> dict[int, float]:
    events = server.openai().fine_tuning.jobs.list_events(job_id, limit=1000)
    return {e.data["step"]: e.data["train_loss"] for e in events if e.type == "metrics"}


def one_process_losses(tiny_dir: Path, tmp_path: Path, seed: int, **hp) -> list[float]:
    spec = TrainSpec(
        base_model_dir=tiny_dir,
        training_file=TRAINING,
        validation_file=None,
        output_dir=tmp_path / "one",
        seed=seed,
        hyperparameters=JobSpec(**(HP | hp)),
        cpu_threads=1,
    )
    hooks = RecordingHooks()
    train(spec, hooks)
    return [m["train_loss"] for m in hooks.metrics()]


def test_a_two_process_job_has_the_one_process_losses_and_deploys(serving, training_file, tiny_dir, tmp_path):
    check_losses_and_deploy(serving, training_file, tiny_dir, tmp_path, "on 2 processes:", {})


def check_losses_and_deploy(server: Server, training_file: str, tiny_dir: Path, tmp_path: Path, says: str, hp: dict):
    client = server.openai()
    job = client.fine_tuning.jobs.create(model="tiny", training_file=training_file, seed=11, hyperparameters=HP | hp)
    done = server.wait_job(job.id)
    assert done.status == "succeeded", done.error
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000)]
    assert any(says in m for m in events), events
    two = losses(server, job.id)
    one = one_process_losses(tiny_dir, tmp_path, 11, **hp)
    assert [two[s] for s in sorted(two)] == pytest.approx(one, rel=LOSS_RTOL)

    ckpt = client.fine_tuning.jobs.checkpoints.list(job.id).data[0]
    for name, model in (("ddp-final", done.fine_tuned_model), ("ddp-ckpt", ckpt.fine_tuned_model_checkpoint)):
        assert server.deploy(name, model)["properties"]["provisioningState"] == "Succeeded"
        answer = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
        )
        assert answer.usage.completion_tokens > 0


@pytest.mark.slow  # `make test` keeps the losses-and-deploy test of this module
def test_pause_and_resume_on_two_processes(serving, training_file):
    client = serving.openai()
    # 36 steps: long enough that the pause lands mid-training (3 epochs, 9 steps, could finish first)
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=training_file, seed=12, hyperparameters={"n_epochs": 12, "batch_size": 4}
    )
    serving.wait_training(job.id)
    client.fine_tuning.jobs.pause(job.id)
    held = {"paused", "succeeded", "failed", "cancelled"}
    wait_for("the job to pause", lambda: client.fine_tuning.jobs.retrieve(job.id).status in held, timeout=120)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    paused_at = max(losses(serving, job.id))
    client.fine_tuning.jobs.resume(job.id)
    done = serving.wait_job(job.id)
    assert done.status == "succeeded", done.error
    steps = losses(serving, job.id)
    assert max(steps) > paused_at and sorted(steps) == list(range(1, max(steps) + 1))


@pytest.mark.slow  # `make test` keeps the losses-and-deploy test of this module
def test_cancel_stops_every_rank(serving, training_file):
    client = serving.openai()
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=training_file, seed=14, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    serving.wait_training(job.id)
    (worker,) = children(serving.proc.pid)
    assert len(ranks(worker)) == 1
    client.fine_tuning.jobs.cancel(job.id)
    wait_for("every rank to stop", lambda: not ranks(worker), timeout=60)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert max(losses(serving, job.id)) < 600


@pytest.mark.slow  # `make test` keeps the losses-and-deploy test of this module
def test_a_killed_rank_fails_the_job_and_nothing_hangs(serving, training_file):
    client = serving.openai()
    job = client.fine_tuning.jobs.create(
        model="tiny", training_file=training_file, seed=13, hyperparameters={"n_epochs": 50, "batch_size": 1}
    )
    serving.wait_training(job.id)
    (worker,) = children(serving.proc.pid)
    (rank_1,) = ranks(worker)
    os.kill(rank_1, signal.SIGKILL)
    started = time.monotonic()
    done = serving.wait_job(job.id, timeout=120)
    assert done.status == "failed", done.status
    assert "stopped answering" in done.error.message and time.monotonic() - started < 120
    wait_for("no rank left over", lambda: not ranks(worker), timeout=60)
    assert children(serving.proc.pid) == [worker]  # the worker lives on for the next job


def ranks(worker: int) -> list[int]:
    return [
        pid for pid in children(worker) if b"tunelab.training.distributed" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
