"""Alembic environment: run by ``Store`` on the connection it passes (there is no alembic.ini).

After changing ``tables.py``, add ``versions/NNNN_<what>.py`` (the newest one is the pattern: set
``revision`` and ``down_revision``); ``tests/store/test_migrations.py`` fails until the migrated
schema equals the tables' metadata.
"""

from alembic import context

from tunelab.store.tables import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
