"""Runs one eval run on a worker: sample each item through the serving engine, grade it, write it.

    outcome = RunExecutor(store, blob_path, engine, cache_dir, stopping=worker.stopping).execute(run)

Items are submitted concurrently (threads) so that the engine batches them; each graded item is
written at once, with the counts so far, so progress shows while the run is in progress and a run
whose worker stops goes on from there (``requeue``). A cancelled or deleted run stops after the
items in flight. Errors in the run as a whole (an item that fails the schema, a model that is
gone) fail it with an error naming what; errors of one item (a prompt too long, a judge's answer
that is no label) make that item ``errored`` and the run goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError

from tunelab.evals import spec
from tunelab.evals.graders import JudgeAnswer, grade
from tunelab.evals.report import classification_criterion, classification_report, labels_of
from tunelab.models.catalog import ModelNotFound, model_source
from tunelab.serving.generation import Completion, PromptTooLong, SamplingParams, ServingEngine
from tunelab.store import Store
from tunelab.store import eval_lifecycle as runs
from tunelab.store.db import now
from tunelab.store.eval_lifecycle import EvalRunStatus
from tunelab.store.tables import EvalOutputItemRow, EvalRow, EvalRunRow

log = logging.getLogger("tunelab.evals")


def new_output_item_id() -> str:
    import secrets

    return f"outputitem_{secrets.token_hex(16)}"


@dataclass(frozen=True)
class Outcome:
    status: EvalRunStatus | None  # None: given back to the queue (the worker is stopping)
    run_id: str


class RunFailed(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Graded:
    index: int
    item: dict[str, Any]
    status: str
    errored: bool
    results: list[dict[str, Any]]
    sample: dict[str, Any]


class RunExecutor:
    def __init__(
        self,
        store: Store,
        blob_path: Path,
        engine: ServingEngine,
        cache_dir: Path,
        *,
        stopping: Callable[[], bool] = lambda: False,
        concurrency: int = 16,
    ) -> None:
        self.store, self.blob_path, self.engine, self.cache_dir = store, blob_path, engine, cache_dir
        self.stopping, self.concurrency = stopping, concurrency
        self._loaded: set[str] = set()

    def execute(self, run: EvalRunRow) -> Outcome:
        """Run ``run`` (claimed: in_progress) to completed, failed, canceled, or back to the queue."""
        try:
            return self._execute(run)
        except RunFailed as exc:
            runs.fail(self.store, run.id, {"code": exc.code, "message": exc.message}, now())
            return Outcome(EvalRunStatus.FAILED, run.id)
        except Exception as exc:  # a bug or a broken environment: fail the run, keep the worker
            log.exception("eval run %s crashed", run.id)
            runs.fail(self.store, run.id, {"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"}, now())
            return Outcome(EvalRunStatus.FAILED, run.id)
        finally:
            for model in self._loaded:
                self.engine.unload(model)
            self._loaded.clear()

    # -- steps -----------------------------------------------------------------------------------
    def _execute(self, run: EvalRunRow) -> Outcome:
        if run.attempts > runs.MAX_ATTEMPTS:
            raise RunFailed(
                "worker_lost",
                f"The run was interrupted {run.attempts - 1} times (its worker stopped or crashed each time); "
                "it is not tried again.",
            )
        ev = self.store.get(EvalRow, run.eval_id)
        if ev is None:
            raise RunFailed("eval_not_found", f"The eval {run.eval_id} no longer exists.")
        rows = self._rows(run, ev)
        model = self._model(run)
        done = {o.datasource_item_id: o for o in self.store.graded_items(run.id)}
        counts = Counter(_count_key(o.status, o.errored) for o in done.values())
        todo = [i for i in range(len(rows)) if i not in done]
        stop = threading.Event()
        requeued = self._grade_all(run, ev, rows, model, todo, counts, stop)
        if requeued:
            runs.requeue(self.store, run.id)
            return Outcome(None, run.id)
        status = self.store.eval_run_status(run.id)
        if status is not EvalRunStatus.IN_PROGRESS:  # cancelled or deleted meanwhile
            return Outcome(status, run.id)
        results = self._summary(run, ev, rows)
        runs.complete(self.store, run.id, now(), **results)
        return Outcome(EvalRunStatus.COMPLETED, run.id)

    def _rows(self, run: EvalRunRow, ev: EvalRow) -> list[spec.Row]:
        """The rows, re-checked against the eval as it is now (the API checked them at create time)."""
        try:
            return spec.check_run(
                self.store, self.blob_path, run.data_source, ev.data_source_config["item_schema"], ev.testing_criteria
            )
        except spec.SpecError as exc:
            where = f" ({exc.param})" if exc.param else ""
            raise RunFailed(exc.code, f"{exc.message}{where}") from None

    def _model(self, run: EvalRunRow) -> str | None:
        if run.data_source["type"] == "jsonl":
            return None
        return self._load(run.data_source["model"])

    def _load(self, name: str) -> str:
        """The model id behind ``name`` (a deployment or a model), loaded into the engine."""
        model = spec.resolve_model(self.store, name)
        if model is None:
            raise RunFailed("model_not_found", f"The model '{name}' no longer exists.")
        if model not in self._loaded:
            try:
                self.engine.load(model_source(self.store, model, self.cache_dir))
            except ModelNotFound:
                raise RunFailed("model_not_found", f"The model '{name}' no longer exists.") from None
            self._loaded.add(model)
        return model

    def _grade_all(
        self,
        run: EvalRunRow,
        ev: EvalRow,
        rows: list[spec.Row],
        model: str | None,
        todo: list[int],
        counts: Counter[str],
        stop: threading.Event,
    ) -> bool:
        """Grade the items left, writing each; True when the worker is stopping (give the run back)."""
        checked = 0.0
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"eval-{run.id[-6:]}") as pool:
            futures: list[Future[_Graded | None]] = [
                pool.submit(self._grade_one, run, ev, rows[i], i, model, stop) for i in todo
            ]
            for future in as_completed(futures):
                graded = future.result()
                if graded is None or stop.is_set():
                    continue
                if not self._write(run, graded, counts):
                    stop.set()  # cancelled or deleted
                if time.monotonic() - checked > 1.0:
                    checked = time.monotonic()
                    if self.stopping():
                        stop.set()
                        return True
        return False

    def _write(self, run: EvalRunRow, graded: _Graded, counts: Counter[str]) -> bool:
        row = EvalOutputItemRow(
            id=new_output_item_id(),
            run_id=run.id,
            eval_id=run.eval_id,
            created_at=now(),
            datasource_item_id=graded.index,
            status=graded.status,
            errored=graded.errored,
            datasource_item=graded.item,
            results=graded.results,
            sample=graded.sample,
        )
        try:
            self.store.add(row)
        except IntegrityError:  # the run was deleted
            return False
        counts[_count_key(graded.status, graded.errored)] += 1
        return runs.progress(self.store, run.id, result_counts=result_counts(counts))

    def _grade_one(
        self, run: EvalRunRow, ev: EvalRow, row: spec.Row, index: int, model: str | None, stop: threading.Event
    ) -> _Graded | None:
        if stop.is_set():
            return None
        messages = spec.prompt_of(run.data_source, row, index)
        if model is None or messages is None:  # jsonl: grade the row's own sample
            sample_ns = row.sample
            sample = jsonl_sample(row.sample)
        else:
            params = sampling_params(run.data_source.get("sampling_params"))
            try:
                completions, prompt_tokens = self.engine.generate(model, messages, params)
            except PromptTooLong as exc:
                return _errored(index, row.item, ev, sample_of(model, messages, None, 0, params, error=str(exc)))
            completion = completions[0]
            sample = sample_of(model, messages, completion, prompt_tokens, params)
            sample_ns = {
                "output_text": completion.text,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": completion.text},
                        "finish_reason": completion.finish_reason,
                    }
                ],
            }
        results = [grade(c, row.item, sample_ns, self._judge) for c in ev.testing_criteria]
        errored = any("error" in r for r in results)
        status = "pass" if all(r["passed"] for r in results) else "fail"
        return _Graded(index, row.item, status, errored, results, sample)

    def _judge(self, name: str, messages: list[dict[str, str]], params: dict[str, Any]) -> JudgeAnswer:
        model = self._load(name)
        completions, prompt_tokens = self.engine.generate(
            model,
            messages,
            SamplingParams(
                max_tokens=params.get("max_tokens"),
                temperature=params.get("temperature", 0.0),
                top_p=params.get("top_p", 1.0),
                seed=params.get("seed") if params.get("temperature") else None,
            ),
        )
        return JudgeAnswer(completions[0].text, prompt_tokens, completions[0].tokens)

    # -- the results -----------------------------------------------------------------------------
    def _summary(self, run: EvalRunRow, ev: EvalRow, rows: list[spec.Row]) -> dict[str, Any]:
        items = self.store.graded_items(run.id)
        counts = Counter(_count_key(o.status, o.errored) for o in items)
        per_criterion = []
        for c in ev.testing_criteria:
            passed = sum(1 for o in items for r in o.results if r["name"] == c["id"] and r["passed"])
            per_criterion.append({"testing_criteria": c["id"], "passed": passed, "failed": len(items) - passed})
        return {
            "result_counts": result_counts(counts),
            "per_testing_criteria_results": per_criterion,
            "per_model_usage": model_usage(items),
            "classification_report": run_classification_report(ev, items),
        }


# -- helpers ---------------------------------------------------------------------------------------
def _count_key(status: str, errored: bool) -> str:
    return "errored" if errored else ("passed" if status == "pass" else "failed")


def result_counts(counts: Counter[str]) -> dict[str, int]:
    """``total = passed + failed + errored``: an errored item (sampling or a grader failed) is not
    counted as failed on its merits."""
    passed, failed, errored = counts["passed"], counts["failed"], counts["errored"]
    return {"total": passed + failed + errored, "errored": errored, "failed": failed, "passed": passed}


def sampling_params(given: dict[str, Any] | None) -> SamplingParams:
    """The engine's params for a run's ``sampling_params`` (OpenAI's defaults when absent). Greedy
    decoding (temperature 0) needs no seed, and one would keep the engine from batching."""
    p = given or {"temperature": 1.0, "top_p": 1.0, "seed": 42, "max_completion_tokens": None}
    return SamplingParams(
        max_tokens=p.get("max_completion_tokens"),
        temperature=p["temperature"],
        top_p=p["top_p"],
        seed=p.get("seed") if p["temperature"] > 0 else None,
    )


def sample_of(
    model: str,
    messages: list[dict[str, str]],
    completion: Completion | None,
    prompt_tokens: int,
    params: SamplingParams,
    error: str | None = None,
) -> dict[str, Any]:
    completion_tokens = completion.tokens if completion else 0
    return {
        "input": messages,
        "output": [{"role": "assistant", "content": completion.text}] if completion else [],
        "finish_reason": completion.finish_reason if completion else "",
        "model": model,
        "usage": {
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
            "prompt_tokens": prompt_tokens,
            "cached_tokens": 0,
        },
        "error": {"code": "context_length_exceeded", "message": error} if error else None,
        "temperature": params.temperature,
        "max_completion_tokens": params.max_tokens,
        "top_p": params.top_p,
        "seed": params.seed,
    }


def jsonl_sample(given: dict[str, Any] | None) -> dict[str, Any]:
    """A jsonl row's own sample in the output-item shape (nothing was sampled: zero usage)."""
    text = (given or {}).get("output_text")
    return {
        "input": [],
        "output": [{"role": "assistant", "content": text}] if isinstance(text, str) else [],
        "finish_reason": "",
        "model": "",
        "usage": {"total_tokens": 0, "completion_tokens": 0, "prompt_tokens": 0, "cached_tokens": 0},
        "error": None,
        "temperature": None,
        "max_completion_tokens": None,
        "top_p": None,
        "seed": None,
    }


def _errored(index: int, item: dict[str, Any], ev: EvalRow, sample: dict[str, Any]) -> _Graded:
    message = sample["error"]["message"]
    results = [
        {"name": c["id"], "type": c["type"], "score": 0.0, "passed": False, "sample": None, "error": message}
        for c in ev.testing_criteria
    ]
    return _Graded(index, item, "fail", True, results, sample)


def model_usage(items: list[EvalOutputItemRow]) -> list[dict[str, Any]]:
    """Tokens per model: the sampled model's, and each judge's."""
    usage: dict[str, Counter[str]] = {}

    def add(model: str, u: dict[str, Any]) -> None:
        c = usage.setdefault(model, Counter())
        c["invocation_count"] += 1
        for key in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens"):
            c[key] += int(u.get(key) or 0)

    for o in items:
        if o.sample.get("model"):
            add(o.sample["model"], o.sample["usage"])
        for r in o.results:
            if r.get("sample") and r["sample"].get("model"):
                add(r["sample"]["model"], r["sample"]["usage"])
    return [
        {
            "model_name": model,
            "invocation_count": c["invocation_count"],
            "prompt_tokens": c["prompt_tokens"],
            "completion_tokens": c["completion_tokens"],
            "total_tokens": c["total_tokens"],
            "cached_tokens": c["cached_tokens"],
        }
        for model, c in usage.items()
    ]


def run_classification_report(ev: EvalRow, items: list[EvalOutputItemRow]) -> dict[str, Any] | None:
    found = classification_criterion(ev.testing_criteria)
    if found is None or not items:
        return None
    criterion, field = found
    truths, predictions = [], []
    for o in items:
        result = next(r for r in o.results if r["name"] == criterion["id"])
        truths.append(str(result.get("reference", o.datasource_item.get(field, ""))))
        predictions.append(str(result.get("input", "")))  # an errored item answered nothing: off-format
    labels = labels_of(ev.data_source_config["item_schema"], field, truths)
    return {
        "testing_criteria": criterion["id"],
        "label_field": field,
        **classification_report(truths, predictions, labels),
    }
