"""The base-model catalogue: which models can be fine-tuned or served, and where their weights are.

Rows live in the store's ``models`` table: the bundled model (weights imported lazily into the
per-user cache), local HF folders added by ``tunelab models add``, and fine-tuned models and
checkpoints written by jobs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunelab.models.bundled import BUNDLED_ID, bundled_model_dir
from tunelab.models.folder import model_folder
from tunelab.store import Store
from tunelab.store.db import now
from tunelab.store.tables import ModelRow


class ModelNotFound(LookupError):
    pass


def ensure_bundled(store: Store) -> None:
    if store.get(ModelRow, BUNDLED_ID) is None:
        store.add(ModelRow(id=BUNDLED_ID, created_at=now(), kind="base", owned_by="tunelab", path=None))


def add_local(store: Store, path: Path, model_id: str) -> ModelRow:
    """Register a local HF-format folder as a base model.

    Raises:
        ValueError: the folder has no ``config.json`` or the id is taken.
    """
    path = model_folder(path.expanduser().resolve())
    if store.get(ModelRow, model_id) is not None:
        raise ValueError(f"a model with id {model_id!r} already exists")
    return store.add(ModelRow(id=model_id, created_at=now(), kind="base", owned_by="user", path=str(path)))


def base_model_dir(store: Store, model_id: str, cache_dir: Path) -> Path:
    """Local HF folder of a base model (imports the bundled model on first use)."""
    row = store.get(ModelRow, model_id)
    if row is None or row.kind != "base":
        raise ModelNotFound(model_id)
    if row.path is None:
        return bundled_model_dir(cache_dir)
    return Path(row.path)


@dataclass(frozen=True)
class ModelSource:
    """Where a model's weights are: what serving loads, and where a job that fine-tunes it starts."""

    model_id: str
    """The id it is asked for by (a base, fine-tuned or checkpoint model)."""
    base_model: str
    """The base model at the root (a fine-tuned model is named after it and shares it when served)."""
    model_dir: Path
    """An HF folder: the base model, or a fully fine-tuned model."""
    adapter_dir: Path | None = None
    """A LoRA adapter on ``model_dir``; None for base and fully fine-tuned models."""


def model_source(store: Store, model_id: str, cache_dir: Path) -> ModelSource:
    """The weights of ``model_id``: a base model, a fine-tuned model or a checkpoint."""
    row = store.get(ModelRow, model_id)
    if row is None:
        raise ModelNotFound(model_id)
    if row.kind == "base":
        return ModelSource(model_id, model_id, base_model_dir(store, model_id, cache_dir))
    assert row.path is not None and row.base_model is not None
    if row.method == "full":
        return ModelSource(model_id, row.base_model, Path(row.path))
    base_dir = base_model_dir(store, row.base_model, cache_dir)
    return ModelSource(model_id, row.base_model, base_dir, adapter_dir=Path(row.path))
