"""Alembic migrations of tunelab's database; ``Store`` applies them at start (see store/db.py)."""
