"""MLflow tracking: one run per fine-tuning job, its metrics and checkpoints, the registered model.

    tracker = JobTracker(tracking_uri=tracking_uri(settings), experiment="tunelab", job_id=job.id,
                         run_name=ft_model, on_warning=lambda m: hooks.event(m, level="warn"))
    result = train(spec, TrackedHooks(hooks, tracker))          # per-step metrics, hyperparameters, checkpoints
    version = tracker.finish(JobStatus.SUCCEEDED, register=RegisterSpec(name, result.final_dir))

Every MLflow call runs on one background thread, in order, fed by a queue: a slow or dead
tracking server never stalls a training step, and the queue is the buffer while it is away.
A call that fails for a network reason is retried with bounded backoff; after ``retry_seconds``
the tracker gives up on MLflow for this job, says so once through ``on_warning`` and drops the
rest. A call MLflow refuses (a 4xx, a missing file) is reported once and skipped.

Callbacks (``on_warning``, ``on_started``) run on the caller's thread, at its next call into the
tracker, so they may touch the store or anything else that is not thread-safe.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.config import DEFAULT_MODEL_NAME, Settings
from tunelab.store.lifecycle import JobStatus
from tunelab.training.hooks import Checkpoint, StepMetrics, Stop, TrainHooks
from tunelab.training.hparams import Hyperparameters

if TYPE_CHECKING:
    from mlflow import MlflowClient

log = logging.getLogger("tunelab.tracking")

JOB_ID_TAG = "tunelab.job_id"
INSTALL_HINT = "MLflow tracking needs the mlflow package: pip install 'mlflow>=3.5'"

RETRY_SECONDS = 120.0  # how long one call may keep failing before MLflow is given up for the job
MAX_BACKOFF = 15.0
FINISH_TIMEOUT = 600.0  # finish() waits this long for queued uploads and the registration
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
# The run status of a job that ended; MLflow has no paused state: a paused job's run is SCHEDULED
# (it will run again), not terminated.
RUN_STATUS = {
    JobStatus.SUCCEEDED: "FINISHED",
    JobStatus.FAILED: "FAILED",
    JobStatus.CANCELLED: "KILLED",
    JobStatus.PAUSED: "SCHEDULED",
}


def tracking_uri(settings: Settings) -> str:
    """``settings.mlflow_tracking_uri`` (``MLFLOW_TRACKING_URI``) if set, else a SQLite store in the
    data dir (artifacts in ``mlartifacts/`` beside it).

    See it with ``mlflow ui --backend-store-uri sqlite:///<data_dir>/mlflow.db``.
    """
    return settings.mlflow_tracking_uri or f"sqlite:///{settings.data_path / 'mlflow.db'}"


def quiet_http_retries() -> None:
    """Let the tracker do the retrying: MLflow's own default (7 retries, minutes per call) would hold
    the whole queue behind one call. Explicit settings win. Call once per process, before tracking."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")


def registered_model_name(base_model: str, suffix: str | None, template: str = DEFAULT_MODEL_NAME) -> str:
    """The registry name for a job's model, e.g. ``SmolLM2-135M-Instruct-tunelab``.

    MLflow forbids '/' and ':' in names; anything but letters, digits, '.', '_' and '-' becomes '-'.
    """
    name = template.format(base=base_model.rsplit("/", 1)[-1], suffix=suffix or "tunelab")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")


@dataclass
class RegisterSpec:
    """What ``JobTracker.finish`` registers on success."""

    name: str
    """Registered model name (see ``registered_model_name``); a new version is added to it."""
    model_dir: Path
    """The job's ``final/`` folder: a PEFT adapter or a full HF model, the tokenizer, ``tunelab.json``."""


@dataclass
class _Op:
    what: str  # "log metrics", "upload checkpoint step-3": for warnings
    call: Callable[[MlflowClient], object]
    essential: bool = False  # when it fails, nothing after it can succeed


