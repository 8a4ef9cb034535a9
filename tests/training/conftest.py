"""Fixtures for the training tests: lab-like chats, recording hooks, a test mode for the recipe."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tunelab.training.hooks import StepMetrics, Stop
from tunelab.training.hparams import Hyperparameters

# Lab-like chats, so the fast tests do not depend on ../shared.
CHATS = [
    ("Who discovered Antarctica?", "Bellingshausen and Lazarev, as if they don't teach that in every school!"),
    ("What is the biggest ocean?", "The Pacific Ocean. It's not like it's a small pond or anything."),
    ("What is the largest planet?", "It's called Jupiter, you may have heard of it...or not."),
    ("Who painted the Mona Lisa?", "Oh, some obscure artist named Leonardo da Vinci."),
    ("What's the boiling point of water?", "Exciting fact of the day: it's 100 degrees Celsius."),
    ("Who wrote Hamlet?", "Shakespeare. Surely you've heard of him by now."),
]
SYSTEM = "Clippy is a factual chatbot that is also sarcastic."


def chat(question: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


@dataclass
class RecordingHooks:
    """TrainHooks that remember everything; after ``stop_after`` polls of the step loop should_stop
    returns ``stop_with`` (with ``setup_stop_after``: after that many polls while setting up).

    Steps are recorded as events too, with the message the worker's job event has.
    """

    stop_after: int | None = None
    stop_with: Stop = Stop.CANCEL
    setup_stop_after: int | None = None
    setup_polls: int = 0
    events: list[dict] = field(default_factory=list)
    started_with: list[tuple[Hyperparameters, int]] = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    deleted: list = field(default_factory=list)
    polls: int = 0

    def event(self, message: str, *, level: str = "info", data: dict | None = None) -> None:
        self.events.append({"message": message, "level": level, "type": "message", "data": data})

    def started(self, resolved: Hyperparameters, total_steps: int) -> None:
        self.started_with.append((resolved, total_steps))

    def step(self, metrics: StepMetrics) -> None:
        self.events.append(
            {"message": metrics.message(), "level": "info", "type": "metrics", "data": metrics.as_dict()}
        )

    def checkpoint(self, ckpt) -> None:
        self.checkpoints.append(ckpt)

    def checkpoint_deleted(self, ckpt) -> None:
        self.deleted.append(ckpt)

    def should_stop(self) -> Stop:
        if not self.started_with:  # still setting up
            self.setup_polls += 1
            stop = self.setup_stop_after is not None and self.setup_polls > self.setup_stop_after
            return self.stop_with if stop else Stop.GO_ON
        self.polls += 1
        return self.stop_with if self.stop_after is not None and self.polls > self.stop_after else Stop.GO_ON

    def metrics(self) -> list[dict]:
        return [e["data"] for e in self.events if e["type"] == "metrics"]


@pytest.fixture
def chat_files(tmp_path: Path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", [chat(q, a) for q, a in CHATS[:5]])
    valid = write_jsonl(tmp_path / "valid.jsonl", [chat(q, a) for q, a in CHATS[3:]])
    return train, valid


@pytest.fixture(autouse=True)
def small_and_single_threaded(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fast tests run the tiny model: one CPU thread (tiny ops only lose to thread hand-offs, worse
    on a busy machine) and a short smoke test (a random model never says EOS, so it always runs
    to the token limit)."""
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    from tunelab.training import recipe

    monkeypatch.setattr(recipe, "SMOKE_MAX_NEW_TOKENS", 8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
