"""Eval runs and their workers: a fine-tuned model against its base (a job's eval at its end,
MLflow, the CLI table), a worker killed mid-run, and a run that can only fail once it runs."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.api.test_evals import EXACT, REVIEWS, SCHEMA, completions, items, wait_run
from tests.conftest import BASE_MODEL, KEY
from tests.server import start_server, start_worker, stop_server

pytestmark = pytest.mark.integration


@pytest.fixture
def idle_server(tmp_path):
    """A server without a worker: runs stay queued until a test starts one."""
    srv = start_server(tmp_path / "data", worker=False)
    yield srv
    stop_server(srv)


def make_eval(client, criteria=None):
    return client.evals.create(
        name="sentiment",
        data_source_config={"type": "custom", "item_schema": SCHEMA},
        testing_criteria=criteria or [EXACT],
    )


@pytest.mark.slow
def test_worker_killed_mid_run_is_resumed_without_duplicates(idle_server):
    client = idle_server.openai()
    ev = make_eval(client)
    many = REVIEWS * 8
    run = client.evals.runs.create(ev.id, data_source=completions(BASE_MODEL, many, max_completion_tokens=12))
    worker = start_worker(idle_server.data_dir)
    deadline = time.time() + 300
    while client.evals.runs.retrieve(run.id, eval_id=ev.id).result_counts.total < 3:
        assert time.time() < deadline and worker.poll() is None
        time.sleep(0.2)
    os.killpg(worker.pid, signal.SIGKILL)  # no chance to give the run back
    worker.wait()
    stale = client.evals.runs.retrieve(run.id, eval_id=ev.id)
    assert stale.status == "in_progress" and stale.result_counts.total < len(many)

    second = start_worker(idle_server.data_dir)  # finds the dead worker's run and queues it again
    try:
        done = wait_run(client, ev.id, run.id)
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(timeout=60)
    assert done.status == "completed" and done.result_counts.total == len(many)
    ids = [o.datasource_item_id for o in client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100)]
    assert ids == list(range(len(many)))  # each item once: the graded ones were kept, the rest graded


def test_a_run_whose_file_is_gone_when_it_runs_fails_naming_it(idle_server):
    client = idle_server.openai()
    ev = make_eval(client)
    lines = "\n".join(json.dumps(r) for r in items(REVIEWS[:2])).encode()
    f = client.files.create(file=("items.jsonl", io.BytesIO(lines)), purpose="evals")
    doomed = client.evals.runs.create(
        ev.id, data_source={**completions(BASE_MODEL), "source": {"type": "file_id", "id": f.id}}
    )
    fine = client.evals.runs.create(ev.id, data_source=completions(BASE_MODEL, REVIEWS[:2]))
    client.files.delete(f.id)  # after the run was accepted, before any worker saw it
    worker = start_worker(idle_server.data_dir)
    try:
        failed = wait_run(client, ev.id, doomed.id)
        ok = wait_run(client, ev.id, fine.id)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=60)
    assert failed.status == "failed" and failed.error.code == "file_not_found" and f.id in failed.error.message
    assert ok.status == "completed"  # no other run affected


@pytest.mark.slow
def test_a_job_evaluates_its_model_and_base_with_mlflow_and_the_cli_compares_them(server, client, uploaded_lab_files):
    from mlflow import MlflowClient

    train, _ = uploaded_lab_files
    ev = make_eval(client, [EXACT, {**EXACT, "name": "contains", "operation": "ilike"}])
    data_source = completions(BASE_MODEL)
    del data_source["model"]
    job = client.fine_tuning.jobs.create(
        model=BASE_MODEL,
        training_file=train,
        seed=7,
        hyperparameters={"n_epochs": 1},
        extra_body={"tunelab": {"eval": {"eval_id": ev.id, "data_source": data_source}}},
    )
    job = server.wait_job(job.id, timeout=900)
    assert job.status == "succeeded", job.error
    deadline = time.time() + 600
    while True:
        runs = [r for r in client.evals.runs.list(ev.id) if (r.metadata or {}).get("fine_tuning_job_id") == job.id]
        if len(runs) == 2 and all(r.status not in ("queued", "in_progress") for r in runs):
            break
        assert time.time() < deadline, [(r.model, r.status) for r in runs]
        time.sleep(1)
    by_model = {r.model: r for r in runs}
    assert set(by_model) == {BASE_MODEL, job.fine_tuned_model}
    assert all(r.status == "completed" and r.result_counts.total == len(REVIEWS) for r in runs)

    while True:  # the worker reports a run as a job event just after the run completes
        events = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "eval"]
        finished = [e for e in events if "passed" in e.message]
        if len(finished) == 2 or time.time() > deadline:
            break
        time.sleep(1)
    assert {e.data["model"] for e in finished} == set(by_model)
    assert all(
        e.data["metrics"]["accuracy"] == by_model[e.data["model"]].classification_report["accuracy"] for e in finished
    )

    raw = requests.get(f"{server.url}/v1/fine_tuning/jobs/{job.id}", headers={"api-key": KEY}).json()
    job_run = raw["tunelab"]["mlflow"]["run_id"]  # tunelab extension: where the job is tracked
    mlflow = MlflowClient(f"sqlite:///{server.data_dir / 'mlflow.db'}")
    # Read again: a run is completed a moment before the worker has tracked it (the job's event
    # above comes after the tracking), so the runs read at completion may not show it yet.
    for r in [client.evals.runs.retrieve(r.id, eval_id=ev.id) for r in runs]:
        tracked = mlflow.get_run(r.tracking["run_id"])
        assert tracked.data.tags["mlflow.parentRunId"] == job_run  # nested under the job's run
        assert tracked.data.tags["tunelab.eval_run_id"] == r.id
        assert tracked.data.metrics["accuracy"] == pytest.approx(r.classification_report["accuracy"])
        assert tracked.data.metrics["macro_f1"] == pytest.approx(r.classification_report["macro_f1"])

    ds_file = server.data_dir.parent / "cli-data-source.json"
    ds_file.write_text(json.dumps(data_source))
    cli = subprocess.run(
        [sys.executable, "-m", "tunelab", "eval", "run", "--eval", ev.id, "--data-source", str(ds_file),
         "--model", BASE_MODEL, "--model", job.fine_tuned_model, "--url", f"{server.url}/v1", "--api-key", KEY],
        capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "250"},
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "exact pass rate" in cli.stdout and "macro-F1" in cli.stdout and "diff vs" in cli.stdout
    # greedy decoding: the CLI's runs answer exactly as the job's runs did
    base_rate = by_model[BASE_MODEL].result_counts.passed / len(REVIEWS)
    row = next(line for line in cli.stdout.splitlines() if "contains pass rate" in line or "exact pass rate" in line)
    assert f"{base_rate:.3f}" in cli.stdout, (row, cli.stdout)
