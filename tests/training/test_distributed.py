"""One job on 2 processes (gloo, CPU): the one-process losses, stop flags for every rank, a killed rank fails it."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunelab.training import distributed
from tunelab.training.hooks import Stop
from tunelab.training.hparams import JobSpec
from tunelab.training.recipe import Paused, TrainingError, TrainSpec, train

from .conftest import CHATS, RecordingHooks, chat, write_jsonl
from .test_dpo import TOPICS, preference

# integration: each test starts rank processes and a gloo group (10-40 s each on 2 cores); slow:
# `make test` keeps the through-the-API 2-process job (tests/api/test_distributed_jobs.py) only.
pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),  # peft 0.21
]

# The ranks pack different rows than one process does (other matmul shapes and rounding) and the
# all-reduce sums in another order: measured |diff| ~5e-7 on losses of ~10 over 6 steps.
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5


def spec(model_dir: Path, train_file: Path, out: Path, **hp) -> TrainSpec:
    return TrainSpec(
        base_model_dir=model_dir,
        training_file=train_file,
        validation_file=None,
        output_dir=out,
        seed=5,
        hyperparameters=JobSpec(**({"n_epochs": 2, "batch_size": 3} | hp)),
        cpu_threads=1,
    )


def run(spec: TrainSpec, world: int, hooks: RecordingHooks | None = None):
    hooks = hooks or RecordingHooks()
    if world == 1:
        return train(spec, hooks), hooks
    with distributed.ranks(spec, world):
        return train(spec, hooks), hooks


@pytest.fixture
def chats(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chats.jsonl", [chat(q, a) for q, a in CHATS] + [chat(a, q) for q, a in CHATS[:1]])


DPO = {"objective": "dpo", "learning_rate_multiplier": 20.0}


# FSDP: full fine-tuning (the supervised rows' fillers, tied weights saved once) and DPO (its
# fillers, a LoRA adapter gathered from the shards); LoRA supervised is the pause test's job.
@pytest.mark.parametrize(
    ("method", "sharding"),
    [({}, "none"), ({"lora_rank": 0}, "none"), (DPO, "none"), ({"lora_rank": 0}, "fsdp"), (DPO, "fsdp")],
    ids=["lora", "full", "dpo", "full-fsdp", "dpo-fsdp"],
)
def test_two_processes_train_the_one_process_job(tiny_dir, chats, tmp_path, method, sharding):
    data = (
        chats if "objective" not in method else write_jsonl(tmp_path / "p.jsonl", [preference(t) for t in TOPICS[:7]])
    )
    one, one_hooks = run(spec(tiny_dir, data, tmp_path / "one", **method), 1)
    two, two_hooks = run(replace(spec(tiny_dir, data, tmp_path / "two", **method), sharding=sharding), 2)
    # 7 examples, batch 3: the last step of each epoch has 1 example, so one rank has none
    losses = [[m["train_loss"] for m in h.metrics()] for h in (one_hooks, two_hooks)]
    assert len(losses[0]) == 6 and losses[1] == pytest.approx(losses[0], rel=LOSS_RTOL)
    assert one.trained_tokens == two.trained_tokens
    name = "adapter_model.safetensors" if "lora_rank" not in method else "model.safetensors"
    a, b = load_file(one.final_dir / name), load_file(two.final_dir / name)
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=WEIGHT_ATOL, rtol=0)
    assert [c.step for c in two_hooks.checkpoints] == [3, 6]  # rank 0 writes them, once
    started = "on 2 processes (FSDP)" if sharding == "fsdp" else "on 2 processes:"
    assert any(started in e["message"] for e in two_hooks.events)


@pytest.mark.parametrize("sharding", ["none", "fsdp"])
def test_a_pause_stops_every_rank_and_resumes_to_the_same_losses(tiny_dir, chats, tmp_path, sharding):
    plain, plain_hooks = run(spec(tiny_dir, chats, tmp_path / "plain"), 2)
    job = replace(spec(tiny_dir, chats, tmp_path / "job"), sharding=sharding)
    with pytest.raises(Paused):
        run(job, 2, RecordingHooks(stop_after=2, stop_with=Stop.PAUSE))
    _, resumed = run(job, 2)
    first = [m["train_loss"] for m in plain_hooks.metrics()]
    assert [m["step"] for m in resumed.metrics()] == [3, 4, 5, 6]
    assert [m["train_loss"] for m in resumed.metrics()] == pytest.approx(first[2:], rel=LOSS_RTOL)


class KillRankOne(RecordingHooks):
    """Kills rank 1 (SIGKILL) before step 2."""

    def should_stop(self) -> Stop:
        if self.polls == 1:
            for pid in distributed.rank_pids():
                os.kill(pid, signal.SIGKILL)
        return super().should_stop()


def test_a_killed_rank_fails_the_job_at_once(tiny_dir, chats, tmp_path):
    started = time.monotonic()
    with pytest.raises(TrainingError, match="stopped answering"):
        run(spec(tiny_dir, chats, tmp_path / "job", n_epochs=50), 2, KillRankOne())
    assert time.monotonic() - started < 120  # not the 15-minute collective timeout
