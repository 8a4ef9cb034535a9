"""Batching in the engine, in-process on a tiny random llama with two LoRA adapters (fast).

Concurrent greedy requests on a base and on adapters of it are answered in shared batches, each
row with its own adapter, and every answer is the one it gets alone.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from tunelab.models.catalog import ModelSource
from tunelab.serving.engine import Engine, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft 0.21

QUESTIONS = ["Who wrote Hamlet?", "What is the biggest ocean?", "Name a prime number.", "Say hi."]


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters with random (not zero) weights, so each changes the answers."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    folders = {}
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        base = AutoModelForCausalLM.from_pretrained(tiny_dir)
        config = LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False)
        folders[name] = tmp_path_factory.mktemp(f"adapter-{name}")
        get_peft_model(base, config).save_pretrained(folders[name])
    return folders


def serve(tiny_dir: Path, adapters: dict[str, Path], max_batch: int) -> Engine:
    engine = Engine("cpu", max_batch=max_batch)
    engine.load(ModelSource("base", "base", tiny_dir))
    for name, folder in adapters.items():
        engine.load(ModelSource(name, "base", tiny_dir, adapter_dir=folder))
    return engine


def ask(engine: Engine, model: str, question: str, max_tokens: int = 12) -> tuple[str, str, int]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    (c,), _ = engine.generate(model, [{"role": "user", "content": question}], params)
    return c.text, c.finish_reason, c.tokens


def ask_together(engine: Engine, requests: list[tuple[str, str, int]]) -> list:
    answers: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def one(i: int) -> None:
        start.wait()
        answers[i] = ask(engine, *requests[i])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers


def test_mixed_adapters_batch_and_answer_as_they_do_alone(tiny_dir, adapters):
    # Different models and max_tokens in one batch; longer prompts left-pad the shorter ones.
    requests = [
        (model, q, 6 + 3 * i) for i, (model, q) in enumerate((m, q) for q in QUESTIONS for m in ("base", "a", "b"))
    ]
    alone_engine = serve(tiny_dir, adapters, max_batch=1)
    alone = [ask(alone_engine, *r) for r in requests]

    engine = serve(tiny_dir, adapters, max_batch=8)
    together = ask_together(engine, requests)
    assert together == alone
    sizes = engine.batch_sizes("base")
    assert sum(n * count for n, count in sizes.items()) == len(requests)
    assert max(sizes) > 1  # some requests did share a batch
    assert all(tokens <= 6 + 3 * i for i, (_, _, tokens) in enumerate(together))  # each row's own max_tokens
    # the adapters are applied per row: the same question gets three different answers
    assert len({alone[0][0], alone[1][0], alone[2][0]}) == 3


def test_requests_that_decode_differently_are_not_batched_together(tiny_dir, adapters):
    engine = serve(tiny_dir, adapters, max_batch=8)
    barrier = threading.Barrier(2)
    results = {}

    def run(name: str, params: SamplingParams) -> None:
        barrier.wait()
        results[name] = engine.generate("a", [{"role": "user", "content": "Hi"}], params)

    threads = [
        threading.Thread(target=run, args=("greedy", SamplingParams(max_tokens=4, temperature=0))),
        threading.Thread(target=run, args=("stop", SamplingParams(max_tokens=4, temperature=0, stop=["x"]))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert engine.batch_sizes("a") == {1: 2}
