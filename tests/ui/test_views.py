"""What the console computes from the API's objects: progress, the best checkpoint, snippets, diffs."""

from __future__ import annotations

import ast
import json
import shlex

import pytest

from tunelab.api.errors import InvalidRequest
from tunelab.api.protocol import CreateJobRequest, FineTuningJob, JobCheckpoint
from tunelab.ui import views
from tunelab.ui.jobs import JobForm

BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def job(**changes) -> FineTuningJob:
    fields = {
        "id": "ftjob-" + "a" * 24,
        "created_at": 100,
        "hyperparameters": {"n_epochs": 3, "batch_size": 2, "learning_rate_multiplier": 1.0},
        "model": BASE,
        "result_files": [],
        "seed": 1,
        "status": "running",
        "training_file": "file-1",
        "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}},
        "tunelab": {"project_id": "proj-default"},
    }
    return FineTuningJob(**(fields | changes))


def checkpoint(step: int, **metrics) -> JobCheckpoint:
    return JobCheckpoint(
        id=f"ftckpt-{step}",
        created_at=0,
        fine_tuned_model_checkpoint=f"ft:{BASE}:lab:12345678:ckpt-step-{step}",
        fine_tuning_job_id="ftjob-x",
        metrics=metrics,
        step_number=step,
    )


def test_progress_estimates_the_time_left_from_the_pace_so_far():
    points = [
        {"step": 1, "total_steps": 12, "train_loss": 3.0, "t": 1000, "tokens_per_second": 50.0},
        {"step": 3, "total_steps": 12, "train_loss": 2.0, "valid_loss": 2.5, "t": 1010},
        {"step": 5, "total_steps": 12, "train_loss": 1.5, "full_valid_loss": 2.2, "t": 1020, "tokens_per_second": 70},
    ]
    progress = views.Progress.of(points)
    assert (progress.step, progress.total_steps) == (5, 12)
    assert progress.eta_seconds == pytest.approx(35.0)  # 5 s a step, 7 steps to go
    assert progress.best_valid_loss == 2.2 and progress.tokens_per_second == 70
    assert views.Progress.of([]).eta_seconds is None
    assert views.epoch_ends(job(), progress) == [4, 8, 12]  # 3 epochs of 4 steps


def test_series_has_a_column_per_metric_with_gaps():
    cols = views.series([{"step": 1, "train_loss": 2.0}, {"step": 2, "train_loss": 1.0, "valid_loss": 1.5}])
    assert cols["step"] == [1, 2] and cols["valid_loss"] == [None, 1.5] and cols["full_valid_loss"] == [None, None]


def test_the_best_checkpoint_has_the_lowest_validation_loss():
    ckpts = [
        checkpoint(6, train_loss=1.0, full_valid_loss=2.0),
        checkpoint(12, train_loss=0.5, full_valid_loss=2.3),
    ]
    assert views.best_checkpoint(ckpts).endswith("ckpt-step-6")
    assert views.best_checkpoint([checkpoint(6, train_loss=1.0), checkpoint(12, train_loss=0.5)]).endswith("-12")
    assert views.best_checkpoint([]) is None


def test_deployment_names_are_short_and_valid():
    assert views.deployment_name(f"ft:{BASE}:lab:1a2b3c4d:ckpt-step-6") == "lab-1a2b3c4d-step-6"
    assert views.deployment_name(f"ft:{BASE}:lab:1a2b3c4d") == "lab-1a2b3c4d"
    assert views.deployment_name(BASE) == "SmolLM2-135M-Instruct"
    assert views.deployment_name("a b/c d") == "c-d"


def test_the_settings_that_differ_come_first():
    a = job(seed=1)
    b = job(seed=2, method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 5, "batch_size": 2}}})
    rows = views.settings_diff([a, b])
    differing = [name for name, _values, differs in rows if differs]
    assert differing == ["seed", "n_epochs"]
    assert rows[0] == ("seed", [1, 2], True)


def test_sparkline_spans_the_box():
    points = views.sparkline([3.0, 2.0, 1.0], width=100, height=20).split()
    assert points[0] == "0.0,2.0" and points[-1] == "100.0,18.0"
    assert views.sparkline([1.0]) == ""


def test_the_form_becomes_the_api_request_and_its_snippets_make_the_same_request():
    form = JobForm(model=BASE, training_file="file-1", validation_file="file-2", n_epochs="2", seed="105", suffix="lab")
    body = form.to_request()
    assert body.to_spec().n_epochs == 2 and body.to_spec().batch_size == "auto" and body.seed == 105

    sdk = views.sdk_job_call(body, "http://127.0.0.1:8000")
    ast.parse(sdk)  # valid Python
    call = next(
        n for n in ast.walk(ast.parse(sdk)) if isinstance(n, ast.Call) and getattr(n.func, "attr", "") == "create"
    )
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    assert CreateJobRequest(**kwargs) == body
    assert "TUNELAB_API_KEY" in sdk and "127.0.0.1:8000/v1" in sdk

    curl = shlex.split(views.curl_job_call(body, "http://127.0.0.1:8000").replace("\\\n", " "))
    assert CreateJobRequest(**json.loads(curl[curl.index("-d") + 1])) == body


def test_full_fine_tuning_and_bad_values():
    full = JobForm(model=BASE, training_file="f", method="full", lora_rank="8").to_request()
    assert full.to_spec().lora_rank == 0  # the rank box is ignored for full fine-tuning
    with pytest.raises(InvalidRequest, match="n_epochs must be “auto” or a number: got 'abc'") as err:
        JobForm(model=BASE, training_file="f", n_epochs="abc").to_request()
    assert err.value.param == "n_epochs"
    with pytest.raises(InvalidRequest, match="lora_dropout") as err:
        JobForm(model=BASE, training_file="f", lora_dropout="2").to_request()
    with pytest.raises(InvalidRequest, match="seed"):
        JobForm(model=BASE, training_file="f", seed="x").to_request()


def test_the_mlflow_run_links_to_a_tracking_server_and_never_shows_a_local_path():
    assert views.mlflow_run(job(), None) is None  # not tracked yet
    tracked = job(tunelab={"project_id": "proj-default", "mlflow": {"run_id": "r1", "experiment_id": "7"}})
    local = views.mlflow_run(tracked, None)
    assert local == {"run_id": "r1", "experiment_id": "7"}
    served = views.mlflow_run(tracked, "http://mlflow.internal:5000/")
    assert served["url"] == "http://mlflow.internal:5000/#/experiments/7/runs/r1"
