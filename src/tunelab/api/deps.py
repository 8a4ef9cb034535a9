"""Shared state of the API process and the ``Annotated`` aliases routes depend on."""

from __future__ import annotations

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


def require_key(request: Request, state: State) -> None:
    """Accept ``api-key: K`` (Azure) or ``Authorization: Bearer K`` (OpenAI, Azure management)."""
    given = request.headers.get("api-key")
    if given is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else None
    if not given:
        raise Unauthorized("Missing API key: send it as 'Authorization: Bearer <key>' or 'api-key: <key>'.")
    if not secrets.compare_digest(given.encode(), state.api_key.encode()):
        raise Unauthorized("Incorrect API key provided.")
