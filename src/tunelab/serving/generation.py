"""The engine seam: what every serving engine takes and gives.

An engine (the built-in one in engine.py, vLLM in vllm_engine.py) loads a base model and adds or
removes adapters on it (``load``/``unload`` of a ``ModelSource``), starts a generation
(``start`` → a ``Generation``: text deltas, then a ``Completion`` per choice; ``cancel`` stops it
at the engine's next step), and reports what it holds (``usage``). Everything around it (which
model a name means, rate limits, usage counting, auth, the wire format) is tunelab's, in chat.py
and api/.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from tunelab.models.catalog import ModelSource

DEFAULT_MAX_TOKENS = 1024
"""Tokens an answer may have when the request names no ``max_tokens`` (TUNELAB_DEFAULT_MAX_TOKENS)."""


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    """None: the engine's default (``DEFAULT_MAX_TOKENS``), never more than the context leaves."""
    temperature: float = 1.0
    """0 is greedy decoding."""
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    n: int = 1


FinishReason = Literal["stop", "length"]


@dataclass
class Completion:
    text: str
    finish_reason: FinishReason
    tokens: int


class PromptTooLong(ValueError):
    def __init__(self, tokens: int, context: int) -> None:
        super().__init__(f"the prompt has {tokens} tokens; this model's context is {context} tokens")


