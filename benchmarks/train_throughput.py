"""Training throughput: the naive HF recipe vs tunelab's recipe, side by side, same model and data.

    python benchmarks/train_throughput.py                 # CPU, bundled SmolLM2-135M, 200 chats
    python benchmarks/train_throughput.py --naive-steps 0 # the naive recipe for a whole epoch

Recipes (one epoch over 200 short generated chats each, every recipe in a fresh process):

- naive: the lab's seed recipe, transformers ``Trainer`` on text padded to 512 tokens
  (``padding="max_length"``), batch 2, fp32, lr 2e-5, weight decay 0.01, full fine-tuning, loss
  on every real token. On CPU an epoch takes ~20 minutes, so by default it runs
  ``--naive-steps`` steps and the epoch time is extrapolated (marked "est.").
- tunelab-full / tunelab-lora: ``tunelab.training.train`` with batch 2 (the same examples per
  step as naive), 1 epoch, no validation file; packed rows, no padding.
- tunelab-lora-2proc: tunelab-lora as one job on 2 processes (``TUNELAB_TRAIN_PROCS=2``:
  torch.distributed, gloo), the same global batch, 1 thread each on CPU; compare it with
  tunelab-lora at ``--threads 2`` (1 process x 2 threads).
- tunelab-full-2proc / tunelab-full-2proc-fsdp (not in the default set): tunelab-full on 2
  processes, the model copied to each (``TUNELAB_TRAIN_SHARDING=none``) or sharded over them
  (``fsdp``: FSDP2); the peak memory column is rank 0's.
- tunelab-api: the whole product path for the LoRA job: a fresh ``tunelab serve`` (embedded
  worker, SQLite, MLflow), the file uploaded with the openai SDK, the job created with batch 2 and
  1 epoch; timed from the upload until the job is ``succeeded`` (validation, model load, training,
  checkpoint, smoke test and MLflow registration included). Bundled model only.

Columns: real (non-pad) tokens per second of training; MFU = real tokens/s x FLOPs per token /
peak, with FLOPs per token = 6N (full) or 4N (LoRA: no weight gradients for the frozen base)
+ 12·L·d·T̄ attention FLOPs at the examples' mean length T̄, and the peak a large matmul
measured on this device (fp32 on CPU, bf16 on CUDA); peak memory (CPU: max RSS of the process;
CUDA: max allocated); the last step's training loss as each recipe defines it; and one common
yardstick, the loss on the assistant tokens of 20 held-out chats after training.

With CUDA, the same three recipes also run on a random-init model shaped like Qwen2.5-0.5B.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

SYSTEMS = [
    "Clippy is a factual chatbot that is also sarcastic.",
    "Marv is a factual chatbot that is also sarcastic.",
    "You are a sarcastic but accurate assistant.",
    "Answer correctly, with a dry, sarcastic tone.",
]
FACTS = [
    ("Who discovered Antarctica?", "Bellingshausen and Lazarev, as if they don't teach that in every school!"),
    ("What is the biggest ocean?", "The Pacific Ocean. It's not like it's a small pond or anything."),
    ("What is the largest planet?", "It's called Jupiter, you may have heard of it...or not."),
    ("Who painted the Mona Lisa?", "Oh, some obscure artist named Leonardo da Vinci. Not that he is famous."),
    ("What's the boiling point of water?", "Exciting fact of the day: it's 100 degrees Celsius. Life-changing."),
    ("Who wrote 'Romeo and Juliet'?", "Oh, just some guy named William Shakespeare. Ever heard of him?"),
    ("What's the capital of France?", "Paris, as if everyone doesn't know that already."),
    ("How far is the Moon from Earth?", "About 384,400 kilometers. Give or take a few, like that really matters."),
    ("What is the chemical symbol for gold?", "Au. Because 'Go' was clearly taken by something more important."),
    ("How many continents are there?", "Seven. Counting is hard, I know."),
    ("What is the fastest land animal?", "The cheetah. Not you on a Monday morning, that's for sure."),
    ("Who invented the telephone?", "Alexander Graham Bell, so you could ignore calls from the comfort of home."),
    ("What is the speed of light?", "About 299,792 kilometers per second. Slightly faster than your Wi-Fi."),
    ("What is the tallest mountain?", "Mount Everest. Hardly a hill, but you do you."),
    ("What gas do plants absorb?", "Carbon dioxide. They're doing the heavy lifting while you breathe it out."),
    ("Who was the first person on the Moon?", "Neil Armstrong, in 1969. Big step, you might have heard."),
    ("What is the smallest prime number?", "Two. The only even prime, which makes it very special, unlike some."),
    ("How many legs does a spider have?", "Eight. Count them next time one crawls on you."),
    ("What language is spoken in Brazil?", "Portuguese. Not Spanish, shocking as that may be."),
    ("What is the freezing point of water?", "Zero degrees Celsius. Cool fact, literally."),
]
PREFIXES = ["", "Quick question: ", "Hey, ", "I was wondering, ", "Tell me: "]


def make_chats(n: int, seed: int) -> list[dict]:
    """``n`` short lab-like chats: every fact under varied system prompts and question phrasings."""
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        question, answer = FACTS[i % len(FACTS)]
        prefix = rng.choice(PREFIXES)
        chats.append(
            {
                "messages": [
                    {"role": "system", "content": rng.choice(SYSTEMS)},
                    {"role": "user", "content": prefix + (question[0].lower() + question[1:] if prefix else question)},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return chats


@dataclass
class Row:
    recipe: str
    steps: int
    epoch_steps: int
    real_tokens: int
    seconds: float
    tokens_per_s: float
    epoch_seconds: float
    epoch_estimated: bool
    mfu: float
    peak_memory_gib: float
    last_train_loss: float
    heldout_loss: float


# -- the naive recipe ------------------------------------------------------------------------------
def run_naive(model_dir: Path, train_file: Path, work: Path, max_steps: int, device: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [
        tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False)
        for line in train_file.read_text().splitlines()
    ]
    enc = tokenizer(texts, padding="max_length", max_length=512, truncation=True, add_special_tokens=False)
    # pad == eos for this model, so labels come from the attention mask, not from pad ids
    labels = [
        [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        for ids, mask in zip(enc["input_ids"], enc["attention_mask"], strict=True)
    ]
    data = Dataset.from_dict({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    args = TrainingArguments(
        output_dir=str(work / "naive"),
        per_device_train_batch_size=2,
        learning_rate=2e-5,
        weight_decay=0.01,
        num_train_epochs=1,
        max_steps=max_steps if max_steps > 0 else -1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=105,
        use_cpu=device == "cpu",
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    peak = peak_memory(device)
    steps = trainer.state.global_step
    # the Trainer shuffles; it saw 2 x steps examples, each of mean real length
    real_per_example = sum(map(sum, enc["attention_mask"])) / len(texts)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "steps": steps,
        "epoch_steps": (len(texts) + 1) // 2,
        "real_tokens": round(2 * steps * real_per_example),
        "seconds": seconds,
        "last_train_loss": losses[-1],
        "model": model,
        "lora": False,
        "peak": peak,
    }


# -- tunelab ---------------------------------------------------------------------------------------
class TimingHooks:
    """TrainHooks that time the training loop: from its start to the last step's metrics."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.last: dict = {}

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None: ...

    def started(self, resolved, total_steps: int) -> None:
        self.start = time.perf_counter()

    def step(self, metrics) -> None:
        self.end, self.last = time.perf_counter(), metrics.as_dict()

    def checkpoint(self, ckpt) -> None: ...
    def checkpoint_deleted(self, ckpt) -> None: ...

    def should_stop(self):
        from tunelab.training.hooks import Stop

        return Stop.GO_ON


