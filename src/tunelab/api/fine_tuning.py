"""/fine_tuning/jobs: create, list, retrieve, cancel, pause, resume, events, checkpoints.

The API never trains: a job is a row that a worker process claims once it is ``queued``.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request

from tunelab.api.deps import AppState, Member, Principal, State
from tunelab.api.errors import InvalidRequest, NotFound
from tunelab.api.evals import get_eval
from tunelab.api.models import visible_model
from tunelab.api.protocol import (
    CreateJobRequest,
    Cursor,
    FineTuningJob,
    JobCheckpoint,
    JobEvent,
    ListPage,
    data_source_echo,
)
from tunelab.evals.service import check_data_source
from tunelab.evals.spec import SpecError, check_run
from tunelab.models.bundled import BundledModelMissing
from tunelab.models.catalog import ModelNotFound, model_source
from tunelab.models.folder import LoraSettings, hidden_size
from tunelab.store import lifecycle
from tunelab.store.db import new_id, now
from tunelab.store.lifecycle import JobStatus
from tunelab.store.tables import FileRow, JobRow, ModelRow
from tunelab.training.hparams import JobSpec

router = APIRouter(tags=["fine-tuning"])
SUPERVISED_FORMATS = ("chat", "prompt_completion")
Limit = Annotated[int, Query(ge=1, le=1000)]
METADATA_KEY = "metadata["  # jobs.list(metadata={"k": "v"}) is sent as metadata[k]=v


def get_job(state: State, caller: Principal, job_id: str) -> JobRow:
    """The caller's job; another project's is as absent as one that never existed."""
    row = state.store.get(JobRow, job_id)
    if row is None or row.project_id != caller.project_id:
        raise NotFound(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id")
    return row


def _job(state: State, caller: Principal, job_id: str) -> FineTuningJob:
    return FineTuningJob.from_row(get_job(state, caller, job_id))


def _fine_tune_file(state: State, caller: Principal, file_id: str, param: str) -> FileRow:
    row = state.store.get(FileRow, file_id)
    if row is None or row.project_id != caller.project_id:
        raise InvalidRequest(f"File {file_id} does not exist.", param=param, code="file_not_found")
    if row.purpose != "fine-tune":
        raise InvalidRequest(
            f"File {file_id} has purpose '{row.purpose}'; upload it with purpose 'fine-tune'.", param=param
        )
    return row


@router.post("/fine_tuning/jobs")
def create_job(state: State, caller: Member, body: CreateJobRequest) -> FineTuningJob:
    start = visible_model(state, caller, body.model)
    if start is None or start.kind not in ("base", "fine-tuned", "checkpoint"):
        known = ", ".join(m.id for m in state.store.models(kind="base"))
        raise InvalidRequest(
            f"Model {body.model} cannot be fine-tuned: give a base model ({known}), a fine-tuned model or a "
            "checkpoint.",
            param="model",
            code="model_not_available",
        )
    spec = body.to_spec()
    if start.kind != "base":
        spec = _going_on_from(start, spec)
    else:
        _check_rank(state, start, spec)
    if body.integrations:
        raise InvalidRequest(
            "Integrations are not supported; tunelab tracks every job in MLflow.", param="integrations"
        )
    eval_on_finish = _eval_on_finish(state, caller, body)
    files = {"training_file": _fine_tune_file(state, caller, body.training_file, "training_file")}
    if body.validation_file:
        files["validation_file"] = _fine_tune_file(state, caller, body.validation_file, "validation_file")

    job = JobRow(
        id=new_id("ftjob"),
        project_id=caller.project_id,
        created_at=now(),
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        suffix=body.suffix,
        user_metadata=body.metadata,
        method={"type": spec.objective},
        hyperparameters=spec.to_json(),
        result_files=[],
        eval_on_finish=eval_on_finish,
    )
    lifecycle.create(
        state.store,
        job,
        f"Validating training file: {body.training_file}"
        + (f" and validation file: {body.validation_file}" if body.validation_file else ""),
    )
    _finish_validation(state, job, files)
    return _job(state, caller, job.id)


def _check_rank(state: State, model: ModelRow, spec: JobSpec) -> None:
    """LoRA's rank is at most the model's hidden size (a wider adapter only wastes memory)."""
    if not spec.lora_rank:
        return
    try:
        width = hidden_size(model_source(state.store, model.id, state.settings.cache_path).model_dir)
    except (ModelNotFound, BundledModelMissing, OSError, ValueError):
        return  # its folder is unreadable here: the worker checks again, and fails the job with the reason
    if width is not None and spec.lora_rank > width:
        raise InvalidRequest(
            f"lora_rank must be at most the hidden size of {model.id} ({width}), got {spec.lora_rank}.",
            param="lora_rank",
        )


def _eval_on_finish(state: State, caller: Principal, body: CreateJobRequest) -> dict | None:
    """tunelab extension ``"tunelab": {"eval": {"eval_id", "data_source"}}``: checked now, run on the
    final model and the model the job starts from when it succeeds (the worker queues the runs)."""
    wanted = body.tunelab.eval if body.tunelab else None
    if wanted is None:
        return None
    ev = get_eval(state, caller, wanted.eval_id)
    data_source = data_source_echo(wanted.data_source)
    data_source["model"] = body.model  # checked as a run on the model the job starts from
    try:
        check_data_source(data_source)
        check_run(
            state.store,
            state.settings.blob_path,
            data_source,
            ev.data_source_config["item_schema"],
            ev.testing_criteria,
        )
    except SpecError as exc:
        raise InvalidRequest(exc.message, param=f"tunelab.eval.{exc.param}", code=exc.code) from None
    del data_source["model"]
    return {"eval_id": ev.id, "data_source": data_source}


def _going_on_from(model: ModelRow, spec: JobSpec) -> JobSpec:
    """A fine-tuned model is trained further by its own method: its LoRA adapter, or all its weights."""
    if model.method == "full":
        if spec.lora_rank:
            raise InvalidRequest(
                f"Model {model.id} was fully fine-tuned; it can only be fine-tuned further in full "
                "(leave lora_rank unset or 0).",
                param="lora_rank",
            )
        return replace(spec, lora_rank=0)
    assert model.path is not None  # fine-tuned models always have their folder
    own = LoraSettings.of_adapter(Path(model.path))
    for key, value in (("lora_rank", own.rank), ("lora_alpha", own.alpha), ("lora_dropout", own.dropout)):
        asked = getattr(spec, key)
        if asked is not None and asked != value:
            raise InvalidRequest(
                f"Model {model.id} is a LoRA adapter with {key} {value}; fine-tuning it further "
                f"trains that adapter (leave {key} unset).",
                param=key,
            )
    return spec.with_lora(own)


def _finish_validation(state: State, job: JobRow, files: dict[str, FileRow]) -> None:
    """Files were validated on upload: fail the job on the first bad file, else queue it."""
    for param, f in files.items():
        what = "training" if param == "training_file" else "validation"
        fmt = (f.validation or {}).get("format")
        message = None
        if f.status != "processed":
            message = f"The {what} file {f.id} has errors: {f.status_details or 'it was not processed'}"
        elif job.method["type"] == "dpo" and fmt != "preference":
            message = (
                f"The {what} file {f.id} holds {fmt} examples; DPO needs preference examples "
                '({"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}).'
            )
        elif job.method["type"] != "dpo" and fmt not in SUPERVISED_FORMATS:
            message = (
                f"The {what} file {f.id} holds {fmt} examples; supervised fine-tuning needs chat or "
                'prompt/completion examples (preference examples train with method type "dpo").'
            )
        if message:
            error = {"code": f"invalid_{param}", "message": message, "param": param}
            lifecycle.fail(state.store, job.id, error, now(), validating=True)
            return
    lifecycle.files_validated(state.store, job.id)


@router.get("/fine_tuning/jobs")
def list_jobs(
    request: Request, state: State, caller: Member, after: Cursor | None = None, limit: Limit = 20
) -> ListPage[FineTuningJob]:
    """Newest first. ``metadata[k]=v`` query parameters (the SDK's ``metadata={"k": "v"}``) keep the
    jobs whose metadata has every one of those pairs."""
    return jobs_page(state, caller, after=after, limit=limit, metadata=_metadata_filter(request))


def jobs_page(
    state: AppState,
    caller: Principal,
    *,
    after: str | None = None,
    limit: int = 20,
    metadata: dict[str, str] | None = None,
) -> ListPage[FineTuningJob]:
    """The caller's project's jobs, newest first, those with every ``metadata`` pair."""
    where = [JobRow.project_id == caller.project_id]
    for key, value in (metadata or {}).items():
        where.append(JobRow.user_metadata[key].as_string() == value)
    rows, more = state.store.page(JobRow, after=after, limit=limit, where=where)
    return ListPage.of([FineTuningJob.from_row(r) for r in rows], more)


def _metadata_filter(request: Request) -> dict[str, str]:
    pairs = {}
    for name, value in request.query_params.multi_items():
        if name.startswith(METADATA_KEY) and name.endswith("]"):
            key = name[len(METADATA_KEY) : -1]
            if not 0 < len(key) <= 64 or len(value) > 512 or '"' in key or "\\" in key:
                raise InvalidRequest(
                    "metadata keys to match are 1-64 characters without '\"' or '\\', values up to 512.", param=name
                )
            pairs[key] = value
    if len(pairs) > 16:
        raise InvalidRequest("At most 16 metadata pairs can be matched.", param="metadata")
    return pairs


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve_job(state: State, caller: Member, job_id: str) -> FineTuningJob:
    return _job(state, caller, job_id)


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(state: State, caller: Member, job_id: str) -> FineTuningJob:
    job = get_job(state, caller, job_id)
    # The worker polls the status and stops within a step; the conditional update loses no race.
    if not lifecycle.cancel(state.store, job_id, now()):
        raise InvalidRequest(
            f"Job {job_id} has already {job.status}; it cannot be cancelled.", param="fine_tuning_job_id"
        )
    return _job(state, caller, job_id)


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_job(state: State, caller: Member, job_id: str) -> FineTuningJob:
    """A queued job is paused at once; a running one is ``pausing`` until its worker has saved its state."""
    job = get_job(state, caller, job_id)
    if not lifecycle.pause(state.store, job_id):
        raise InvalidRequest(
            f"Job {job_id} is {job.status}; only a queued or running job can be paused.", param="fine_tuning_job_id"
        )
    return _job(state, caller, job_id)


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_job(state: State, caller: Member, job_id: str) -> FineTuningJob:
    """A paused job goes back to the queue; the worker that claims it goes on from where it stopped."""
    job = get_job(state, caller, job_id)
    if not lifecycle.resume(state.store, job_id):
        hint = " (it is still saving its state; try again in a moment)" if job.status is JobStatus.PAUSING else ""
        raise InvalidRequest(
            f"Job {job_id} is {job.status}; only a paused job can be resumed{hint}.", param="fine_tuning_job_id"
        )
    return _job(state, caller, job_id)


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_events(
    state: State, caller: Member, job_id: str, after: Cursor | None = None, limit: Limit = 20
) -> ListPage[JobEvent]:
    get_job(state, caller, job_id)
    rows, more = state.store.events(job_id, after=after, limit=limit)
    return ListPage.of([JobEvent.from_row(r) for r in rows], more)


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(
    state: State, caller: Member, job_id: str, after: Cursor | None = None, limit: Limit = 10
) -> ListPage[JobCheckpoint]:
    get_job(state, caller, job_id)
    rows, more = state.store.checkpoints(job_id, after=after, limit=limit)
    return ListPage.of([JobCheckpoint.from_row(r) for r in rows], more)
