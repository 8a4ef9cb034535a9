"""Serving that cannot be starved, through the real server and SDK (built-in engine).

An abandoned request (a closed stream, a client that timed out) stops generating at the next
decode step; with every generation slot taken, a chat gets 429 ``server_busy`` with retry-after
while files, models and deployments answer at once; SIGTERM ends in-flight generations within the
grace period; chat bounds are checked at the door (400, never 500).

The served model is a tiny random llama (``tiny_dir``) registered as ``tiny``: random weights
almost never emit EOS, so every request really runs to its ``max_tokens`` unless it is stopped,
which is what makes "it stopped" observable: the server's CPU time stops growing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
import requests

from tests.server import Server, start_server, stop_server

pytestmark = pytest.mark.integration

HI = [{"role": "user", "content": "Hi"}]
LONG = 6000  # tokens: a minute or more of work for the tiny model if nothing stops it


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory, tiny_dir: Path) -> Path:
    """``tiny_dir``'s weights with an 8k context, so that a request can ask for thousands of tokens."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("tiny-8k")
    for f in tiny_dir.iterdir():
        shutil.copy(f, folder / f.name)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 8192
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def srv(tmp_path_factory, long_tiny: Path):
    data = tmp_path_factory.mktemp("limits") / "data"
    env = {
        "TUNELAB_MAX_PENDING_CHATS": "3",
        "TUNELAB_SHUTDOWN_GRACE_SECONDS": "3",
        "TUNELAB_SERVE_THREADS": "1",
        "TUNELAB_DATA_DIR": str(data),
    }
    subprocess.run(
        [sys.executable, "-m", "tunelab", "models", "add", str(long_tiny), "--id", "tiny", "--data-dir", str(data)],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
    )
    server = start_server(data, worker=False, env=env)
    server.openai().chat.completions.create(model="tiny", messages=HI, max_tokens=2)  # loaded
    yield server
    stop_server(server)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def settles(pid: int, within: float = 20.0, quiet: float = 0.15) -> bool:
    """True once the server uses under ``quiet`` CPU-seconds per second (idle: nothing generates)."""
    deadline = time.time() + within
    while time.time() < deadline:
        before = cpu_seconds(pid)
        time.sleep(1.0)
        if cpu_seconds(pid) - before < quiet:
            return True
    return False


def busy(pid: int) -> bool:
    before = cpu_seconds(pid)
    time.sleep(1.0)
    return cpu_seconds(pid) - before > 0.3


def test_a_closed_stream_stops_its_generation(srv: Server):
    pid = srv.proc.pid
    assert settles(pid)
    stream = srv.openai().chat.completions.create(model="tiny", messages=HI, max_tokens=LONG, stream=True)
    pieces = [c for _, c in zip(range(5), stream, strict=False)]
    assert len(pieces) == 5
    assert busy(pid)  # the control: it is generating
    stream.close()
    assert settles(pid), "the server kept generating for a client that had gone"


def test_a_client_that_times_out_stops_its_generation(srv: Server):
    pid = srv.proc.pid
    assert settles(pid)
    impatient = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=srv.key, max_retries=0, timeout=3.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="tiny", messages=HI, max_tokens=LONG)
    assert settles(pid), "the server kept generating a non-streamed answer nobody waits for"


