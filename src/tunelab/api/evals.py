"""/evals: evals, their runs and output items (OpenAI's Evals API).

The API never samples or grades: a run is a row that a worker claims once it is ``queued``
(tunelab.evals.executor). Everything is checked here first, so that a bad template variable, an
unknown model, a file that is not JSONL or an item failing the schema is a 400 naming the field.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool

from tunelab.api.deps import Member, State
from tunelab.api.errors import InvalidRequest, NotFound
from tunelab.api.protocol import (
    CompletionsDataSource,
    CreateEvalRequest,
    CreateEvalRunRequest,
    Eval,
    EvalDeleted,
    EvalOutputItem,
    EvalRun,
    EvalRunDeleted,
    ListPage,
    UpdateEvalRequest,
    data_source_echo,
)
from tunelab.evals import service
from tunelab.store import eval_lifecycle as runs
from tunelab.store.db import now
from tunelab.store.eval_lifecycle import EvalRunStatus
from tunelab.store.tables import EvalOutputItemRow, EvalRow, EvalRunRow

router = APIRouter(tags=["evals"])
Limit = Annotated[int, Query(ge=1, le=1000)]
Order = Literal["asc", "desc"]


def get_eval(state: State, caller: Member, eval_id: str) -> EvalRow:
    row = state.store.get(EvalRow, eval_id)
    if row is None or row.project_id != caller.project_id:
        raise NotFound(f"No such eval: {eval_id}", param="eval_id")
    return row


def get_run(state: State, caller: Member, eval_id: str, run_id: str) -> EvalRunRow:
    row = state.store.get(EvalRunRow, run_id)
    if row is None or row.eval_id != eval_id or row.project_id != caller.project_id:
        raise NotFound(f"No such eval run: {run_id} (of eval {eval_id})", param="run_id")
    return row


def _run(request: Request, row: EvalRunRow) -> EvalRun:
    return EvalRun.from_row(row, str(request.base_url).rstrip("/"))


# -- evals -----------------------------------------------------------------------------------------
@router.post("/evals", status_code=201)
def create_eval(state: State, caller: Member, body: CreateEvalRequest) -> Eval:
    config = body.data_source_config.model_dump()
    criteria = body.criteria_echo()
    service.check_eval(state.store, config, criteria)
    created = now()
    row = EvalRow(
        id=service.new_eval_id(),
        project_id=caller.project_id,
        created_at=created,
        updated_at=created,
        name=body.name or "eval",
        user_metadata=body.metadata,
        data_source_config=config,
        testing_criteria=criteria,
    )
    state.store.add(row)
    return Eval.from_row(row)


@router.get("/evals")
def list_evals(
    state: State,
    caller: Member,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    order_by: Literal["created_at", "updated_at"] = "created_at",
) -> ListPage[Eval]:
    rows, more = state.store.page(
        EvalRow,
        after=after,
        limit=limit,
        newest_first=order == "desc",
        where=[EvalRow.project_id == caller.project_id],
        order_by=order_by,
    )
    return ListPage.of([Eval.from_row(r) for r in rows], more)


@router.get("/evals/{eval_id}")
def retrieve_eval(state: State, caller: Member, eval_id: str) -> Eval:
    return Eval.from_row(get_eval(state, caller, eval_id))


@router.post("/evals/{eval_id}")
def update_eval(state: State, caller: Member, eval_id: str, body: UpdateEvalRequest) -> Eval:
    row = get_eval(state, caller, eval_id)
    given = body.model_dump(exclude_unset=True)
    if "name" in given and given["name"] is not None:
        row.name = given["name"]
    if "metadata" in given:
        row.user_metadata = given["metadata"]
    row.updated_at = now()
    state.store.put(row)
    return Eval.from_row(row)


@router.delete("/evals/{eval_id}")
def delete_eval(state: State, caller: Member, eval_id: str) -> EvalDeleted:
    """Its runs and output items go too; a worker running one stops after the items in flight."""
    get_eval(state, caller, eval_id)
    for run in state.store.eval_runs_in(runs.RUN_ACTIVE):
        if run.eval_id == eval_id:
            runs.cancel(state.store, run.id, now())
    state.store.delete(EvalRow, eval_id)
    return EvalDeleted(eval_id=eval_id)


# -- runs ------------------------------------------------------------------------------------------
@router.post("/evals/{eval_id}/runs", status_code=201)
async def create_run(
    request: Request, state: State, caller: Member, eval_id: str, body: CreateEvalRunRequest
) -> EvalRun:
    ev = get_eval(state, caller, eval_id)
    ds = body.data_source
    params = ds.sampling_params if isinstance(ds, CompletionsDataSource) else None
    if params is not None and (params.response_format is not None or params.tools):
        field = "response_format" if params.response_format is not None else "tools"
        raise InvalidRequest(
            f"sampling_params.{field} is not supported by tunelab.", param=f"data_source.sampling_params.{field}"
        )
    # Reading and checking a large file takes a moment: off the event loop.
    row = await run_in_threadpool(
        service.queue_run,
        state.store,
        state.settings.blob_path,
        ev,
        data_source_echo(ds),
        name=body.name,
        metadata=body.metadata,
        project_id=caller.project_id,
    )
    return _run(request, row)


@router.get("/evals/{eval_id}/runs")
def list_runs(
    request: Request,
    state: State,
    caller: Member,
    eval_id: str,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    status: EvalRunStatus | None = None,
) -> ListPage[EvalRun]:
    get_eval(state, caller, eval_id)
    where = [EvalRunRow.eval_id == eval_id, EvalRunRow.project_id == caller.project_id]
    if status is not None:
        where.append(EvalRunRow.status == status)
    rows, more = state.store.page(
        EvalRunRow, after=after, limit=limit, newest_first=order == "desc", where=where, order_by="created_at"
    )
    return ListPage.of([_run(request, r) for r in rows], more)


@router.get("/evals/{eval_id}/runs/{run_id}")
def retrieve_run(request: Request, state: State, caller: Member, eval_id: str, run_id: str) -> EvalRun:
    return _run(request, get_run(state, caller, eval_id, run_id))


@router.post("/evals/{eval_id}/runs/{run_id}/cancel")
@router.post("/evals/{eval_id}/runs/{run_id}")
def cancel_run(request: Request, state: State, caller: Member, eval_id: str, run_id: str) -> EvalRun:
    """The SDK posts to ``.../cancel`` (no body); OpenAI's reference names ``POST .../runs/{id}``: both cancel."""
    run = get_run(state, caller, eval_id, run_id)
    if not runs.cancel(state.store, run_id, now()):
        raise InvalidRequest(f"Run {run_id} has already {run.status}; it cannot be canceled.", param="run_id")
    return _run(request, get_run(state, caller, eval_id, run_id))


