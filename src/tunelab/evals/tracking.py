"""Eval metrics in MLflow: one run per eval run, nested under the run of the job it belongs to.

Called by the worker only (never the API process). The parent is the MLflow run of the job that
asked for the eval (a job's eval at its end), else of the job that produced the model; a base
model's run stands alone in the experiment. Tracking problems are returned as a message, never
raised: an eval run does not fail because MLflow is away.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from tunelab.store import Store
from tunelab.store.tables import EvalRow, EvalRunRow, JobRow, ModelRow

log = logging.getLogger("tunelab.evals")


def parent_job(store: Store, run: EvalRunRow, model_id: str | None) -> JobRow | None:
    job_id = run.job_id
    if job_id is None and model_id is not None:
        model = store.get(ModelRow, model_id)
        job_id = model.job_id if model else None
    return store.get(JobRow, job_id) if job_id else None


def job_mlflow_run(job: JobRow | None) -> str | None:
    for entry in (job.integrations or []) if job else []:
        if entry.get("type") == "mlflow":
            return entry["mlflow"].get("run_id")
    return None


def metrics_of(run: EvalRunRow, ev: EvalRow) -> dict[str, float]:
    """Pass rate per criterion, and the classification report's figures."""
    total = max(int(run.result_counts.get("total") or 0), 1)
    names = {c["id"]: c["name"] for c in ev.testing_criteria}
    out = {
        f"pass_rate.{_key(names.get(r['testing_criteria'], r['testing_criteria']))}": r["passed"] / total
        for r in run.per_testing_criteria_results or []
    }
    report = run.classification_report
    if report:
        out.update(accuracy=report["accuracy"], macro_f1=report["macro_f1"], off_format=float(report["off_format"]))
        for label, figures in report["per_label"].items():
            out[f"f1.{_key(label)}"] = figures["f1"]
    return out


def _key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-/ ]+", "_", text)[:200]


def log_eval_run(
    tracking_uri: str, experiment: str, run: EvalRunRow, ev: EvalRow, model_id: str | None, parent: str | None
) -> tuple[dict[str, Any] | None, str | None]:
    """Log ``run``'s metrics; (its ``tracking`` entry, None) or (None, why it could not)."""
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Metric, Param

        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = None
            if tracking_uri.startswith("sqlite:///"):  # artifacts beside the database, as jobs do
                location = (Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
            experiment_id = client.create_experiment(experiment, artifact_location=location)
        tags = {"tunelab.eval_id": ev.id, "tunelab.eval_run_id": run.id, "tunelab.model": run.model or "jsonl"}
        if parent:
            tags["mlflow.parentRunId"] = parent
        if run.job_id:
            tags["tunelab.job_id"] = run.job_id
        created = client.create_run(experiment_id, run_name=f"eval {ev.name}: {run.model or 'jsonl'}", tags=tags)
        run_id = created.info.run_id
        ms = created.info.start_time
        metrics = [Metric(k, float(v), ms, 0) for k, v in metrics_of(run, ev).items()]
        params = [
            Param("eval_id", ev.id),
            Param("model", run.model or "jsonl"),
            Param("items", str(run.result_counts["total"])),
        ]
        client.log_batch(run_id, metrics=metrics, params=params)
        if run.classification_report:
            client.log_dict(run_id, run.classification_report, "eval/classification_report.json")
        client.set_terminated(run_id, "FINISHED")
    except Exception as exc:  # noqa: BLE001 -- tracking never fails an eval run
        log.warning("MLflow logging of eval run %s failed: %s", run.id, exc)
        return None, f"MLflow: could not log eval run {run.id}: {str(exc).splitlines()[0][:300]}"
    return {"type": "mlflow", "run_id": run_id, "experiment_id": experiment_id, "parent_run_id": parent}, None
