"""The FastAPI application: OpenAI routes under /v1, Azure data-plane under /openai, management plane."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from tunelab import __version__, ui
from tunelab.api import chat, deployments, errors, evals, files, fine_tuning, health, models, organization
from tunelab.api.deps import AppState, require_key
from tunelab.api.limits import BodyLimit
from tunelab.config import Settings
from tunelab.models.catalog import ensure_bundled
from tunelab.serving.chat import ChatService
from tunelab.serving.deployer import Deployer
from tunelab.serving.engine import Engine
from tunelab.serving.ratelimit import RateLimiter
from tunelab.store import Store
from tunelab.store.blobs import BlobStore
from tunelab.store.keys import KeyRing, bootstrap_admin_key

log = logging.getLogger("tunelab")
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def create_app(settings: Settings, *, lifespan: Lifespan | None = None, supervisor: Any = None) -> FastAPI:
    """The app. ``lifespan`` runs around serving (``tunelab serve`` starts and stops its worker
    there); ``supervisor`` is that worker's ``WorkerSupervisor``, if there is one (/ready then
    needs a live worker)."""
    settings.data_path.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    ensure_bundled(store)
    bootstrap_admin_key(settings, store)
    engine = Engine(settings.device, max_batch=settings.max_batch)
    deployer = Deployer(store, engine, settings.cache_path)
    chat_service = ChatService(store, deployer, RateLimiter() if settings.rate_limits else None)
    blobs = BlobStore(settings.blob_path)
    if swept := blobs.sweep_abandoned():
        log.info("deleted %d partial uploads left by processes that died mid-upload", swept)
    state = AppState(
        settings=settings,
        store=store,
        blobs=blobs,
        deployer=deployer,
        chat=chat_service,
        keys=KeyRing.of(settings, store),
        embedded_worker=supervisor is not None,
    )

    app = FastAPI(title="tunelab", version=__version__, lifespan=lifespan)
    app.state.tunelab = state
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes, upload_bytes=settings.max_upload_bytes)

    # Each route also names its caller (deps.Caller, deps.Member: the role it needs); the key is
    # checked once per request either way.
    keyed = [Depends(require_key)]
    data_plane = APIRouter(dependencies=keyed)
    for module in (files, fine_tuning, models, chat, evals):
        data_plane.include_router(module.router)
    app.include_router(data_plane, prefix="/v1")
    # AzureOpenAI(azure_endpoint=E) calls E/openai/<same path>?api-version=...; inference paths
    # get /deployments/{name} (chat.router serves both spellings).
    app.include_router(data_plane, prefix="/openai")
    app.include_router(organization.router, prefix="/v1", dependencies=keyed)
    app.include_router(deployments.router, dependencies=keyed)
    app.include_router(health.router)
    ui.mount(app, state)  # the web console at /ui, on the session of a logged-in key
    return app
