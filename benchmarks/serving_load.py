"""Load on one tunelab server while a job trains: do control-plane calls stay fast, does anything fail?

    python benchmarks/serving_load.py                  # 50 clients for 60 s (loopback only)
    python benchmarks/serving_load.py --clients 20 --seconds 30

Starts ``tunelab serve`` (built-in engine, embedded worker) on a fresh data dir, starts a LoRA job
on the lab's training file and waits until it trains, then lets ``--clients`` threads loop for
``--seconds``: 60% control-plane calls (list models, files, jobs, a job, its events, deployments;
/health), 40% chats through the stock openai SDK (no retries): plain, streamed to the end, or
streamed and abandoned after two chunks. Printed: requests and outcomes per kind (429s are
documented: TUNELAB_MAX_PENDING_CHATS), control-plane latency p50/p99/max (the goal: p99 under 200
ms on 2 cores, measured by a probe: one more client, in a process of its own, that GETs the
control-plane routes in turn 5 times a second), and the serving process's memory after a warm-up,
at the end of the load, and after it settles (no growth expected), and whether it went back to
idle. Every request goes to 127.0.0.1; the run stops by itself.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import openai
import requests

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "load"
QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "Name a prime number.", "Tell me a story."]


def rss(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="load rounds on the same server (memory after each)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the server")
    args = parser.parse_args()

    data = Path(tempfile.mkdtemp(prefix="serving-load-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TUNELAB_API_KEY": KEY, "TUNELAB_SERVING_ENGINE": "builtin"}
    env.update(dict(e.split("=", 1) for e in args.env))
    log = data / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--data-dir", str(data / "d")],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        run(proc, url, args)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)


def run(proc: subprocess.Popen, url: str, args: argparse.Namespace) -> None:
    deadline = time.time() + 120
    while True:
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/health", timeout=2).ok:
                break
        if time.time() > deadline or proc.poll() is not None:
            raise SystemExit("the server did not start")
        time.sleep(0.3)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    with (files("tunelab") / "samples" / "training_set.jsonl").open("rb") as f:
        training = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=training, hyperparameters={"n_epochs": 50}).id
    print("waiting for the job to train ...", flush=True)
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job)):
        time.sleep(1)
    for q in QUESTIONS:  # warm-up: the model is loaded, the allocator has seen chats
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], max_tokens=8)
    warm = rss(proc.pid)

    headers = {"Authorization": f"Bearer {KEY}"}
    deployments = f"{url}/subscriptions/s/resourceGroups/g/providers/Microsoft.CognitiveServices/accounts/a/deployments"
    control = [
        f"{url}/v1/models",
        f"{url}/v1/files",
        f"{url}/v1/fine_tuning/jobs",
        f"{url}/v1/fine_tuning/jobs/{job}",
        f"{url}/v1/fine_tuning/jobs/{job}/events",
        deployments,
        f"{url}/health",
    ]
    outcomes: collections.Counter[str] = collections.Counter()
    control_ms: list[float] = []
    by_route: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
    lock = threading.Lock()
    stop_at = [0.0]  # the current round's end

    def note(kind: str, ms: float | None = None, route: str = "") -> None:
        with lock:
            outcomes[kind] += 1
            if ms is not None:
                control_ms.append(ms)
                by_route[route].append(ms)

    def chat(rng: random.Random) -> str:
        messages = [{"role": "user", "content": rng.choice(QUESTIONS)}]
        mode = rng.choice(["plain", "plain", "stream", "abandon"])
        try:
            if mode == "plain":
                client.chat.completions.create(model=MODEL, messages=messages, max_tokens=args.max_tokens)
            else:
                stream = client.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=args.max_tokens * 4, stream=True
                )
                for i, _ in enumerate(stream):
                    if mode == "abandon" and i == 2:
                        stream.close()
                        break
            return f"chat {mode}: ok"
        except openai.RateLimitError as e:
            return f"chat {mode}: 429 {e.body.get('code') if isinstance(e.body, dict) else ''}"
        except openai.APIError as e:
            return f"chat {mode}: ERROR {type(e).__name__} {getattr(e, 'status_code', '')}"

    def client_loop(seed: int) -> None:
        rng = random.Random(seed)
        session = requests.Session()
        while time.time() < stop_at[0]:
            if rng.random() < 0.6:
                target = rng.choice(control)
                t = time.perf_counter()
                try:
                    status = session.get(target, headers=headers, timeout=60).status_code
                except requests.RequestException as e:
                    note(f"control: ERROR {type(e).__name__}")
                    continue
                ms = (time.perf_counter() - t) * 1000
                route = "deployments" if target == deployments else target.removeprefix(url).replace(job, "{job}")
                note("control: ok" if status == 200 else f"control: ERROR {status}", ms, route)
            else:
                note(chat(rng))

    probed: list[tuple[str, float]] = []
    settled_after: list[int] = []
    for round_ in range(args.rounds):
        print(f"round {round_ + 1}: {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
        stop_at[0] = time.time() + args.seconds
        # The probe: one control-plane user in a process of its own, so that its figures do not
        # include the GIL waits of the 50 client threads here (which parse chat streams).
        ctx = multiprocessing.get_context("spawn")
        receive, send = ctx.Pipe(duplex=False)
        prober = ctx.Process(target=probe, args=(control, headers, args.seconds, send))
        prober.start()
        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        probed += receive.recv()
        prober.join()
        after_load = rss(proc.pid)
        time.sleep(15)  # abandoned and cancelled rows are gone; let the server settle
        before = cpu(proc.pid)
        time.sleep(5)
        idle_cpu = (cpu(proc.pid) - before) / 5
        settled_after.append(rss(proc.pid))
    settled = settled_after[-1]
    client.fine_tuning.jobs.cancel(job)

    errors = sum(n for k, n in outcomes.items() if "ERROR" in k)
    ms = sorted(control_ms)
    p99 = percentile(ms, 0.99)
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n# {datetime.date.today()}, {os.cpu_count()} CPUs, load average {load}")
    print(f"{args.clients} clients, {args.rounds} x {args.seconds:.0f} s, a LoRA job training in the embedded worker")
    print("| outcome | requests |\n|---|---|")
    for kind, n in sorted(outcomes.items()):
        print(f"| {kind} | {n} |")
    pms = sorted(t for _, t in probed)
    failed = sum(1 for status, _ in probed if status != "200")
    print(
        f"\ncontrol plane, the probe (one client process, sequential GETs): {len(pms)} calls, {failed} not 200, "
        f"p50 {statistics.median(pms):.0f} ms, p99 {percentile(pms, 0.99):.0f} ms, max {pms[-1]:.0f} ms "
        "(goal: p99 < 200 ms)"
    )
    print(
        f"control plane, as the {args.clients} load threads saw it (their own GIL waits included): {len(ms)} calls, "
        f"p50 {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms, max {ms[-1]:.0f} ms"
    )
    for route, times in sorted(by_route.items()):
        times.sort()
        print(f"  {route}: {len(times)} calls, p50 {statistics.median(times):.0f} ms, max {times[-1]:.0f} ms")
    print(
        f"serving process memory: {warm / 2**20:.0f} MiB after warm-up, {after_load / 2**20:.0f} MiB after the load, "
        f"{settled / 2**20:.0f} MiB settled ({(settled - warm) / 2**20:+.0f} MiB); "
        f"CPU while idle afterwards {idle_cpu:.2f} cores"
    )
    if args.rounds > 1:
        print("settled after each round: " + ", ".join(f"{m / 2**20:.0f} MiB" for m in settled_after))
    print(f"errors (other than documented 429s): {errors}")


def percentile(sorted_ms: list[float], q: float) -> float:
    return sorted_ms[min(len(sorted_ms) - 1, round(q * (len(sorted_ms) - 1)))] if sorted_ms else float("nan")


def probe(routes: list[str], headers: dict[str, str], seconds: float, send: Any) -> None:
    """GET the control-plane routes in turn for ``seconds``, 5 per second; send (status, ms) pairs."""
    session = requests.Session()
    out: list[tuple[str, float]] = []
    stop_at = time.time() + seconds
    i = 0
    while time.time() < stop_at:
        t = time.perf_counter()
        try:
            status = str(session.get(routes[i % len(routes)], headers=headers, timeout=60).status_code)
        except requests.RequestException as e:
            status = type(e).__name__
        out.append((status, (time.perf_counter() - t) * 1000))
        i += 1
        time.sleep(0.2)
    send.send(out)


if __name__ == "__main__":
    main()
