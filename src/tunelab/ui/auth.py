"""Login and logout: an API key in, a session cookie out; the key is never shown again."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, Request, Response
from fastapi.responses import HTMLResponse

from tunelab.api.deps import Role, State, authenticate
from tunelab.api.errors import Unauthorized
from tunelab.ui.render import PageRoute, page, redirect
from tunelab.ui.session import LOGIN_REASONS, Checked, clear_cookie, new_session, same_origin, set_cookie

router = APIRouter(route_class=PageRoute, include_in_schema=False)


def _safe_next(url: str) -> str:
    """Only a console path: never an open redirect to another site."""
    return url if url.startswith("/ui") and not url.startswith("/ui/login") else "/ui"


@router.get("/login")
def login_page(request: Request, reason: str = "", next: str = "/ui") -> HTMLResponse:
    notice = LOGIN_REASONS.get(reason) if reason else None
    return page(request, "login.html", {"notice": notice, "error": None, "next": _safe_next(next)})


@router.post("/login")
def login(request: Request, state: State, key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/ui"):
    same_origin(request)
    try:
        principal = authenticate(state, key.strip())
    except Unauthorized:
        error = "That API key was not accepted. Use a key of this server (TUNELAB_API_KEY, or the one it printed)."
        return page(request, "login.html", {"notice": None, "error": error, "next": _safe_next(next)}, 401)
    if principal.role is Role.INFERENCE:
        error = "This key may only call chat completions (role 'inference'): log in with a member, owner or admin key."
        return page(request, "login.html", {"notice": None, "error": error, "next": _safe_next(next)}, 403)
    response = redirect(request, _safe_next(next))
    set_cookie(request, response, request.app.state.console_sessions, new_session(principal))
    return response


@router.post("/logout")
def logout(request: Request, session: Checked) -> Response:
    response = redirect(request, "/ui/login?reason=logged_out")
    clear_cookie(response)
    return response
