"""The console's doors over plain HTTP: login, the cookie, CSRF, expiry; the API ignores the cookie."""

from __future__ import annotations

import re
import time

import pytest
import requests

from tests.conftest import KEY
from tests.server import Server
from tests.ui.conftest import session_cookie

pytestmark = pytest.mark.integration


def logged_in(server: Server) -> tuple[requests.Session, str]:
    """A requests session holding a console cookie, and the page's CSRF token."""
    http = requests.Session()
    r = http.post(f"{server.url}/ui/login", data={"key": KEY, "next": "/ui/files"})
    assert r.url == f"{server.url}/ui/files" and r.ok
    token = re.search(r'name="csrf-token" content="([^"]+)"', r.text)
    assert token
    return http, token.group(1)


def test_pages_need_a_session(console_server):
    r = requests.get(f"{console_server.url}/ui/jobs?status=running", allow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?reason=missing&next=/ui/jobs%3Fstatus%3Drunning"
    assert requests.get(f"{console_server.url}/", allow_redirects=False).headers["location"] == "/ui"


def test_a_bad_key_is_refused_with_a_readable_message(console_server):
    r = requests.post(f"{console_server.url}/ui/login", data={"key": "wrong"}, allow_redirects=False)
    assert r.status_code == 401 and "That API key was not accepted" in r.text
    assert "set-cookie" not in r.headers


def test_login_sets_a_strict_http_only_cookie_without_the_key(console_server):
    r = requests.post(f"{console_server.url}/ui/login", data={"key": KEY}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui"
    cookie = r.headers["set-cookie"]
    for attribute in ("HttpOnly", "SameSite=strict", "Path=/ui", "Max-Age=43200"):
        assert attribute in cookie
    assert KEY not in cookie
    http, _ = logged_in(console_server)
    for path in ("/ui", "/ui/files", "/ui/jobs", "/ui/deployments", "/ui/playground", "/ui/jobs/new"):
        page = http.get(console_server.url + path)
        assert page.ok and KEY not in page.text, path  # the key is never shown again
        assert "script-src 'self'" in page.headers["content-security-policy"]


def test_next_never_leaves_the_console(console_server):
    for target in ("https://evil.example/", "//evil.example", "/v1/models"):
        r = requests.post(f"{console_server.url}/ui/login", data={"key": KEY, "next": target}, allow_redirects=False)
        assert r.headers["location"] == "/ui", target


def test_a_post_without_the_csrf_token_or_from_another_site_is_refused(console_server):
    http, token = logged_in(console_server)
    url = f"{console_server.url}/ui/files/file-{'0' * 24}/delete"
    forged = http.post(url)
    assert forged.status_code == 403 and "CSRF token is missing or wrong" in forged.text
    wrong = http.post(url, headers={"x-csrf-token": token[:-1] + "x"})
    assert wrong.status_code == 403
    cross = http.post(url, headers={"x-csrf-token": token, "origin": "http://evil.example"})
    assert cross.status_code == 403 and "another site" in cross.text
    real = http.post(url, headers={"x-csrf-token": token, "origin": console_server.url})
    assert real.status_code == 404 and "No such File object" in real.text  # it got through to the API


def test_an_expired_cookie_goes_to_the_login_page_saying_so(console_server):
    http = requests.Session()
    http.cookies.set("tunelab_console", session_cookie(issued_at=time.time() - 13 * 3600), path="/ui")
    r = http.get(f"{console_server.url}/ui/jobs", allow_redirects=False)
    assert r.status_code == 303 and "reason=expired" in r.headers["location"]
    assert 'tunelab_console=""' in r.headers["set-cookie"]  # the dead cookie is removed
    login = http.get(console_server.url + r.headers["location"])
    assert "Your session expired. Log in again." in login.text

    fresh = requests.get(f"{console_server.url}/ui/jobs", cookies={"tunelab_console": session_cookie()})
    assert fresh.ok and "Fine-tuning jobs" in fresh.text  # the same cookie, signed now, is accepted
    tampered = requests.get(
        f"{console_server.url}/ui/jobs", cookies={"tunelab_console": session_cookie() + "x"}, allow_redirects=False
    )
    assert "reason=invalid" in tampered.headers["location"]


def test_a_session_of_an_unknown_key_is_refused(console_server):
    r = requests.get(
        f"{console_server.url}/ui",
        cookies={"tunelab_console": session_cookie(key_id="key-revoked")},
        allow_redirects=False,
    )
    assert "reason=revoked" in r.headers["location"]


def test_revoking_a_key_ends_its_console_sessions_and_inference_keys_cannot_log_in(console_server):
    admin = {"Authorization": f"Bearer {KEY}"}
    api = f"{console_server.url}/v1/organization/projects/proj-default/api_keys"
    member = requests.post(api, headers=admin, json={"name": "console", "role": "member"}).json()
    http = requests.Session()
    assert http.post(f"{console_server.url}/ui/login", data={"key": member["value"]}).ok
    assert http.get(f"{console_server.url}/ui/jobs", allow_redirects=False).status_code == 200
    assert requests.delete(f"{api}/{member['id']}", headers=admin).ok
    r = http.get(f"{console_server.url}/ui/jobs", allow_redirects=False)
    assert r.status_code == 303 and "reason=revoked" in r.headers["location"]

    chat_only = requests.post(api, headers=admin, json={"name": "bot", "role": "inference"}).json()
    r = requests.post(f"{console_server.url}/ui/login", data={"key": chat_only["value"]}, allow_redirects=False)
    assert r.status_code == 403 and "role &#39;inference&#39;" in r.text and "set-cookie" not in r.headers


def test_htmx_requests_are_sent_to_the_login_page_too(console_server):
    r = requests.get(
        f"{console_server.url}/ui/overview/live",
        headers={"hx-request": "true", "hx-current-url": f"{console_server.url}/ui/jobs?status=failed"},
        allow_redirects=False,
    )
    assert r.status_code == 204
    assert r.headers["hx-redirect"] == "/ui/login?reason=missing&next=/ui/jobs%3Fstatus%3Dfailed"


def test_the_api_keeps_its_key_headers_and_ignores_the_cookie(console_server):
    http, token = logged_in(console_server)
    r = http.get(f"{console_server.url}/v1/models", headers={"x-csrf-token": token})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    chat = requests.post(f"{console_server.url}/ui/api/chat/completions", json={"model": "x", "messages": []})
    assert chat.status_code == 401 and chat.json()["error"]["code"] == "login_required"


def test_logout_ends_the_session_in_the_browser(console_server):
    http, token = logged_in(console_server)
    r = http.post(f"{console_server.url}/ui/logout", headers={"x-csrf-token": token}, allow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/ui/login?reason=logged_out"
    assert 'tunelab_console=""' in r.headers["set-cookie"]
    assert http.get(f"{console_server.url}/ui", allow_redirects=False).status_code == 303
