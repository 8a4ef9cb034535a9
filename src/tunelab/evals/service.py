"""Creating evals and runs: what the API routes and the worker (a job's eval at its end) share."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from tunelab.evals import spec
from tunelab.evals.graders import SIMILARITY_METRICS
from tunelab.store import Store
from tunelab.store import eval_lifecycle as runs
from tunelab.store.db import now
from tunelab.store.tables import EvalRow, EvalRunRow

UNSUPPORTED_GRADERS = {
    "python": "tunelab does not run user code: a python grader would execute arbitrary code on the workers, which "
    "needs a sandbox decision of its own (see docs/evals.md). Use string_check, text_similarity, label_model or "
    "score_model.",
    "multi": "multi graders are for reinforcement fine-tuning at OpenAI, not eval testing criteria; give each "
    "grader as its own testing criterion.",
}


def new_eval_id() -> str:
    return f"eval_{secrets.token_hex(16)}"


def new_run_id() -> str:
    return f"evalrun_{secrets.token_hex(16)}"


def check_eval(store: Store, config: dict[str, Any], criteria: list[dict[str, Any]]) -> None:
    """An eval's data source config and testing criteria, as echoed.

    Raises:
        spec.SpecError: naming the field.
    """
    if config["type"] != "custom":
        raise spec.SpecError(
            f"data_source_config type '{config['type']}' is not supported: tunelab keeps no logs or stored "
            "completions; use 'custom' with an item_schema.",
            "data_source_config.type",
        )
    spec.check_item_schema(config["item_schema"])
    for i, c in enumerate(criteria):
        if c["type"] in UNSUPPORTED_GRADERS:
            raise spec.SpecError(UNSUPPORTED_GRADERS[c["type"]], f"testing_criteria[{i}].type", "unsupported_grader")
        if c["type"] == "text_similarity" and c["evaluation_metric"] not in SIMILARITY_METRICS:
            raise spec.SpecError(
                "evaluation_metric 'cosine' needs an embeddings model, which tunelab does not serve; use one of "
                + ", ".join(SIMILARITY_METRICS),
                f"testing_criteria[{i}].evaluation_metric",
            )
        if c["type"] == "label_model" and not set(c["passing_labels"]) <= set(c["labels"]):
            raise spec.SpecError(
                f"passing_labels {c['passing_labels']} must be among labels {c['labels']}",
                f"testing_criteria[{i}].passing_labels",
            )
        if c["type"] == "score_model" and c["range"][0] >= c["range"][1]:
            raise spec.SpecError("range must be [low, high] with low < high", f"testing_criteria[{i}].range")
    names = [c.get("name") for c in criteria]
    spec.check_criteria(store, criteria, config["item_schema"])
    if len(set(names)) != len(names):
        raise spec.SpecError("testing criteria need distinct names", "testing_criteria")


def check_data_source(data_source: dict[str, Any], *, needs_model: bool = True) -> None:
    """What a run's data source must say beyond its shape."""
    if data_source["source"]["type"] not in ("file_content", "file_id"):
        raise spec.SpecError(
            f"source type '{data_source['source']['type']}' is not supported: tunelab stores no completions or "
            "responses; use file_content or file_id.",
            "data_source.source.type",
        )
    if data_source["type"] == "jsonl":
        return
    if needs_model and not data_source.get("model"):
        raise spec.SpecError("A completions data source needs a model.", "data_source.model")
    if not data_source.get("input_messages"):
        raise spec.SpecError(
            "A completions data source needs input_messages (a template, or an item_reference).",
            "data_source.input_messages",
        )


def queue_run(
    store: Store,
    blob_path: Path,
    ev: EvalRow,
    data_source: dict[str, Any],
    *,
    name: str | None,
    metadata: dict[str, str] | None,
    project_id: str,
    job_id: str | None = None,
) -> EvalRunRow:
    """Check ``data_source`` (echoed form) against ``ev`` and queue a run of it for the workers.

    Raises:
        spec.SpecError: naming the field (unknown model, bad file, an item failing the schema, ...).
    """
    check_data_source(data_source)
    spec.check_run(store, blob_path, data_source, ev.data_source_config["item_schema"], ev.testing_criteria)
    model = data_source.get("model") or ""
    run = EvalRunRow(
        id=new_run_id(),
        eval_id=ev.id,
        project_id=project_id,
        created_at=now(),
        name=name or (f"{model or 'jsonl'} on {ev.name}"),
        user_metadata=metadata,
        model=model,
        data_source=data_source,
        result_counts={"total": 0, "errored": 0, "failed": 0, "passed": 0},
        per_model_usage=[],
        per_testing_criteria_results=[],
        job_id=job_id,
    )
    return runs.create(store, run)
