"""MLflow tracking: a real `mlflow server` (SQLite, free port), real jobs trained by the recipe on a tiny llama.

One LoRA job (with a validation file) is trained once and checked from several angles: one run
tagged with the job id, params, one train_loss point per step, valid_loss, checkpoint artifacts,
a registered version that points at the run and generates. A full fine-tune checks that
registration path; an unreachable and a hanging server check that training never notices.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub (it reads this once): tests never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tunelab.config import Settings
from tunelab.store.lifecycle import JobStatus
from tunelab.training.hooks import Stop
from tunelab.training.hparams import JobSpec
from tunelab.training.recipe import TrainResult, TrainSpec, train
from tunelab.training.tracking import (
    JOB_ID_TAG,
    JobTracker,
    RegisterSpec,
    TrackedHooks,
    quiet_http_retries,
    registered_model_name,
    tracking_uri,
)

from .conftest import CHATS, RecordingHooks, chat, write_jsonl

EXPERIMENT = "tunelab-tests"
quiet_http_retries()  # as the worker does: the tracker retries, MLflow's client does not


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` with a SQLite backend and proxied artifacts; its URL."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = root / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # The job runner (huey consumers, ~2 GB) serves features tunelab does not use.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            try:
                if requests.get(f"{url}/health", timeout=1).ok:
                    break
            except (requests.ConnectionError, requests.Timeout):
                time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def job_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tracking-data")
    train_file = write_jsonl(root / "train.jsonl", [chat(q, a) for q, a in CHATS[:5]])
    valid_file = write_jsonl(root / "valid.jsonl", [chat(q, a) for q, a in CHATS[3:]])
    return train_file, valid_file


@dataclass
class Job:
    job_id: str
    tracker: JobTracker
    hooks: RecordingHooks
    result: TrainResult
    version: str | None
    started: list[dict]


def run_job(
    uri: str,
    job_id: str,
    base_dir: Path,
    files: tuple[Path, Path | None],
    out: Path,
    *,
    lora_rank: int = 4,
    retry_seconds: float = 30.0,
) -> Job:
    """What the worker does around ``train``, in the few lines it takes."""
    hooks, started = RecordingHooks(), []
    tracker = JobTracker(
        tracking_uri=uri,
        experiment=EXPERIMENT,
        job_id=job_id,
        run_name=f"ft:tiny:{job_id}",
        on_warning=lambda m: hooks.event(m, level="warn"),
        on_started=started.append,
        retry_seconds=retry_seconds,
    )
    tracker.log_params(
        {
            "base_model": "tiny-llama",
            "training_file": files[0].name,
            "validation_file": files[1].name if files[1] else None,
            "seed": 7,
        }
    )
    tracker.log_dict({"examples": 5, "path": files[0]}, "validation/training_file.json")
    spec = TrainSpec(
        base_model_dir=base_dir,
        training_file=files[0],
        validation_file=files[1],
        output_dir=out,
        seed=7,
        hyperparameters=JobSpec(n_epochs=2, batch_size=2, lora_rank=lora_rank),
        device="cpu",
    )
    result = train(spec, TrackedHooks(hooks, tracker))
    tracker.log_params({"training_examples": 5, "trained_tokens": result.trained_tokens})
    tracker.log_artifact(result.results_csv)
    name = registered_model_name("tests/tiny-llama", job_id)
    version = tracker.finish(JobStatus.SUCCEEDED, register=RegisterSpec(name, result.final_dir), timeout=300)
    return Job(job_id, tracker, hooks, result, version, started)


@pytest.fixture(scope="module")
def lora_job(mlflow_server: str, tiny_dir: Path, job_files, tmp_path_factory) -> Job:
    return run_job(mlflow_server, "ftjob-lora", tiny_dir, job_files, tmp_path_factory.mktemp("lora-job"))


@pytest.fixture(scope="module")
def client(mlflow_server: str):
    from mlflow import MlflowClient

    return MlflowClient(mlflow_server)


def the_run(client, job_id: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{job_id}'")
    assert len(runs) == 1, runs
    return runs[0]


# -- one LoRA job against a real server ------------------------------------------------------------
@pytest.mark.slow
def test_one_run_per_job_tagged_and_named_after_it(lora_job: Job, client):
    run = the_run(client, lora_job.job_id)
    assert run.info.run_id == lora_job.tracker.run_id
    assert run.info.run_name == "ft:tiny:ftjob-lora"
    assert run.info.status == "FINISHED"
    assert not [e for e in lora_job.hooks.events if e["level"] == "warn" and "MLflow" in e["message"]]
    # The job's integrations entry: once when the run started, then with the model version.
    assert [s["mlflow"]["run_id"] for s in lora_job.started] == [run.info.run_id]
    entry = lora_job.tracker.integration()
    assert entry["type"] == "mlflow" and entry["mlflow"]["run_id"] == run.info.run_id
    assert entry["mlflow"]["registered_model"] == {"name": "tiny-llama-ftjob-lora", "version": lora_job.version}


@pytest.mark.slow
def test_params_hold_the_job_the_resolved_hyperparameters_and_dataset_stats(lora_job: Job, client):
    params = the_run(client, lora_job.job_id).data.params
    targets = params.pop("lora_target_modules")
    assert params == {
        "base_model": "tiny-llama",
        "training_file": "train.jsonl",
        "validation_file": "valid.jsonl",
        "seed": "7",
        "n_epochs": "2",
        "batch_size": "2",
        "learning_rate_multiplier": "1.0",
        "learning_rate": "0.0002",
        "method": "lora",
        "lora_rank": "4",
        "lora_alpha": "32",
        "lora_dropout": "0.0",
        "total_steps": "6",
        "training_examples": "5",
        "trained_tokens": str(lora_job.result.trained_tokens),
    }
    assert set(targets.split(",")) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


@pytest.mark.slow
def test_metrics_have_one_point_per_step(lora_job: Job, client):
    run_id = the_run(client, lora_job.job_id).info.run_id
    recorded = {m["step"]: m for m in lora_job.hooks.metrics()}
    train_loss = client.get_metric_history(run_id, "train_loss")
    assert [(m.step, m.value) for m in train_loss] == [(s, m["train_loss"]) for s, m in recorded.items()]
    assert [m.step for m in train_loss] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run_id, "train_mean_token_accuracy")] == [1, 2, 3, 4, 5, 6]
    valid_steps = [s for s, m in recorded.items() if "valid_loss" in m]
    assert valid_steps and [m.step for m in client.get_metric_history(run_id, "valid_loss")] == valid_steps
    assert [m.step for m in client.get_metric_history(run_id, "full_valid_loss")] == [3, 6]  # each epoch end
    assert "total_steps" not in the_run(client, lora_job.job_id).data.metrics


@pytest.mark.slow
def test_checkpoints_results_and_validation_report_are_artifacts(lora_job: Job, client, tmp_path):
    run_id = the_run(client, lora_job.job_id).info.run_id
    assert {a.path for a in client.list_artifacts(run_id)} >= {"checkpoints", "results.csv", "validation"}
    checkpoints = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/step-3", "checkpoints/step-6"]
    for ckpt in lora_job.result.checkpoints:
        uploaded = {Path(a.path).name for a in client.list_artifacts(run_id, f"checkpoints/step-{ckpt.step}")}
        assert uploaded == {p.name for p in ckpt.path.iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tunelab.json"} <= uploaded
    csv_file = client.download_artifacts(run_id, "results.csv", str(tmp_path))
    assert Path(csv_file).read_text() == lora_job.result.results_csv.read_text()
    report = client.download_artifacts(run_id, "validation/training_file.json", str(tmp_path))
    assert '"examples": 5' in Path(report).read_text()


@pytest.mark.slow
def test_registered_version_points_at_the_run_and_generates(
    lora_job: Job, client, mlflow_server: str, tiny_dir, monkeypatch
):
    import mlflow

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # a user's client, not the worker's tracker

    name = "tiny-llama-ftjob-lora"
    version = client.get_model_version(name, lora_job.version)
    assert version.run_id == lora_job.tracker.run_id and version.status == "READY"

    mlflow.set_tracking_uri(mlflow_server)
    uri = f"models:/{name}/{lora_job.version}"
    pipe = mlflow.transformers.load_model(uri)
    assert type(pipe.model).__name__.startswith("PeftModel")  # the adapter on the recorded base
    assert pipe.model.peft_config["default"].r == 4
    out = pipe([{"role": "user", "content": "Who wrote Hamlet?"}], max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"

    answer = mlflow.pyfunc.load_model(uri).predict({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5})
    assert answer[0]["object"] == "chat.completion" and answer[0]["usage"]["completion_tokens"] > 0


# -- a full fine-tune: the whole model is logged ------------------------------------------------------
@pytest.mark.slow
def test_full_fine_tune_registers_the_whole_model(
    mlflow_server: str, tiny_dir: Path, job_files, tmp_path, client, monkeypatch
):
    import mlflow

    job = run_job(mlflow_server, "ftjob-full", tiny_dir, (job_files[0], None), tmp_path / "job", lora_rank=0)
    run = the_run(client, "ftjob-full")
    assert run.data.params["method"] == "full" and "valid_loss" not in run.data.metrics
    version = client.get_model_version("tiny-llama-ftjob-full", job.version)
    assert version.run_id == run.info.run_id

    mlflow.set_tracking_uri(mlflow_server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")  # a user's client, not the worker's tracker
    pipe = mlflow.transformers.load_model(f"models:/tiny-llama-ftjob-full/{job.version}")
    assert type(pipe.model).__name__ == "LlamaForCausalLM"
    out = pipe([{"role": "user", "content": "Hi"}], max_new_tokens=3, do_sample=False)
    assert out[0]["generated_text"][-1]["role"] == "assistant"


# -- a paused and resumed job: one run, every step once -----------------------------------------------
@pytest.mark.slow
def test_a_resumed_job_goes_on_in_its_run(mlflow_server: str, tiny_dir: Path, job_files, tmp_path, client):
    from tunelab.training.recipe import Paused

    spec = TrainSpec(
        base_model_dir=tiny_dir,
        training_file=job_files[0],
        validation_file=None,
        output_dir=tmp_path / "job",
        seed=7,
        hyperparameters=JobSpec(n_epochs=2, batch_size=2, lora_rank=4),
        device="cpu",
    )
    first = JobTracker(
        tracking_uri=mlflow_server, experiment=EXPERIMENT, job_id="ftjob-paused", run_name="paused", on_warning=print
    )
    with pytest.raises(Paused):
        train(spec, TrackedHooks(RecordingHooks(stop_after=2, stop_with=Stop.PAUSE), first))
    first.finish(JobStatus.PAUSED)
    assert the_run(client, "ftjob-paused").info.status == "SCHEDULED"

    second = JobTracker(
        tracking_uri=mlflow_server,
        experiment=EXPERIMENT,
        job_id="ftjob-paused",
        run_name="paused",
        on_warning=print,
        run_id=first.run_id,
    )
    train(spec, TrackedHooks(RecordingHooks(), second))
    second.finish(JobStatus.SUCCEEDED)
    run = the_run(client, "ftjob-paused")  # still exactly one run
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "learning_rate")] == [1, 2, 3, 4, 5, 6]


# -- MLflow away: training never notices -----------------------------------------------------------------
@pytest.mark.slow
def test_unreachable_server_job_succeeds_with_one_warning(tiny_dir: Path, job_files, tmp_path):
    job = run_job(
        f"http://127.0.0.1:{free_port()}", "ftjob-offline", tiny_dir, job_files, tmp_path / "job", retry_seconds=2
    )
    assert job.result.final_dir.is_dir() and job.version is None
    warnings = [e["message"] for e in job.hooks.events if e["level"] == "warn" and "MLflow" in e["message"]]
    assert len(warnings) == 1 and "unreachable" in warnings[0] and "without MLflow" in warnings[0], warnings
    assert job.tracker.run_id is None and job.tracker.integration() is None and job.started == []


def test_hanging_server_never_blocks_a_step(monkeypatch):
    """A server that accepts connections and never answers: every call returns at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # connections queue in the backlog; nobody ever reads them
        warnings: list[tuple[str, str]] = []
        tracker = JobTracker(
            tracking_uri=f"http://127.0.0.1:{hole.getsockname()[1]}",
            experiment=EXPERIMENT,
            job_id="ftjob-hang",
            run_name="hang",
            on_warning=lambda m: warnings.append((m, threading.current_thread().name)),
            retry_seconds=1,
        )
        start = time.monotonic()
        for step in range(1, 201):
            tracker.log_metrics(step, {"train_loss": 1.0 / step, "step": step})
        tracker.log_params({"seed": 1})
        assert time.monotonic() - start < 1.0  # each call would otherwise wait out a 3 s request timeout
        assert tracker.finish(JobStatus.SUCCEEDED, timeout=1) is None
    assert [w for w, _ in warnings] == [
        "MLflow logging did not finish within 1 s; the job goes on without waiting for it."
    ]
    assert {thread for _, thread in warnings} == {threading.current_thread().name}  # delivered on the caller's thread


