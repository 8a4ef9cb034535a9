"""The worker's side of evals: claim a queued run, execute it, report it (MLflow, job events).

The training worker calls ``EvalRunner.run_once`` when no job is queued, so evals scale with the
workers and never run in the API process. The engine is created on first use and kept; each
run's models are unloaded when it ends, so training that follows has the memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tunelab.config import Settings
from tunelab.evals import service, spec
from tunelab.evals.executor import RunExecutor
from tunelab.evals.tracking import job_mlflow_run, log_eval_run, metrics_of, parent_job
from tunelab.serving.engines import create_engine
from tunelab.serving.generation import ServingEngine
from tunelab.store import Store
from tunelab.store import eval_lifecycle as runs
from tunelab.store.eval_lifecycle import EvalRunStatus
from tunelab.store.tables import EvalRow, EvalRunRow, JobRow

log = logging.getLogger("tunelab.evals")


EVAL_CONCURRENCY = 16
"""Items generating at once: the engine batches them continuously."""


class EvalRunner:
    def __init__(
        self, settings: Settings, store: Store, worker_id: str, stopping: Callable[[], bool], tracking_uri: str
    ) -> None:
        self.settings, self.store, self.worker_id, self.stopping = settings, store, worker_id, stopping
        self.tracking_uri = tracking_uri
        self._engine: ServingEngine | None = None

    @property
    def engine(self) -> ServingEngine:
        """The serving engine (built-in or vLLM, as the server's): one implementation of generation."""
        if self._engine is None:
            self._engine = create_engine(self.settings)
        return self._engine

    def run_once(self) -> bool:
        """Claim and execute one queued eval run; False when none was queued."""
        run = runs.claim(self.store, self.worker_id)
        if run is None:
            return False
        log.info("eval run %s (eval %s, model %s) claimed", run.id, run.eval_id, run.model or "jsonl")
        executor = RunExecutor(
            self.store,
            self.settings.blob_path,
            self.engine,
            self.settings.cache_path,
            stopping=self.stopping,
            concurrency=EVAL_CONCURRENCY,
        )
        outcome = executor.execute(run)
        if outcome.status is not None:
            self._report(run.id)
        return True

    def _report(self, run_id: str) -> None:
        run = self.store.get(EvalRunRow, run_id)
        ev = self.store.get(EvalRow, run.eval_id) if run else None
        if run is None or ev is None:
            return
        job = parent_job(self.store, run, spec.resolve_model(self.store, run.model) if run.model else None)
        warning = None
        if run.status is EvalRunStatus.COMPLETED:
            tracking, warning = log_eval_run(
                self.tracking_uri, self.settings.mlflow_experiment, run, ev, run.model or None, job_mlflow_run(job)
            )
            if tracking is not None:
                self.store.update_eval_run(run.id, tracking=tracking)
        if run.job_id and self.store.get(JobRow, run.job_id) is not None:
            self._job_event(run, ev)
            if warning:
                self.store.add_event(run.job_id, warning, level="warn")

    def _job_event(self, run: EvalRunRow, ev: EvalRow) -> None:
        assert run.job_id is not None
        if run.status is not EvalRunStatus.COMPLETED:
            error = (run.error or {}).get("message", run.status)
            self.store.add_event(run.job_id, f"Eval {ev.name} on {run.model} {run.status}: {error}", level="warn")
            return
        counts = run.result_counts
        message = f"Eval {ev.name} on {run.model}: {counts['passed']}/{counts['total']} passed"
        report = run.classification_report
        if report:
            message += f", accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}"
        data = {
            "eval_id": ev.id,
            "run_id": run.id,
            "model": run.model,
            "result_counts": counts,
            "metrics": metrics_of(run, ev),
        }
        self.store.add_event(run.job_id, message, type="eval", data=data)


def queue_job_evals(store: Store, settings: Settings, job: JobRow, final_model: str) -> None:
    """A finished job's eval (tunelab extension): one run on its final model, one on the model it
    started from, on the same data; results come back as job events."""
    assert job.eval_on_finish is not None
    ev = store.get(EvalRow, job.eval_on_finish["eval_id"])
    if ev is None:
        store.add_event(job.id, f"Eval {job.eval_on_finish['eval_id']} no longer exists; not run", level="warn")
        return
    for model in (final_model, job.model):
        data_source = {**job.eval_on_finish["data_source"], "model": model}
        try:
            run = service.queue_run(
                store,
                settings.blob_path,
                ev,
                data_source,
                name=f"{job.id} {'fine-tuned' if model == final_model else 'base'}",
                metadata={"fine_tuning_job_id": job.id},
                project_id=ev.project_id,
                job_id=job.id,
            )
        except spec.SpecError as exc:
            store.add_event(job.id, f"Eval {ev.name} on {model} could not start: {exc.message}", level="warn")
            continue
        store.add_event(job.id, f"Eval {ev.name} queued on {model}: run {run.id}", type="eval")
