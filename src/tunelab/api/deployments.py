"""Azure management-plane deployments:
``/subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.CognitiveServices/accounts/{a}/deployments``.

A deployment belongs to the project of the key that created it; names are unique on the server
(one Azure account), so another project's name is taken (409) and, for reading, absent (404).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from tunelab.api.deps import AppState, Member, Principal, State
from tunelab.api.errors import NotFound
from tunelab.api.models import visible_model
from tunelab.api.protocol import DEPLOYMENT_NAME, Deployment, DeploymentRequest
from tunelab.serving.deployer import DeploymentNotFound, NotDeployable
from tunelab.store.tables import DeploymentRow

ACCOUNT = (
    "/subscriptions/{subscription}/resourceGroups/{group}/providers/Microsoft.CognitiveServices/accounts/{account}"
)
router = APIRouter(prefix=ACCOUNT, tags=["deployments"])
Segment = Annotated[str, Path(min_length=1, max_length=256)]
Name = Annotated[str, Path(min_length=1, max_length=128)]
NewName = Annotated[
    str, Path(pattern=DEPLOYMENT_NAME, description="2-64 letters, digits, '.', '_' or '-' (Azure's rule).")
]


def _scope(request: Request) -> str:
    return request.url.path.split("/deployments")[0]


def _own(state: State, caller: Principal, name: str) -> DeploymentRow:
    row = state.store.get(DeploymentRow, name)
    if row is None or row.project_id != caller.project_id:
        raise DeploymentNotFound(name)
    return row


@router.put("/deployments/{name}")
def put_deployment(
    request: Request,
    response: Response,
    state: State,
    caller: Member,
    subscription: Segment,
    group: Segment,
    account: Segment,
    name: NewName,
    body: DeploymentRequest,
) -> Deployment:
    deployment, created = deploy(state, caller, _scope(request), name, body)
    response.status_code = 201 if created else 200
    return deployment


def deploy(state: State, caller: Principal, scope: str, name: str, body: DeploymentRequest) -> tuple[Deployment, bool]:
    """Create or replace deployment ``name`` under the management-plane ``scope``; (deployment, created)."""
    model = body.properties.model
    if visible_model(state, caller, model.name) is None:
        raise NotDeployable(model.name)
    row, created = state.deployer.create(
        name, scope, model.name, model.format, model.version, body.sku.model_dump(), caller.project_id
    )
    return Deployment.from_row(row), created


@router.get("/deployments")
def list_deployments(state: State, caller: Member, subscription: Segment, group: Segment, account: Segment) -> dict:
    return {"value": [d.model_dump() for d in deployments_of(state, caller)]}


def deployments_of(state: AppState, caller: Principal) -> list[Deployment]:
    """The caller's project's deployments."""
    return [Deployment.from_row(r) for r in state.store.deployments() if r.project_id == caller.project_id]


@router.get("/deployments/{name}")
def get_deployment(
    state: State, caller: Member, subscription: Segment, group: Segment, account: Segment, name: Name
) -> Deployment:
    return Deployment.from_row(_own(state, caller, name))


@router.delete("/deployments/{name}", status_code=200)
def delete_deployment(
    state: State, caller: Member, subscription: Segment, group: Segment, account: Segment, name: Name
) -> Response:
    undeploy(state, caller, name)
    return Response(status_code=200)


def undeploy(state: AppState, caller: Principal, name: str) -> None:
    """Delete the caller's project's deployment ``name``."""
    _own(state, caller, name)
    try:
        state.deployer.delete(name)
    except DeploymentNotFound:  # deleted meanwhile
        raise NotFound(f"The deployment '{name}' does not exist.", param="deployment_name") from None
