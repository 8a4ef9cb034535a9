"""The embedded worker of ``tunelab serve``: a child process, watched and restarted when it dies.

    supervisor = WorkerSupervisor(settings, store)
    supervisor.start()      # spawns `python -m tunelab worker --parent-pid <server>`
    ...
    supervisor.stop()       # SIGTERM: the worker pauses its job after the current step; waited for

When the child exits without being asked to (killed, out of memory, a crash), the job it was
training gets an event saying so and goes back to the queue at once (its last saved state is
where the next worker goes on), and a new child starts after a backoff: 1 s, doubling up to a
minute, back to 1 s once a child has stayed up for a minute.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from tunelab.config import Settings
from tunelab.store import Store, lifecycle

log = logging.getLogger("tunelab.supervisor")

FIRST_BACKOFF, MAX_BACKOFF = 1.0, 60.0
STABLE_SECONDS = 60.0
"""A child that ran this long resets the backoff."""
STOP_TIMEOUT = 60.0
"""How long ``stop`` waits for the worker to save its job's state before killing it."""


class WorkerSupervisor:
    def __init__(self, settings: Settings, store: Store) -> None:
        self.settings, self.store = settings, store
        self.child: subprocess.Popen | None = None
        self.restarts = 0
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def worker_id(self) -> str | None:
        """The child's worker id (as jobs and heartbeats name it), None before it started."""
        return None if self.child is None else f"{socket.gethostname()}:{self.child.pid}"

    def start(self) -> None:
        self._spawn()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop supervising, then SIGTERM the child and wait for it (SIGKILL after ``timeout``)."""
        self._stopping.set()
        with self._lock:
            child = self.child
        if child is None or child.poll() is not None:
            return
        child.terminate()  # it pauses its running job after the current step, then exits
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("the worker (pid %d) did not stop within %.0f s; killing it", child.pid, timeout)
            child.kill()
            child.wait()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _spawn(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tunelab",
            "worker",
            "--data-dir",
            str(self.settings.data_path),
            "--parent-pid",
            str(os.getpid()),
        ]
        with self._lock:
            # A separate process: training must not compete with the server's event loop for the GIL.
            self.child = subprocess.Popen(cmd)
        log.info("embedded worker started (pid %d)", self.child.pid)

    def _watch(self) -> None:
        backoff = FIRST_BACKOFF
        while not self._stopping.is_set():
            assert self.child is not None
            started = time.monotonic()
            code = self.child.wait()
            if self._stopping.is_set():
                return
            if time.monotonic() - started >= STABLE_SECONDS:
                backoff = FIRST_BACKOFF
            self._report_death(self.child, code, backoff)
            if self._stopping.wait(backoff):
                return
            backoff = min(backoff * 2, MAX_BACKOFF)
            self.restarts += 1
            self._spawn()

    def _report_death(self, child: subprocess.Popen, code: int, backoff: float) -> None:
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        worker_id = f"{socket.gethostname()}:{child.pid}"
        log.error("embedded worker %s %s; restarting it in %.0f s", worker_id, how, backoff)
        try:
            for job in self.store.jobs_held(worker_id):
                self.store.add_event(
                    job.id, f"The worker training this job ({worker_id}) {how}; it is restarted", level="warn"
                )
                lifecycle.requeue(self.store, job.id, "The job goes on from its last saved state", worker_id=worker_id)
            self.store.forget_worker(worker_id)
        except Exception:  # the database is away: the next worker's orphan check requeues the job
            log.exception("could not requeue the jobs of worker %s", worker_id)
