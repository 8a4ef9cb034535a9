"""What the pages show, computed from the API's wire objects: curves, summaries, snippets, diffs.

Everything here reads through the API's route functions (with the session's principal) or is a
pure function of their results, so the console shows exactly what an API client would see.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from tunelab.api import fine_tuning, models
from tunelab.api.deps import AppState, Principal
from tunelab.api.protocol import CreateJobRequest, FineTuningJob, JobCheckpoint, JobEvent, ModelObject

METRICS = (
    "train_loss",
    "valid_loss",
    "full_valid_loss",
    "train_mean_token_accuracy",
    "valid_mean_token_accuracy",
    "full_valid_mean_token_accuracy",
    "learning_rate",
    "tokens_per_second",
)
PAGE = 1000  # events per API call when reading a whole job


# -- a job's metrics -----------------------------------------------------------------------------
def job_metrics(
    state: AppState, caller: Principal, job_id: str, since: str | None = None, *, recent: bool = False
) -> tuple[list[dict[str, Any]], str | None]:
    """The job's metrics points, oldest first, newer than event ``since``; and its newest event id.

    Events come newest first, so reading stops at ``since``: a page that polls gets only what is new.
    ``recent``: only the newest page of events (what progress and a sparkline need, however long
    the job). Each point is a ``metrics`` event's data plus ``t``, when it was recorded.
    """
    points: list[dict[str, Any]] = []
    newest, cursor = None, None
    while True:
        page = fine_tuning.list_events(state, caller, job_id, after=cursor, limit=PAGE)
        for event in page.data:
            newest = newest or event.id
            if event.id == since:
                return points[::-1], newest
            if event.type == "metrics" and event.data:
                points.append({**event.data, "t": event.created_at})
        if recent or not page.has_more:
            return points[::-1], newest or since
        cursor = page.last_id


def series(points: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Points as columns (what uPlot plots): ``step`` and each metric, None where not measured."""
    return {"step": [p["step"] for p in points]} | {m: [p.get(m) for p in points] for m in METRICS}


@dataclass
class Progress:
    """How far a job is: its last step, throughput, and the time left at the pace so far."""

    step: int = 0
    total_steps: int | None = None
    tokens_per_second: float | None = None
    eta_seconds: float | None = None
    best_valid_loss: float | None = None

    @classmethod
    def of(cls, points: list[dict[str, Any]]) -> Progress:
        if not points:
            return cls()
        last, first = points[-1], points[0]
        eta = None
        if last["step"] > first["step"] and last["t"] > first["t"]:
            per_step = (last["t"] - first["t"]) / (last["step"] - first["step"])
            eta = per_step * (last["total_steps"] - last["step"])
        valid = [p[k] for p in points for k in ("full_valid_loss", "valid_loss") if p.get(k) is not None]
        return cls(
            step=last["step"],
            total_steps=last.get("total_steps"),
            tokens_per_second=last.get("tokens_per_second"),
            eta_seconds=eta,
            best_valid_loss=min(valid) if valid else None,
        )

    @property
    def percent(self) -> float:
        return 100.0 * self.step / self.total_steps if self.total_steps else 0.0


def epoch_ends(job: FineTuningJob, progress: Progress) -> list[int]:
    """The steps at which the job's epochs end (known once training has started)."""
    epochs = job.hyperparameters.get("n_epochs")
    if not isinstance(epochs, int) or not progress.total_steps:
        return []
    per_epoch = progress.total_steps // epochs
    return [per_epoch * (i + 1) for i in range(epochs)]


def best_checkpoint(checkpoints: list[JobCheckpoint]) -> str | None:
    """The checkpoint with the lowest validation loss (full, else sampled, else training loss)."""
    for key in ("full_valid_loss", "valid_loss", "train_loss"):
        scored = [c for c in checkpoints if c.metrics.get(key) is not None]
        if scored:
            return min(scored, key=lambda c: c.metrics[key] or 0.0).fine_tuned_model_checkpoint
    return None


def job_events(
    state: AppState, caller: Principal, job_id: str, *, level: str = "", metrics: bool = False, limit: int = 200
) -> list[JobEvent]:
    """The job's newest events of ``level`` ("" = every level), step metrics only if asked for."""
    found: list[JobEvent] = []
    cursor = None
    while len(found) < limit:
        page = fine_tuning.list_events(state, caller, job_id, after=cursor, limit=PAGE)
        found += [e for e in page.data if (not level or e.level == level) and (metrics or e.type != "metrics")]
        if not page.has_more:
            break
        cursor = page.last_id
    return found[:limit]


def duration(job: FineTuningJob) -> float:
    """Seconds from creation to the end (or to now while the job is unfinished)."""
    return (job.finished_at or time.time()) - job.created_at


