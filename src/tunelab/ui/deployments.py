"""Deployments: create one from any model or checkpoint, watch it load, its endpoint and code, delete."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field

from tunelab.api import deployments
from tunelab.api.deps import AppState, Principal, State
from tunelab.api.protocol import DeploymentModel, DeploymentProperties, DeploymentRequest, DeploymentSku
from tunelab.ui import views
from tunelab.ui.render import PageRoute, page, redirect
from tunelab.ui.session import Checked, Console

router = APIRouter(route_class=PageRoute, include_in_schema=False)
# Console deployments live under one management-plane account (the API keeps the path it was created under).
SCOPE = "/subscriptions/tunelab/resourceGroups/console/providers/Microsoft.CognitiveServices/accounts/tunelab"
STOPPED_POLLING = 286


class DeploymentForm(BaseModel):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    model: str = Field(min_length=1)
    capacity: int = Field(default=1, ge=1, le=1000)


def _table(request: Request, state: AppState, caller: Principal) -> dict[str, Any]:
    base = str(request.base_url).rstrip("/")
    listed = [d.model_dump() for d in deployments.deployments_of(state, caller)]
    rows = [(d, views.sdk_chat_call(d["name"], base)) for d in listed]
    loading = any(d["properties"]["provisioningState"] == "Creating" for d in listed)
    return {"rows": rows, "loading": loading, "base": base, "scope": SCOPE}


@router.get("/deployments")
def deployments_page(request: Request, state: State, session: Console, model: str = "") -> HTMLResponse:
    choices = views.model_choices(state, session.principal)
    context = {"session": session, "choices": choices, "model": model, "suggest": views.deployment_name(model)}
    return page(request, "deployments.html", context | _table(request, state, session.principal))


@router.get("/deployments/table")
def table(request: Request, state: State, session: Console) -> HTMLResponse:
    """The polled table; polling stops once nothing is loading."""
    context = _table(request, state, session.principal)
    status = 200 if context["loading"] else STOPPED_POLLING
    return page(request, "partials/deployments_table.html", {"session": session, **context}, status)


@router.post("/deployments")
def create(request: Request, state: State, session: Checked, form: Annotated[DeploymentForm, Form()]) -> Response:
    """Create or replace a deployment; the model loads in the background (the table shows it)."""
    body = DeploymentRequest(
        sku=DeploymentSku(capacity=form.capacity),
        properties=DeploymentProperties(model=DeploymentModel(name=form.model)),
    )
    deployments.deploy(state, session.principal, SCOPE, form.name, body)
    if request.headers.get("hx-target") == "deployments-table":  # the form on this page: refresh the table
        context = {"session": session, **_table(request, state, session.principal)}
        return page(request, "partials/deployments_table.html", context)
    return redirect(request, "/ui/deployments")  # a Deploy button elsewhere: go and watch it load


@router.post("/deployments/{name}/delete")
def delete(request: Request, state: State, session: Checked, name: str) -> HTMLResponse:
    deployments.undeploy(state, session.principal, name)
    context = _table(request, state, session.principal)
    return page(request, "partials/deployments_table.html", {"session": session, **context})
