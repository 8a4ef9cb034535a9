"""Projects and hashed API keys; project_id on files, jobs, models, deployments; workers and their
heartbeats; a creation sequence on files and jobs (lists keep the order rows were created in).

Existing rows belong to the default project; fine-tuned models and checkpoints to their job's.

Revision ID: 0015_projects
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0015_projects"
down_revision = "0002"
branch_labels = None
depends_on = None

DEFAULT_PROJECT = "proj-default"


def upgrade() -> None:
    op.create_table(
        "projects",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("archived_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("project_id", sa.String(length=64), nullable=True),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=256), nullable=False),
        sa.Column("redacted_value", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("last_used_at", sa.BigInteger(), nullable=True),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("digest"),
    )
    op.create_index(op.f("ix_api_keys_project_id"), "api_keys", ["project_id"], unique=False)
    op.create_table(
        "workers",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=256), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=False),
        sa.Column("heartbeat_at", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_workers_heartbeat_at"), "workers", ["heartbeat_at"], unique=False)
    op.execute(
        sa.text("INSERT INTO projects (id, name, created_at) VALUES (:id, 'Default project', :now)").bindparams(
            id=DEFAULT_PROJECT, now=0
        )
    )

    for table in ("files", "jobs", "deployments"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("project_id", sa.String(length=64), nullable=False, server_default=DEFAULT_PROJECT)
            )
        with op.batch_alter_table(table) as batch:  # the default was for the rows already there
            batch.alter_column("project_id", server_default=None)
            batch.create_index(op.f(f"ix_{table}_project_id"), ["project_id"], unique=False)
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("project_id", sa.String(length=64), nullable=True))
        batch.create_index(op.f("ix_models_project_id"), ["project_id"], unique=False)
    op.execute(
        sa.text("UPDATE models SET project_id = :p WHERE kind IN ('fine-tuned', 'checkpoint')").bindparams(
            p=DEFAULT_PROJECT
        )
    )

    conn = op.get_bind()
    for table in ("files", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("seq", sa.BigInteger(), nullable=True))
        ids = conn.execute(sa.text(f"SELECT id FROM {table} ORDER BY created_at, id")).scalars().all()
        for n, row_id in enumerate(ids, start=1):
            conn.execute(sa.text(f"UPDATE {table} SET seq = :n WHERE id = :id"), {"n": n, "id": row_id})
        with op.batch_alter_table(table) as batch:
            batch.alter_column("seq", existing_type=sa.BigInteger(), nullable=False)
            batch.create_unique_constraint(f"uq_{table}_seq", ["seq"])


def downgrade() -> None:
    for table in ("files", "jobs"):
        with op.batch_alter_table(table) as batch:
            batch.drop_constraint(f"uq_{table}_seq", type_="unique")
            batch.drop_column("seq")
    for table in ("files", "jobs", "deployments", "models"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(op.f(f"ix_{table}_project_id"))
            batch.drop_column("project_id")
    for table in ("workers", "api_keys", "projects"):
        op.drop_table(table)