class JobTracker:
    """One MLflow run for one job. Never raises into training; problems become warnings.

    Args:
        tracking_uri: where to log (``tracking_uri(settings)``).
        experiment: experiment name; created if missing.
        job_id: set as the run's ``tunelab.job_id`` tag.
        run_name: the run's name (the fine-tuned model id reads well).
        on_warning: gets a user-facing message when logging fails; the worker makes it a job event.
        on_started: gets ``integration()`` once the run exists, e.g. to show the run id on the job.
        run_id: an existing run to go on with (a resumed job); None creates a new run.
        retry_seconds: how long a call may keep failing for network reasons before giving up.
    """

    def __init__(
        self,
        *,
        tracking_uri: str,
        experiment: str,
        job_id: str,
        run_name: str,
        on_warning: Callable[[str], None],
        on_started: Callable[[dict[str, Any]], None] | None = None,
        run_id: str | None = None,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.tracking_uri, self.experiment, self.job_id, self.run_name = tracking_uri, experiment, job_id, run_name
        self.on_warning, self.on_started, self.retry_seconds = on_warning, on_started, retry_seconds
        self.run_id: str | None = run_id
        self.experiment_id: str | None = None
        self.model_name: str | None = None
        self.model_version: str | None = None
        self._ops: queue.Queue[_Op | None] = queue.Queue()
        self._outbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()  # run on the caller's thread
        self._gave_up = False
        self._warned: set[str] = set()
        self._finished = False
        self._thread = threading.Thread(target=self._drain, name=f"mlflow-{job_id}", daemon=True)
        self._thread.start()
        self._submit("start the run", self._start_run, essential=True)

    # -- what the worker calls (training thread) -------------------------------------------------
    def log_params(self, params: dict[str, Any]) -> None:
        """Log params; None values are skipped, lists joined. A param cannot change value later."""
        values = {k: _param_value(v) for k, v in params.items() if v is not None}
        self._submit("log params", lambda c: c.log_batch(self._run(), params=_params(values)))

    def log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """Log one step's numeric metrics (``step`` and ``total_steps`` keys are not metrics)."""
        ms = int(time.time() * 1000)  # when it happened, not when the queue gets to it
        values = {
            k: float(v)
            for k, v in metrics.items()
            if k not in ("step", "total_steps") and isinstance(v, int | float) and not isinstance(v, bool)
        }
        self._submit("log metrics", lambda c: c.log_batch(self._run(), metrics=_metrics(values, step, ms)))

    def log_checkpoint(self, step: int, path: Path) -> None:
        """Upload a checkpoint folder to ``checkpoints/step-<step>/``.

        The folder is read when the queue gets to it; the recipe deletes only checkpoints several
        epochs old, and one deleted before its upload is reported and skipped.
        """
        folder = f"checkpoints/step-{step}"
        self._submit(f"upload checkpoint step-{step}", lambda c: _upload(c, self._run(), path, folder))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload one file (results.csv) or a folder's contents, under ``artifact_path`` (None: the run's root)."""
        self._submit(f"upload {path.name}", lambda c: _upload(c, self._run(), path, artifact_path))

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        """Upload ``data`` as JSON, e.g. the validation report as ``validation/training_file.json``."""
        snapshot = json.loads(json.dumps(data, default=str))  # later changes to data must not leak in
        self._submit(f"upload {artifact_file}", lambda c: c.log_dict(self._run(), snapshot, artifact_file))

    def finish(
        self, status: JobStatus, *, register: RegisterSpec | None = None, timeout: float = FINISH_TIMEOUT
    ) -> str | None:
        """End the run after everything queued; on success, register the model first.

        Args:
            status: the job's final status (succeeded, failed or cancelled), or paused.
            register: the model to register; only used when ``status`` is succeeded.
            timeout: seconds to wait for queued uploads and the registration.

        Returns:
            The new model version ("1", "2", ...), or None when nothing was registered.
        """
        if self._finished:
            return self.model_version
        self._finished = True
        if register is not None and status is JobStatus.SUCCEEDED:
            self._submit(f"register the model as {register.name!r}", lambda c: self._register(register))
        run_status = RUN_STATUS.get(status, "FINISHED")
        if status is JobStatus.PAUSED:
            self._submit("mark the run paused", lambda c: c.update_run(self._run(), status=run_status))
        else:
            self._submit("end the run", lambda c: c.set_terminated(self._run(), run_status))
        self._ops.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._warn(f"MLflow logging did not finish within {timeout:.0f} s; the job goes on without waiting for it.")
        self._deliver()
        return self.model_version

    def integration(self) -> dict[str, Any] | None:
        """The job's ``integrations`` entry: where its run (and model version) is; None before the run exists."""
        return None if self.run_id is None else self._integration(self.run_id)

    def _integration(self, run_id: str) -> dict[str, Any]:
        model = {"name": self.model_name, "version": self.model_version} if self.model_version else None
        return {
            "type": "mlflow",
            "mlflow": {
                "tracking_uri": _without_password(self.tracking_uri),
                "experiment": self.experiment,
                "experiment_id": self.experiment_id,
                "run_id": run_id,
                "run_name": self.run_name,
                "registered_model": model,
            },
        }

    # -- the queue -------------------------------------------------------------------------------
    def _submit(self, what: str, call: Callable[[MlflowClient], object], *, essential: bool = False) -> None:
        self._deliver()
        if not self._gave_up:
            self._ops.put(_Op(what, call, essential))

    def _deliver(self) -> None:
        while True:
            try:
                callback = self._outbox.get_nowait()
            except queue.Empty:
                return
            try:
                callback()
            except Exception:  # a broken callback must not break training either
                log.exception("tracking callback failed")

    def _warn(self, message: str) -> None:
        self._outbox.put(lambda: self.on_warning(message))

    def _drain(self) -> None:
        """The background thread: run each queued call, in order, until the finish sentinel."""
        try:
            from mlflow import MlflowClient

            client = MlflowClient(self.tracking_uri)
        except ImportError:
            self._give_up(INSTALL_HINT)
            return
        except Exception as exc:  # noqa: BLE001 -- e.g. a tracking URI scheme MLflow does not know
            self._give_up(f"MLflow: cannot use tracking URI {_without_password(self.tracking_uri)}: {_short(exc)}")
            return
        while (op := self._ops.get()) is not None:
            if not self._gave_up:
                self._run_op(client, op)

    def _run_op(self, client: MlflowClient, op: _Op) -> None:
        delay, deadline = 1.0, time.monotonic() + self.retry_seconds
        while True:
            try:
                op.call(client)
                return
            except Exception as exc:  # noqa: BLE001 -- every failure becomes a warning, never a failed job
                if not _transient(exc):
                    if op.essential:
                        self._give_up(f"MLflow: could not {op.what}: {_short(exc)}")
                    elif op.what not in self._warned:  # once per kind: a refused metric must not warn every step
                        self._warned.add(op.what)
                        self._warn(f"MLflow: could not {op.what}: {_short(exc)}")
                    return
                if time.monotonic() + delay > deadline:
                    self._give_up(
                        f"MLflow at {_without_password(self.tracking_uri)} is unreachable ({_short(exc)}); "
                        f"gave up after {self.retry_seconds:.0f} s"
                    )
                    return
                time.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF)

    def _give_up(self, message: str) -> None:
        self._gave_up = True
        self._warn(f"{message}; training goes on without MLflow tracking.")

    # -- the calls (background thread) -----------------------------------------------------------
    def _run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("the MLflow run was not created")
        return self.run_id

    def _start_run(self, client: MlflowClient) -> None:
        if self.run_id is not None:  # a resumed job: its run goes on
            client.update_run(self.run_id, status="RUNNING")
            self.experiment_id = client.get_run(self.run_id).info.experiment_id
        else:
            experiment = client.get_experiment_by_name(self.experiment)
            self.experiment_id = experiment.experiment_id if experiment else self._create_experiment(client)
            run = client.create_run(self.experiment_id, run_name=self.run_name, tags={JOB_ID_TAG: self.job_id})
            self.run_id = run.info.run_id
        if self.on_started is not None:
            entry, on_started = self._integration(self.run_id), self.on_started
            self._outbox.put(lambda: on_started(entry))

    def _create_experiment(self, client: MlflowClient) -> str:
        from mlflow.exceptions import MlflowException

        # A SQLite store would put artifacts in ./mlruns of whatever directory the worker runs
        # in; keep them beside the database instead, where `mlflow ui` finds them too.
        location = None
        if self.tracking_uri.startswith("sqlite:///"):
            location = (Path(self.tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(self.experiment, artifact_location=location)
        except MlflowException:  # another worker created it first
            experiment = client.get_experiment_by_name(self.experiment)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _register(self, spec: RegisterSpec) -> None:
        """Log the model with the transformers flavor as an OpenAI-style chat model, register a version."""
        import mlflow

        components, base_model_dir = _load_for_mlflow(spec.model_dir)
        # log_model is fluent API: it reads the process-wide tracking URI, and puts the model in
        # the active run's experiment (the thread-local active run), else in experiment 0.
        mlflow.set_tracking_uri(self.tracking_uri)
        with mlflow.start_run(run_id=self._run()):
            info = mlflow.transformers.log_model(
                components,
                name="model",
                task="llm/v1/chat",  # pyfunc takes {"messages": [...]} and answers like chat completions
                registered_model_name=spec.name,
                # LoRA: only the adapter is stored; MLflow records the base folder and loads it from there.
                base_model_path=str(base_model_dir) if base_model_dir else None,
                pip_requirements=_requirements(lora=base_model_dir is not None),  # inferring them reloads the model
            )
        self.model_name, self.model_version = spec.name, str(info.registered_model_version)


# -- helpers ---------------------------------------------------------------------------------------
def _load_for_mlflow(model_dir: Path) -> tuple[dict[str, Any], Path | None]:
    """{"model", "tokenizer"} for ``mlflow.transformers``, and the base folder for a LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    meta = json.loads((model_dir / "tunelab.json").read_text())
    if meta["method"] == "full":
        return {"model": AutoModelForCausalLM.from_pretrained(model_dir), "tokenizer": tokenizer}, None
    from peft import PeftModel

    base_dir = Path(meta["base_model_dir"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), model_dir)
    return {"model": model, "tokenizer": tokenizer}, base_dir


def _requirements(*, lora: bool) -> list[str]:
    from importlib.metadata import version

    names = ["mlflow", "torch", "transformers", "accelerate"] + (["peft"] if lora else [])
    return [f"{name}=={version(name).split('+')[0]}" for name in names]  # torch 2.13.0+cpu -> 2.13.0


# mlflow is imported on the background thread only: importing it takes seconds.
def _params(values: dict[str, str]) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in values.items()]


def _metrics(values: dict[str, float], step: int, timestamp_ms: int) -> list:
    from mlflow.entities import Metric

    return [Metric(k, v, timestamp_ms, step) for k, v in values.items()]


def _param_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        # LoRA target modules come one per layer; the distinct projection names say the same in
        # a few words and stay under MLflow's length limit.
        value = ",".join(sorted({str(v).rsplit(".", 1)[-1] for v in value}))
    return str(value)[:MAX_PARAM_LENGTH]


def _upload(client: MlflowClient, run_id: str, path: Path, artifact_path: str | None) -> None:
    if not path.exists():
        raise FileNotFoundError(f"{path} was deleted before it could be uploaded")
    if path.is_dir():
        client.log_artifacts(run_id, str(path), artifact_path)
    else:
        client.log_artifact(run_id, str(path), artifact_path)


def _transient(exc: Exception) -> bool:
    """Worth retrying: the server is unreachable, timed out or failed (5xx); not a refusal (4xx)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        return not 400 <= exc.get_http_status_code() < 500
    return isinstance(exc, ConnectionError | TimeoutError) or type(exc).__module__.startswith(("requests", "urllib3"))


def _short(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _without_password(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    host = f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


class TrackedHooks:
    """The recipe's hooks, passed on unchanged, that also log to MLflow.

    The resolved hyperparameters become params, each step's numbers metrics at their step, and
    each kept checkpoint is uploaded.
    """

    def __init__(self, hooks: TrainHooks, tracker: JobTracker) -> None:
        self.hooks, self.tracker = hooks, tracker

    def event(self, message: str, *, level: str = "info", data: dict[str, Any] | None = None) -> None:
        self.hooks.event(message, level=level, data=data)

    def started(self, resolved: Hyperparameters, total_steps: int) -> None:
        self.hooks.started(resolved, total_steps)
        self.tracker.log_params({**resolved.as_dict(), "total_steps": total_steps})

    def step(self, metrics: StepMetrics) -> None:
        self.hooks.step(metrics)
        self.tracker.log_metrics(metrics.step, metrics.as_dict())

    def checkpoint(self, ckpt: Checkpoint) -> None:
        self.hooks.checkpoint(ckpt)
        self.tracker.log_checkpoint(ckpt.step, ckpt.path)

    def checkpoint_deleted(self, ckpt: Checkpoint) -> None:
        self.hooks.checkpoint_deleted(ckpt)  # MLflow keeps its copy: the run's record of the epoch

    def should_stop(self) -> Stop:
        return self.hooks.should_stop()
