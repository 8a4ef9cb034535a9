"""Persistence: the database (SQLAlchemy; SQLite by default, PostgreSQL by URL) and the blob folder."""

from tunelab.store.db import Store

__all__ = ["Store"]
