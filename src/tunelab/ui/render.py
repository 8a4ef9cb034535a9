"""Rendering console pages: the templates, their filters, and errors as pages a person can read.

``PageRoute`` is the route class of every HTML route: an API error raised by the route functions
the pages call (or by the session checks) becomes a readable message: a page, or for an htmx
request a fragment swapped into the page's flash area. A missing or expired session sends the
browser to the login page, saying why.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

import jinja2
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from markupsafe import Markup, escape
from starlette.templating import Jinja2Templates

from tunelab import __version__
from tunelab.api.errors import DOMAIN_ERRORS, APIError, InvalidRequest
from tunelab.ui.session import LoginRequired, clear_cookie

# The console's pages, in the order the navigation shows them. Evals (issue 11) adds its entry here.
NAV = [
    ("Overview", "/ui"),
    ("Files", "/ui/files"),
    ("Jobs", "/ui/jobs"),
    ("Deployments", "/ui/deployments"),
    ("Playground", "/ui/playground"),
]

SECURITY_HEADERS = {
    # Scripts only from this server (no inline script, no eval); styles may be inline (bars, uPlot).
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'self'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}

_IDS = re.compile(r"\b(ftjob-[0-9a-f]{24}|file-[0-9a-f]{24})\b")


def _linkify(text: str) -> Markup:
    """Escape ``text`` and link the job and file ids in it (an error naming a job links to it)."""

    def link(m: re.Match[str]) -> str:
        kind = "jobs" if m.group(1).startswith("ftjob-") else "files"
        return f'<a href="/ui/{kind}/{m.group(1)}">{m.group(1)}</a>'

    return Markup(_IDS.sub(link, str(escape(text))))


def _filesize(n: int | None) -> str:
    if n is None:
        return "—"
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "B" else f"{size:,.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _when(ts: int | None) -> str:
    return "—" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("tunelab.ui", "templates"),
        autoescape=jinja2.select_autoescape(["html"]),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(linkify=_linkify, filesize=_filesize, duration=_duration, when=_when, num=_num, quote=quote)
    env.globals.update(nav=NAV, version=__version__, now=lambda: int(time.time()))
    return env


templates = Jinja2Templates(env=_environment())


def page(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    """Render template ``name``; ``context`` should hold the ``session`` on every logged-in page."""
    return templates.TemplateResponse(request, name, context, status_code=status_code)


def is_htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


def redirect(request: Request, url: str) -> Response:
    """Go to ``url``: a full navigation for htmx (``HX-Redirect``), a 303 otherwise."""
    if is_htmx(request):
        return Response(status_code=204, headers={"hx-redirect": url})
    return RedirectResponse(url, status_code=303)


def error_page(request: Request, status: int, message: str) -> Response:
    """A readable error: for htmx, a fragment for the flash area; otherwise a page."""
    if is_htmx(request):
        html = templates.get_template("partials/flash.html").render(kind="error", message=message)
        return HTMLResponse(html, status_code=status, headers={"hx-retarget": "#flash", "hx-reswap": "innerHTML"})
    return page(request, "error.html", {"status": status, "message": message}, status_code=status)


def as_api_error(exc: Exception) -> APIError | None:
    """The API error a client would get for ``exc`` (None: not an error the API reports)."""
    if isinstance(exc, APIError):
        return exc
    to_api = DOMAIN_ERRORS.get(type(exc))
    if to_api is not None:
        return to_api(exc)
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form"))
        return InvalidRequest(f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", ""))
    return None


def login_redirect(request: Request, reason: str) -> Response:
    url = urlsplit(request.headers.get("hx-current-url", "/ui")) if is_htmx(request) else request.url
    next_url = url.path + (f"?{url.query}" if url.query else "")  # htmx: back to the page it came from
    response = redirect(request, f"/ui/login?reason={reason}&next={quote(next_url)}")
    if reason != "missing":
        clear_cookie(response)
    return response


class PageRoute(APIRoute):
    """An HTML route: API errors become readable pages, a lost session a trip to the login page."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handle = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handle(request)
            except LoginRequired as e:
                response = login_redirect(request, e.reason)
            except Exception as e:
                api_error = as_api_error(e)
                if api_error is None:
                    raise
                response = error_page(request, api_error.status, api_error.message)
            response.headers.update(SECURITY_HEADERS)
            return response

        return route
