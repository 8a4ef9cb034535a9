"""Writes that race: one deployment name PUT by many at once, rows created in the same second,
dead workers tidied by several live ones. On SQLite and on a real PostgreSQL server."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import new_database
from tunelab.config import Settings
from tunelab.store import Store, lifecycle
from tunelab.store.blobs import BlobStore
from tunelab.store.db import DeploymentNameTaken, new_id, now
from tunelab.store.lifecycle import JobStatus
from tunelab.store.tables import DeploymentRow, DeploymentState, FileRow, JobRow

THREADS = 16


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'tunelab.db'}"
    return new_database(request.getfixturevalue("postgres_url"), f"races_{secrets.token_hex(4)}")


def deployment(name: str, project: str = "proj-default", model: str = "m") -> DeploymentRow:
    return DeploymentRow(
        name=name, project_id=project, scope="/s", created_at=now(), model=model, model_format="OpenAI",
        model_version="1", sku={"capacity": 1}, state=DeploymentState.CREATING,
    )  # fmt: skip


def together(n: int, work):
    start = threading.Barrier(n)

    def run(i: int):
        start.wait()
        return work(i)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(run, range(n)))


def test_many_puts_of_one_new_name_create_it_once(db_url):
    stores = [Store(db_url) for _ in range(THREADS)]
    created = together(THREADS, lambda i: stores[i].upsert_deployment(deployment("raced", model=f"m{i}"))[1])
    assert created.count(True) == 1
    assert [d.name for d in stores[0].deployments()] == ["raced"]


def test_a_name_of_another_project_is_taken(db_url):
    store = Store(db_url)
    store.upsert_deployment(deployment("mine", project="proj-a"))
    with pytest.raises(DeploymentNameTaken):
        store.upsert_deployment(deployment("mine", project="proj-b"))
    row, created = store.upsert_deployment(deployment("mine", project="proj-a", model="other"))
    assert not created and row.model == "other" and row.project_id == "proj-a"


def test_rows_created_at_once_get_distinct_increasing_numbers(db_url):
    stores = [Store(db_url) for _ in range(THREADS)]

    def add(i: int) -> int:
        row = FileRow(id=new_id("file"), created_at=1, filename="f", purpose="fine-tune", bytes=1, status="processed",
                      blob="b")  # fmt: skip
        return stores[i].add_in_order(row).seq

    numbers = together(THREADS, add)
    assert sorted(numbers) == list(range(1, THREADS + 1))
    rows, _ = stores[0].page(FileRow, after=None, limit=100)
    assert [r.seq for r in rows] == list(range(THREADS, 0, -1))  # newest first, however equal created_at is


def held_job(store: Store, worker_id: str) -> str:
    job = JobRow(id=new_id("ftjob"), created_at=now(), model="m", training_file="f", seed=1, method={},
                 hyperparameters={}, status=JobStatus.RUNNING, worker_id=worker_id, started_at=now() - 3600,
                 result_files=[])  # fmt: skip
    return store.add_in_order(job).id


def test_the_job_of_a_worker_whose_heartbeat_lapsed_is_requeued_once(db_url, tmp_path):
    from tunelab.training.worker import Worker

    settings = Settings(data_dir=tmp_path / "data", database_url=db_url, worker_timeout_seconds=30)
    store = Store(db_url)
    store.beat("far-host:1234", host="far-host", pid=1234, job_id=None)  # another machine: no pid to check
    job_id = held_job(store, "far-host:1234")
    alive_id = held_job(store, "alive-host:1")
    store.beat("alive-host:1", host="alive-host", pid=1, job_id=alive_id)
    with store.session() as s:
        s.get(type(store.workers()[0]), "far-host:1234").heartbeat_at = now() - 31
    workers = [Worker(settings) for _ in range(4)]
    together(4, lambda i: workers[i].requeue_orphans())
    assert store.job_status(job_id) is JobStatus.QUEUED
    requeued = [
        e.message for e in store.events(job_id, after=None, limit=50)[0] if "stopped sending heartbeats" in e.message
    ]
    assert len(requeued) == 1  # however many workers tidied at once
    assert store.job_status(alive_id) is JobStatus.RUNNING
    assert [w.id for w in store.workers()] == ["alive-host:1"]


def test_a_requeue_for_a_dead_worker_leaves_a_job_another_worker_claimed(db_url):
    store = Store(db_url)
    job_id = held_job(store, "dead:1")
    assert lifecycle.requeue(store, job_id, "dead", worker_id="dead:1")
    assert lifecycle.claim(store, "new:2").id == job_id
    assert not lifecycle.requeue(store, job_id, "dead again", worker_id="dead:1")  # a late, second tidier
    assert store.job_holder(job_id) == (JobStatus.RUNNING, "new:2")


def test_partial_uploads_of_dead_processes_are_swept_and_live_ones_kept(tmp_path):
    import socket

    blobs = BlobStore(tmp_path / "files")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    gone = tmp_path / "files" / f".upload-{host}-{dead.pid}-abc"
    mine = tmp_path / "files" / f".upload-{host}-{os.getpid()}-def"
    elsewhere = tmp_path / "files" / ".upload-other-host-1-ghi"
    for path in (gone, mine, elsewhere):
        path.write_bytes(b"half")
    assert blobs.sweep_abandoned() == 1
    assert not gone.exists() and mine.exists() and elsewhere.exists()


def test_a_worker_whose_job_was_queued_again_stops_and_keeps_the_saved_state(db_url, tmp_path):
    """A live worker whose heartbeat lapsed (a network partition): its job went back to the queue. It
    must stop as "lost", not as "cancelled", which would delete the state the next worker goes on from."""
    from tunelab.training.hooks import Stop
    from tunelab.training.worker import JobHooks, Worker

    worker = Worker(Settings(data_dir=tmp_path / "data", database_url=db_url))
    job_id = held_job(worker.store, worker.id)
    hooks = JobHooks(worker.store, worker.store.get(JobRow, job_id), "ft", "base", worker)
    assert hooks.should_stop() is Stop.GO_ON and not hooks.lost
    lifecycle.requeue(worker.store, job_id, "heartbeat lapsed", worker_id=worker.id)
    hooks._checked = 0.0  # its next check (at most a second later)
    assert hooks.should_stop() is Stop.CANCEL and hooks.lost

    cancelled = JobHooks(worker.store, worker.store.get(JobRow, held_job(worker.store, worker.id)), "ft", "b", worker)
    lifecycle.cancel(worker.store, cancelled.job.id, now())
    assert cancelled.should_stop() is Stop.CANCEL and not cancelled.lost  # a real cancel is one
