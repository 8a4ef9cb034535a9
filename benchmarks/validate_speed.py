"""How fast `tunelab data validate --encoding cl100k_base` is next to the lab's token-count cell.

    .venv/bin/python benchmarks/validate_speed.py [--mb 40] [--keep]

Generates a ~40 MB chat file of short, realistic conversations (a few personas, questions and
answers from templates whose slots are filled at random, so nearly every user and assistant
message is unique), then, in this one run, times:

- lab: the lab notebook's own approach, its functions verbatim (json.loads of every line into a
  list, then tiktoken cl100k_base ``encode`` of every field, assistant contents twice);
- tunelab: ``validate_file(path, encodings=("cl100k_base",))``, which also checks every error
  and warning, with its default worker processes (process start-up included);
- tunelab, 1 worker: the same in this process alone, for reference.

Runs the three in interleaved rounds (--repeat) and prints each one's best round: wall time,
the ratio to the lab (the issue asks for at least 3x on 2 cores), and CPU time (this process
and its workers), which other load on the machine disturbs less than wall time. Checks that
both sides agree on the token distribution.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import tiktoken

from tunelab.data.encodings import install_tiktoken_cache
from tunelab.data.validate import validate_file

PERSONAS = [
    "Clippy is a factual chatbot that is also sarcastic.",
    "You are a helpful assistant.",
    (
        "You are Contoso Outdoors' support agent. Answer questions about orders, returns and product "
        "care politely and briefly. If you do not know the answer, say so and offer to connect the "
        "customer with a human agent. Never invent order numbers or tracking links."
    ),
    (
        "You are a patient math tutor for high-school students. Explain each step, check the "
        "student's reasoning, and end with a short question that tests understanding."
    ),
    "You translate English into French. Reply with the translation only.",
    "You are a terse assistant for a DevOps team. Prefer commands over prose.",
]
NAMES = ["Ada", "Grace", "Linus", "Margaret", "Alan", "Barbara", "Ken", "Radia", "Tim", "Frances"]
CITIES = ["Paris", "Lagos", "Lima", "Osaka", "Oslo", "Quito", "Perth", "Cairo", "Denver", "Hanoi"]
THINGS = ["hiking boots", "rain jacket", "tent", "sleeping bag", "headlamp", "water filter", "stove"]
QUESTIONS = [
    "Who discovered {city}?",
    "What is {a} times {b}?",
    "Can you help me return the {thing} I bought on order {order}?",
    "My {thing} arrived damaged. Order {order}, what should I do?",
    "How do I clean a {thing} after a trip to {city}?",
    "Translate: My friend {name} lives in {city} and has {a} cats.",
    "What's the boiling point of water at {a} meters above sea level?",
    "Solve for x: {a}x + {b} = {c}.",
    "How do I restart the {thing} service on host web-{a}?",
    "Is it true that {name} invented the {thing}?",
]
ANSWERS = [
    "Oh, some obscure person named {name}. Not that anyone in {city} would remember, of course.",
    "It's {c}. Impressive that you needed a chatbot for that, truly.",
    (
        "I'm sorry about that! I've noted order {order}. You can return the {thing} within {a} days; "
        "I'll email a prepaid label to the address on file."
    ),
    (
        "Rinse the {thing} with lukewarm water, let it dry away from direct sun, and store it loosely. "
        "Avoid detergents: they strip the coating after about {a} washes."
    ),
    "Mon amie {name} habite à {city} et a {a} chats.",
    "Roughly {c} degrees Celsius: water boils about 1 degree lower for every 300 meters you climb.",
    (
        "Subtract {b} from both sides: {a}x = {d}. Then divide by {a}: x = {d}/{a}. What would x be "
        "if the right-hand side were {c} instead?"
    ),
    "`ssh web-{a} sudo systemctl restart {slug}` then `journalctl -u {slug} -n {b}`.",
    "No. {name} never went near a {thing}; that rumor started in {city} around {year}.",
]


def make_file(path: Path, megabytes: float, seed: int = 0) -> int:
    """Write about ``megabytes`` MB of chat examples to ``path``; return how many."""
    rng = random.Random(seed)
    target = int(megabytes * 1_000_000)
    written = n = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            messages = [{"role": "system", "content": rng.choice(PERSONAS)}]
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                messages.append({"role": "user", "content": _text(rng, QUESTIONS, 2)})
                messages.append({"role": "assistant", "content": _text(rng, ANSWERS, 3)})
            line = json.dumps({"messages": messages}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            n += 1
    return n


def _text(rng: random.Random, templates: list[str], most: int) -> str:
    # One to `most` templated sentences with fresh slots: nearly every message is unique.
    return " ".join(rng.choice(templates).format(**_slots(rng)) for _ in range(rng.randint(1, most)))


def _slots(rng: random.Random) -> dict[str, object]:
    a, b = rng.randint(2, 99), rng.randint(1, 999)
    thing = rng.choice(THINGS)
    return {
        "name": rng.choice(NAMES),
        "city": rng.choice(CITIES),
        "thing": thing,
        "slug": thing.replace(" ", "-"),
        "order": f"CO-{rng.randint(100000, 999999)}",
        "year": rng.randint(1850, 2020),
        "a": a,
        "b": b,
        "c": a * b,
        "d": a * b - b,
    }


# --- The lab's token-count cell (shared/lab/lab_client.py), its functions verbatim ---
encoding = None  # set in lab_token_counts, as the lab sets it at the top of its cell


def num_tokens_from_messages(messages, tokens_per_message=3, tokens_per_name=1):  # type: ignore[no-untyped-def]
    num_tokens = 0
    for message in messages:
        num_tokens += tokens_per_message
        for key, value in message.items():
            num_tokens += len(encoding.encode(value))
            if key == "name":
                num_tokens += tokens_per_name
    num_tokens += 3
    return num_tokens


def num_assistant_tokens_from_messages(messages):  # type: ignore[no-untyped-def]
    num_tokens = 0
    for message in messages:
        if message["role"] == "assistant":
            num_tokens += len(encoding.encode(message["content"]))
    return num_tokens


def lab_token_counts(file: Path) -> tuple[list[int], list[int]]:
    """The lab cell's loop for one file, minus its printing (the statistics are computed)."""
    global encoding
    encoding = tiktoken.get_encoding("cl100k_base")
    with open(file, encoding="utf-8") as f:
        dataset = [json.loads(line) for line in f]
    total_tokens = []
    assistant_tokens = []
    for ex in dataset:
        messages = ex.get("messages", {})
        total_tokens.append(num_tokens_from_messages(messages))
        assistant_tokens.append(num_assistant_tokens_from_messages(messages))
    for values in (total_tokens, assistant_tokens):
        min(values), max(values), np.mean(values), np.median(values)
    return total_tokens, assistant_tokens


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process and of the worker processes it waited for)."""
    before = _cpu()
    started = time.perf_counter()
    run()
    return time.perf_counter() - started, _cpu() - before


def _cpu() -> float:
    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=40.0, help="size of the generated file in MB")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each approach's best round is shown")
    parser.add_argument("--keep", action="store_true", help="keep the generated file and print its path")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="tunelab-bench-"))
    # The lab calls plain tiktoken.get_encoding; give it the offline cache tunelab uses.
    os.environ["TIKTOKEN_CACHE_DIR"] = str(install_tiktoken_cache(work / "tiktoken"))
    path = work / "chat.jsonl"
    n = make_file(path, args.mb)
    size_mb = path.stat().st_size / 1e6
    tiktoken.get_encoding("cl100k_base")  # load once, outside every timing

    approaches: dict[str, Callable[[], object]] = {
        "lab cell (json.loads + tiktoken encode)": lambda: lab_token_counts(path),
        "tunelab validate_file, default workers": lambda: validate_file(path, encodings=("cl100k_base",)),
        "tunelab validate_file, 1 worker": lambda: validate_file(path, encodings=("cl100k_base",), workers=1),
    }
    best: dict[str, tuple[float, float]] = {}
    for _ in range(args.repeat):  # interleaved, so that a busy moment hurts every approach alike
        for label, run in approaches.items():
            wall, cpu = timed(run)
            if label not in best or wall < best[label][0]:
                best[label] = (wall, cpu)

    lab_totals, lab_assistant = lab_token_counts(path)
    report = validate_file(path, encodings=("cl100k_base",))
    stats = report.tokens["cl100k_base"]
    assert report.valid and report.examples == n, report.summary()
    assert (stats.total.min, stats.total.max) == (min(lab_totals), max(lab_totals))
    assert abs(stats.total.mean - float(np.mean(lab_totals))) < 1e-6
    assert abs(stats.assistant.median - float(np.median(lab_assistant))) < 1e-6

    cores = len(os.sched_getaffinity(0))
    load = os.getloadavg()[0]
    print(
        f"file: {n:,} chat examples, {size_mb:.1f} MB; {cores} cores (load average {load:.1f}); "
        f"tiktoken {tiktoken.__version__}; best of {args.repeat}"
    )
    print(f"{'approach':<42}{'wall s':>8}{'MB/s':>7}{'vs lab':>8}{'CPU s':>8}")
    lab_wall = best["lab cell (json.loads + tiktoken encode)"][0]
    for label, (wall, cpu) in best.items():
        print(f"{label:<42}{wall:>8.2f}{size_mb / wall:>7.1f}{lab_wall / wall:>7.2f}x{cpu:>8.2f}")
    default_wall = best["tunelab validate_file, default workers"][0]
    print(f"speed-up (lab / tunelab default, wall): {lab_wall / default_wall:.2f}x")
    if args.keep:
        print(f"kept {path}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
