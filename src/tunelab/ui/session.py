"""Console sessions: a signed, expiring cookie that names a key's principal (never the key), and CSRF.

Login checks the API key with ``api.deps.authenticate`` (the one place a key is checked) and puts
the principal it returns in the cookie: key id, project, role, a random CSRF token and the login
time, signed with itsdangerous. Every request re-checks the principal with
``api.deps.reauthenticate``, so a session dies with its key. The cookie is HttpOnly,
SameSite=Strict, scoped to /ui, and expires ``Settings.session_hours`` after login.

State-changing console requests must carry the session's CSRF token in ``X-CSRF-Token`` (htmx
sends it from ``hx-headers`` on <body>; the chat module from the page's meta tag) and, when the
browser says where they come from (``Origin``), come from this host. The /v1 API never reads the
cookie: it keeps its key headers, so it needs no CSRF defence.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request, Response
from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from tunelab.api.deps import AppState, Principal, Role, State, reauthenticate
from tunelab.api.errors import APIError, Unauthorized
from tunelab.store import Store

COOKIE = "tunelab_console"
PATH = "/ui"
CSRF_HEADER = "x-csrf-token"


class LoginRequired(APIError):
    """No valid session; ``reason`` says why (shown on the login page)."""

    status = 401
    type = "invalid_request_error"
    code = "login_required"

    def __init__(self, reason: str) -> None:
        super().__init__(LOGIN_REASONS.get(reason, LOGIN_REASONS["missing"]))
        self.reason = reason


LOGIN_REASONS = {
    "missing": "Log in with an API key to use the console.",
    "expired": "Your session expired. Log in again.",
    "invalid": "Your session is no longer valid (the server's API key or session secret changed). Log in again.",
    "revoked": "The API key of your session is no longer accepted. Log in with a valid key.",
    "logged_out": "You are logged out.",
}


class RequestRefused(APIError):
    """A state-changing request that did not come from a console page (CSRF)."""

    status = 403
    type = "invalid_request_error"
    code = "csrf_failed"


@dataclass(frozen=True)
class ConsoleSession:
    principal: Principal
    csrf: str
    """Sent back by the page with every state-changing request."""
    issued_at: int


class SessionCodec:
    """Signs sessions into cookie values and reads them back, refusing old or forged ones."""

    def __init__(self, secret: str, max_age_seconds: int) -> None:
        self.max_age = max_age_seconds
        self._serializer = URLSafeTimedSerializer(secret, salt="tunelab.console.session")

    def dumps(self, session: ConsoleSession) -> str:
        p = session.principal
        return self._serializer.dumps(
            {"k": p.key_id, "p": p.project_id, "r": p.role.value, "c": session.csrf, "t": session.issued_at}
        )

    def loads(self, value: str) -> ConsoleSession:
        """Raises: LoginRequired ("expired" or "invalid")."""
        try:
            data = self._serializer.loads(value, max_age=self.max_age)
            principal = Principal(key_id=data["k"], project_id=data["p"], role=Role(data["r"]))
            return ConsoleSession(principal, csrf=data["c"], issued_at=int(data["t"]))
        except SignatureExpired:
            raise LoginRequired("expired") from None
        except (BadSignature, KeyError, TypeError, ValueError):
            raise LoginRequired("invalid") from None


def session_codec(state: AppState, store: Store) -> SessionCodec:
    """The codec of this server: its secret is ``TUNELAB_SESSION_SECRET``, else one generated once and
    kept in the database (so every API process and restart shares it). A session ends with its key:
    ``current_session`` re-checks the key on every request."""
    secret = state.settings.session_secret or store.set_setting_once(
        "console_session_secret", secrets.token_urlsafe(32)
    )
    return SessionCodec(secret, int(state.settings.session_hours * 3600))


def new_session(principal: Principal) -> ConsoleSession:
    return ConsoleSession(principal, csrf=secrets.token_urlsafe(24), issued_at=int(time.time()))


def set_cookie(request: Request, response: Response, codec: SessionCodec, session: ConsoleSession) -> None:
    response.set_cookie(
        COOKIE,
        codec.dumps(session),
        max_age=codec.max_age,
        path=PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_cookie(response: Response) -> None:
    response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict")


def _codec(request: Request) -> SessionCodec:
    return request.app.state.console_sessions


def current_session(request: Request, state: State) -> ConsoleSession:
    """The request's session, re-checked against its key.

    Raises:
        LoginRequired: no cookie, a forged or expired one, or its key is no longer valid.
    """
    value = request.cookies.get(COOKIE)
    if not value:
        raise LoginRequired("missing")
    session = _codec(request).loads(value)
    try:
        principal = reauthenticate(state, session.principal)
    except Unauthorized:
        raise LoginRequired("revoked") from None
    return ConsoleSession(principal, session.csrf, session.issued_at)


def checked_session(request: Request, session: Annotated[ConsoleSession, Depends(current_session)]) -> ConsoleSession:
    """The session of a state-changing request, which must come from a console page.

    Raises:
        RequestRefused: another origin, or no (or a wrong) CSRF token.
    """
    same_origin(request)
    token = request.headers.get(CSRF_HEADER, "")
    if not secrets.compare_digest(token.encode(), session.csrf.encode()):
        raise RequestRefused(
            "Refused: this request did not come from a console page (its CSRF token is missing or wrong). "
            "Reload the page and try again."
        )
    return session


def same_origin(request: Request) -> None:
    """Browsers name the page a request comes from in ``Origin``; it must be this host.

    Raises:
        RequestRefused: a cross-site request.
    """
    origin = request.headers.get("origin")
    site = request.headers.get("sec-fetch-site")
    foreign = (origin is not None and urlsplit(origin).netloc != request.headers.get("host")) or site in (
        "cross-site",
        "same-site",
    )
    if foreign:
        raise RequestRefused(f"Refused: a request from another site ({origin or site}) cannot change anything here.")


Console = Annotated[ConsoleSession, Depends(current_session)]
"""A page or read: any valid session."""
Checked = Annotated[ConsoleSession, Depends(checked_session)]
"""A state-changing request: a valid session, the CSRF token and the same origin."""
