"""The schema comes from Alembic migrations: a new database, and one from before migrations existed."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, text

from tunelab.store import Store
from tunelab.store.db import BASELINE, MIGRATIONS
from tunelab.store.lifecycle import JobStatus
from tunelab.store.tables import DEFAULT_PROJECT, Base, JobRow, ProjectRow


def schema_differences(url: str) -> list:
    with create_engine(url).connect() as conn:
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)


def test_a_new_database_gets_exactly_the_tables_schema(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'new.db'}"
    Store(url)
    assert schema_differences(url) == []


def test_a_database_from_before_migrations_is_upgraded_and_keeps_its_rows(tmp_path: Path):
    # tunelab 0.1 made its tables with create_all: the baseline schema, and no alembic_version table.
    url = f"sqlite:///{tmp_path / 'old.db'}"
    with create_engine(url).begin() as conn:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        command.upgrade(config, BASELINE)
        conn.execute(text("DROP TABLE alembic_version"))
        conn.execute(
            text("""INSERT INTO jobs VALUES ('ftjob-old', 1, 'm', 'file-1', NULL, 7, NULL, NULL, '{}',
                             '{"n_epochs": 2}', 'succeeded', NULL, NULL, 2, 'ft:m', 10, NULL, '[]', '[]')""")
        )
    store = Store(url)
    old = store.get(JobRow, "ftjob-old")
    assert old is not None and old.status is JobStatus.SUCCEEDED and old.hyperparameters == {"n_epochs": 2}
    assert old.resolved_hyperparameters is None
    # projects came later: what was there belongs to the default project, in the order it was made
    assert old.project_id == DEFAULT_PROJECT and old.seq == 1
    assert store.get(ProjectRow, DEFAULT_PROJECT) is not None
    assert schema_differences(url) == []
    Store(url)  # a second start finds nothing to do
