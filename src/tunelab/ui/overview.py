"""The overview: running jobs with live sparklines, deployments, recent events."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from tunelab.api import deployments, files, fine_tuning
from tunelab.api.deps import AppState, Principal, State
from tunelab.ui import views
from tunelab.ui.render import PageRoute, page
from tunelab.ui.session import Console

router = APIRouter(route_class=PageRoute, include_in_schema=False)
RECENT_JOBS = 5


@router.get("")
def overview(request: Request, state: State, session: Console) -> HTMLResponse:
    return page(request, "overview.html", {"session": session, **_live(state, session.principal)})


@router.get("/overview/live")
def overview_live(request: Request, state: State, session: Console) -> HTMLResponse:
    return page(request, "partials/overview_live.html", {"session": session, **_live(state, session.principal)})


def _live(state: AppState, caller: Principal) -> dict[str, Any]:
    jobs = fine_tuning.jobs_page(state, caller, limit=100).data
    running = []
    for job in (j for j in jobs if not j.status.is_finished):
        points, _ = views.job_metrics(state, caller, job.id, recent=True)
        losses = [p["train_loss"] for p in points]
        running.append((job, views.Progress.of(points), views.sparkline(losses)))
    events = [
        (job.id, event) for job in jobs[:RECENT_JOBS] for event in views.job_events(state, caller, job.id, limit=10)
    ]
    events.sort(key=lambda pair: pair[1].created_at, reverse=True)
    return {
        "running": running,
        "jobs": jobs,
        "deployments": [d.model_dump() for d in deployments.deployments_of(state, caller)],
        "events": events[:15],
        "n_files": len(files.list_files(state, caller, purpose="fine-tune").data),
    }
