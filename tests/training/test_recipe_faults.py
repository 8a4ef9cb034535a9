"""The recipe under faults and hostile numbers: a lazy step plan, stops while setting up, and a run
killed outright going on from its last save with the losses of a run that never stopped (CPU)."""

from __future__ import annotations

import itertools
import math
import tracemalloc

import pytest
import torch

from tunelab.training import recipe as recipe_module
from tunelab.training.hooks import Stop
from tunelab.training.recipe import Cancelled, Paused, TrainingError, _step_plan, train

from .conftest import CHATS, RecordingHooks, chat, write_jsonl
from .test_recipe import read_csv, spec


def eager_plan(n_examples: int, batch_size: int, n_epochs: int, seed: int) -> list[list[int]]:
    """The plan as it used to be built: every step of every epoch, up front."""
    shuffle = torch.Generator().manual_seed(seed)
    plan = []
    for _ in range(n_epochs):
        order = torch.randperm(n_examples, generator=shuffle).tolist()
        plan += [order[start : start + batch_size] for start in range(0, n_examples, batch_size)]
    return plan


def test_the_step_plan_is_lazy_whatever_n_epochs_says():
    tracemalloc.start()
    plan = _step_plan(1000, 1, 10**9, seed=3)  # a billion epochs: 10^12 steps
    first = list(itertools.islice(plan, 5))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert [step for step, _ in first] == [1, 2, 3, 4, 5]
    assert peak < 5_000_000  # bytes: one epoch's order, not the run's


@pytest.mark.parametrize("start", [0, 1, 3, 4, 7, 9])
def test_the_plan_from_any_step_is_the_tail_of_the_whole_plan(start):
    whole = eager_plan(5, 2, 3, seed=11)  # 3 steps per epoch, the last one short
    plan = list(_step_plan(5, 2, 3, seed=11, start=start))
    assert [s for s, _ in plan] == list(range(start + 1, 10))
    assert [ids for _, ids in plan] == whole[start:]


def test_cancel_while_tokenizing_a_big_file_stops_within_a_few_hundred_examples(tiny_dir, tmp_path, monkeypatch):
    big = write_jsonl(tmp_path / "big.jsonl", [chat(q, a) for q, a in CHATS] * 400)  # 2400 examples
    calls = []
    tokenize = recipe_module.tokenize_chat
    monkeypatch.setattr(recipe_module, "tokenize_chat", lambda *a, **k: calls.append(1) or tokenize(*a, **k))
    hooks = RecordingHooks(setup_stop_after=1)  # go on at the first setup poll, then cancel
    with pytest.raises(Cancelled):
        train(spec(tiny_dir, (big, None), tmp_path / "job"), hooks)
    assert len(calls) < recipe_module.STOP_CHECK_EXAMPLES + 1 < 2400
    assert hooks.started_with == [] and hooks.metrics() == []


@pytest.mark.parametrize("polls", [0, 1, 2])  # before tokenizing, before and after loading the model
def test_a_pause_while_setting_up_stops_before_any_step_and_saves_nothing(tiny_dir, chat_files, tmp_path, polls):
    hooks = RecordingHooks(setup_stop_after=polls, stop_with=Stop.PAUSE)
    with pytest.raises(Paused) as paused:
        train(spec(tiny_dir, chat_files, tmp_path / "job"), hooks)
    assert paused.value.step is None
    assert hooks.metrics() == [] and not (tmp_path / "job" / "resume.pt").exists()


def test_lora_rank_above_the_hidden_size_is_a_training_error(tiny_dir, chat_files, tmp_path):
    with pytest.raises(TrainingError, match="lora_rank must be at most the model's hidden size \\(64\\)"):
        train(spec(tiny_dir, chat_files, tmp_path / "job", lora_rank=65), RecordingHooks())


class Killed(BaseException):
    """Stands for kill -9: nothing in the recipe catches it, no pause state is written on the way out."""


class DiesAtStep(RecordingHooks):
    def __init__(self, step: int) -> None:
        super().__init__()
        self.dies_at = step

    def step(self, metrics) -> None:
        super().step(metrics)
        if metrics.step == self.dies_at:
            raise Killed


@pytest.mark.parametrize("method", [{"lora_dropout": 0.1}, {"lora_rank": 0}], ids=["lora", "full"])
def test_a_run_killed_mid_epoch_goes_on_from_its_last_save_bitwise(tiny_dir, chat_files, tmp_path, method):
    straight = train(spec(tiny_dir, chat_files, tmp_path / "a", n_epochs=3, **method), RecordingHooks())

    # Saved after every step (resume_every=0); killed inside epoch 2, in step 5's hooks: step 4's state is on disk.
    every_step = dict(n_epochs=3, resume_every=0.0, **method)
    with pytest.raises(Killed):
        train(spec(tiny_dir, chat_files, tmp_path / "b", **every_step), DiesAtStep(5))
    assert (tmp_path / "b" / "resume.pt").is_file()

    again = RecordingHooks()
    resumed = train(spec(tiny_dir, chat_files, tmp_path / "b", **every_step), again)
    assert any(e["message"].startswith("Training resumed at step 5:") for e in again.events)
    assert [m["step"] for m in again.metrics()] == [5, 6, 7, 8, 9]
    assert read_csv(resumed.results_csv) == read_csv(straight.results_csv)  # bitwise, every column
    assert not (tmp_path / "b" / "resume.pt").exists()  # a finished run drops its state


def test_without_periodic_saves_the_state_is_saved_at_epoch_ends(tiny_dir, chat_files, tmp_path):
    hours = dict(n_epochs=3, resume_every=3600.0)
    with pytest.raises(Killed):
        train(spec(tiny_dir, chat_files, tmp_path / "job", **hours), DiesAtStep(5))
    again = RecordingHooks()
    train(spec(tiny_dir, chat_files, tmp_path / "job", **hours), again)
    assert [m["step"] for m in again.metrics()] == [4, 5, 6, 7, 8, 9]  # from the end of epoch 1 (step 3)
    assert math.isfinite(again.metrics()[0]["train_loss"])


def test_a_torn_results_row_is_dropped_on_resume(tmp_path):
    path = tmp_path / "results.csv"
    path.write_text("step,train_loss\n1,0.5\n2,0.4\n3,0.3\n1")  # killed while writing step 4's row... or 12's
    assert [r["step"] for r in recipe_module._read_results(path, upto=3)] == ["1", "2", "3"]
    assert [r["step"] for r in recipe_module._read_results(path, upto=2)] == ["1", "2"]