@pytest.mark.slow
def test_default_store_is_sqlite_in_the_data_dir_and_refusals_warn_once(tmp_path: Path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TUNELAB_MLFLOW_TRACKING_URI", raising=False)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # SQLite stores default to ./mlruns for artifacts: not here
    uri = tracking_uri(Settings(data_dir=tmp_path))
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    warnings: list[str] = []
    tracker = JobTracker(
        tracking_uri=uri, experiment=EXPERIMENT, job_id="ftjob-local", run_name="local", on_warning=warnings.append
    )
    tracker.log_params({"seed": 1})
    for step in (1, 2):
        tracker.log_params({"seed": 2})  # MLflow refuses to change a param: reported once, not per call
        tracker.log_metrics(step, {"train_loss": 0.5})
    (tmp_path / "results.csv").write_text("step,train_loss\n1,0.5\n")
    tracker.log_artifact(tmp_path / "results.csv")
    tracker.log_checkpoint(9, tmp_path / "deleted-already")
    assert tracker.finish(JobStatus.FAILED) is None
    assert len(warnings) == 2 and warnings[0].startswith("MLflow: could not log params"), warnings
    assert warnings[1].startswith("MLflow: could not upload checkpoint step-9")

    run = MlflowClient(uri).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.params == {"seed": "1"} and run.data.metrics == {"train_loss": 0.5}
    assert (tmp_path / "mlartifacts" / tracker.run_id / "artifacts" / "results.csv").is_file()
    assert not any((tmp_path / "cwd").iterdir())


def test_tracking_uri_prefers_the_environment(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert tracking_uri(Settings(data_dir=tmp_path)) == "http://mlflow.internal:5000"


def test_registered_model_name():
    assert registered_model_name("HuggingFaceTB/SmolLM2-135M-Instruct", None) == "SmolLM2-135M-Instruct-tunelab"
    assert registered_model_name("org/base", "my bot:v2") == "base-my-bot-v2"  # MLflow forbids '/' and ':'
    assert registered_model_name("org/base", "x", template="tunelab.{suffix}") == "tunelab.x"


def test_unknown_tracking_uri_scheme_warns_once():
    warnings: list[str] = []
    tracker = JobTracker(
        tracking_uri="nosuch://host",
        experiment=EXPERIMENT,
        job_id="ftjob-bad",
        run_name="bad",
        on_warning=warnings.append,
    )
    tracker.log_metrics(1, {"train_loss": 1.0})
    assert tracker.finish(JobStatus.SUCCEEDED, timeout=60) is None
    assert len(warnings) == 1 and warnings[0].startswith("MLflow: cannot use tracking URI nosuch://host"), warnings
