"""The FastAPI application: OpenAI routes under /v1, Azure data-plane under /openai, management plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI

from tunelab import __version__, ui
from tunelab.api import chat, deployments, errors, evals, files, fine_tuning, health, models, organization
from tunelab.api.deps import AppState, require_key
from tunelab.api.limits import BodyLimit
from tunelab.config import Settings
from tunelab.models.catalog import ensure_bundled
from tunelab.serving.chat import ChatLimits, ChatService
from tunelab.serving.deployer import Deployer
from tunelab.serving.engines import create_engine
from tunelab.serving.ratelimit import RateLimiter
from tunelab.store import Store
from tunelab.store.blobs import BlobStore
from tunelab.store.keys import KeyRing, bootstrap_admin_key

log = logging.getLogger("tunelab")
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def serving_lifespan(chat: ChatService, inner: Lifespan | None) -> Lifespan:
    """Around ``inner`` (``tunelab serve`` starts and stops its worker there): on shutdown,
    generations still running are cancelled and the engine stops (vLLM's processes with it).
    uvicorn first lets in-flight requests finish for ``timeout_graceful_shutdown`` (``tunelab serve``
    sets it to TUNELAB_SHUTDOWN_GRACE_SECONDS), then cancels them."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            if inner is None:
                yield
            else:
                async with inner(app):
                    yield
        finally:
            await asyncio.to_thread(chat.close, 1.0)

    return lifespan


def create_app(settings: Settings, *, lifespan: Lifespan | None = None, supervisor: Any = None) -> FastAPI:
    """The app. ``lifespan`` runs around serving (``tunelab serve`` starts and stops its worker
    there); ``supervisor`` is that worker's ``WorkerSupervisor``, if there is one (/ready then
    needs a live worker)."""
    settings.data_path.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    ensure_bundled(store)
    bootstrap_admin_key(settings, store)
    engine = create_engine(settings)
    deployer = Deployer(store, engine, settings.cache_path)
    limits = ChatLimits(default_max_tokens=settings.default_max_tokens, max_pending=settings.max_pending_chats)
    chat_service = ChatService(store, deployer, RateLimiter() if settings.rate_limits else None, limits)
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

    app = FastAPI(title="tunelab", version=__version__, lifespan=serving_lifespan(chat_service, lifespan))
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
