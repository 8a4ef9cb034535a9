"""Azure management-plane deployments:
``/subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.CognitiveServices/accounts/{a}/deployments``.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from tunelab.api.deps import Caller, State
from tunelab.api.protocol import Deployment, DeploymentRequest

ACCOUNT = (
    "/subscriptions/{subscription}/resourceGroups/{group}/providers/Microsoft.CognitiveServices/accounts/{account}"
)
router = APIRouter(prefix=ACCOUNT, tags=["deployments"])


def _scope(request: Request) -> str:
    return request.url.path.split("/deployments")[0]


@router.put("/deployments/{name}")
def put_deployment(
    request: Request, response: Response, state: State, caller: Caller, name: str, body: DeploymentRequest
) -> Deployment:
    deployment, created = deploy(state, caller, _scope(request), name, body)
    response.status_code = 201 if created else 200
    return deployment


def deploy(state: State, caller: Caller, scope: str, name: str, body: DeploymentRequest) -> tuple[Deployment, bool]:
    """Create or replace deployment ``name`` under the management-plane ``scope``; (deployment, created)."""
    model = body.properties.model
    row, created = state.deployer.create(name, scope, model.name, model.format, model.version, body.sku.model_dump())
    return Deployment.from_row(row), created


@router.get("/deployments")
def list_deployments(state: State, caller: Caller) -> dict:
    return {"value": [Deployment.from_row(r).model_dump() for r in state.store.deployments()]}


@router.get("/deployments/{name}")
def get_deployment(state: State, caller: Caller, name: str) -> Deployment:
    return Deployment.from_row(state.deployer.get(name))


@router.delete("/deployments/{name}", status_code=200)
def delete_deployment(state: State, caller: Caller, name: str) -> Response:
    state.deployer.delete(name)
    return Response(status_code=200)
