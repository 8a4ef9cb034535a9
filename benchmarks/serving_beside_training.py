"""Serving and training on the same cores: chat throughput alone and while a job trains, and the
job's step rate while chats run, per serving configuration (engine, threads, OpenMP waiting).

    python benchmarks/serving_beside_training.py        # builtin active/passive, vLLM 1 and 2 threads
    python benchmarks/serving_beside_training.py --configs builtin:passive,vllm:1 --seconds 30

Each configuration starts ``tunelab serve`` with its embedded worker (``TUNELAB_SERVE_WAIT_POLICY``
or ``TUNELAB_VLLM_THREADS`` as named, training threads as ``--train-threads``), deploys the base
model, then: (1) ``--clients`` streamed greedy chats in a loop for ``--seconds``, nothing else
running; (2) a LoRA job on the lab's data; once it trains, the same chat load again, while the
job's optimizer steps are counted from its events. Printed: chat tokens/s alone and beside
training, and training steps/min beside chats (and alone, before the chats start). Loopback only;
bounded by ``--seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
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
KEY = "bench"
QUESTIONS = ["What is the capital of France?", "Who wrote Hamlet?", "What is the biggest ocean?", "Name a planet."]


def chat_load(client: openai.OpenAI, model: str, clients: int, seconds: float, max_tokens: int) -> float:
    """Completion tokens per second of ``clients`` threads chatting for ``seconds``."""
    stop_at = time.time() + seconds
    tokens = [0] * clients

    def loop(i: int) -> None:
        n = 0
        while time.time() < stop_at:
            stream = client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": QUESTIONS[(i + n) % len(QUESTIONS)]}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if chunk.usage:
                    tokens[i] += chunk.usage.completion_tokens
            n += 1

    t = time.time()
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return sum(tokens) / (time.time() - t)


def steps_done(client: openai.OpenAI, job: str) -> int:
    events = client.fine_tuning.jobs.list_events(job, limit=100).data
    return max((e.data["step"] for e in events if e.type == "metrics" and e.data), default=0)


def measure(config: str, args: argparse.Namespace) -> dict:
    engine, _, knob = config.partition(":")
    env = {**os.environ, "TUNELAB_API_KEY": KEY, "TUNELAB_SERVING_ENGINE": engine}
    if args.train_threads:
        env["TUNELAB_TRAIN_THREADS"] = str(args.train_threads)
    if engine == "builtin":
        env["TUNELAB_SERVE_WAIT_POLICY"] = knob or "auto"
    else:
        env["TUNELAB_VLLM_THREADS"] = knob or "1"
    data = Path(tempfile.mkdtemp(prefix="beside-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--data-dir", str(data)],
        env=env,
        stdout=(data / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).ok:
                    break
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=20, timeout=1800)
        deadline = time.time() + 900
        while True:  # the base model served by the engine (vLLM: until its server answers)
            try:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
                break
            except openai.APIStatusError:
                if time.time() > deadline:
                    raise
                time.sleep(5)
        alone = chat_load(client, MODEL, args.clients, args.seconds, args.max_tokens)
        with (files("tunelab") / "samples" / "training_set.jsonl").open("rb") as f:
            training = client.files.create(file=f, purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(model=MODEL, training_file=training, hyperparameters={"n_epochs": 50}).id
        while steps_done(client, job) < 2:
            time.sleep(1)
        s0, t0 = steps_done(client, job), time.time()
        time.sleep(args.seconds)
        train_alone = (steps_done(client, job) - s0) / (time.time() - t0) * 60
        s0, t0 = steps_done(client, job), time.time()
        beside = chat_load(client, MODEL, args.clients, args.seconds, args.max_tokens)
        train_beside = (steps_done(client, job) - s0) / (time.time() - t0) * 60
        client.fine_tuning.jobs.cancel(job)
        return {
            "config": config,
            "alone": alone,
            "beside": beside,
            "train_alone": train_alone,
            "train_beside": train_beside,
        }
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="builtin:active,builtin:passive,vllm:1,vllm:2")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=45)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--train-threads", type=int, default=None)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {args.clients} chat clients, {args.seconds:.0f} s per phase", flush=True)
    rows = []
    for config in args.configs.split(","):
        try:
            row = measure(config, args)
        except Exception as exc:  # noqa: BLE001 -- report and go on
            print(f"{config}: failed: {exc}", flush=True)
            continue
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{config}: {row} [load {load}]", flush=True)
        rows.append((row, load))
    print(
        "\n| serving config | chat tok/s alone | chat tok/s beside training | training steps/min alone "
        "| training steps/min beside chats | load average |"
    )
    print("|---|---|---|---|---|---|")
    for r, load in rows:
        print(
            f"| {r['config']} | {r['alone']:.1f} | {r['beside']:.1f} | {r['train_alone']:.1f} | "
            f"{r['train_beside']:.1f} | {load} |"
        )


if __name__ == "__main__":
    main()
