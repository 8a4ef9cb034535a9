"""The FastAPI application: OpenAI routes under /v1, Azure data-plane under /openai, management plane."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

from fastapi import APIRouter, Depends, FastAPI

from tunelab import __version__
from tunelab.api import chat, deployments, errors, files, fine_tuning, models
from tunelab.api.deps import AppState, require_key
from tunelab.config import Settings
from tunelab.models.catalog import ensure_bundled
from tunelab.serving.chat import ChatLimits, ChatService
from tunelab.serving.deployer import Deployer
from tunelab.serving.engines import create_engine
from tunelab.serving.ratelimit import RateLimiter
from tunelab.store import Store
from tunelab.store.blobs import BlobStore

log = logging.getLogger("tunelab")


def resolve_api_key(settings: Settings, store: Store) -> tuple[str, bool]:
    """The configured key, else one generated on first start and kept in the store."""
    if settings.api_key:
        return settings.api_key, False
    stored = store.setting("api_key")
    if stored:
        return stored, False
    return store.set_setting_once("api_key", "tl-" + secrets.token_urlsafe(32)), True


def serving_lifespan(chat: ChatService) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    """On shutdown, generations still running are cancelled and the engine stops (vLLM's processes
    with it). uvicorn first lets in-flight requests finish for ``timeout_graceful_shutdown``
    (``tunelab serve`` sets it to TUNELAB_SHUTDOWN_GRACE_SECONDS), then cancels them."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await asyncio.to_thread(chat.close, 1.0)

    return lifespan


def create_app(settings: Settings) -> FastAPI:
    settings.data_path.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    ensure_bundled(store)
    api_key, _ = resolve_api_key(settings, store)
    engine = create_engine(settings)
    deployer = Deployer(store, engine, settings.cache_path)
    limits = ChatLimits(default_max_tokens=settings.default_max_tokens, max_pending=settings.max_pending_chats)
    chat_service = ChatService(store, deployer, RateLimiter() if settings.rate_limits else None, limits)
    state = AppState(
        settings=settings,
        store=store,
        blobs=BlobStore(settings.blob_path),
        deployer=deployer,
        chat=chat_service,
        api_key=api_key,
    )

    app = FastAPI(title="tunelab", version=__version__, lifespan=serving_lifespan(chat_service))
    app.state.tunelab = state
    errors.install(app)

    data_plane = APIRouter(dependencies=[Depends(require_key)])
    for module in (files, fine_tuning, models, chat):
        data_plane.include_router(module.router)
    app.include_router(data_plane, prefix="/v1")
    # AzureOpenAI(azure_endpoint=E) calls E/openai/<same path>?api-version=...; inference paths
    # get /deployments/{name} (chat.router serves both spellings).
    app.include_router(data_plane, prefix="/openai")
    app.include_router(deployments.router, dependencies=[Depends(require_key)])

    @app.get("/health", include_in_schema=False)
    def health() -> dict:
        return {"status": "ok"}

    return app
