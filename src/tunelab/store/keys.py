"""Projects and API keys.

A key is ``tl-`` and 43 random URL-safe characters (256 bits). Only its HMAC-SHA256 digest under a
server-side pepper is stored (``api_keys.digest``), so a copy of the database alone gives no usable
key and no way to test guesses offline. A fast keyed hash is the right tool for keys this random
(a slow hash only matters for guessable secrets such as passwords) and lets every request find
its key with one indexed lookup. The pepper is 32 random bytes in ``<data dir>/key-pepper``
(mode 0600), made on first use; every server of one install must share it (they share the data
dir), and losing it invalidates every key.

Roles: ``admin`` (every project; the organization routes), ``owner`` (its project, and that
project's keys), ``member`` (its project's files, jobs, models and deployments), ``inference``
(chat completions and reading the model list only).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
import time
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from tunelab.config import Settings
from tunelab.store.db import Store, new_id, now
from tunelab.store.tables import DEFAULT_PROJECT, ApiKeyRow, ProjectRow

PEPPER_FILE = "key-pepper"
LEGACY_SETTING = "api_key"
"""Where tunelab 0.1 kept its generated key, in plain text (moved into ``api_keys`` at start)."""
GENERATED_ADMIN, CONFIGURED_ADMIN = "key-admin", "key-configured"
TOUCH_SECONDS = 60
"""``last_used_at`` is written at most this often per key."""


class Role(enum.StrEnum):
    """What a key may do."""

    ADMIN = "admin"  # everything, in every project
    OWNER = "owner"
    MEMBER = "member"
    INFERENCE = "inference"  # chat only


PROJECT_ROLES = (Role.OWNER, Role.MEMBER, Role.INFERENCE)


def new_key() -> str:
    return "tl-" + secrets.token_urlsafe(32)


def redact(key: str) -> str:
    return f"{key[:6]}...{key[-4:]}"


def load_pepper(data_path: Path) -> bytes:
    """The install's pepper, made on first use (atomically: concurrent first starts agree)."""
    path = data_path / PEPPER_FILE
    data_path.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        tmp = secrets.token_hex(32)
        with os.fdopen(fd, "w") as f:
            f.write(tmp)
    for _ in range(50):  # another process may have created it and not yet written it
        text = path.read_text().strip()
        if text:
            return bytes.fromhex(text)
        time.sleep(0.02)
    raise RuntimeError(f"{path} is empty; delete it to make a new pepper (every key is then invalid)")


