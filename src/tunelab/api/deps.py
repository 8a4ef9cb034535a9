"""Shared state of the API process and the ``Annotated`` aliases routes depend on."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated

from fastapi import Depends, Request

from tunelab.api.errors import Forbidden, Unauthorized
from tunelab.config import Settings
from tunelab.serving.chat import ChatService
from tunelab.serving.deployer import Deployer
from tunelab.store import Store
from tunelab.store.blobs import BlobStore
from tunelab.store.keys import KeyRing, Role
from tunelab.store.tables import DEFAULT_PROJECT

__all__ = ["DEFAULT_PROJECT", "AppState", "Caller", "Member", "Principal", "Role", "State", "authenticate"]


@dataclass
class AppState:
    settings: Settings
    store: Store
    blobs: BlobStore
    deployer: Deployer
    chat: ChatService
    keys: KeyRing
    embedded_worker: bool = False
    """``tunelab serve`` runs a worker beside the API: /ready needs a live one."""


def get_state(request: Request) -> AppState:
    return request.app.state.tunelab


State = Annotated[AppState, Depends(get_state)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's project and role. Every route that reads or writes a resource
    acts for a principal; the console's session resolves to one too."""

    key_id: str
    project_id: str
    """The project it acts in: its key's project; for an admin key the default project, or the
    one its ``OpenAI-Project`` header names."""
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    def may_manage_keys_of(self, project_id: str) -> bool:
        """Admin keys manage every project's keys; an owner key its own project's."""
        return self.is_admin or (self.role is Role.OWNER and self.project_id == project_id)


def authenticate(state: AppState, key: str) -> Principal:
    """The principal of an API key (the one place a key is checked).

    Raises:
        Unauthorized: no such key, or it was revoked, or its project is archived.
    """
    found = state.keys.find(key)
    if found is None:
        raise Unauthorized("Incorrect API key provided.")
    row, _project = found
    return Principal(key_id=row.id, project_id=row.project_id or DEFAULT_PROJECT, role=Role(row.role))


def reauthenticate(state: AppState, principal: Principal) -> Principal:
    """The principal of a key that authenticated earlier, if that key is still accepted.

    A console session keeps the principal its login returned (never the key) and re-checks it here
    on every request, so that a session ends as soon as its key is revoked or its project archived.

    Raises:
        Unauthorized: the key no longer exists, was revoked, or its project is archived.
    """
    found = state.keys.find_id(principal.key_id)
    if found is None:
        raise Unauthorized("The API key of this session is no longer valid.")
    row, _project = found
    return Principal(key_id=row.id, project_id=principal.project_id, role=Role(row.role))


def require_key(request: Request, state: State) -> Principal:
    """Accept ``api-key: K`` (Azure) or ``Authorization: Bearer K`` (OpenAI, Azure management).

    ``OpenAI-Project: proj_...`` (the SDK's ``project=``) picks the project an admin key acts in;
    a project key's header must name its own project.
    """
    given = request.headers.get("api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if not given:
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>' or 'api-key: <key>'.")
    principal = authenticate(state, given)
    wanted = request.headers.get("openai-project")
    if wanted and wanted != principal.project_id:
        project = state.keys.project(wanted) if principal.is_admin else None
        if project is None or project.archived_at is not None:
            raise Unauthorized(
                f"OpenAI-Project header names '{wanted}', which is not a project this key can act in.",
                code="mismatched_project",
            )
        principal = replace(principal, project_id=wanted)
    return principal


Caller = Annotated[Principal, Depends(require_key)]
"""Any valid key: chat completions and reading the model list."""


def require_member(caller: Caller) -> Principal:
    """A key that may upload, train and deploy: every role but ``inference``."""
    if caller.role is Role.INFERENCE:
        raise Forbidden("This key may only call chat completions and read the model list (role 'inference').")
    return caller


Member = Annotated[Principal, Depends(require_member)]
