"""The fine-tuning job lifecycle: its states, their groups, and every transition.

    validating_files ─▶ queued ─▶ running ─▶ succeeded | failed | cancelled
                          ▲   │      │
                          │   ▼      ▼
                          └─ paused ◀─ pausing   (the worker saves its state, then lets go)

Each transition is one conditional UPDATE (``Store.update_job``) that happens only from the
states it names, with its event written in the same transaction; a transition that lost a race
returns False. The API server and the workers are separate processes that meet only in the
database, so these functions are the one place where a job's status changes. Modelled on
vLLM's ``RequestStatus``: the enum knows its groups (``is_finished``), callers never compare
against bare strings.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.store.db import Store
    from tunelab.store.tables import JobRow


class JobStatus(enum.StrEnum):
    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSING = "pausing"  # the worker finishes its step and saves the training state
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_finished(self) -> bool:
        return self in FINISHED

    @property
    def is_held(self) -> bool:
        """A worker holds the job (it runs, or it is saving its state)."""
        return self in HELD


FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})
HELD = frozenset({JobStatus.RUNNING, JobStatus.PAUSING})
"""A pause asked for after the last step does not stop the job finishing: success and failure
come from either."""
ACTIVE = frozenset(JobStatus) - FINISHED
"""Not finished: the job still needs its files and the model it starts from."""


def create(store: Store, job: JobRow, message: str) -> JobRow:
    """Record a new job in ``validating_files`` with its first event."""
    job.status = JobStatus.VALIDATING_FILES
    store.add_in_order(job)
    store.add_event(job.id, message)
    return job


def files_validated(store: Store, job_id: str) -> bool:
    """validating_files → queued."""
    return store.update_job(
        job_id,
        only_if_status=[JobStatus.VALIDATING_FILES],
        status=JobStatus.QUEUED,
        event="Files validated, moving job to queued state",
    )


def claim(store: Store, worker_id: str) -> JobRow | None:
    """queued → running: the oldest queued job, for ``worker_id``; None when none is queued."""
    return store.claim_job(worker_id, from_status=JobStatus.QUEUED, to_status=JobStatus.RUNNING)


def pause(store: Store, job_id: str) -> bool:
    """queued → paused at once; running → pausing (the worker saves its state, then ``paused``)."""
    return store.update_job(
        job_id, only_if_status=[JobStatus.QUEUED], status=JobStatus.PAUSED, event="Job paused"
    ) or store.update_job(
        job_id,
        only_if_status=[JobStatus.RUNNING],
        status=JobStatus.PAUSING,
        event="Pausing the job: training stops after the current step",
    )


def paused(store: Store, job_id: str, step: int | None) -> bool:
    """pausing → paused: the worker has saved the state after ``step`` (None: it stopped while
    setting up, before a step) and lets the job go."""
    where = "while setting up" if step is None else f"after step {step}"
    return store.update_job(
        job_id,
        only_if_status=[JobStatus.PAUSING],
        status=JobStatus.PAUSED,
        worker_id=None,
        event=f"Job paused {where}; resume it to go on from there",
    )


def resume(store: Store, job_id: str) -> bool:
    """paused → queued: the worker that claims it goes on from where it stopped."""
    return store.update_job(
        job_id,
        only_if_status=[JobStatus.PAUSED],
        status=JobStatus.QUEUED,
        worker_id=None,
        event="Job resumed, moving job to queued state",
    )


def cancel(store: Store, job_id: str, now: int) -> bool:
    """Any unfinished state → cancelled; a worker running the job notices and stops within a step."""
    return store.update_job(
        job_id, only_if_status=ACTIVE, status=JobStatus.CANCELLED, finished_at=now, event="Job cancelled"
    )


def requeue(store: Store, job_id: str, reason: str, *, worker_id: str | None = None) -> bool:
    """running → queued, when its worker stops (``reason`` says why); pausing → paused likewise.

    With ``worker_id``, only while that worker still holds the job (a job re-queued for a dead
    worker may already run on another). The next worker goes on from the last state saved.
    """
    return store.update_job(
        job_id,
        only_if_status=[JobStatus.RUNNING],
        only_if_worker=worker_id,
        status=JobStatus.QUEUED,
        worker_id=None,
        event=f"{reason}; the job is queued again",
        event_level="warn",
    ) or store.update_job(
        job_id,
        only_if_status=[JobStatus.PAUSING],
        only_if_worker=worker_id,
        status=JobStatus.PAUSED,
        worker_id=None,
        event=f"{reason}; the job is paused",
        event_level="warn",
    )


def fail(store: Store, job_id: str, error: dict[str, Any], now: int, *, validating: bool = False) -> bool:
    """A held job (or, with ``validating``, one whose files are bad) → failed with ``error``."""
    states = [JobStatus.VALIDATING_FILES] if validating else HELD
    return store.update_job(
        job_id,
        only_if_status=states,
        status=JobStatus.FAILED,
        error=error,
        finished_at=now,
        event=error["message"] if validating else f"Fine-tuning job failed: {error['message']}",
        event_level="error",
    )


def succeed(store: Store, job_id: str, now: int, **outputs: Any) -> bool:
    """A held job → succeeded, with its outputs (``fine_tuned_model``, ``result_files``, ...)."""
    return store.update_job(
        job_id,
        only_if_status=HELD,
        status=JobStatus.SUCCEEDED,
        finished_at=now,
        event="The job has successfully completed",
        **outputs,
    )
