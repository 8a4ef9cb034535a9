"""Jobs: the table, a new job with its review, the job's live page, and comparing jobs."""

from __future__ import annotations

import csv
import io
import math
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, ValidationError

from tunelab.api import files, fine_tuning
from tunelab.api.deps import AppState, Principal, State
from tunelab.api.errors import InvalidRequest
from tunelab.api.protocol import CreateJobRequest, FineTuningJob
from tunelab.store.lifecycle import JobStatus
from tunelab.training.hparams import resolve
from tunelab.ui import views
from tunelab.ui.render import PageRoute, page, redirect
from tunelab.ui.session import Checked, Console

router = APIRouter(route_class=PageRoute, include_in_schema=False)
data = APIRouter(include_in_schema=False)  # JSON for the page's charts
STOPPED_POLLING = 286  # htmx stops polling on this status (and still swaps the content)


# -- the table ------------------------------------------------------------------------------------
@router.get("/jobs")
def jobs_page(request: Request, state: State, session: Console, status: str = "", model: str = "", q: str = ""):
    jobs = fine_tuning.jobs_page(state, session.principal, limit=1000).data
    shown = [j for j in jobs if _matches(j, status, model, q)]
    rows = [(j, _progress(state, session.principal, j)) for j in shown]
    bases = sorted({j.model for j in jobs})
    context = {"session": session, "rows": rows, "bases": bases, "status": status, "model": model, "q": q}
    return page(request, "jobs.html", context | {"statuses": list(JobStatus)})


def _matches(job: FineTuningJob, status: str, model: str, q: str) -> bool:
    wanted = not status or job.status == status or (status == "active" and not job.status.is_finished)
    text = " ".join(str(x) for x in (job.id, job.fine_tuned_model, job.user_provided_suffix, job.model))
    return wanted and (not model or job.model == model) and q.lower() in text.lower()


_finished: dict[str, views.Progress] = {}  # a finished job's numbers never change


def _progress(state: AppState, caller: Principal, job: FineTuningJob) -> views.Progress:
    if job.id in _finished:
        return _finished[job.id]
    progress = views.Progress.of(views.job_metrics(state, caller, job.id)[0])
    if job.status.is_finished:
        _finished[job.id] = progress
    return progress


# -- a new job --------------------------------------------------------------------------------------
class JobForm(BaseModel):
    """The new-job form as typed: blank means the default, "auto" the API's auto rule."""

    model: str
    training_file: str
    validation_file: str = ""
    method: Literal["lora", "full"] = "lora"
    lora_rank: str = ""
    lora_alpha: str = ""
    lora_dropout: str = ""
    n_epochs: str = "auto"
    batch_size: str = "auto"
    learning_rate_multiplier: str = "auto"
    seed: str = ""
    suffix: str = ""

    def to_request(self) -> CreateJobRequest:
        """The API request this form asks for (pydantic checks the values, the error names the field).
        The API takes JSON numbers strictly, so the typed text is read as a number here first."""
        keys = ["n_epochs", "batch_size", "learning_rate_multiplier"]
        keys += ["lora_rank", "lora_alpha", "lora_dropout"] if self.method == "lora" else []
        hyper: dict[str, Any] = {
            k: _number(k, v, auto=k in keys[:3]) for k in keys if (v := getattr(self, k).strip()) and v != "auto"
        }
        if self.method == "full":
            hyper["lora_rank"] = 0
        body: dict[str, Any] = {"model": self.model, "training_file": self.training_file}
        if seed := self.seed.strip():
            body["seed"] = _number("seed", seed, auto=False)
        optional = {"validation_file": self.validation_file, "suffix": self.suffix.strip()}
        body |= {k: v for k, v in optional.items() if v}
        if hyper:
            body["method"] = {"type": "supervised", "supervised": {"hyperparameters": hyper}}
        try:
            return CreateJobRequest.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            field = [str(p) for p in first["loc"] if p in JobForm.model_fields][-1]  # n_epochs, not method
            raise InvalidRequest(f"{field} {first['msg'].lower()}: got {first.get('input')!r}.", param=field) from None


