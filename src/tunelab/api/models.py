"""/models: base models (shared by every project), and a project's fine-tuned models and checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import APIRouter

from tunelab.api.deps import Caller, Member, Principal, State
from tunelab.api.errors import Conflict, InvalidRequest, NotFound
from tunelab.api.protocol import ListPage, ModelDeleted, ModelObject
from tunelab.store.tables import ModelRow

router = APIRouter(tags=["models"])


def visible_model(state: State, caller: Principal, model_id: str) -> ModelRow | None:
    """The model, if the caller may see it: a base model, or one of its project's."""
    row = state.store.get(ModelRow, model_id)
    return row if row is not None and row.project_id in (None, caller.project_id) else None


def get_model(state: State, caller: Principal, model_id: str) -> ModelRow:
    row = visible_model(state, caller, model_id)
    if row is None:
        raise NotFound(f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return row


@router.get("/models")
def list_models(state: State, caller: Caller) -> ListPage[ModelObject]:
    rows = [r for r in state.store.models() if r.project_id in (None, caller.project_id)]
    return ListPage.of([ModelObject.from_row(r) for r in rows])


# Model ids contain slashes (HuggingFaceTB/SmolLM2-135M-Instruct, ft:<base>:...), hence :path.
@router.get("/models/{model_id:path}")
def retrieve_model(state: State, caller: Caller, model_id: str) -> ModelObject:
    return ModelObject.from_row(get_model(state, caller, model_id))


@router.delete("/models/{model_id:path}")
def delete_model(state: State, caller: Member, model_id: str) -> ModelDeleted:
    row = get_model(state, caller, model_id)
    if row.kind == "base":
        raise InvalidRequest("Base models cannot be deleted through the API.", param="model")
    users = [d.name for d in state.store.deployments() if d.model == model_id]
    if users:
        raise Conflict(
            f"Model {model_id} is deployed as {', '.join(users)}; delete the deployment first.", param="model"
        )
    job = state.store.active_job_from(model_id)
    if job:
        raise Conflict(f"Model {model_id} is being fine-tuned further by job {job}; cancel it first.", param="model")
    state.store.delete(ModelRow, model_id)
    if row.path and row.kind == "fine-tuned":
        shutil.rmtree(Path(row.path), ignore_errors=True)
    return ModelDeleted(id=model_id)