@router.delete("/evals/{eval_id}/runs/{run_id}")
def delete_run(state: State, caller: Member, eval_id: str, run_id: str) -> EvalRunDeleted:
    get_run(state, caller, eval_id, run_id)
    runs.cancel(state.store, run_id, now())  # a worker running it stops; then the rows go
    state.store.delete(EvalRunRow, run_id)
    return EvalRunDeleted(run_id=run_id)


@router.get("/evals/{eval_id}/runs/{run_id}/output_items")
def list_output_items(
    state: State,
    caller: Member,
    eval_id: str,
    run_id: str,
    after: str | None = None,
    limit: Limit = 20,
    order: Order = "asc",
    status: Literal["pass", "fail", "failed"] | None = None,
) -> ListPage[EvalOutputItem]:
    """In data-source order; ``status=fail`` (or ``failed``, the SDK docstring's spelling)."""
    get_run(state, caller, eval_id, run_id)
    wanted = {"pass": "pass", "fail": "fail", "failed": "fail"}.get(status or "")
    rows, more = state.store.output_items(run_id, after=after, limit=limit, newest_first=order == "desc", status=wanted)
    return ListPage.of([EvalOutputItem.from_row(r) for r in rows], more)


@router.get("/evals/{eval_id}/runs/{run_id}/output_items/{output_item_id}")
def retrieve_output_item(
    state: State, caller: Member, eval_id: str, run_id: str, output_item_id: str
) -> EvalOutputItem:
    get_run(state, caller, eval_id, run_id)
    row = state.store.get(EvalOutputItemRow, output_item_id)
    if row is None or row.run_id != run_id:
        raise NotFound(f"No such output item: {output_item_id} (of run {run_id})", param="output_item_id")
    return EvalOutputItem.from_row(row)