def test_full_generation_slots_give_429_and_the_control_plane_still_answers(srv: Server):
    client = srv.openai()
    streams = [
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=LONG, stream=True) for _ in range(3)
    ]
    for s in streams:
        next(iter(s))  # all three slots are decoding
    try:
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model="tiny", messages=HI, max_tokens=4)
        assert err.value.body["code"] == "server_busy"
        assert int(err.value.response.headers["retry-after"]) >= 1
        headers = {"Authorization": f"Bearer {srv.key}"}
        for path in ("/v1/models", "/v1/files", "/v1/fine_tuning/jobs", "/health"):
            t = time.perf_counter()
            assert requests.get(srv.url + path, headers=headers, timeout=10).status_code == 200
            assert time.perf_counter() - t < 2.0, f"{path} waited behind generation"
        t = time.perf_counter()
        r = requests.get(srv.deployment_url("").rstrip("/"), headers=headers, timeout=10)
        assert r.status_code == 200 and time.perf_counter() - t < 2.0
    finally:
        for s in streams:
            s.close()
    assert settles(srv.proc.pid)
    # the slots are free again: the SDK's own retries (which honour retry-after) would succeed now
    assert client.chat.completions.create(model="tiny", messages=HI, max_tokens=2).choices


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("seed", True),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("n", 9),
        ("n", 0),
        ("max_tokens", 0),
        ("max_tokens", 2**21),
        ("temperature", True),
        ("temperature", 2.5),
        ("top_p", 0),
    ],
)
def test_chat_bounds_are_checked_at_the_door(srv: Server, field: str, value):
    r = requests.post(
        f"{srv.url}/v1/chat/completions",
        headers={"api-key": srv.key},
        json={"model": "tiny", "messages": HI, "max_tokens": 2, field: value},
        timeout=30,
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].split(".")[0] == field and error["type"] == "invalid_request_error"


def test_max_tokens_above_the_server_cap_is_400_and_int64_seeds_work(srv: Server):
    client = srv.openai()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=HI, max_tokens=8193)  # TUNELAB_MAX_TOKENS_LIMIT 8192
    assert err.value.body["param"] == "max_tokens"
    for seed in (2**63 - 1, -(2**63)):
        r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=3, seed=seed, n=2)
        assert len(r.choices) == 2


def test_no_null_system_fingerprint_and_a_default_max_tokens(srv: Server):
    r = requests.post(
        f"{srv.url}/v1/chat/completions",
        headers={"api-key": srv.key},
        json={"model": "tiny", "messages": HI, "temperature": 0},
        timeout=300,
    )
    body = r.json()
    assert r.status_code == 200 and "system_fingerprint" not in body
    assert body["choices"][0]["message"]["refusal"] is None  # nullable fields stay, as the spec has them
    assert body["usage"]["completion_tokens"] == 1024  # TUNELAB_DEFAULT_MAX_TOKENS: not the rest of 8k
    assert body["choices"][0]["finish_reason"] == "length"
    with requests.post(
        f"{srv.url}/v1/chat/completions",
        headers={"api-key": srv.key},
        json={"model": "tiny", "messages": HI, "max_tokens": 2, "stream": True},
        stream=True,
        timeout=60,
    ) as s:
        lines = [line for line in s.iter_lines() if line.startswith(b"data: {")]
    assert lines and all(b"system_fingerprint" not in line for line in lines)


def test_sigterm_cancels_what_is_still_generating_within_the_grace(tmp_path, long_tiny: Path):
    data = tmp_path / "data"
    env = {"TUNELAB_SHUTDOWN_GRACE_SECONDS": "2", "TUNELAB_DATA_DIR": str(data)}
    subprocess.run(
        [sys.executable, "-m", "tunelab", "models", "add", str(long_tiny), "--id", "tiny", "--data-dir", str(data)],
        check=True,
        capture_output=True,
        env={**os.environ, **env},
    )
    server = start_server(data, worker=False, env=env)
    try:
        client = server.openai()
        stream = client.chat.completions.create(model="tiny", messages=HI, max_tokens=LONG, stream=True)
        next(iter(stream))
        outcome: dict = {}

        def plain() -> None:
            try:
                client.chat.completions.create(model="tiny", messages=HI, max_tokens=LONG)
            except openai.APIError as exc:
                outcome["error"] = exc

        waiter = threading.Thread(target=plain)
        waiter.start()
        time.sleep(1.0)
        t = time.time()
        os.kill(server.proc.pid, signal.SIGTERM)
        server.proc.wait(timeout=60)
        assert time.time() - t < 30  # grace 2 s, then cancelled; not minutes of generation
        waiter.join(timeout=30)
        assert "error" in outcome  # the non-streamed request was not answered after shutdown
    finally:
        if server.proc.poll() is None:
            stop_server(server)
