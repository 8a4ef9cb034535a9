"""The lab end to end through the SDK: upload → job → events, checkpoints, results → deploy → chat."""

import csv
import io
import os
import re
import subprocess
import sys
import time

import openai
import pytest
import requests

from tests.conftest import BASE_MODEL, SAMPLES, SHARED_LAB
from tests.server import start_server, start_server_with_model, stop_server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.e2e]
QUESTION = [
    {"role": "system", "content": "Marv is a factual chatbot that is also a little sarcastic."},
    {"role": "user", "content": "What is the capital of Portugal?"},
]


@pytest.fixture(scope="module")
def finished_job(client, uploaded_lab_files):
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=uploaded_lab_files[0],
        validation_file=uploaded_lab_files[1],
        seed=105,
        suffix="lab",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
    )
    assert job.status in ("queued", "running")
    assert job.seed == 105
    return job.id


def test_job_succeeds_with_a_fine_tuned_model(server, client, finished_job):
    job = server.wait_job(finished_job)
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model.startswith(f"ft:{BASE_MODEL}:lab:")
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    assert job.hyperparameters.n_epochs == 2
    assert isinstance(job.hyperparameters.batch_size, int)  # "auto" resolved
    assert isinstance(job.hyperparameters.learning_rate_multiplier, float)
    assert job.fine_tuned_model in [m.id for m in client.models.list()]


def test_events_auto_page_to_the_end_newest_first(server, client, finished_job):
    server.wait_job(finished_job)
    events = list(client.fine_tuning.jobs.list_events(finished_job, limit=3))  # SDK follows has_more/after
    assert len(events) == len({e.id for e in events}) > 3
    assert events[0].message == "The job has successfully completed"
    assert events[-1].message.startswith("Validating training file")
    metrics = [e for e in events if e.type == "metrics"]
    assert metrics and all("train_loss" in e.data for e in metrics)
    steps = [e.data["step"] for e in metrics]
    assert steps == sorted(steps, reverse=True)


def test_checkpoints_one_per_epoch_with_openai_metrics(server, client, finished_job):
    server.wait_job(finished_job)
    ckpts = client.fine_tuning.jobs.checkpoints.list(finished_job).data
    assert len(ckpts) == 2
    for c in ckpts:
        assert c.fine_tuned_model_checkpoint.endswith(f":ckpt-step-{c.step_number}")
        assert c.metrics.train_loss is not None and c.metrics.full_valid_loss is not None


def test_results_csv_has_the_openai_columns(server, client, finished_job):
    job = server.wait_job(finished_job)
    (results_id,) = job.result_files
    meta = client.files.retrieve(results_id)
    assert meta.purpose == "fine-tune-results" and meta.filename == "results.csv"
    rows = list(csv.DictReader(io.StringIO(client.files.content(results_id).text)))
    header = list(rows[0])
    assert header[:3] == ["step", "train_loss", "train_mean_token_accuracy"]
    assert "valid_loss" in header
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))


def test_deploy_fine_tuned_model_and_chat(server, client, finished_job):
    job = server.wait_job(finished_job)
    state = server.deploy("lab-ft", job.fine_tuned_model)
    assert state["properties"]["provisioningState"] == "Succeeded", state
    azure = server.azure(api_version="2024-02-01")
    answer = azure.chat.completions.create(model="lab-ft", messages=QUESTION, temperature=0, max_tokens=60)
    assert answer.choices[0].message.content.strip()
    assert answer.choices[0].finish_reason == "stop"  # it learned to end its turn


def test_checkpoint_deploys_too(server, client, finished_job):
    server.wait_job(finished_job)
    first = client.fine_tuning.jobs.checkpoints.list(finished_job).data[-1]
    state = server.deploy("lab-ckpt", first.fine_tuned_model_checkpoint)
    assert state["properties"]["provisioningState"] == "Succeeded", state
    r = client.chat.completions.create(model="lab-ckpt", messages=QUESTION, temperature=0, max_tokens=40)
    assert r.choices[0].message.content.strip()


