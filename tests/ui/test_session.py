"""Console sessions: signed, expiring, naming a principal (never the key); the origin check."""

from __future__ import annotations

import time
from unittest import mock

import pytest
from starlette.requests import Request

from tunelab.api.deps import Principal, Role
from tunelab.ui.session import ConsoleSession, LoginRequired, RequestRefused, SessionCodec, new_session, same_origin

ADMIN = Principal("key-admin", "proj-default", Role.ADMIN)


def test_a_session_round_trips_and_holds_no_key():
    codec = SessionCodec("secret:digest-of-the-key", 3600)
    session = new_session(ADMIN)
    value = codec.dumps(session)
    assert codec.loads(value) == session
    assert "digest-of-the-key" not in value and len(session.csrf) >= 32


def test_an_old_session_is_expired_and_a_forged_one_invalid():
    codec = SessionCodec("secret", 3600)
    with mock.patch("itsdangerous.timed.time.time", return_value=time.time() - 3601):
        old = codec.dumps(new_session(ADMIN))
    with pytest.raises(LoginRequired) as expired:
        codec.loads(old)
    assert expired.value.reason == "expired" and "expired" in expired.value.message

    other = SessionCodec("another secret", 3600).dumps(new_session(ADMIN))
    payload, _, signature = codec.dumps(new_session(ADMIN)).rpartition(".")
    for forged in (other, payload + "x." + signature, "garbage"):
        with pytest.raises(LoginRequired) as bad:
            codec.loads(forged)
        assert bad.value.reason == "invalid"


def test_a_session_keeps_its_role_and_project():
    codec = SessionCodec("secret", 60)
    member = ConsoleSession(Principal("key-1", "proj-x", Role.INFERENCE), csrf="c", issued_at=1)
    assert codec.loads(codec.dumps(member)).principal == member.principal


def request(headers: dict[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in {"host": "127.0.0.1:8000", **headers}.items()]
    return Request({"type": "http", "method": "POST", "path": "/ui/x", "headers": raw, "query_string": b""})


@pytest.mark.parametrize(
    "headers",
    [{}, {"origin": "http://127.0.0.1:8000"}, {"origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}],
)
def test_same_origin_requests_pass(headers):
    same_origin(request(headers))


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": "http://evil.example"},
        {"origin": "http://127.0.0.1:9999"},
        {"origin": "null"},
        {"sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "same-site"},
    ],
)
def test_cross_site_requests_are_refused(headers):
    with pytest.raises(RequestRefused, match="another site"):
        same_origin(request(headers))
