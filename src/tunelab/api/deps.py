"""Shared state of the API process and the ``Annotated`` aliases routes depend on."""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from tunelab.api.errors import Unauthorized
from tunelab.config import Settings
from tunelab.serving.chat import ChatService
from tunelab.serving.deployer import Deployer
from tunelab.store import Store
from tunelab.store.blobs import BlobStore


@dataclass
class AppState:
    settings: Settings
    store: Store
    blobs: BlobStore
    deployer: Deployer
    chat: ChatService
    api_key: str


def get_state(request: Request) -> AppState:
    return request.app.state.tunelab


State = Annotated[AppState, Depends(get_state)]


class Role(enum.StrEnum):
    """What a key may do."""

    ADMIN = "admin"  # everything, in every project
    OWNER = "owner"
    MEMBER = "member"
    INFERENCE = "inference"  # chat only


@dataclass(frozen=True)
class Principal:
    """Who is calling: the key's project and role. Every route that reads or writes a resource
    acts for a principal; the console's session resolves to one too."""

    key_id: str
    project_id: str
    role: Role


DEFAULT_PROJECT = "proj-default"


def authenticate(state: AppState, key: str) -> Principal:
    """The principal of an API key (the one place a key is checked).

    Raises:
        Unauthorized: no such key.
    """
    if not secrets.compare_digest(key.encode(), state.api_key.encode()):
        raise Unauthorized("Incorrect API key provided.")
    return Principal(key_id="key-admin", project_id=DEFAULT_PROJECT, role=Role.ADMIN)


def reauthenticate(state: AppState, principal: Principal) -> Principal:
    """The principal of a key that authenticated earlier, if that key is still accepted.

    A console session keeps the principal its login returned (never the key) and re-checks it here
    on every request, so that a revoked key's sessions end at once. With one admin key there is
    nothing to revoke (changing the key invalidates every session's signature instead).

    Raises:
        Unauthorized: the key no longer exists or was revoked.
    """
    admin = authenticate(state, state.api_key)  # today's only key
    if principal.key_id != admin.key_id:
        raise Unauthorized("The API key of this session is no longer valid.")
    return admin


def require_key(request: Request, state: State) -> Principal:
    """Accept ``api-key: K`` (Azure) or ``Authorization: Bearer K`` (OpenAI, Azure management)."""
    given = request.headers.get("api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if not given:
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>' or 'api-key: <key>'.")
    return authenticate(state, given)


Caller = Annotated[Principal, Depends(require_key)]
