"""Deployments: named handles on served models, loaded into the engine in the background.

A deployment row is the source of truth (any server process can serve it: the engine loads it
on first use); this process's engine holds the weights. State goes Creating → Succeeded | Failed.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from tunelab.models.catalog import model_source
from tunelab.serving.generation import ServingEngine
from tunelab.store import Store
from tunelab.store.db import now
from tunelab.store.tables import DeploymentRow, DeploymentState, ModelRow

log = logging.getLogger("tunelab.deployments")


class DeploymentNotFound(LookupError):
    """No deployment (and, for chat, no model) of that name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class DeploymentFailed(RuntimeError):
    """The deployment exists but its model failed to load; the message says why."""


class NotDeployable(LookupError):
    """A deployment names a model that does not exist."""

    def __init__(self, model: str) -> None:
        super().__init__(model)
        self.model = model


class Deployer:
    def __init__(self, store: Store, engine: ServingEngine, cache_dir: Path) -> None:
        self.store, self.engine, self.cache_dir = store, engine, cache_dir
        engine.watch(self._engine_changed)

    def create(
        self, name: str, scope: str, model: str, fmt: str, version: str, sku: dict, project_id: str
    ) -> tuple[DeploymentRow, bool]:
        """Create or replace deployment ``name`` of ``project_id``; returns (row, created).

        Raises:
            NotDeployable: ``model`` is no known model id.
            DeploymentNameTaken: another project has a deployment of that name.
        """
        if self.store.get(ModelRow, model) is None:
            raise NotDeployable(model)
        old = self.store.get(DeploymentRow, name)
        row = DeploymentRow(
            name=name,
            project_id=project_id,
            scope=scope,
            created_at=now(),
            model=model,
            model_format=fmt,
            model_version=version,
            sku=sku,
            state=DeploymentState.CREATING,
        )
        row, created = self.store.upsert_deployment(row)  # atomic: concurrent PUTs of one name create it once
        if old is not None and old.model != model and old.project_id == project_id:
            self._release(old.model, keep=name)
        threading.Thread(target=self._load, args=(name, model), daemon=True).start()
        return row, created

    def delete(self, name: str) -> DeploymentRow:
        row = self.get(name)
        self.store.delete(DeploymentRow, name)
        self._release(row.model, keep=None)
        return row

    def resolve(self, name: str, *, wait: bool = True) -> str:
        """The model id to generate with for ``name``: a deployment, else a model id itself.

        Loads the model into this process's engine if needed (blocking; with ``wait=False`` an
        engine that starts slowly, vLLM, starts it in the background and raises EngineUnavailable).

        Raises:
            DeploymentNotFound: neither a deployment nor a model.
            DeploymentFailed: the deployment failed to load.
            EngineUnavailable: not ready yet (``wait=False``).
        """
        row = self.store.get(DeploymentRow, name)
        if row is not None:
            if row.state is DeploymentState.FAILED:
                raise DeploymentFailed(row.error or "the deployment failed")
            model = row.model
        elif self.store.get(ModelRow, name) is not None:
            model = name  # serverless-style: call any model by id, as OpenAI does for ft: models
        else:
            raise DeploymentNotFound(name)
        if not self.engine.loaded(model):
            self.engine.load(model_source(self.store, model, self.cache_dir), wait=wait)
        return model

    def get(self, name: str) -> DeploymentRow:
        row = self.store.get(DeploymentRow, name)
        if row is None:
            raise DeploymentNotFound(name)
        return row

    def _load(self, name: str, model: str) -> None:
        try:
            self.engine.load(model_source(self.store, model, self.cache_dir))
        except Exception as exc:  # the state carries the reason to the client
            log.exception("deployment %s failed", name)
            self.store.set_deployment_state(name, DeploymentState.FAILED, f"could not load {model}: {exc}")
            return
        self.store.set_deployment_state(name, DeploymentState.SUCCEEDED)

    def _engine_changed(self, models: list[str], state: str, message: str | None) -> None:
        """The engine's process for ``models`` crashed and restarts, is back, or failed: the
        deployments on them say so (``provisioningState`` and ``properties.error``)."""
        new = {"restarting": DeploymentState.CREATING, "ready": DeploymentState.SUCCEEDED}.get(
            state, DeploymentState.FAILED
        )
        for row in self.store.deployments():
            if row.model in models:
                self.store.set_deployment_state(row.name, new, message)

    def _release(self, model: str, keep: str | None) -> None:
        """Unload ``model`` unless another deployment still serves it."""
        if not any(d.model == model and d.name != keep for d in self.store.deployments()):
            self.engine.unload(model)
