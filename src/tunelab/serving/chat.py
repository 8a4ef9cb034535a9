"""Chat generation behind the API: which model a name means, its rate limit, then the engine.

The API route turns a request into ``(name, messages, SamplingParams)`` and awaits
``ChatService.start``: it admits the request (bounded: at most ``max_pending`` generations at once,
else ``ServerBusy`` → 429 with retry-after), resolves the model and its rate limit, and starts the
engine; it returns a ``Generation`` the route reads with ``async for`` and cancels when its client
goes away. The blocking parts (database reads, loading a model, tokenizing) run on this service's
own small thread pool, never on the event loop nor on the thread pool that FastAPI's synchronous
routes and dependencies share, so files, jobs, models, deployments and health never wait behind
generation. Everything here raises domain errors (``DeploymentNotFound``, ``DeploymentFailed``,
``PromptTooLong``, ``RateLimitExceeded``, ``ServerBusy``, ``EngineUnavailable``); api/errors.py
maps them to HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from tunelab.serving.deployer import Deployer, DeploymentNotFound
from tunelab.serving.generation import DEFAULT_MAX_TOKENS, Generation, SamplingParams, ServingEngine
from tunelab.serving.ratelimit import RateLimiter, RateLimitExceeded
from tunelab.store import Store
from tunelab.store.tables import DeploymentRow, ModelRow

Messages = list[dict[str, str]]
log = logging.getLogger("tunelab.serving")


@dataclass(frozen=True)
class Admitted:
    """A request that may run: the model to generate with and the rate-limit headers to send."""

    model: str
    headers: dict[str, str]


@dataclass(frozen=True)
class ChatLimits:
    default_max_tokens: int = DEFAULT_MAX_TOKENS
    """Answer tokens when a request names none (TUNELAB_DEFAULT_MAX_TOKENS)."""
    max_pending: int = 128
    """Generations admitted at once, running or queued in the engine (TUNELAB_MAX_PENDING_CHATS)."""
    admission_threads: int = 4
    """Threads that resolve models, load them and tokenize prompts."""


class ServerBusy(Exception):
    """Every generation slot is taken (or the server is shutting down); retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ChatService:
    def __init__(
        self, store: Store, deployer: Deployer, limiter: RateLimiter | None, limits: ChatLimits | None = None
    ) -> None:
        self.store, self.deployer, self.limiter = store, deployer, limiter
        self.limits = limits or ChatLimits()
        self._executor = ThreadPoolExecutor(self.limits.admission_threads, thread_name_prefix="chat-admit")
        self._lock = threading.Lock()
        self._pending = 0
        self._running: set[Generation] = set()
        self._closing = False

    @property
    def engine(self) -> ServingEngine:
        return self.deployer.engine

    @property
    def pending(self) -> int:
        """Generations admitted and not finished."""
        return self._pending

    async def start(
        self, name: str, messages: Messages, params: SamplingParams, *, stream: bool = False, project: str | None = None
    ) -> tuple[Admitted, Generation]:
        """Admit and start a generation; returns once the engine has it (not when it is done).

        Raises:
            ServerBusy: ``max_pending`` generations are running or waiting; nothing was counted.
            and what ``admit`` and the engine's ``start`` raise.
        """
        self._reserve()
        future = self._executor.submit(self._admit_and_start, name, messages, params, stream, project)
        future.add_done_callback(self._release_unstarted)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the client left while we were admitting it
            future.add_done_callback(_cancel_started)
            raise

    def admit(self, name: str, messages: Messages, params: SamplingParams, project: str | None = None) -> Admitted:
        """Resolve ``name`` (a deployment or a model id, loaded if needed: blocking) and count the
        request against its deployment's rate limit when limits are on.

        With ``project``, only that project's deployments and models (and the shared base models)
        are found: another project's are as absent as names that never existed.

        Raises:
            DeploymentNotFound, DeploymentFailed: from ``Deployer.resolve``.
            EngineUnavailable: the model's engine is still starting.
            RateLimitExceeded: over the deployment's capacity; nothing was counted.
        """
        if project is not None:
            self._check_visible(name, project)
        model = self.deployer.resolve(name, wait=False)
        return Admitted(model, self._rate_limit(name, model, messages, params))

    def close(self, grace: float) -> None:
        """Stop admitting; let running generations finish for up to ``grace`` seconds, cancel the
        rest, then stop the engine (its child processes included)."""
        with self._lock:
            self._closing = True
        deadline = time.monotonic() + grace
        while self._pending and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            left = list(self._running)
        if left:
            log.info("cancelling %d generations still running after %.0f s", len(left), grace)
        for generation in left:
            generation.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    # -- internals --------------------------------------------------------------------------------
    def _reserve(self) -> None:
        with self._lock:
            if self._closing:
                raise ServerBusy("The server is shutting down; retry on another instance.", retry_after=5)
            if self._pending >= self.limits.max_pending:
                raise ServerBusy(
                    f"The server is busy: {self._pending} chat completions are running or queued "
                    f"(TUNELAB_MAX_PENDING_CHATS={self.limits.max_pending}). Please retry after 1 second."
                )
            self._pending += 1

    def _release(self, generation: Generation | None = None) -> None:
        with self._lock:
            self._pending -= 1
            if generation is not None:
                self._running.discard(generation)

    def _release_unstarted(self, future: Future) -> None:
        if future.cancelled():  # never ran: its slot was never handed to a generation
            self._release()

    def _admit_and_start(
        self, name: str, messages: Messages, params: SamplingParams, stream: bool, project: str | None
    ) -> tuple[Admitted, Generation]:
        try:
            admitted = self.admit(name, messages, params, project)
            generation = self.engine.start(admitted.model, messages, self._defaults(params), stream=stream)
        except BaseException:
            self._release()
            raise
        with self._lock:
            self._running.add(generation)
        generation.on_end(self._release)
        return admitted, generation

    def _defaults(self, params: SamplingParams) -> SamplingParams:
        if params.max_tokens is not None:
            return params
        return replace(params, max_tokens=self.limits.default_max_tokens)

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


def _cancel_started(future: Future) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result()[1].cancel()
