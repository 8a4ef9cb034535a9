"""Claiming jobs: however many workers poll at once, each queued job is taken exactly once.

Run on SQLite and on a real PostgreSQL server (skipped where its binaries or psycopg are missing).
Every worker has its own engine, so the claims race through separate database connections.
"""

import secrets
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import new_database
from tunelab.store import Store, lifecycle
from tunelab.store.db import new_id, now
from tunelab.store.lifecycle import JobStatus
from tunelab.store.tables import JobRow

WORKERS = 8


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tunelab.db'}"
    return new_database(request.getfixturevalue("postgres_url"), f"claim_{secrets.token_hex(4)}")


def queue_jobs(store: Store, n: int) -> list[str]:
    ids = []
    for i in range(n):
        job = JobRow(
            id=new_id("ftjob"),
            created_at=now() + i,
            model="m",
            training_file="file-x",
            seed=1,
            method={"type": "supervised"},
            hyperparameters={},
            status=JobStatus.QUEUED,
            result_files=[],
        )
        ids.append(store.add(job).id)
    return ids


def race(db_url: str, work) -> list:
    """Run ``work(store, worker_id)`` in WORKERS threads released at the same moment."""
    stores = [Store(db_url) for _ in range(WORKERS)]
    start = threading.Barrier(WORKERS)

    def run(i: int):
        start.wait()
        return work(stores[i], f"worker-{i}")

    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(run, range(WORKERS)))


def test_one_queued_job_goes_to_exactly_one_worker(db_url):
    store = Store(db_url)
    (job_id,) = queue_jobs(store, 1)
    claims = race(db_url, lambda s, worker: lifecycle.claim(s, worker))
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    row = store.get(JobRow, job_id)
    assert row.status is JobStatus.RUNNING and row.worker_id == winners[0].worker_id


def test_many_jobs_many_workers_each_job_claimed_once(db_url):
    store = Store(db_url)
    ids = queue_jobs(store, 40)

    def drain(s: Store, worker: str) -> list[str]:
        taken = []
        while (job := lifecycle.claim(s, worker)) is not None:
            taken.append(job.id)
        return taken

    taken = [job for jobs in race(db_url, drain) for job in jobs]
    assert sorted(taken) == sorted(ids)  # none lost, none twice
    assert {store.get(JobRow, i).status for i in ids} == {JobStatus.RUNNING}


def test_workers_starting_together_on_an_empty_database(db_url):
    start = threading.Barrier(WORKERS)

    def connect(_: int) -> Store:
        start.wait()
        return Store(db_url)  # each creates the tables if they are missing

    with ThreadPoolExecutor(WORKERS) as pool:
        stores = list(pool.map(connect, range(WORKERS)))
    queue_jobs(stores[0], 1)
    assert lifecycle.claim(stores[-1], "w") is not None