def test_a_fine_tuned_model_can_be_fine_tuned_further(server, client, uploaded_lab_files, finished_job):
    parent = server.wait_job(finished_job)
    job = client.fine_tuning.jobs.create(
        model=parent.fine_tuned_model,
        training_file=uploaded_lab_files[0],
        seed=105,
        suffix="more",
        hyperparameters={"n_epochs": 1},
    )
    assert job.model == parent.fine_tuned_model
    done = server.wait_job(job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith(f"ft:{BASE_MODEL}:more:")  # named after the base model
    assert done.method.supervised.hyperparameters.model_extra["lora_rank"] == 16  # the parent's adapter

    def first_loss(job_id: str) -> float:
        return min(
            (e for e in client.fine_tuning.jobs.list_events(job_id) if e.type == "metrics"),
            key=lambda e: e.data["step"],
        ).data["train_loss"]

    # It starts where the parent ended (2 epochs on these examples), not from the base model.
    assert first_loss(job.id) < first_loss(finished_job) - 0.3
    answer = client.chat.completions.create(
        model=done.fine_tuned_model, messages=QUESTION, temperature=0, max_tokens=60
    )
    assert answer.choices[0].message.content.strip() and answer.choices[0].finish_reason == "stop"


def test_continuing_with_another_method_is_a_400(client, uploaded_lab_files, finished_job, server):
    parent = server.wait_job(finished_job)
    with pytest.raises(openai.BadRequestError, match="LoRA") as err:
        client.fine_tuning.jobs.create(
            model=parent.fine_tuned_model,
            training_file=uploaded_lab_files[0],
            method={"type": "supervised", "supervised": {"hyperparameters": {"lora_rank": 0}}},
        )
    assert err.value.body["param"] == "lora_rank"


def test_a_model_that_a_job_starts_from_cannot_be_deleted(server, client, uploaded_lab_files, finished_job):
    server.wait_job(finished_job)
    newest = client.fine_tuning.jobs.checkpoints.list(finished_job).data[0].fine_tuned_model_checkpoint  # not deployed
    job = client.fine_tuning.jobs.create(model=newest, training_file=uploaded_lab_files[0])
    client.fine_tuning.jobs.pause(job.id)  # queued -> paused at once, or pausing if the worker took it
    with pytest.raises(openai.ConflictError, match=job.id):
        client.models.delete(newest)
    client.fine_tuning.jobs.cancel(job.id)
    assert client.models.retrieve(newest).id == newest


def test_cancel_mid_training_leaves_worker_healthy(server, client, uploaded_lab_files):
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=uploaded_lab_files[0], hyperparameters={"n_epochs": 20}
    )
    server.wait_training(job.id)  # mid-epoch
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    time.sleep(3)
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)
    # The worker takes the next job.
    nxt = client.fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=uploaded_lab_files[0], hyperparameters={"n_epochs": 1}
    )
    assert server.wait_job(nxt.id).status == "succeeded"


def test_full_fine_tuning_job_deploys_and_answers(server, client, uploaded_lab_files):
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=uploaded_lab_files[0],
        seed=11,
        suffix="full",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "lora_rank": 0}}},
    )
    done = server.wait_job(job.id)
    assert done.status == "succeeded", done.error
    assert done.method.supervised.hyperparameters.model_extra["method"] == "full"
    state = server.deploy("lab-full", done.fine_tuned_model)
    assert state["properties"]["provisioningState"] == "Succeeded", state
    answer = client.chat.completions.create(model="lab-full", messages=QUESTION, temperature=0, max_tokens=60)
    assert answer.choices[0].message.content.strip()
    assert answer.choices[0].finish_reason == "stop"


def _wait_status(client, job_id: str, status: str, timeout: float = 300):
    deadline = time.time() + timeout
    while (job := client.fine_tuning.jobs.retrieve(job_id)).status != status:
        assert time.time() < deadline, f"job stayed {job.status}"
        time.sleep(0.5)
    return job


