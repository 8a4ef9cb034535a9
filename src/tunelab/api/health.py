"""Probes for a service manager or a load balancer (no key needed, nothing sensitive shown).

``GET /health``: the process answers (liveness). ``GET /ready``: it can do its work (readiness):
the database answers, a worker is alive when ``tunelab serve`` runs one, and the data dir's disk
has ``TUNELAB_MIN_FREE_DISK_BYTES`` free. 503 with an OpenAI-shaped error otherwise.
"""

from __future__ import annotations

import logging
import shutil
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tunelab.api.deps import State
from tunelab.api.errors import error_body
from tunelab.store.db import now

router = APIRouter(tags=["health"])
log = logging.getLogger("tunelab.api")


@router.get("/health")
def health() -> dict:
    return {"status": "ok"}


@router.get("/ready", responses={503: {"description": "Not ready: the failing checks are named"}})
def ready(state: State) -> JSONResponse:
    checks: dict[str, Any] = {}
    failing = []
    try:
        state.store.ping()
        checks["database"] = "ok"
    except Exception as e:  # whatever the driver raises: not ready, and why
        log.warning("readiness: the database does not answer: %s", e)
        checks["database"] = "unreachable"
        failing.append("the database does not answer")
    if state.embedded_worker and checks["database"] == "ok":
        live = state.store.workers(beat_since=now() - int(state.settings.worker_timeout_seconds))
        checks["workers"] = {"live": len(live)}
        if not live:
            failing.append("no training worker is alive")
    free = shutil.disk_usage(state.settings.data_path).free
    checks["disk"] = {"free_bytes": free, "min_free_bytes": state.settings.min_free_disk_bytes}
    if free < state.settings.min_free_disk_bytes:
        failing.append(f"the data dir's disk has {free} bytes free, under {state.settings.min_free_disk_bytes}")
    if failing:
        body = error_body("Not ready: " + "; ".join(failing) + ".", "service_unavailable", None, "not_ready")
        return JSONResponse({**body, "status": "not_ready", "checks": checks}, status_code=503)
    return JSONResponse({"status": "ready", "checks": checks})