def mlflow_run(job: FineTuningJob, tracking_uri: str | None) -> dict[str, Any] | None:
    """The job's MLflow run (``job.tunelab.mlflow``), with a ``url`` when the server tracks to an
    MLflow server a browser can open (``tracking_uri``: TUNELAB_MLFLOW_TRACKING_URI; None is the
    local store in the data dir, whose path is not shown, as in the API)."""
    if job.tunelab.mlflow is None:
        return None
    run = job.tunelab.mlflow.model_dump(exclude_none=True)
    if tracking_uri and tracking_uri.startswith(("http://", "https://")):
        run["tracking_uri"] = tracking_uri
        run["url"] = f"{tracking_uri.rstrip('/')}/#/experiments/{run.get('experiment_id')}/runs/{run['run_id']}"
    return run


def sparkline(values: list[float], width: int = 160, height: int = 32) -> str:
    """SVG polyline points for ``values`` (a running job's loss on the overview)."""
    if len(values) < 2:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    step = width / (len(values) - 1)
    return " ".join(f"{i * step:.1f},{height - 2 - (v - low) / span * (height - 4):.1f}" for i, v in enumerate(values))


# -- models and settings -------------------------------------------------------------------------
@dataclass
class ModelChoices:
    base: list[ModelObject] = field(default_factory=list)
    fine_tuned: list[ModelObject] = field(default_factory=list)
    checkpoints: list[ModelObject] = field(default_factory=list)


def model_choices(state: AppState, caller: Principal) -> ModelChoices:
    choices = ModelChoices()
    for m in models.list_models(state, caller).data:
        {"base": choices.base, "fine-tuned": choices.fine_tuned}.get(m.kind, choices.checkpoints).append(m)
    return choices


def job_settings(job: FineTuningJob) -> dict[str, Any]:
    """What a job was asked to do (its resolved hyperparameters once it has started)."""
    objective = job.method.get("type", "supervised")
    hyper = dict((job.method.get(objective) or {}).get("hyperparameters") or {})
    return {
        "method_type": objective,
        "model": job.model,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "seed": job.seed,
        "suffix": job.user_provided_suffix,
        **{k: (", ".join(v) if isinstance(v, list) else v) for k, v in sorted(hyper.items())},
    }


def settings_diff(jobs: list[FineTuningJob]) -> list[tuple[str, list[Any], bool]]:
    """(setting, each job's value, whether they differ), the differing settings first."""
    table = [job_settings(j) for j in jobs]
    names = list(dict.fromkeys(k for row in table for k in row))
    rows = [(n, [row.get(n) for row in table], len({json.dumps(row.get(n)) for row in table}) > 1) for n in names]
    return sorted(rows, key=lambda r: not r[2])


# -- snippets: the same call from code -------------------------------------------------------------
def _client(base: str) -> list[str]:
    return [
        "import os",
        "from openai import OpenAI",
        "",
        f'client = OpenAI(base_url="{base}/v1", api_key=os.environ["TUNELAB_API_KEY"])',
    ]


def sdk_job_call(body: CreateJobRequest, base: str) -> str:
    """The Python SDK call that creates this job (the key comes from the environment, never the page)."""
    args = body.model_dump(exclude_unset=True)
    return "\n".join(
        [*_client(base), "job = client.fine_tuning.jobs.create(", *(f"    {k}={v!r}," for k, v in args.items()), ")"]
    )


def curl_job_call(body: CreateJobRequest, base: str) -> str:
    payload = json.dumps(body.model_dump(exclude_unset=True))
    return (
        f"curl {base}/v1/fine_tuning/jobs \\\n"
        '  -H "Authorization: Bearer $TUNELAB_API_KEY" \\\n'
        '  -H "Content-Type: application/json" \\\n'
        f"  -d {shlex.quote(payload)}"
    )


def sdk_chat_call(deployment: str, base: str) -> str:
    return "\n".join(
        [
            *_client(base),
            "answer = client.chat.completions.create(",
            f"    model={deployment!r},",
            '    messages=[{"role": "user", "content": "Hello!"}],',
            ")",
            "print(answer.choices[0].message.content)",
        ]
    )


def deployment_name(model_id: str) -> str:
    """A deployment name for a model: ``lab-1a2b3c4d-step-6`` for a checkpoint of job 1a2b3c4d's
    ``lab`` model, ``lab-1a2b3c4d`` for the model itself, the last part of a base model's id."""
    parts = model_id.split(":")
    if model_id.startswith("ft:") and len(parts) >= 4:
        suffix, short = parts[2], parts[3]
        step = parts[4].removeprefix("ckpt-") if len(parts) > 4 else ""
        name = "-".join(p for p in (suffix, short, step) if p)
    else:
        name = model_id.rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name)[:64]
