"""Chat generation behind the API: which model a name means, its rate limit, then the engine.

The API route turns a request into ``(name, messages, SamplingParams)``, asks ``ChatService.admit``
for the model and the rate-limit headers, and shapes what ``generate`` or ``stream`` return into
wire objects. Everything here raises domain errors (``DeploymentNotFound``, ``DeploymentFailed``,
``PromptTooLong``, ``RateLimitExceeded``); api/errors.py maps them to HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from tunelab.serving.deployer import Deployer, DeploymentNotFound
from tunelab.serving.engine import Completion, Engine, SamplingParams
from tunelab.serving.ratelimit import RateLimiter, RateLimitExceeded
from tunelab.store import Store
from tunelab.store.tables import DeploymentRow, ModelRow

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Admitted:
    """A request that may run: the model to generate with and the rate-limit headers to send."""

    model: str
    headers: dict[str, str]


class ChatService:
    def __init__(self, store: Store, deployer: Deployer, limiter: RateLimiter | None) -> None:
        self.store, self.deployer, self.limiter = store, deployer, limiter

    @property
    def engine(self) -> Engine:
        return self.deployer.engine

    def admit(self, name: str, messages: Messages, params: SamplingParams, project: str | None = None) -> Admitted:
        """Resolve ``name`` (a deployment or a model id, loaded if needed: blocking) and count the
        request against its deployment's rate limit when limits are on.

        With ``project``, only that project's deployments and models (and the shared base models)
        are found: another project's are as absent as names that never existed.

        Raises:
            DeploymentNotFound, DeploymentFailed: from ``Deployer.resolve``.
            RateLimitExceeded: over the deployment's capacity; nothing was counted.
        """
        if project is not None:
            self._check_visible(name, project)
        model = self.deployer.resolve(name)
        return Admitted(model, self._rate_limit(name, model, messages, params))

    def generate(self, model: str, messages: Messages, params: SamplingParams) -> tuple[list[Completion], int]:
        """``params.n`` completions and the prompt's token count (blocking)."""
        return self.engine.generate(model, messages, params)

    def stream(self, model: str, messages: Messages, params: SamplingParams) -> tuple[int, Iterator[str | Completion]]:
        """The prompt's token count, and the answer as text deltas then one final ``Completion``."""
        return self.engine.prompt_tokens(model, messages), self.engine.stream(model, messages, params)

    def _check_visible(self, name: str, project: str) -> None:
        deployment = self.store.get(DeploymentRow, name)
        if deployment is not None:
            if deployment.project_id != project:
                raise DeploymentNotFound(name)
            return
        model = self.store.get(ModelRow, name)
        if model is not None and model.project_id not in (None, project):
            raise DeploymentNotFound(name)

    def _rate_limit(self, name: str, model: str, messages: Messages, params: SamplingParams) -> dict[str, str]:
        if self.limiter is None:
            return {}
        deployment = self.store.get(DeploymentRow, name)
        if deployment is None:  # a model called by its id: no deployment, no quota
            return {}
        capacity = int((deployment.sku or {}).get("capacity") or 1)
        tokens = self.engine.prompt_tokens(model, messages) + (params.max_tokens or 0) * params.n
        decision = self.limiter.take(name, capacity, tokens)
        if not decision.allowed:
            raise RateLimitExceeded(name, capacity, decision)
        return decision.headers()
