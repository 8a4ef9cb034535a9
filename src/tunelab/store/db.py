"""The store: every read and write of tunelab's state goes through here.

The API server and the workers are separate processes that meet only in this database, so state
changes that can race (claiming a job, finishing or cancelling it) are conditional UPDATEs.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

from filelock import FileLock
from sqlalchemy import create_engine, delete, event, inspect, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, CursorResult, Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from tunelab.store.eval_lifecycle import EvalRunStatus
from tunelab.store.lifecycle import ACTIVE, HELD, JobStatus
from tunelab.store.tables import (
    ApiKeyRow,
    DeploymentRow,
    DeploymentState,
    EvalOutputItemRow,
    EvalRow,
    EvalRunRow,
    EventRow,
    FileRow,
    JobRow,
    ModelRow,
    ProjectRow,
    SettingRow,
    WorkerRow,
)

Row = TypeVar(
    "Row",
    FileRow,
    JobRow,
    ModelRow,
    DeploymentRow,
    ApiKeyRow,
    ProjectRow,
    WorkerRow,
    EvalRow,
    EvalRunRow,
    EvalOutputItemRow,
)
Listed = TypeVar("Listed", FileRow, JobRow, EvalRow, EvalRunRow)  # rows paged in a list route
Sequenced = TypeVar("Sequenced", FileRow, JobRow)  # rows numbered in creation order (``seq``)


class DeploymentNameTaken(Exception):
    """The deployment name belongs to another project (names are unique on the server)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())


def _event(
    job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
) -> EventRow:
    return EventRow(
        id=new_id("ftevent"), job_id=job_id, created_at=now(), level=level, message=message, type=type, data=data
    )


MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the schema databases had before migrations existed