def run_tunelab(
    model_dir: Path, train_file: Path, work: Path, lora_rank: int, device: str, procs: int = 1, sharding: str = "none"
) -> dict:
    from contextlib import nullcontext

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.data.tokenize import tokenize_chat
    from tunelab.training import distributed
    from tunelab.training.hparams import JobSpec
    from tunelab.training.recipe import TrainSpec, train

    hooks = TimingHooks()
    out = work / f"tunelab-{lora_rank}-{procs}-{sharding}"
    spec = TrainSpec(
        base_model_dir=model_dir,
        training_file=train_file,
        validation_file=None,
        output_dir=out,
        seed=105,
        hyperparameters=JobSpec(n_epochs=1, batch_size=2, lora_rank=lora_rank),
        device=device,
        cpu_threads=(1 if procs > 1 else torch.get_num_threads()) if device == "cpu" else None,
        sharding=sharding,
    )
    with distributed.ranks(spec, procs) if procs > 1 else nullcontext():
        result = train(spec, hooks)
    peak = peak_memory(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lines = train_file.read_text().splitlines()
    real_tokens = sum(len(tokenize_chat(tokenizer, json.loads(line)["messages"])) for line in lines)
    if lora_rank:
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), result.final_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(result.final_dir)
    return {
        "steps": hooks.last["step"],
        "epoch_steps": hooks.last["total_steps"],
        "real_tokens": real_tokens,
        "seconds": hooks.end - hooks.start,
        "last_train_loss": hooks.last["train_loss"],
        "model": model.to(device),
        "lora": bool(lora_rank),
        "peak": peak,
    }


