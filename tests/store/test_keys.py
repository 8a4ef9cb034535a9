"""Keys and projects in the store: hashed with the install's pepper, shown once, revoked at once; the
plain-text key of an install from before projects becomes its admin key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config import Settings
from tunelab.store import Store
from tunelab.store.keys import GENERATED_ADMIN, KeyRing, Role, bootstrap_admin_key, load_pepper
from tunelab.store.tables import DEFAULT_PROJECT, ApiKeyRow


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path / "data")


@pytest.fixture
def store(settings: Settings) -> Store:
    settings.data_path.mkdir(parents=True)
    return Store(settings.db_url)


def test_a_key_is_stored_only_as_its_peppered_digest(settings, store):
    ring = KeyRing.of(settings, store)
    project = ring.create_project("team")
    row, key = ring.create(role=Role.MEMBER, project_id=project.id, name="ci")
    stored = store.get(ApiKeyRow, row.id)
    assert key not in {stored.digest, stored.redacted_value} and stored.redacted_value.endswith(key[-4:])
    assert len(stored.digest) == 64 and ring.find(key)[0].id == row.id
    other = KeyRing(store, b"another pepper")  # the database alone does not check keys
    assert other.find(key) is None
    assert (settings.data_path / "key-pepper").stat().st_mode & 0o777 == 0o600
    assert load_pepper(settings.data_path) == load_pepper(settings.data_path)


def test_revoked_keys_and_archived_projects_find_nothing(settings, store):
    ring = KeyRing.of(settings, store)
    project = ring.create_project("team")
    row, key = ring.create(role=Role.INFERENCE, project_id=project.id, name="bot")
    assert ring.revoke(row.id) and ring.find(key) is None and not ring.revoke(row.id)
    _, key2 = ring.create(role=Role.OWNER, project_id=project.id, name="owner")
    ring.archive_project(project.id)
    assert ring.find(key2) is None
    with pytest.raises(ValueError):
        ring.archive_project(DEFAULT_PROJECT)


def test_admin_keys_belong_to_no_project(settings, store):
    ring = KeyRing.of(settings, store)
    with pytest.raises(ValueError):
        ring.create(role=Role.ADMIN, project_id=DEFAULT_PROJECT, name="x")
    with pytest.raises(ValueError):
        ring.create(role=Role.MEMBER, project_id=None, name="x")


def test_a_fresh_install_generates_one_admin_key_shown_once(settings, store):
    key = bootstrap_admin_key(settings, store)
    assert key and KeyRing.of(settings, store).find(key)[0].role == "admin"
    assert bootstrap_admin_key(settings, store) is None  # a restart shows nothing again


def test_the_plain_key_of_an_old_install_becomes_its_admin_key(settings, store):
    store.set_setting_once("api_key", "tl-old-key")  # where tunelab 0.1 kept its generated key
    assert bootstrap_admin_key(settings, store) is None
    found = KeyRing.of(settings, store).find("tl-old-key")
    assert found is not None and found[0].id == GENERATED_ADMIN and found[0].role == "admin"
    assert store.setting("api_key") is None  # no plain-text copy is left


def test_the_configured_key_is_an_admin_key_and_a_new_value_replaces_it(settings, store):
    bootstrap_admin_key(Settings(data_dir=settings.data_dir, api_key="first"), store)
    ring = KeyRing.of(settings, store)
    assert ring.find("first")[0].role == "admin"
    bootstrap_admin_key(Settings(data_dir=settings.data_dir, api_key="second"), store)
    assert ring.find("first") is None and ring.find("second") is not None
