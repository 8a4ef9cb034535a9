"""Azure management-plane deployments:
``/subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.CognitiveServices/accounts/{a}/deployments``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from tunelab.api.deps import State
from tunelab.api.errors import InvalidRequest, NotFound
from tunelab.api.protocol import Deployment, DeploymentRequest
from tunelab.models.catalog import ModelNotFound
from tunelab.serving.deployer import DeploymentNotFound
from tunelab.store.tables import DeploymentRow

ACCOUNT = (
    "/subscriptions/{subscription}/resourceGroups/{group}"
    "/providers/Microsoft.CognitiveServices/accounts/{account}"
)
router = APIRouter(prefix=ACCOUNT, tags=["deployments"])


def _scope(request: Request) -> str:
    return request.url.path.split("/deployments")[0]


def _not_found(name: str) -> NotFound:
    return NotFound(f"Deployment '{name}' was not found.", param="deployment", code="DeploymentNotFound")


@router.put("/deployments/{name}")
def put_deployment(request: Request, response: Response, state: State, name: str, body: DeploymentRequest) -> Deployment:
    model = body.properties.model
    try:
        row, created = state.deployer.create(
            name, _scope(request), model.name, model.format, model.version, body.sku.model_dump()
        )
    except ModelNotFound:
        raise InvalidRequest(
            f"Model '{model.name}' does not exist; use a base model, a fine-tuned model or a checkpoint id.",
            param="properties.model.name", code="DeploymentModelNotSupported",
        ) from None
    response.status_code = 201 if created else 200
    return Deployment.from_row(row)


@router.get("/deployments")
def list_deployments(state: State) -> dict:
    return {"value": [Deployment.from_row(r).model_dump() for r in state.store.deployments()]}


@router.get("/deployments/{name}")
def get_deployment(state: State, name: str) -> Deployment:
    row = state.store.get(DeploymentRow, name)
    if row is None:
        raise _not_found(name)
    return Deployment.from_row(row)


@router.delete("/deployments/{name}", status_code=200)
def delete_deployment(state: State, name: str) -> Response:
    try:
        state.deployer.delete(name)
    except DeploymentNotFound:
        raise _not_found(name) from None
    return Response(status_code=200)