def run_api(model_dir: Path, train_file: Path, work: Path, device: str) -> dict:
    """Upload -> job -> succeeded through a real ``tunelab serve``, timed end to end."""
    import socket
    import subprocess

    from openai import OpenAI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data_dir = work / "api-data"
    env = {**os.environ, "TUNELAB_API_KEY": "bench", "TUNELAB_DEVICE": device}
    server = subprocess.Popen(
        [sys.executable, "-m", "tunelab", "serve", "--port", str(port), "--data-dir", str(data_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=20)
    try:
        client.models.list()  # retries until the server is up
        start = time.perf_counter()
        with train_file.open("rb") as f:
            file_id = client.files.create(file=f, purpose="fine-tune").id
        job = client.fine_tuning.jobs.create(
            model="HuggingFaceTB/SmolLM2-135M-Instruct",
            training_file=file_id,
            seed=105,
            hyperparameters={"n_epochs": 1, "batch_size": 2},
        )
        while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
            time.sleep(0.5)
        seconds = time.perf_counter() - start
        if job.status != "succeeded":
            raise RuntimeError(f"the job {job.status}: {job.error}")
        last = next(e.data for e in client.fine_tuning.jobs.list_events(job.id) if e.type == "metrics")
    finally:
        server.terminate()
        server.wait(timeout=60)
    from transformers import AutoTokenizer

    from tunelab.data.tokenize import tokenize_chat

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    real_tokens = sum(
        len(tokenize_chat(tokenizer, json.loads(line)["messages"])) for line in train_file.read_text().splitlines()
    )
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(model_dir), data_dir / "jobs" / job.id / "final"
    )
    return {
        "steps": last["step"],
        "epoch_steps": last["total_steps"],
        "real_tokens": real_tokens,
        "seconds": seconds,
        "last_train_loss": last["train_loss"],
        "model": model.to(device),
        "lora": True,
        "peak": None,
    }


# -- measuring -------------------------------------------------------------------------------------
@torch.no_grad()
def heldout_loss(model, model_dir: Path, chats: list[dict], device: str) -> float:
    """Mean loss on the assistant tokens of ``chats``, with tunelab's masking, for every recipe alike."""
    from transformers import AutoTokenizer

    from tunelab.data.tokenize import tokenize_chat
    from tunelab.training.packing import pack, token_losses

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = [tokenize_chat(tokenizer, c["messages"]) for c in chats]
    model.eval()
    losses = [token_losses(model, {k: v.to(device) for k, v in row.items()})[0] for row in pack(examples, 2048)]
    return torch.cat(losses).mean().item()


def peak_flops(device: str) -> float:
    """Measured FLOP/s of a large matmul: fp32 on CPU, bf16 on CUDA."""
    n, dtype = (2048, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(2):
        a @ b
    reps, best = (5 if device == "cpu" else 50), 0.0
    for _ in range(3):  # the best of three: a busy machine only ever makes it slower
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            a @ b
        _sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - start))
    return best


def flops_per_token(model_dir: Path, lora: bool, mean_len: float) -> float:
    config = json.loads((model_dir / "config.json").read_text())
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        n_params = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir)).parameters()
        )
    if not config.get("tie_word_embeddings", False):  # the input embedding is a lookup, not a matmul
        n_params -= config["vocab_size"] * config["hidden_size"]
    d_attn = config["num_attention_heads"] * config.get(
        "head_dim", config["hidden_size"] // config["num_attention_heads"]
    )
    return (4 if lora else 6) * n_params + 12 * config["num_hidden_layers"] * d_attn * mean_len


def peak_memory(device: str) -> int:
    """Bytes: the process's max RSS on CPU, the max allocated on CUDA."""
    if device == "cpu":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return torch.cuda.max_memory_allocated()


def _sync(device: str) -> None:
    if device != "cpu":
        torch.cuda.synchronize()


def _child(
    recipe: str,
    model_dir: Path,
    train_file: Path,
    heldout: list[dict],
    work: Path,
    naive_steps: int,
    device: str,
    threads: int,
    queue: mp.Queue,
) -> None:
    torch.set_num_threads(threads)
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
    if recipe == "naive":
        run = run_naive(model_dir, train_file, work, naive_steps, device)
    elif recipe == "tunelab-api":
        run = run_api(model_dir, train_file, work, device)
    elif recipe == "tunelab-lora-2proc":
        run = run_tunelab(model_dir, train_file, work, 16, device, procs=2)
    elif recipe in ("tunelab-full-2proc", "tunelab-full-2proc-fsdp"):
        run = run_tunelab(
            model_dir, train_file, work, 0, device, procs=2, sharding="fsdp" if recipe.endswith("-fsdp") else "none"
        )
    else:
        run = run_tunelab(model_dir, train_file, work, 0 if recipe == "tunelab-full" else 16, device)
    run["heldout_loss"] = heldout_loss(run.pop("model"), model_dir, heldout, device)
    peak = run.pop("peak")  # None: it was another process (the API's worker)
    run["peak_memory_gib"] = float("nan") if peak is None else peak / 2**30
    queue.put(run)


