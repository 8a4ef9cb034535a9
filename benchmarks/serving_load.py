"""Load on one tunelab server while a job trains: do control-plane calls stay fast, does anything fail?

    python benchmarks/serving_load.py                  # 50 clients for 60 s (loopback only)
    python benchmarks/serving_load.py --clients 20 --seconds 30

Starts ``tunelab serve`` (built-in engine, embedded worker) on a fresh data dir, starts a LoRA job
on the lab's training file and waits until it trains, then lets ``--clients`` threads loop for
``--seconds``: 60% control-plane calls (list models, files, jobs, a job, its events, deployments;
/health), 40% chats through the stock openai SDK (no retries): plain, streamed to the end, or
streamed and abandoned after two chunks. Printed: requests and outcomes per kind (429s are
documented: TUNELAB_MAX_PENDING_CHATS), control-plane latency p50/p99/max (the goal: p99 under
200 ms on 2 cores), and the serving process's memory after a warm-up, at the end of the load, and
after it settles (no growth expected), and whether it went back to idle. Every request goes to
127.0.0.1; the run stops by itself.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
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
    lock = threading.Lock()
    stop_at = time.time() + args.seconds

    def note(kind: str, ms: float | None = None) -> None:
        with lock:
            outcomes[kind] += 1
            if ms is not None:
                control_ms.append(ms)

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
        while time.time() < stop_at:
            if rng.random() < 0.6:
                target = rng.choice(control)
                t = time.perf_counter()
                try:
                    status = session.get(target, headers=headers, timeout=60).status_code
                except requests.RequestException as e:
                    note(f"control: ERROR {type(e).__name__}")
                    continue
                ms = (time.perf_counter() - t) * 1000
                note("control: ok" if status == 200 else f"control: ERROR {status}", ms)
            else:
                note(chat(rng))

    print(f"{args.clients} clients for {args.seconds:.0f} s ...", flush=True)
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after_load = rss(proc.pid)
    time.sleep(15)  # abandoned and cancelled rows are gone; let the server settle
    before = cpu(proc.pid)
    time.sleep(5)
    idle_cpu = (cpu(proc.pid) - before) / 5
    settled = rss(proc.pid)
    client.fine_tuning.jobs.cancel(job)

    errors = sum(n for k, n in outcomes.items() if "ERROR" in k)
    ms = sorted(control_ms)
    p99 = ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))] if ms else float("nan")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n# {datetime.date.today()}, {os.cpu_count()} CPUs, load average {load}")
    print(f"{args.clients} clients, {args.seconds:.0f} s, a LoRA job training in the embedded worker")
    print("| outcome | requests |\n|---|---|")
    for kind, n in sorted(outcomes.items()):
        print(f"| {kind} | {n} |")
    print(
        f"\ncontrol plane: {len(ms)} calls, p50 {statistics.median(ms):.0f} ms, p99 {p99:.0f} ms, "
        f"max {ms[-1]:.0f} ms (goal: p99 < 200 ms)"
    )
    print(
        f"serving process memory: {warm / 2**20:.0f} MiB after warm-up, {after_load / 2**20:.0f} MiB after the load, "
        f"{settled / 2**20:.0f} MiB settled ({(settled - warm) / 2**20:+.0f} MiB); "
        f"CPU while idle afterwards {idle_cpu:.2f} cores"
    )
    print(f"errors (other than documented 429s): {errors}")


if __name__ == "__main__":
    main()