def _number(field: str, text: str, *, auto: bool) -> int | float:
    """The number typed in a box (an integer when it is one)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    problem = "must be “auto” or a number" if auto else "must be a number (blank: the default)"
    raise InvalidRequest(f"{field} {problem}: got {text!r}.", param=field)


@router.get("/jobs/new")
def new_job(request: Request, state: State, session: Console, model: str = "", training_file: str = ""):
    choices = views.model_choices(state, session.principal)
    tuned = [f for f in files.list_files(state, session.principal, purpose="fine-tune").data if f.status == "processed"]
    context = {"session": session, "choices": choices, "files": tuned, "model": model, "training_file": training_file}
    return page(request, "job_new.html", context)


@router.post("/jobs/review")
def review(request: Request, state: State, session: Checked, form: Annotated[JobForm, Form()]) -> HTMLResponse:
    """What the job will run with ("auto" resolved for this file and model) and the same call from code."""
    body = form.to_request()
    report = files.file_validation(state, session.principal, body.training_file, body.model)
    stats = report["tokens"].get("model")
    try:
        resolved = resolve(body.to_spec(), n_examples=report["examples"], mean_tokens=stats["total"]["mean"])
    except ValueError as e:
        raise InvalidRequest(str(e)) from None
    steps = math.ceil(report["examples"] / resolved.batch_size) * resolved.n_epochs
    base = str(request.base_url).rstrip("/")
    context = {
        "asked": body.to_spec(),
        "resolved": resolved,
        "report": report,
        "steps": steps,
        "tokens": {  # read: every token, after truncation; trained: the assistant tokens the loss is on
            "read": stats["trained_tokens_per_epoch"] * resolved.n_epochs,
            "trained": round(stats["assistant"]["mean"] * report["examples"]) * resolved.n_epochs,
        },
        "sdk": views.sdk_job_call(body, base),
        "curl": views.curl_job_call(body, base),
    }
    return page(request, "partials/job_review.html", context)


@router.post("/jobs")
def create(request: Request, state: State, session: Checked, form: Annotated[JobForm, Form()]) -> Response:
    job = fine_tuning.create_job(state, session.principal, form.to_request())
    return redirect(request, f"/ui/jobs/{job.id}")


# -- one job --------------------------------------------------------------------------------------
def _live(state: AppState, caller: Principal, job_id: str) -> dict[str, Any]:
    job = fine_tuning.retrieve_job(state, caller, job_id)
    progress = views.Progress.of(views.job_metrics(state, caller, job_id, recent=True)[0])
    checkpoints = fine_tuning.list_checkpoints(state, caller, job_id, limit=1000).data
    return {
        "job": job,
        "progress": progress,
        "checkpoints": checkpoints,
        "best": views.best_checkpoint(checkpoints),
        "epochs": views.epoch_ends(job, progress),
        "settings": views.job_settings(job),
        "mlflow": views.mlflow_run(job, state.settings.mlflow_tracking_uri),
        "deployment_name": views.deployment_name,
        "elapsed": views.duration(job),
    }


@router.get("/jobs/{job_id}")
def job_page(request: Request, state: State, session: Console, job_id: str) -> HTMLResponse:
    return page(request, "job.html", {"session": session, **_live(state, session.principal, job_id)})


@router.get("/jobs/{job_id}/live")
def job_live(request: Request, state: State, session: Console, job_id: str) -> HTMLResponse:
    """The polled part of the job page; polling stops once the job is finished."""
    context = _live(state, session.principal, job_id)
    status = STOPPED_POLLING if context["job"].status.is_finished else 200
    return page(request, "partials/job_live.html", {"session": session, **context}, status)


ACTIONS = {"cancel": fine_tuning.cancel_job, "pause": fine_tuning.pause_job, "resume": fine_tuning.resume_job}


@router.post("/jobs/{job_id}/{action}")
def act(
    request: Request, state: State, session: Checked, job_id: str, action: Literal["cancel", "pause", "resume"]
) -> HTMLResponse:
    ACTIONS[action](state, session.principal, job_id)
    return page(request, "partials/job_live.html", {"session": session, **_live(state, session.principal, job_id)})


@router.get("/jobs/{job_id}/events")
def events(
    request: Request, state: State, session: Console, job_id: str, level: str = "", metrics: bool = False
) -> HTMLResponse:
    found = views.job_events(state, session.principal, job_id, level=level, metrics=metrics)
    return page(request, "partials/job_events.html", {"events": found})


@router.get("/jobs/{job_id}/metrics.csv")
def metrics_csv(state: State, session: Console, job_id: str) -> Response:
    points, _ = views.job_metrics(state, session.principal, job_id)
    columns = ["step", *(m for m in views.METRICS if any(m in p for p in points))]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(points)
    disposition = f'attachment; filename="{job_id}-metrics.csv"'
    return Response(out.getvalue(), media_type="text/csv", headers={"content-disposition": disposition})


@data.get("/jobs/{job_id}/metrics")
def metrics(state: State, session: Console, job_id: str, since: str | None = None) -> dict[str, Any]:
    """The chart's data: points newer than event ``since``, the checkpoints, and where epochs end."""
    job = fine_tuning.retrieve_job(state, session.principal, job_id)
    points, newest = views.job_metrics(state, session.principal, job_id, since)
    checkpoints = fine_tuning.list_checkpoints(state, session.principal, job_id, limit=1000).data
    best = views.best_checkpoint(checkpoints)
    return {
        "status": job.status,
        "finished": job.status.is_finished,
        "since": newest,
        "series": views.series(points),
        "total_steps": points[-1]["total_steps"] if points else None,
        "n_epochs": job.hyperparameters.get("n_epochs"),
        "checkpoints": [
            {
                "step": c.step_number,
                "model": c.fine_tuned_model_checkpoint,
                "best": c.fine_tuned_model_checkpoint == best,
            }
            for c in checkpoints
        ],
    }


# -- compare ----------------------------------------------------------------------------------------
@router.get("/compare")
def compare(request: Request, state: State, session: Console, job: Annotated[list[str], Query()] = []):  # noqa: B006
    if not 2 <= len(job) <= 6:
        raise InvalidRequest("Choose two to six jobs to compare (tick them in the jobs table).", param="job")
    jobs = [fine_tuning.retrieve_job(state, session.principal, j) for j in job]
    rows = [(j, _progress(state, session.principal, j)) for j in jobs]
    chart = [{"id": j.id, "label": j.user_provided_suffix or j.id.removeprefix("ftjob-")[:8]} for j in jobs]
    context = {"session": session, "rows": rows, "diff": views.settings_diff(jobs), "chart": chart}
    return page(request, "compare.html", context)
