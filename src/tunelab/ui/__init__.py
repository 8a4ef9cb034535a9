"""The web console at /ui: server-rendered pages (Jinja2 + htmx, uPlot charts, a small chat module).

A client of the API, not a second implementation: every page handler calls the API's route
functions (``api/files.py``, ``api/fine_tuning.py``, ...) with the principal of the session, so
the console sees and may do exactly what the session's key may. Everything a page shows is read
from the server, so a reload shows the same state. The JavaScript and CSS it needs are vendored
in ``static/vendor`` (see ``vendor.py``); nothing is fetched from the internet.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi.staticfiles import StaticFiles

from tunelab.api.deps import AppState
from tunelab.ui import auth, deployments, files, jobs, overview, playground
from tunelab.ui.session import session_codec

# The page modules; the evals page (issue 11) is one more module here and one NAV entry in render.py.
PAGES = (auth, overview, files, jobs, deployments, playground)


def mount(app: FastAPI, state: AppState) -> None:
    """Serve the console under /ui (pages), /ui/api (what page scripts call) and /ui/static."""
    app.state.console_sessions = session_codec(state, state.store)
    for module in PAGES:
        app.include_router(module.router, prefix="/ui")
    for module in (jobs, playground):
        app.include_router(module.data, prefix="/ui/api")
    app.mount("/ui/static", StaticFiles(packages=[("tunelab.ui", "static")]), name="console-static")

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/ui")
