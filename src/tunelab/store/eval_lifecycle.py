"""The eval run lifecycle: its states and every transition, in the style of ``lifecycle.py``.

    queued ─▶ in_progress ─▶ completed | failed | canceled
      ▲            │
      └────────────┘  (its worker stopped: the next worker goes on from the items already graded)

Each transition is one conditional UPDATE (``Store.update_eval_run``) from the states it names,
and returns False when it lost a race (a run cancelled or deleted meanwhile). The API writes
runs; workers claim them. Output items are written one by one as they are graded, so a run that
goes back to the queue loses nothing.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.store.db import Store
    from tunelab.store.tables import EvalRunRow


class EvalRunStatus(enum.StrEnum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def is_finished(self) -> bool:
        return self in RUN_FINISHED


RUN_FINISHED = frozenset({EvalRunStatus.COMPLETED, EvalRunStatus.FAILED, EvalRunStatus.CANCELED})
RUN_ACTIVE = frozenset(EvalRunStatus) - RUN_FINISHED

MAX_ATTEMPTS = 3
"""Claims a run gets: one whose workers keep dying (an item that crashes them) then fails."""


def create(store: Store, run: EvalRunRow) -> EvalRunRow:
    """Record a new run, ``queued``."""

    run.status = EvalRunStatus.QUEUED
    run.attempts = 0
    return store.add(run)


def claim(store: Store, worker_id: str) -> EvalRunRow | None:
    """queued → in_progress: the oldest queued run, for ``worker_id``; None when none is queued."""
    return store.claim_eval_run(worker_id, from_status=EvalRunStatus.QUEUED, to_status=EvalRunStatus.IN_PROGRESS)


def progress(store: Store, run_id: str, **values: Any) -> bool:
    """Counts so far on an in_progress run; False once it is no longer in progress (cancelled, deleted)."""
    return store.update_eval_run(run_id, only_if_status=[EvalRunStatus.IN_PROGRESS], **values)


def complete(store: Store, run_id: str, now: int, **results: Any) -> bool:
    """in_progress → completed, with its results."""
    return store.update_eval_run(
        run_id, only_if_status=[EvalRunStatus.IN_PROGRESS], status=EvalRunStatus.COMPLETED, finished_at=now, **results
    )


def fail(store: Store, run_id: str, error: dict[str, Any], now: int) -> bool:
    """Queued or in_progress → failed with ``error`` (``{"code", "message"}``)."""
    return store.update_eval_run(
        run_id, only_if_status=RUN_ACTIVE, status=EvalRunStatus.FAILED, error=error, finished_at=now
    )


def cancel(store: Store, run_id: str, now: int) -> bool:
    """Queued or in_progress → canceled; a worker running it stops after the items in flight."""
    return store.update_eval_run(run_id, only_if_status=RUN_ACTIVE, status=EvalRunStatus.CANCELED, finished_at=now)


def requeue(store: Store, run_id: str, *, worker_id: str | None = None) -> bool:
    """in_progress → queued, when its worker stops; the next worker grades only the items left.
    With ``worker_id``, only while that worker still holds it (two tidying workers requeue it once)."""
    return store.update_eval_run(
        run_id,
        only_if_status=[EvalRunStatus.IN_PROGRESS],
        only_if_worker=worker_id,
        status=EvalRunStatus.QUEUED,
        worker_id=None,
    )