class KeyRing:
    """Every read and write of projects and keys."""

    def __init__(self, store: Store, pepper: bytes) -> None:
        self.store, self._pepper = store, pepper

    @classmethod
    def of(cls, settings: Settings, store: Store) -> KeyRing:
        return cls(store, load_pepper(settings.data_path))

    def digest(self, key: str) -> str:
        return hmac.new(self._pepper, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    # -- keys ------------------------------------------------------------------------------------
    def create(
        self, *, role: Role, project_id: str | None, name: str, key_id: str | None = None
    ) -> tuple[ApiKeyRow, str]:
        """A new key; returns its row and the key itself (shown once, never stored).

        ``project_id`` is None for an admin key, a project's id otherwise.
        """
        if (role is Role.ADMIN) != (project_id is None):
            raise ValueError("admin keys belong to no project; every other key to one")
        key = new_key()
        row = ApiKeyRow(
            id=key_id or new_id("key"),
            digest=self.digest(key),
            project_id=project_id,
            role=str(role),
            name=name,
            redacted_value=redact(key),
            created_at=now(),
        )
        self.store.add(row)
        return row, key

    def find(self, key: str) -> tuple[ApiKeyRow, ProjectRow | None] | None:
        """The live key (not revoked, its project not archived) and its project; None if none."""
        with self.store.session() as s:
            return self._live(s, s.scalar(select(ApiKeyRow).where(ApiKeyRow.digest == self.digest(key))))

    def find_id(self, key_id: str) -> tuple[ApiKeyRow, ProjectRow | None] | None:
        """As ``find``, by the key's id (a console session keeps the id, never the key)."""
        with self.store.session() as s:
            return self._live(s, s.get(ApiKeyRow, key_id))

    @staticmethod
    def _live(s: Session, row: ApiKeyRow | None) -> tuple[ApiKeyRow, ProjectRow | None] | None:
        if row is None or row.revoked_at is not None:
            return None
        project = s.get(ProjectRow, row.project_id) if row.project_id else None
        if row.project_id is not None and (project is None or project.archived_at is not None):
            return None
        if row.last_used_at is None or now() - row.last_used_at >= TOUCH_SECONDS:
            row.last_used_at = now()
        return row, project

    def get(self, key_id: str) -> ApiKeyRow | None:
        row = self.store.get(ApiKeyRow, key_id)
        return row if row is not None and row.revoked_at is None else None

    def keys(self, *, project_id: str | None, admin: bool = False) -> list[ApiKeyRow]:
        """Live keys of a project (``admin``: the admin keys), oldest first."""
        with self.store.session() as s:
            q = select(ApiKeyRow).where(ApiKeyRow.revoked_at.is_(None)).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
            q = q.where(ApiKeyRow.project_id.is_(None)) if admin else q.where(ApiKeyRow.project_id == project_id)
            return list(s.scalars(q))

    def revoke(self, key_id: str) -> bool:
        """Revoke a live key: every request with it is refused from now on. False if there is none."""
        with self.store.session() as s:
            result = s.execute(
                update(ApiKeyRow).where(ApiKeyRow.id == key_id, ApiKeyRow.revoked_at.is_(None)).values(revoked_at=now())
            )
            return bool(result.rowcount)  # type: ignore[attr-defined]

    # -- projects --------------------------------------------------------------------------------
    def create_project(self, name: str) -> ProjectRow:
        return self.store.add(ProjectRow(id=new_id("proj"), name=name, created_at=now()))

    def project(self, project_id: str) -> ProjectRow | None:
        return self.store.get(ProjectRow, project_id)

    def projects(self, *, include_archived: bool = False) -> list[ProjectRow]:
        with self.store.session() as s:
            q = select(ProjectRow).order_by(ProjectRow.created_at, ProjectRow.id)
            if not include_archived:
                q = q.where(ProjectRow.archived_at.is_(None))
            return list(s.scalars(q))

    def rename_project(self, project_id: str, name: str) -> ProjectRow | None:
        with self.store.session() as s:
            row = s.get(ProjectRow, project_id)
            if row is not None:
                row.name = name
            return row

    def archive_project(self, project_id: str) -> ProjectRow | None:
        """Archive a project: its keys stop working; its resources stay. The default project cannot be."""
        if project_id == DEFAULT_PROJECT:
            raise ValueError("the default project cannot be archived")
        with self.store.session() as s:
            row = s.get(ProjectRow, project_id)
            if row is not None and row.archived_at is None:
                row.archived_at = now()
            return row


def bootstrap_admin_key(settings: Settings, store: Store) -> str | None:
    """Make sure the install has an admin key; returns one it generated (to show once), else None.

    - ``TUNELAB_API_KEY`` is an admin key (recorded as ``key-configured``; a new value replaces it);
    - the plain-text key an older tunelab generated is moved into the table as ``key-admin``;
    - with neither and no admin key yet, one is generated as ``key-admin``.
    """
    ring = KeyRing.of(settings, store)
    if settings.api_key:
        digest = ring.digest(settings.api_key)
        with store.session() as s:
            row = s.get(ApiKeyRow, CONFIGURED_ADMIN)
            if row is None:
                s.add(
                    ApiKeyRow(
                        id=CONFIGURED_ADMIN,
                        digest=digest,
                        project_id=None,
                        role=str(Role.ADMIN),
                        name="TUNELAB_API_KEY",
                        redacted_value=redact(settings.api_key),
                        created_at=now(),
                    )
                )
            elif row.digest != digest or row.revoked_at is not None:
                row.digest, row.redacted_value, row.revoked_at = digest, redact(settings.api_key), None
    legacy = store.setting(LEGACY_SETTING)
    if legacy:
        with store.session() as s:
            if s.get(ApiKeyRow, GENERATED_ADMIN) is None:
                s.add(
                    ApiKeyRow(
                        id=GENERATED_ADMIN,
                        digest=ring.digest(legacy),
                        project_id=None,
                        role=str(Role.ADMIN),
                        name="generated at first start",
                        redacted_value=redact(legacy),
                        created_at=now(),
                    )
                )
        store.delete_setting(LEGACY_SETTING)
        return None
    if settings.api_key or store.get(ApiKeyRow, GENERATED_ADMIN) is not None:
        return None
    try:
        _, key = ring.create(role=Role.ADMIN, project_id=None, name="generated at first start", key_id=GENERATED_ADMIN)
    except Exception:  # another process generated it first
        if store.get(ApiKeyRow, GENERATED_ADMIN) is None:
            raise
        return None
    return key
