"""Continuous batching in the built-in engine, in-process on a tiny random llama with two LoRA adapters.

Requests join a running batch and leave it the step they end; rows of different adapters, streamed
and non-streamed rows, greedy and seeded rows share decode steps; every greedy answer is the one
the request gets alone (fp32); a cancelled row leaves at the next step.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tunelab.models.catalog import ModelSource
from tunelab.serving.engine import Engine, SamplingParams, kv_bytes_per_token
from tunelab.serving.generation import Cancelled, Delta, Done

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


def serve(tiny_dir: Path, adapters: dict[str, Path], **kwargs) -> Engine:
    engine = Engine("cpu", dtype="float32", **kwargs)
    engine.load(ModelSource("base", "base", tiny_dir))
    for name, folder in adapters.items():
        engine.load(ModelSource(name, "base", tiny_dir, adapter_dir=folder))
    return engine


@pytest.fixture(scope="module")
def alone(tiny_dir, adapters):
    """The reference: one row at a time."""
    engine = serve(tiny_dir, adapters, max_batch=1)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def batched(tiny_dir, adapters):
    engine = serve(tiny_dir, adapters)
    yield engine
    engine.close()


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kw)


def user(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


def answer(engine: Engine, model: str, question: str, params: SamplingParams) -> tuple[str, str, int]:
    (c,), _ = engine.generate(model, user(question), params)
    return c.text, c.finish_reason, c.tokens


def test_staggered_mixed_adapter_requests_join_the_running_batch_and_answer_as_alone(alone, batched):
    requests = [(m, q, 8 + 5 * i) for i, (m, q) in enumerate((m, q) for q in QUESTIONS for m in ("base", "a", "b"))]
    expected = [answer(alone, m, q, greedy(n)) for m, q, n in requests]
    assert len({expected[0][0], expected[1][0], expected[2][0]}) == 3  # each adapter changes the answer

    sched = batched.scheduler("base")
    joined_before, steps_before = sched.joined_running, sched.steps
    generations = []
    for m, q, n in requests:  # arrivals spread over the decode of the earlier ones
        generations.append(batched.start(m, user(q), greedy(n)))
        time.sleep(0.01)
    got = [(c.text, c.finish_reason, c.tokens) for (c,) in (g.result(timeout=120) for g in generations)]
    assert got == expected
    assert all(tokens <= n for (_, _, n), (_, _, tokens) in zip(requests, got, strict=True))
    assert sched.joined_running > joined_before  # some rows were merged into a batch already decoding
    assert max(sched.batch_sizes) > 2 and sched.steps > steps_before


def test_a_short_request_finishes_while_a_long_one_keeps_decoding(batched):
    long = batched.start("a", user("Tell me a story."), greedy(400))
    while batched.scheduler("a").steps == 0 or not long.prompt_tokens:
        time.sleep(0.01)
    time.sleep(0.2)
    short = batched.start("b", user("Say hi."), greedy(3))
    (c,) = short.result(timeout=60)
    assert c.tokens <= 3
    assert not long.finished  # nobody waited for the other's batch to end
    (c_long,) = long.result(timeout=120)
    assert c_long.tokens > 3


def test_streamed_and_plain_rows_share_steps_and_streamed_text_equals_plain(alone, batched):
    reference = answer(alone, "b", QUESTIONS[0], greedy(40))
    plain = [batched.start("b", user(QUESTIONS[0]), greedy(40)) for _ in range(2)]
    streamed = batched.start("b", user(QUESTIONS[0]), greedy(40), stream=True)
    deltas, done = [], []
    for event in streamed:
        (deltas if isinstance(event, Delta) else done).append(event)
    assert len(done) == 1 and isinstance(done[0], Done)
    assert "".join(d.text for d in deltas) == done[0].completion.text == reference[0]
    assert len(deltas) > 3  # really streamed, piece by piece
    assert [g.result(timeout=60)[0].text for g in plain] == [reference[0]] * 2


def test_a_cancelled_row_leaves_at_the_next_step_and_the_others_go_on(alone, batched):
    sched = batched.scheduler("base")
    other = batched.start("base", user(QUESTIONS[1]), greedy(60))
    doomed = batched.start("a", user("Tell me a long story."), greedy(800), stream=True)
    pieces = iter(doomed)
    next(pieces)  # it is decoding
    steps = sched.steps
    doomed.cancel()
    with pytest.raises(Cancelled):
        list(pieces)
    deadline = time.time() + 30
    while sched.counts()[0] > (0 if other.finished else 1) and time.time() < deadline:
        time.sleep(0.01)
    assert sched.steps - steps <= 3 or other.finished  # gone within a step or so, not after 800 tokens
    assert other.result(timeout=60)[0].text == answer(alone, "base", QUESTIONS[1], greedy(60))[0]


def test_stop_strings_cut_the_answer_and_are_never_streamed(alone, batched):
    full = answer(alone, "a", QUESTIONS[2], greedy(30))[0]
    stop = full[10:12]
    assert stop and stop in full
    expected = full[: full.find(stop)]
    g = batched.start("a", user(QUESTIONS[2]), greedy(30, stop=[stop, "\u2603never"]), stream=True)
    streamed = "".join(e.text for e in g if isinstance(e, Delta))
    (c,) = g.result()
    assert c.text == streamed == expected and c.finish_reason == "stop"


def test_seeded_samples_repeat_inside_a_batch_and_differ_per_choice(batched):
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7)
    alone_first = batched.generate("base", user("Hi"), params)[0]
    crowd = [batched.start("a", user(q), greedy(30)) for q in QUESTIONS]
    together = batched.start("base", user("Hi"), params)
    assert together.result(timeout=60) == alone_first
    for g in crowd:
        g.result(timeout=60)
    two = batched.generate("base", user("Hi"), SamplingParams(max_tokens=16, temperature=1.0, seed=7, n=2))[0]
    assert two[0] == alone_first[0] and two[1] != two[0]  # choice i draws from seed + i


def test_the_batch_is_limited_by_the_kv_budget(tiny_dir, adapters):
    from transformers import AutoConfig, AutoTokenizer

    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(tiny_dir), torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    prompt = len(tokenizer.apply_chat_template(user(QUESTIONS[0]), add_generation_prompt=True))
    budget = 3 * (prompt + 20) * per_token  # room for three rows of this prompt and 20 new tokens
    engine = serve(tiny_dir, {}, kv_cache_bytes=budget)
    try:
        gens = [engine.start("base", user(QUESTIONS[0]), greedy(20)) for _ in range(8)]
        assert all(len(g.result(timeout=120)[0].text) >= 0 for g in gens)
        assert max(engine.batch_sizes("base")) <= 3
    finally:
        engine.close()


def test_a_long_prompt_is_prefilled_in_chunks_with_the_same_answer(tiny_dir, alone):
    question = " ".join(f"word{i}" for i in range(100))
    expected = answer(alone, "base", question, greedy(12))
    engine = serve(tiny_dir, {}, prefill_chunk=64)
    try:
        short = engine.start("base", user("Say hi."), greedy(200))
        got = answer(engine, "base", question, greedy(12))
        assert got[0][:20] == expected[0][:20]
        short.result(timeout=120)
    finally:
        engine.close()


def test_unloading_an_adapter_in_use_lets_its_rows_finish(tiny_dir, adapters):
    engine = serve(tiny_dir, adapters)
    try:
        running = engine.start("a", user(QUESTIONS[0]), greedy(60))
        engine.unload("a")
        assert not engine.loaded("a")
        (c,) = running.result(timeout=60)
        assert c.tokens > 0
        with pytest.raises(KeyError):
            engine.start("a", user("Hi"), greedy(2))
        assert engine.generate("b", user("Hi"), greedy(4))[0][0].tokens > 0
    finally:
        engine.close()


def test_many_threads_blocking_generate(batched, alone):
    expected = answer(alone, "base", QUESTIONS[3], greedy(10))
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(answer(batched, "base", QUESTIONS[3], greedy(10))))
        for _ in range(6)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 6


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
def test_the_decode_thread_runs_below_the_api_threads(tiny_dir):
    engine = Engine("cpu", dtype="float32", decode_nice=3)
    try:
        engine.load(ModelSource("base", "base", tiny_dir))
        answer(engine, "base", "Hello?", greedy(2))  # the loop has started (and lowered itself)
        decode = engine.scheduler("base")._thread.native_id
        assert decode is not None
        assert os.getpriority(os.PRIO_PROCESS, decode) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    finally:
        engine.close()