def measure(
    recipe: str,
    model_dir: Path,
    train_file: Path,
    heldout: list[dict],
    work: Path,
    naive_steps: int,
    device: str,
    threads: int,
    peak: float,
    mean_len: float,
) -> Row:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_child, args=(recipe, model_dir, train_file, heldout, work, naive_steps, device, threads, queue)
    )
    proc.start()
    run = queue.get()
    proc.join()
    tokens_per_s = run["real_tokens"] / run["seconds"]
    return Row(
        recipe=recipe,
        steps=run["steps"],
        epoch_steps=run["epoch_steps"],
        real_tokens=run["real_tokens"],
        seconds=run["seconds"],
        tokens_per_s=tokens_per_s,
        epoch_seconds=run["seconds"] * run["epoch_steps"] / run["steps"],
        epoch_estimated=run["steps"] < run["epoch_steps"],
        mfu=tokens_per_s * flops_per_token(model_dir, run["lora"], mean_len) / peak,
        peak_memory_gib=run["peak_memory_gib"],
        last_train_loss=run["last_train_loss"],
        heldout_loss=run["heldout_loss"],
    )


def qwen_shaped_model(tokenizer_dir: Path, work: Path) -> Path:
    """A random-init model with Qwen2.5-0.5B's shapes (494M parameters), with the bundled tokenizer."""
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    path = work / "qwen2.5-0.5b-shaped"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def print_table(title: str, rows: list[Row], naive: Row) -> None:
    print(f"\n{title}")
    print("| recipe | steps | real tok/s | epoch s | speed-up | MFU | peak mem GiB | last train loss | held-out loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        epoch = f"{r.epoch_seconds:.0f}" + (" (est.)" if r.epoch_estimated else "")
        memory = "—" if r.peak_memory_gib != r.peak_memory_gib else f"{r.peak_memory_gib:.2f}"  # NaN: not measured
        print(
            f"| {r.recipe} | {r.steps}/{r.epoch_steps} | {r.tokens_per_s:.1f} | {epoch} | "
            f"{naive.epoch_seconds / r.epoch_seconds:.1f}x | {100 * r.mfu:.1f}% | {memory} | "
            f"{r.last_train_loss:.3f} | {r.heldout_loss:.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=200)
    parser.add_argument(
        "--naive-steps",
        type=int,
        default=None,
        help="steps of the naive recipe (0 = a whole epoch; default 20 on CPU, 0 on CUDA)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPU threads for every recipe (default: every core, as tunelab's recipe does)",
    )
    parser.add_argument(
        "--recipes",
        default="naive,tunelab-full,tunelab-lora,tunelab-lora-2proc,tunelab-api",
        help="of naive, tunelab-full, tunelab-lora, tunelab-lora-2proc, tunelab-full-2proc, "
        "tunelab-full-2proc-fsdp, tunelab-api (bundled model only)",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    naive_steps = args.naive_steps if args.naive_steps is not None else (20 if args.device == "cpu" else 0)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from transformers import AutoTokenizer

    from tunelab.data.tokenize import tokenize_chat
    from tunelab.models.bundled import bundled_model_dir

    bundled = bundled_model_dir(Path("~/.cache/tunelab").expanduser())
    torch.set_num_threads(args.threads)
    peak = peak_flops(args.device)
    chats, heldout = make_chats(args.examples, seed=0), make_chats(20, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(bundled)
    mean_len = sum(len(tokenize_chat(tokenizer, c["messages"])) for c in chats) / len(chats)
    print(
        f"device={args.device} ({platform.processor() or platform.machine()}, {args.threads} threads"
        f"{', ' + torch.cuda.get_device_name() if args.device != 'cpu' else ''}), torch {torch.__version__}, "
        f"peak matmul {peak / 1e9:.0f} GFLOP/s, {len(chats)} chats of {mean_len:.1f} tokens on average"
    )

    models = [("SmolLM2-135M-Instruct (bundled)", bundled)]
    all_rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        train_file = work / "train.jsonl"
        train_file.write_text("".join(json.dumps(c) + "\n" for c in chats))
        if args.device != "cpu":
            models.append(("Qwen2.5-0.5B-shaped, random init", qwen_shaped_model(bundled, work)))
        for title, model_dir in models:
            recipes = [r for r in args.recipes.split(",") if r != "tunelab-api" or model_dir == bundled]
            rows = [
                measure(
                    recipe, model_dir, train_file, heldout, work, naive_steps, args.device, args.threads, peak, mean_len
                )
                for recipe in recipes
            ]
            naive = next((r for r in rows if r.recipe == "naive"), rows[0])
            print_table(title, rows, naive)
            all_rows[title] = [asdict(r) for r in rows]
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=2))


if __name__ == "__main__":
    main()
