"""Fixtures of the console tests: real servers, and Debian's Chromium driven by pytest-playwright.

The browser fixtures extend pytest-playwright's own (``browser_type_launch_args``, ``context``);
the browser test modules skip, naming the extra to install, where the plugin is missing, and the
launch skips where there is no Chromium. Every browser context is guarded: a request to any
host but this machine is aborted and fails the test, and so does a JavaScript error.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import KEY, SAMPLES
from tests.server import Server, start_server, stop_server

CHROMIUM = os.environ.get("TUNELAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
SECRET = "console-test-secret"  # the servers' TUNELAB_SESSION_SECRET, so a test can sign an old cookie
DOCS = Path(__file__).resolve().parents[2] / "docs"


# -- servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def console_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server without a worker: jobs stay where the console puts them (no training)."""
    srv = start_server(
        tmp_path_factory.mktemp("console") / "data", worker=False, env={"TUNELAB_SESSION_SECRET": SECRET}
    )
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def lab_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with its training worker, for the lab end to end."""
    srv = start_server(tmp_path_factory.mktemp("lab") / "data", env={"TUNELAB_SESSION_SECRET": SECRET})
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def lab_files(console_server: Server) -> tuple[str, str]:
    """The lab's files uploaded through the API: (training file id, validation file id)."""
    client = console_server.openai()
    ids = []
    for name in ("training_set.jsonl", "validation_set.jsonl"):
        with (SAMPLES / name).open("rb") as f:
            ids.append(client.files.create(file=f, purpose="fine-tune").id)
    return ids[0], ids[1]


def session_cookie(issued_at: float | None = None, key_id: str = "key-configured") -> str:
    """A session cookie signed as the test servers sign them, issued at ``issued_at`` (default now)."""
    from unittest import mock

    from tunelab.api.deps import Principal, Role
    from tunelab.ui.session import ConsoleSession, SessionCodec

    codec = SessionCodec(SECRET, 3600)
    when = time.time() if issued_at is None else issued_at
    session = ConsoleSession(Principal(key_id, "proj-default", Role.ADMIN), csrf="t" * 32, issued_at=int(when))
    with mock.patch("itsdangerous.timed.time.time", return_value=when):
        return codec.dumps(session)


# -- the browser: Debian's chromium, headless, never the network -------------------------------
@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args: dict) -> dict:
    """Playwright already passes --headless (the new mode), --no-sandbox and --disable-dev-shm-usage."""
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set TUNELAB_CHROMIUM)")
    return {**browser_type_launch_args, "executable_path": CHROMIUM}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args: dict) -> dict:
    return {**browser_context_args, "viewport": {"width": 1360, "height": 900}}


@pytest.fixture(scope="session")
def base_url() -> None:
    """Overrides pytest-playwright's fallback ``base_url`` (deprecated by pytest 9: an error under -W
    error). None: tests name their server's URL, as each tier has its own server."""
    return None


@pytest.fixture
def blocked_requests() -> list[str]:
    return []


@pytest.fixture
def page_errors() -> list[str]:
    return []


@pytest.fixture
def context(context, blocked_requests: list[str], page_errors: list[str]):
    """The plugin's per-test context, guarded: loopback only, and JavaScript errors recorded."""

    def guard(route):
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            blocked_requests.append(route.request.url)
            route.abort("blockedbyclient")

    context.route("**/*", guard)
    context.on("page", lambda p: p.on("pageerror", lambda e: page_errors.append(str(e))))
    context.on("dialog", lambda d: d.accept())  # hx-confirm: yes
    context.set_default_timeout(30_000)
    yield context
    assert not blocked_requests, f"the console tried to reach the network: {blocked_requests}"
    assert not page_errors, f"JavaScript errors: {page_errors}"


def log_in(page, url: str, key: str = KEY) -> None:
    """Log in through the login page, as a person does."""
    page.goto(f"{url}/ui/login")
    page.fill("#key", key)
    page.click("button[type=submit]")
