"""Chat serving under concurrent clients: dynamic batching vs one request at a time, side by side.

    python benchmarks/serving_throughput.py                   # 8 clients x 4 requests, bundled model
    python benchmarks/serving_throughput.py --clients 16 --requests 2 --max-tokens 128

Each row starts its own ``tunelab serve --no-worker`` (the baseline with ``TUNELAB_MAX_BATCH=1``,
the others with the batch size named), warms the model up with one request, then lets
``--clients`` threads send ``--requests`` greedy chat completions each through the openai SDK.
Printed: wall time, requests/s, completion tokens/s, median and p95 latency, and whether every
answer equals the baseline's answer to the same question.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from openai import OpenAI

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
QUESTIONS = [
    "Who discovered Antarctica?",
    "What is the biggest ocean?",
    "What is the largest planet?",
    "Who painted the Mona Lisa?",
    "What's the boiling point of water?",
    "Who wrote 'Romeo and Juliet'?",
    "What's the capital of France?",
    "How far is the Moon from Earth?",
    "What is the chemical symbol for gold?",
    "How many continents are there?",
    "What is the fastest land animal?",
    "Who invented the telephone?",
]


def start(data_dir: Path, max_batch: int) -> tuple[subprocess.Popen, OpenAI]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TUNELAB_API_KEY": "bench", "TUNELAB_MAX_BATCH": str(max_batch)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", "--no-worker", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=30, timeout=600)


def measure(max_batch: int, clients: int, requests: int, max_tokens: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc, client = start(Path(tmp), max_batch)
        try:

            def ask(i: int) -> tuple[str, int, float]:
                t = time.perf_counter()
                r = client.chat.completions.create(
                    model=MODEL,
                    temperature=0,
                    max_tokens=max_tokens,
                    messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                )
                return r.choices[0].message.content, r.usage.completion_tokens, time.perf_counter() - t

            ask(0)  # loads the model
            start_t = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                results = list(pool.map(ask, range(clients * requests)))
            wall = time.perf_counter() - start_t
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    latencies = sorted(r[2] for r in results)
    return {
        "max_batch": max_batch,
        "wall": wall,
        "answers": [r[0] for r in results],
        "requests_s": len(results) / wall,
        "tokens_s": sum(r[1] for r in results) / wall,
        "p50": statistics.median(latencies),
        "p95": latencies[int(0.95 * (len(latencies) - 1))],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--batches", default="8", help="batch sizes to compare with the baseline (1)")
    args = parser.parse_args()

    print(
        f"{platform.machine()}, {os.cpu_count()} CPUs; {args.clients} clients x {args.requests} greedy requests, "
        f"max_tokens {args.max_tokens}, model {MODEL}"
    )
    rows = [measure(b, args.clients, args.requests, args.max_tokens) for b in [1, *map(int, args.batches.split(","))]]
    base = rows[0]
    print(
        "| max_batch | wall s | requests/s | completion tok/s | speed-up | p50 latency s | p95 latency s "
        "| same answers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = sum(a == b for a, b in zip(r["answers"], base["answers"], strict=True))
        print(
            f"| {r['max_batch']}{' (baseline)' if r is base else ''} | {r['wall']:.1f} | {r['requests_s']:.2f} | "
            f"{r['tokens_s']:.1f} | {base['wall'] / r['wall']:.1f}x | {r['p50']:.1f} | {r['p95']:.1f} | "
            f"{same}/{len(base['answers'])} |"
        )


if __name__ == "__main__":
    main()
