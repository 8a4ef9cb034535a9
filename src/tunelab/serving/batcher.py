"""Dynamic batching: chat requests that wait for the same loaded model share one ``generate``.

A thread per loaded model takes the oldest waiting request and every other waiting request that
decodes the same way (greedy, or the same temperature/top_p; the same stop strings), up to
``max_batch``, and runs them as one left-padded batch; LoRA requests name their adapter per row,
so adapters of one base batch together. Requests that arrive while a batch runs wait for the
next one, so there is no timer and no added latency when the model is idle.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Request:
    prompt: list[int]
    adapter: str | None
    params: Any  # engine.SamplingParams
    future: Future = field(default_factory=Future)

    def key(self) -> tuple:
        """Requests with equal keys can share a ``generate`` call."""
        p = self.params
        decoding = ("greedy",) if p.temperature == 0 else ("sample", p.temperature, p.top_p)
        return (*decoding, tuple(p.stop))


class Batcher:
    def __init__(self, run: Callable[[list[Request]], None], max_batch: int, name: str) -> None:
        self._run, self.max_batch = run, max_batch
        self.sizes: Counter[int] = Counter()  # batch size -> batches run: what batching achieved
        self._waiting: list[Request] = []
        self._ready = threading.Condition()
        threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True).start()

    def submit(self, request: Request) -> Future:
        with self._ready:
            self._waiting.append(request)
            self._ready.notify()
        return request.future

    def _next_batch(self) -> list[Request]:
        with self._ready:
            self._ready.wait_for(lambda: self._waiting)
            key = self._waiting[0].key()
            batch = [r for r in self._waiting if r.key() == key][: self.max_batch]
            taken = {id(r) for r in batch}
            self._waiting = [r for r in self._waiting if id(r) not in taken]
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            self.sizes[len(batch)] += 1
            try:
                self._run(batch)
            except BaseException as exc:  # noqa: BLE001 -- every waiting caller gets the error
                for r in batch:
                    if not r.future.done():
                        r.future.set_exception(exc)