def _upgrade(conn: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = conn
    tables = set(inspect(conn).get_table_names())
    if "jobs" in tables and "alembic_version" not in tables:
        command.stamp(config, BASELINE)
    command.upgrade(config, "head")


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets the server read while a worker writes; busy_timeout waits out short write locks.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


class Store:
    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._migrate()
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def _migrate(self) -> None:
        """Bring the schema up to date (Alembic). The server and its workers start together: one
        migrates, the others wait, then find nothing to do. A database from before migrations
        existed is stamped with the baseline first."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.begin() as conn:
                conn.execute(text("SELECT pg_advisory_xact_lock(7467356)"))
                _upgrade(conn)
        elif self.engine.dialect.name == "sqlite" and self.engine.url.database not in (None, "", ":memory:"):
            with FileLock(f"{self.engine.url.database}.lock"), self.engine.begin() as conn:
                _upgrade(conn)
        else:
            with self.engine.begin() as conn:
                _upgrade(conn)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as s, s.begin():
            yield s

    # -- generic -------------------------------------------------------------------------------
    def add(self, row: Any) -> Any:
        with self.session() as s:
            s.add(row)
        return row

    def add_in_order(self, row: Sequenced) -> Sequenced:
        """Insert a file or job row; its ``seq`` is the next in the table (see ``tables._next_seq``).

        On PostgreSQL two concurrent inserts may pick the same number; the unique index refuses the
        second, which tries again with the next one.
        """
        for attempt in range(10):
            try:
                with self.session() as s:
                    s.add(row)
                return row
            except IntegrityError:
                if attempt == 9 or self.get(type(row), row.id) is not None:
                    raise
                row.seq = None  # type: ignore[assignment]  # let the default pick again
        raise AssertionError("unreachable")

    def put(self, row: Any) -> Any:
        """Insert or replace by primary key (a resumed or restarted job writes its checkpoints again)."""
        with self.session() as s:
            return s.merge(row)

    def get(self, cls: type[Row], key: str) -> Row | None:
        with self.session() as s:
            return s.get(cls, key)

    def delete(self, cls: type, key: str) -> bool:
        with self.session() as s:
            row = s.get(cls, key)
            if row is None:
                return False
            s.delete(row)
            return True

    def page(
        self,
        cls: type[Listed],
        *,
        after: str | None,
        limit: int,
        newest_first: bool = True,
        where: Sequence[Any] = (),
        order_by: str = "seq",
    ) -> tuple[list[Listed], bool]:
        """One page of rows ordered by (``order_by``, id), after the row with id ``after``.

        Files and jobs are ordered by ``seq`` (their creation order); evals by ``created_at`` or
        ``updated_at``. An ``after`` that names no row (or one outside ``where``) starts from the
        beginning, as OpenAI's cursors do for an unknown id.
        """
        with self.session() as s:
            q = select(cls).where(*where)
            column = getattr(cls, order_by)
            key = (column, cls.id)
            if after is not None:
                anchor = s.scalar(select(cls).where(cls.id == after, *where))
                if anchor is not None:
                    pivot = (getattr(anchor, order_by), anchor.id)
                    cmp = (
                        (column < pivot[0]) | ((column == pivot[0]) & (cls.id < pivot[1]))
                        if newest_first
                        else (column > pivot[0]) | ((column == pivot[0]) & (cls.id > pivot[1]))
                    )
                    q = q.where(cmp)
            order = [k.desc() for k in key] if newest_first else list(key)
            rows = list(s.scalars(q.order_by(*order).limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    # -- settings ------------------------------------------------------------------------------
    def setting(self, key: str) -> str | None:
        with self.session() as s:
            row = s.get(SettingRow, key)
            return row.value if row else None

    def set_setting_once(self, key: str, value: str) -> str:
        """Store ``value`` unless the key exists; return the stored value either way."""
        with self.session() as s:
            row = s.get(SettingRow, key)
            if row is None:
                s.add(SettingRow(key=key, value=value))
                return value
            return row.value

    def delete_setting(self, key: str) -> None:
        with self.session() as s:
            s.execute(delete(SettingRow).where(SettingRow.key == key))

    # -- jobs ----------------------------------------------------------------------------------
    def update_job(
        self,
        job_id: str,
        *,
        only_if_status: Collection[JobStatus] | None = None,
        only_if_worker: str | None = None,
        event: str | None = None,
        event_level: str = "info",
        **values: Any,
    ) -> bool:
        """Conditional update; False when the job is gone, not in one of ``only_if_status``, or
        (``only_if_worker``) held by another worker.

        ``event``, if given, is recorded in the same transaction, only when the update happened.
        Status changes go through ``tunelab.store.lifecycle``, which calls this.
        """
        with self.session() as s:
            q = update(JobRow).where(JobRow.id == job_id)
            if only_if_status is not None:
                q = q.where(JobRow.status.in_(only_if_status))
            if only_if_worker is not None:
                q = q.where(JobRow.worker_id == only_if_worker)
            result = cast(CursorResult[Any], s.execute(q.values(**values)))
            if result.rowcount != 1:
                return False
            if event is not None:
                s.add(_event(job_id, event, level=event_level))
            return True

    def claim_job(self, worker_id: str, *, from_status: JobStatus, to_status: JobStatus) -> JobRow | None:
        """Atomically move the oldest job in ``from_status`` to ``to_status`` for ``worker_id``."""
        with self.session() as s:
            candidates = s.scalars(
                select(JobRow.id).where(JobRow.status == from_status).order_by(JobRow.created_at, JobRow.id).limit(5)
            ).all()
        for job_id in candidates:
            if self.update_job(
                job_id, only_if_status=[from_status], status=to_status, worker_id=worker_id, started_at=now()
            ):
                return self.get(JobRow, job_id)
        return None

    def jobs_held(self, worker_id: str | None = None) -> list[JobRow]:
        """Jobs a worker holds (``worker_id``'s, or any): running, or pausing (running until the
        worker has saved its state)."""
        with self.session() as s:
            q = select(JobRow).where(JobRow.status.in_(HELD))
            if worker_id is not None:
                q = q.where(JobRow.worker_id == worker_id)
            return list(s.scalars(q))

    def job_status(self, job_id: str) -> JobStatus | None:
        with self.session() as s:
            return s.scalar(select(JobRow.status).where(JobRow.id == job_id))

    def job_holder(self, job_id: str) -> tuple[JobStatus, str | None] | None:
        """The job's status and the worker that holds it (None when none does); None when gone."""
        with self.session() as s:
            row = s.execute(select(JobRow.status, JobRow.worker_id).where(JobRow.id == job_id)).first()
            return None if row is None else (row[0], row[1])

    def active_job_using(self, file_id: str) -> str | None:
        with self.session() as s:
            return s.scalar(
                select(JobRow.id).where(
                    JobRow.status.in_(ACTIVE),
                    or_(JobRow.training_file == file_id, JobRow.validation_file == file_id),
                )
            )

    def active_job_from(self, model_id: str) -> str | None:
        """An unfinished job that fine-tunes ``model_id`` further."""
        with self.session() as s:
            return s.scalar(select(JobRow.id).where(JobRow.status.in_(ACTIVE), JobRow.model == model_id))

    # -- events --------------------------------------------------------------------------------
    def add_event(
        self, job_id: str, message: str, *, level: str = "info", type: str = "message", data: dict | None = None
    ) -> EventRow:
        return self.add(_event(job_id, message, level=level, type=type, data=data))

    def events(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[EventRow], bool]:
        with self.session() as s:
            q = select(EventRow).where(EventRow.job_id == job_id)
            if after is not None:
                anchor = s.scalar(select(EventRow.seq).where(EventRow.id == after))
                if anchor is not None:
                    q = q.where(EventRow.seq < anchor)
            rows = list(s.scalars(q.order_by(EventRow.seq.desc()).limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    # -- models --------------------------------------------------------------------------------
    def models(self, **filters: Any) -> list[ModelRow]:
        with self.session() as s:
            q = select(ModelRow).filter_by(**filters).order_by(ModelRow.created_at, ModelRow.id)
            return list(s.scalars(q))

    def checkpoints(self, job_id: str, *, after: str | None, limit: int) -> tuple[list[ModelRow], bool]:
        with self.session() as s:
            q = select(ModelRow).where(ModelRow.job_id == job_id, ModelRow.kind == "checkpoint")
            if after is not None:
                anchor = s.scalar(select(ModelRow.step).where(ModelRow.checkpoint_id == after))
                if anchor is not None:
                    q = q.where(ModelRow.step < anchor)
            rows = list(s.scalars(q.order_by(ModelRow.step.desc()).limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    # -- deployments ---------------------------------------------------------------------------
    def deployments(self) -> list[DeploymentRow]:
        with self.session() as s:
            return list(s.scalars(select(DeploymentRow).order_by(DeploymentRow.created_at)))

    def upsert_deployment(self, row: DeploymentRow) -> tuple[DeploymentRow, bool]:
        """Create deployment ``row.name`` or replace it (keeping its ``created_at``), atomically:
        however many requests race for one name, one creates it and the others replace it.

        Returns the stored row and whether it was created.

        Raises:
            DeploymentNameTaken: another project has a deployment of that name.
        """
        values = {c.key: getattr(row, c.key) for c in DeploymentRow.__table__.columns}
        with self.session() as s:
            insert = (postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite.insert)(DeploymentRow)
            # RETURNING says whether the row went in (rowcount of an ignored INSERT is not portable).
            inserted = insert.values(**values).on_conflict_do_nothing(index_elements=["name"])
            created = s.execute(inserted.returning(DeploymentRow.name)).first() is not None
            if not created:
                changes = {k: v for k, v in values.items() if k not in ("name", "created_at")}
                replaced = cast(
                    CursorResult[Any],
                    s.execute(
                        update(DeploymentRow)
                        .where(DeploymentRow.name == row.name, DeploymentRow.project_id == row.project_id)
                        .values(**changes)
                    ),
                ).rowcount
                if not replaced:
                    raise DeploymentNameTaken(row.name)
            stored = s.get(DeploymentRow, row.name, populate_existing=True)
            assert stored is not None
            return stored, bool(created)

    def set_deployment_state(self, name: str, state: DeploymentState, error: str | None = None) -> None:
        with self.session() as s:
            s.execute(update(DeploymentRow).where(DeploymentRow.name == name).values(state=state, error=error))

    # -- workers -------------------------------------------------------------------------------
    def beat(self, worker_id: str, *, host: str, pid: int, job_id: str | None) -> None:
        """Record that ``worker_id`` is alive (and which job it trains); registers it the first time."""
        with self.session() as s:
            row = s.get(WorkerRow, worker_id)
            if row is None:
                s.add(WorkerRow(id=worker_id, host=host, pid=pid, started_at=now(), heartbeat_at=now(), job_id=job_id))
            else:
                row.heartbeat_at, row.job_id = now(), job_id

    def forget_worker(self, worker_id: str) -> None:
        with self.session() as s:
            s.execute(delete(WorkerRow).where(WorkerRow.id == worker_id))

    def workers(self, *, beat_since: int | None = None) -> list[WorkerRow]:
        """Registered workers; with ``beat_since``, those that beat at or after that time."""
        with self.session() as s:
            q = select(WorkerRow).order_by(WorkerRow.started_at)
            if beat_since is not None:
                q = q.where(WorkerRow.heartbeat_at >= beat_since)
            return list(s.scalars(q))

    def ping(self) -> None:
        """Raises if the database cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # -- eval runs -----------------------------------------------------------------------------
    def update_eval_run(
        self,
        run_id: str,
        *,
        only_if_status: Collection[EvalRunStatus] | None = None,
        only_if_worker: str | None = None,
        **values: Any,
    ) -> bool:
        """Conditional update; False when the run is gone, not in one of ``only_if_status``, or (with
        ``only_if_worker``) held by another worker. Status changes go through
        ``tunelab.store.eval_lifecycle``, which calls this."""
        with self.session() as s:
            q = update(EvalRunRow).where(EvalRunRow.id == run_id)
            if only_if_status is not None:
                q = q.where(EvalRunRow.status.in_(only_if_status))
            if only_if_worker is not None:
                q = q.where(EvalRunRow.worker_id == only_if_worker)
            return cast(CursorResult[Any], s.execute(q.values(**values))).rowcount == 1

    def claim_eval_run(
        self, worker_id: str, *, from_status: EvalRunStatus, to_status: EvalRunStatus
    ) -> EvalRunRow | None:
        """Atomically move the oldest run in ``from_status`` to ``to_status`` for ``worker_id``."""
        with self.session() as s:
            candidates = s.execute(
                select(EvalRunRow.id, EvalRunRow.attempts)
                .where(EvalRunRow.status == from_status)
                .order_by(EvalRunRow.created_at, EvalRunRow.id)
                .limit(5)
            ).all()
        for run_id, attempts in candidates:
            # Conditional on the attempts read too: two workers cannot both count the same claim.
            with self.session() as s:
                q = (
                    update(EvalRunRow)
                    .where(EvalRunRow.id == run_id, EvalRunRow.status == from_status, EvalRunRow.attempts == attempts)
                    .values(status=to_status, worker_id=worker_id, started_at=now(), attempts=attempts + 1)
                )
                claimed = cast(CursorResult[Any], s.execute(q)).rowcount == 1
            if claimed:
                return self.get(EvalRunRow, run_id)
        return None

    def eval_runs_in(self, statuses: Collection[EvalRunStatus]) -> list[EvalRunRow]:
        with self.session() as s:
            return list(s.scalars(select(EvalRunRow).where(EvalRunRow.status.in_(statuses))))

    def eval_run_status(self, run_id: str) -> EvalRunStatus | None:
        with self.session() as s:
            return s.scalar(select(EvalRunRow.status).where(EvalRunRow.id == run_id))

    def output_items(
        self, run_id: str, *, after: str | None, limit: int, newest_first: bool = False, status: str | None = None
    ) -> tuple[list[EvalOutputItemRow], bool]:
        """One page of a run's output items in data-source order, after the item with id ``after``."""
        with self.session() as s:
            q = select(EvalOutputItemRow).where(EvalOutputItemRow.run_id == run_id)
            if status is not None:
                q = q.where(EvalOutputItemRow.status == status)
            key = EvalOutputItemRow.datasource_item_id
            if after is not None:
                anchor = s.scalar(select(key).where(EvalOutputItemRow.id == after))
                if anchor is not None:
                    q = q.where(key < anchor if newest_first else key > anchor)
            rows = list(s.scalars(q.order_by(key.desc() if newest_first else key).limit(limit + 1)))
            return rows[:limit], len(rows) > limit

    def graded_items(self, run_id: str) -> list[EvalOutputItemRow]:
        """Every output item of a run written so far, in data-source order."""
        with self.session() as s:
            q = select(EvalOutputItemRow).where(EvalOutputItemRow.run_id == run_id)
            return list(s.scalars(q.order_by(EvalOutputItemRow.datasource_item_id)))
