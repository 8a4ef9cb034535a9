"""Database rows. Never returned over HTTP: api/protocol.py converts them explicitly.

A change here needs a migration in migrations/versions/ (tests/store/test_migrations.py checks).
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import JSON, BigInteger, Enum, ForeignKey, Index, Integer, String, Text, UniqueConstraint, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from tunelab.store.eval_lifecycle import EvalRunStatus
from tunelab.store.lifecycle import JobStatus

DEFAULT_PROJECT = "proj-default"
"""The project of an install from before projects existed, and of the admin key's own work."""


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


def _next_seq(table: str) -> Any:
    """A column default: one more than the table's largest ``seq``, computed inside the INSERT.

    Lists are ordered by it, so rows created in the same second keep the order they were created
    in (ids are random). SQLite serialises writers; on PostgreSQL two concurrent inserts can pick
    the same number, and the unique index makes the loser retry (``Store.add_in_order``).
    """
    return text(f"(SELECT COALESCE(MAX(seq), 0) + 1 FROM {table})")


class FileRow(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True, default=_next_seq("files"))
    project_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_PROJECT)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    filename: Mapped[str] = mapped_column(String(512))
    purpose: Mapped[str] = mapped_column(String(64), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(32))  # uploaded | processed | error
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    blob: Mapped[str] = mapped_column(String(256))  # path relative to the blob folder
    validation: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, unique=True, default=_next_seq("jobs"))
    project_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_PROJECT)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    model: Mapped[str] = mapped_column(String(256))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    method: Mapped[dict[str, Any]] = mapped_column()  # {"type": "supervised", "supervised": {...}}
    hyperparameters: Mapped[dict[str, Any]] = mapped_column()  # requested: training.hparams.JobSpec
    resolved_hyperparameters: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)  # once training starts
    # Stored as its string value (VARCHAR, no database enum type): a new state needs no migration.
    status: Mapped[JobStatus] = mapped_column(
        Enum(JobStatus, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e]), index=True
    )
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    error: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    result_files: Mapped[list[Any]] = mapped_column(default=list)
    integrations: Mapped[list[Any]] = mapped_column(default=list)
    # tunelab extension: {"eval_id", "data_source"} run on the final model and its base at the end
    eval_on_finish: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)


class EventRow(Base):
    __tablename__ = "job_events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    __table_args__ = (Index("ix_job_events_job_seq", "job_id", "seq"),)


class ModelRow(Base):
    """A servable model: a base model, a fine-tuned model or one of its checkpoints."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(512), primary_key=True)
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    """The project of a fine-tuned model or checkpoint; None for base models, which every project shares."""
    created_at: Mapped[int] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))  # base | fine-tuned | checkpoint
    owned_by: Mapped[str] = mapped_column(String(128))
    path: Mapped[str | None] = mapped_column(Text, nullable=True)  # None: bundled, resolved lazily
    base_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    method: Mapped[str | None] = mapped_column(String(16), nullable=True)  # lora | full
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    checkpoint_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # ftckpt-...
    metrics: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)


class DeploymentState(enum.StrEnum):
    """Azure's ``provisioningState`` of a deployment."""

    CREATING = "Creating"  # the model is loading
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


class DeploymentRow(Base):
    __tablename__ = "deployments"
    # Names are unique on the server (as they are in one Azure account); each belongs to one project.
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True, default=DEFAULT_PROJECT)
    scope: Mapped[str] = mapped_column(Text)  # the management-plane path it was created under
    created_at: Mapped[int] = mapped_column(BigInteger)
    model: Mapped[str] = mapped_column(String(512))
    model_format: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    sku: Mapped[dict[str, Any]] = mapped_column()
    state: Mapped[DeploymentState] = mapped_column(
        Enum(DeploymentState, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])
    )
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class SettingRow(Base):
    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class ProjectRow(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(256))
    created_at: Mapped[int] = mapped_column(BigInteger)
    archived_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ApiKeyRow(Base):
    """An API key, by its digest (store/keys.py); the key itself is shown once and never stored."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)  # None: an admin key
    role: Mapped[str] = mapped_column(String(16))  # admin | owner | member | inference
    name: Mapped[str] = mapped_column(String(256))
    redacted_value: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[int] = mapped_column(BigInteger)
    last_used_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    revoked_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class WorkerRow(Base):
    """A live training worker: it beats every few seconds; one whose beat lapsed is dead."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # host:pid, as jobs.worker_id
    host: Mapped[str] = mapped_column(String(256))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[int] = mapped_column(BigInteger)
    heartbeat_at: Mapped[int] = mapped_column(BigInteger, index=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class EvalRow(Base):
    """An eval: what items look like and how answers are graded (``testing_criteria``)."""

    __tablename__ = "evals"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    updated_at: Mapped[int] = mapped_column(BigInteger)
    name: Mapped[str] = mapped_column(String(256))
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    data_source_config: Mapped[dict[str, Any]] = mapped_column()  # {"type": "custom", "item_schema", ...}
    testing_criteria: Mapped[list[Any]] = mapped_column()  # as echoed: each with its "id"


class EvalRunRow(Base):
    """A run of an eval on one data source (and model): a row that a worker claims, like a job."""

    __tablename__ = "eval_runs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    eval_id: Mapped[str] = mapped_column(ForeignKey("evals.id", ondelete="CASCADE"), index=True)
    project_id: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    name: Mapped[str] = mapped_column(String(256))
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    model: Mapped[str] = mapped_column(String(512))  # as asked for (a deployment name or model id); "" for jsonl
    data_source: Mapped[dict[str, Any]] = mapped_column()  # as echoed
    status: Mapped[EvalRunStatus] = mapped_column(
        Enum(EvalRunStatus, native_enum=False, length=32, values_callable=lambda e: [m.value for m in e]), index=True
    )
    worker_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far: a run that kills workers fails
    started_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    result_counts: Mapped[dict[str, Any]] = mapped_column()
    per_model_usage: Mapped[list[Any]] = mapped_column(default=list)
    per_testing_criteria_results: Mapped[list[Any]] = mapped_column(default=list)
    classification_report: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)
    tracking: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)  # the MLflow run it was logged to
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the job that asked for it
    error: Mapped[dict[str, Any] | None] = mapped_column(nullable=True)


class EvalOutputItemRow(Base):
    """One graded item of a run; written as it is graded, so a run that stops goes on from there."""

    __tablename__ = "eval_output_items"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("eval_runs.id", ondelete="CASCADE"))
    eval_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[int] = mapped_column(BigInteger)
    datasource_item_id: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(8))  # pass | fail
    errored: Mapped[bool] = mapped_column(default=False)
    datasource_item: Mapped[dict[str, Any]] = mapped_column()
    results: Mapped[list[Any]] = mapped_column()
    sample: Mapped[dict[str, Any]] = mapped_column()
    __table_args__ = (UniqueConstraint("run_id", "datasource_item_id", name="uq_eval_output_items_run_item"),)