class EngineUnavailable(RuntimeError):
    """The model's engine cannot take requests now (starting, restarting); retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class GenerationRejected(ValueError):
    """The engine refused the request as invalid (vLLM's 4xx); the message is the engine's."""


class Cancelled(Exception):
    """The generation was cancelled before it finished."""


@dataclass(frozen=True)
class Delta:
    """New text of choice ``index`` (streamed generations only)."""

    index: int
    text: str


@dataclass(frozen=True)
class Done:
    """Choice ``index`` is finished."""

    index: int
    completion: Completion


Event = Delta | Done


class Generation:
    """One request's answer while it is made, shared by the engine (producer) and the caller.

    The engine calls ``delta``/``done``/``fail`` from any thread; the caller reads the events by
    iterating (blocking) or with ``async for`` (an asyncio task), or waits for every choice with
    ``result()``/``await wait()``. ``cancel()`` (any thread, idempotent) asks the engine to stop:
    its rows leave at the next decode step, and readers get ``Cancelled``.
    """

    def __init__(self, n: int, prompt_tokens: int) -> None:
        self.n = n
        self.prompt_tokens = prompt_tokens
        """The prompt's tokens as the engine counted them (final once the generation ends)."""
        self.completions: list[Completion | None] = [None] * n
        self.error: BaseException | None = None
        self.cancelled = False
        self._events: deque[Event] = deque()
        self._cond = threading.Condition()
        self._wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._on_cancel: list[Callable[[], object]] = []
        self._on_end: list[Callable[[Generation], None]] = []
        self._ended = False

    # -- the engine's side ---------------------------------------------------------------------
    def on_cancel(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` when the caller cancels (at once if it already has)."""
        with self._cond:
            if not self.cancelled:
                self._on_cancel.append(fn)
                return
        fn()

    def delta(self, index: int, text: str) -> None:
        if text:
            self._push(Delta(index, text))

    def done(self, index: int, completion: Completion) -> None:
        with self._cond:
            if self._ended:
                return
            self.completions[index] = completion
        self._push(Done(index, completion))
        if all(c is not None for c in self.completions):
            self._end()

    def fail(self, error: BaseException) -> None:
        with self._cond:
            if self._ended:
                return
            self.error = error
        self._end()

    # -- the caller's side ---------------------------------------------------------------------
    def cancel(self) -> None:
        with self._cond:
            if self._ended or self.cancelled:
                return
            self.cancelled = True
            callbacks, self._on_cancel = self._on_cancel, []
        for fn in callbacks:
            fn()
        self._end()

    @property
    def finished(self) -> bool:
        return self._ended

    def on_end(self, fn: Callable[[Generation], None]) -> None:
        """Run ``fn(self)`` once, when every choice is done, or on failure or cancel."""
        with self._cond:
            if not self._ended:
                self._on_end.append(fn)
                return
        fn(self)

    def __iter__(self) -> Iterator[Event]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._events or self._ended)
                events, ended = list(self._events), self._ended
                self._events.clear()
            yield from events
            if ended and not events:
                self._raise_if_failed()
                return

    async def __aiter__(self) -> AsyncIterator[Event]:
        waker = (asyncio.get_running_loop(), asyncio.Event())
        with self._cond:
            self._wakers.append(waker)
        try:
            while True:
                waker[1].clear()
                with self._cond:
                    events, ended = list(self._events), self._ended
                    self._events.clear()
                for event in events:
                    yield event
                if ended and not events:
                    self._raise_if_failed()
                    return
                if not events:
                    await waker[1].wait()
        finally:
            with self._cond:
                self._wakers.remove(waker)

    def result(self, timeout: float | None = None) -> list[Completion]:
        """Every choice's completion (blocking).

        Raises:
            Cancelled, or the engine's error.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._ended, timeout):
                raise TimeoutError("the generation did not finish in time")
        self._raise_if_failed()
        return [c for c in self.completions if c is not None]

    async def wait(self) -> list[Completion]:
        async for _ in self:
            pass
        return [c for c in self.completions if c is not None]

    # -- internals -----------------------------------------------------------------------------
    def _push(self, event: Event) -> None:
        with self._cond:
            if self._ended:
                return
            self._events.append(event)
            self._cond.notify_all()
            wakers = list(self._wakers)
        _wake(wakers)

    def _end(self) -> None:
        with self._cond:
            if self._ended:
                return
            self._ended = True
            self._cond.notify_all()
            wakers, callbacks = list(self._wakers), self._on_end
            self._on_end = []
        _wake(wakers)
        for fn in callbacks:
            fn(self)

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error
        if self.cancelled:
            raise Cancelled()


def _wake(wakers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]) -> None:
    for loop, wake in wakers:
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(wake.set)


@dataclass(frozen=True)
class EngineUsage:
    """What an engine holds and does now (``GET /health`` style reporting, benchmarks, tests)."""

    engine: str
    models: list[str]
    running: int
    """Rows (built-in) or requests (vLLM) being decoded."""
    waiting: int
    details: dict[str, Any] = field(default_factory=dict)


EngineListener = Callable[[list[str], str, str | None], None]
"""``(model ids, state, message)``: state "restarting", "ready" or "failed" (vLLM's supervised processes)."""


class ServingEngine(Protocol):
    """What chat.py and the deployer need of an engine (engine.Engine, vllm_engine.VllmEngine)."""

    name: str

    def load(self, source: ModelSource, *, wait: bool = True) -> None:
        """Make ``source.model_id`` servable (idempotent, blocking). Raises on a model it cannot load.

        ``wait=False``: an engine whose start takes minutes (vLLM) starts it in the background and
        raises EngineUnavailable until it is ready; the built-in engine loads either way.
        """
        ...

    def unload(self, model_id: str) -> None:
        """Forget ``model_id``; a base leaves memory with its last user."""
        ...

    def loaded(self, model_id: str) -> bool: ...

    def prompt_tokens(self, model_id: str, messages: list[dict]) -> int: ...

    def start(self, model_id: str, messages: list[dict], params: SamplingParams, *, stream: bool = False) -> Generation:
        """Begin generating (returns at once). With ``stream``, the Generation carries text deltas.

        Raises:
            PromptTooLong, EngineUnavailable.
        """
        ...

    def generate(self, model_id: str, messages: list[dict], params: SamplingParams) -> tuple[list[Completion], int]:
        """``params.n`` completions and the prompt's token count (blocking)."""
        ...

    def usage(self) -> EngineUsage: ...

    def watch(self, listener: EngineListener) -> None: ...

    def close(self) -> None:
        """Cancel what runs and free everything (child processes included)."""
        ...