def test_pause_then_resume_trains_every_step_once(server, client, uploaded_lab_files):
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL, training_file=uploaded_lab_files[0], seed=5, hyperparameters={"n_epochs": 3, "batch_size": 2}
    )  # 18 steps
    server.wait_training(job.id)
    assert client.fine_tuning.jobs.pause(job.id).status in ("pausing", "paused")
    _wait_status(client, job.id, "paused")
    events = list(client.fine_tuning.jobs.list_events(job.id))
    paused = next(e.message for e in events if e.message.startswith("Job paused after step"))
    paused_after = int(re.match(r"Job paused after step (\d+);", paused).group(1))
    assert 0 < paused_after < 18
    assert max(e.data["step"] for e in events if e.type == "metrics") == paused_after

    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    done = server.wait_job(job.id)
    assert done.status == "succeeded", done.error
    events = list(client.fine_tuning.jobs.list_events(job.id))
    assert any(e.message.startswith(f"Training resumed at step {paused_after + 1}:") for e in events)
    steps = sorted(e.data["step"] for e in events if e.type == "metrics")
    assert steps == list(range(1, 19))  # every step once: none lost, none trained twice
    rows = list(csv.DictReader(io.StringIO(client.files.content(done.result_files[0]).text)))
    assert [int(r["step"]) for r in rows] == list(range(1, 19))
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [18, 12, 6]


def test_a_restarted_server_goes_on_with_the_job(tmp_path, tiny_dir):
    # The tiny model: what is tested is the restart, and 72 of its steps take seconds.
    srv = start_server_with_model(tmp_path / "data", tiny_dir, "tiny")
    try:
        client = srv.openai()
        with (SAMPLES / "training_set.jsonl").open("rb") as f:
            training_file = client.files.create(file=f, purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(
            model="tiny", training_file=training_file, hyperparameters={"n_epochs": 6, "batch_size": 1}
        )  # 72 steps
        srv.wait_training(job.id)
        stop_server(srv)  # SIGTERM, as a service manager or Ctrl-C would stop it
        srv = start_server(tmp_path / "data")
        done = srv.wait_job(job.id)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in srv.openai().fine_tuning.jobs.list_events(job.id)]
        stopped = next(m for m in messages if "the worker is shutting down" in m)
        step = int(re.match(r"Training stopped after step (\d+):", stopped).group(1))
        assert any(m.startswith(f"Training resumed at step {step + 1}:") for m in messages)
        steps = sorted(e.data["step"] for e in srv.openai().fine_tuning.jobs.list_events(job.id) if e.type == "metrics")
        assert steps == list(range(1, 73))
    finally:
        stop_server(srv)


@pytest.mark.skipif(not SHARED_LAB.is_dir(), reason="../shared/lab is not beside the checkout")
def test_the_lab_client_runs_unchanged(server, client, tmp_path):
    from tunelab.data.encodings import install_tiktoken_cache

    env = {
        **os.environ,
        "TUNELAB_ENDPOINT": server.url,
        "TUNELAB_API_KEY": server.key,
        "TIKTOKEN_CACHE_DIR": str(install_tiktoken_cache(tmp_path / "tiktoken")),
        "TUNELAB_LAB_TIMEOUT": "900",
    }
    run = subprocess.run(
        [sys.executable, str(SHARED_LAB / "lab_client.py")],
        env=env,
        cwd=SHARED_LAB,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.rstrip().endswith("LAB OK")
    assert requests.get(server.deployment_url("gpt-4o-ft"), headers={"api-key": server.key}).status_code == 404

    # The lab's job (seed 105, "auto" everything): what "auto" resolves to, and that it learned.
    job = client.fine_tuning.jobs.retrieve(re.search(r"^Job ID: (\S+)$", run.stdout, re.MULTILINE).group(1))
    hp = job.method.supervised.hyperparameters
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (10, 2, 1.0)
    assert {k: hp.model_extra[k] for k in ("method", "lora_rank", "lora_alpha", "lora_dropout")} == {
        "method": "lora",
        "lora_rank": 16,
        "lora_alpha": 32,
        "lora_dropout": 0.0,
    }
    assert hp.model_extra["learning_rate"] == pytest.approx(2e-4)
    rows = csv.DictReader(io.StringIO(client.files.content(job.result_files[0]).text))
    full_valid = [float(r["full_valid_loss"]) for r in rows if r["full_valid_loss"]]
    assert len(full_valid) == 10 and full_valid[-1] < full_valid[0] - 0.3
    smoke = next(e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.message.startswith("Smoke"))
    assert smoke.data["ends_with_eos"] and all(s["ended_with_eos"] and s["answer"] for s in smoke.data["samples"])
