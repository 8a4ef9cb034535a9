"""The FastAPI application: OpenAI routes under /v1, Azure data-plane under /openai, management plane."""

from __future__ import annotations

import logging
import secrets

from fastapi import APIRouter, Depends, FastAPI

from tunelab import __version__
from tunelab.api import chat, deployments, errors, evals, files, fine_tuning, models
from tunelab.api.deps import AppState, require_key
from tunelab.config import Settings
from tunelab.models.catalog import ensure_bundled
from tunelab.serving.chat import ChatService
from tunelab.serving.deployer import Deployer
from tunelab.serving.engine import Engine
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


def create_app(settings: Settings) -> FastAPI:
    settings.data_path.mkdir(parents=True, exist_ok=True)
    store = Store(settings.db_url)
    ensure_bundled(store)
    api_key, _ = resolve_api_key(settings, store)
    engine = Engine(settings.device, max_batch=settings.max_batch)
    deployer = Deployer(store, engine, settings.cache_path)
    chat_service = ChatService(store, deployer, RateLimiter() if settings.rate_limits else None)
    state = AppState(
        settings=settings,
        store=store,
        blobs=BlobStore(settings.blob_path),
        deployer=deployer,
        chat=chat_service,
        api_key=api_key,
    )

    app = FastAPI(title="tunelab", version=__version__)
    app.state.tunelab = state
    errors.install(app)

    data_plane = APIRouter(dependencies=[Depends(require_key)])
    for module in (files, fine_tuning, models, chat, evals):
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
