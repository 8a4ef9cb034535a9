"""Iteration-level (continuous) batching of one loaded model: the built-in engine's decode loop.

One thread per base model owns the model and one batch KV cache (a transformers ``DynamicCache``,
left-aligned: every row's newest token is in the same column, shorter histories are left-padded
and masked out). Each iteration:

1. runs pending calls (adapter loads and unloads happen here, between steps), drops cancelled rows;
2. admits waiting rows while the KV-cache budget holds them: short prompts are prefilled together
   as one left-padded batch, a long prompt in chunks over several iterations (so that it does not
   stall every other stream), each row with its own adapter; each newcomer's first token is
   sampled and its cache merged into the batch cache;
3. decodes one token for every row: per-row positions, a 2-D attention mask, and PEFT's
   ``adapter_names`` so that rows of different adapters share the step;
4. samples per row (greedy, or temperature + top-p with the row's own ``torch.Generator`` when
   seeded, so a seed never touches the global RNG or another row) and ends rows at once on EOS,
   a stop string or ``max_tokens``; their cache rows leave in the same step.

Why not transformers' ``ContinuousBatchingManager``: it packs requests into one varlen row, so PEFT
cannot route adapters per request, and it has no per-request seed or stop strings; its greedy
output also differed from ``generate`` in fp32 (docs/serving.md has the measurements).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.serving.generation import Completion, FinishReason

log = logging.getLogger("tunelab.serving")

BASE = "__base__"
"""PEFT's ``adapter_names`` entry for a row without an adapter."""

_STEP = threading.Lock()
"""One model step at a time in this process: two bases stepping at once would run two OpenMP
teams on the same cores, which is much slower than taking turns (docs/serving.md)."""


@dataclass(eq=False)
class Row:
    """One sequence being generated. ``cancel()`` may be called from any thread."""

    prompt: list[int]
    max_tokens: int
    on_done: Callable[[Completion | None, BaseException | None], None]
    """Called once on the loop thread: the completion, or the error that ended the row."""
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    adapter: str | None = None
    generator: torch.Generator | None = None
    on_delta: Callable[[str], None] | None = None
    """Streaming: new text, on the loop thread (text that might begin a stop string is held back)."""
    cancelled: bool = False
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    _prefix: int = 0  # incremental detokenization: tokens[_prefix:_read] are already text
    _read: int = 0
    _sent: int = 0  # characters of ``text`` streamed

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def projected(self) -> int:
        """Tokens this row holds in the cache at most: its prompt and every token it may generate."""
        return len(self.prompt) + self.max_tokens


@dataclass
class _Prefill:
    """A long prompt being prefilled chunk by chunk in its own cache."""

    row: Row
    cache: Any
    done: int = 0


class Scheduler:
    """The decode loop of one model (module docstring). Thread-safe: ``submit``, ``call``, ``close``.

    Args:
        model: a causal LM, or a PeftModel wrapping one (in eval mode).
        eos: token ids that end an answer.
        kv_bytes_per_token: cache bytes one token of one row takes (every layer's keys and values).
        kv_budget: bytes the batch cache may grow to: the batch limit. A row alone is always admitted.
        max_batch: an upper bound on rows decoded together (None: the budget alone decides).
        prefill_chunk: prompt tokens prefilled per iteration (longer prompts are chunked).
        nice: niceness the decode thread adds to its own (Linux: per thread; the OpenMP team it
            starts inherits it), so that the server's other threads go first on a busy CPU.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        eos: set[int],
        *,
        kv_bytes_per_token: int,
        kv_budget: int,
        max_batch: int | None = None,
        prefill_chunk: int = 512,
        name: str = "model",
        nice: int = 0,
    ) -> None:
        self.model, self.tokenizer, self.eos = model, tokenizer, frozenset(eos)
        self.kv_bytes_per_token, self.kv_budget = kv_bytes_per_token, kv_budget
        self.max_batch, self.prefill_chunk, self.nice = max_batch, prefill_chunk, nice
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
        self.device = next(model.parameters()).device
        # statistics: what batching achieved
        self.steps = 0
        self.batch_sizes: Counter[int] = Counter()  # rows in a decode step -> steps
        self.joined_running = 0  # rows merged into a batch that was already decoding
        self.generated = 0  # tokens
        # state, owned by the loop thread
        self.rows: list[Row] = []
        self.cache: Any = None  # DynamicCache, per layer (B, kv_heads, L, head_dim)
        self.mask: torch.Tensor | None = None  # (B, L) long, 1 = a real token in the cache
        self.last: torch.Tensor | None = None  # (B,) each row's newest token, not yet in the cache
        self.prefilling: _Prefill | None = None
        self._waiting: deque[Row] = deque()
        self._calls: deque[tuple[Callable[[], Any], Future]] = deque()
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"decode-{name}", daemon=True)
        self._thread.start()

    # -- any thread -------------------------------------------------------------------------------
    def submit(self, row: Row) -> None:
        with self._cv:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._waiting.append(row)
            self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the loop thread between two steps (e.g. change the model's adapters)."""
        future: Future = Future()
        with self._cv:
            if self._closed:
                raise RuntimeError("the model was unloaded")
            self._calls.append((fn, future))
            self._cv.notify()
        return future

    def counts(self) -> tuple[int, int]:
        """(rows decoding or prefilling, rows waiting)."""
        with self._cv:
            return len(self.rows) + (self.prefilling is not None), len(self._waiting)

    def uses(self, adapter: str) -> bool:
        """Whether a row running or waiting uses ``adapter``."""
        with self._cv:
            rows = [*self.rows, *self._waiting, *([self.prefilling.row] if self.prefilling else [])]
        return any(r.adapter == adapter and not r.cancelled for r in rows)

    def close(self, timeout: float = 30) -> None:
        """Stop the loop; rows still held end with an error."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the loop ---------------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        if self.nice and sys.platform == "linux":  # before this thread's first op starts its OpenMP team
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), os.nice(0) + self.nice)
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._waiting or self._calls or self.rows or self.prefilling or self._closed)
                if self._closed:
                    break
                calls = list(self._calls)
                self._calls.clear()
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 -- the caller gets it
                    future.set_exception(exc)
            new: list[Row] = []
            try:
                with torch.inference_mode(), _STEP:
                    self._drop([i for i, r in enumerate(self.rows) if r.cancelled])
                    if self.prefilling is not None and self.prefilling.row.cancelled:
                        self.prefilling = None
                    new = self._take_newcomers()
                    if new:
                        self._admit(new)
                    if self.prefilling is not None:
                        self._prefill_chunk()
                    if self.rows:
                        self._decode()
            except Exception as exc:  # one bad step fails the rows it held; the loop keeps serving
                log.exception("decode step failed")
                held = {id(r): r for r in [*self.rows, *new, *([self.prefilling.row] if self.prefilling else [])]}
                self.rows, self.cache, self.mask, self.last, self.prefilling = [], None, None, None, None
                for r in held.values():
                    r.on_done(None, exc)
        error = RuntimeError("the model was unloaded")
        for r in [*self.rows, *self._waiting, *([self.prefilling.row] if self.prefilling else [])]:
            r.on_done(None, error)
        for _, future in self._calls:
            future.set_exception(error)
        self.rows, self.cache, self.mask, self.last, self.prefilling = [], None, None, None, None

    def _fits(self, rows: list[Row]) -> bool:
        if self.max_batch is not None and len(rows) > self.max_batch:
            return False
        return len(rows) * max(r.projected for r in rows) * self.kv_bytes_per_token <= self.kv_budget

    def _take_newcomers(self) -> list[Row]:
        """Waiting rows that start this iteration: as many short ones as the budget and one prefill
        chunk hold; a long prompt becomes ``self.prefilling`` (one at a time)."""
        held = [*self.rows, *([self.prefilling.row] if self.prefilling else [])]
        picked: list[Row] = []
        with self._cv:
            while self._waiting:
                r = self._waiting[0]
                if r.cancelled:
                    self._waiting.popleft()
                    continue
                if held + picked and not self._fits([*held, *picked, r]):
                    break
                if len(r.prompt) > self.prefill_chunk:
                    if self.prefilling is None and not picked:
                        from transformers import DynamicCache

                        self.prefilling = _Prefill(self._waiting.popleft(), DynamicCache())
                    break
                width = max(len(x.prompt) for x in [*picked, r])
                if picked and width * (len(picked) + 1) > self.prefill_chunk:
                    break
                picked.append(self._waiting.popleft())
        return picked

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, rows: list[Row]) -> Any:
        kwargs: dict[str, Any] = {}
        if hasattr(self.model, "peft_config"):
            kwargs["adapter_names"] = [r.adapter or BASE for r in rows]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
            **kwargs,
        )
        return out.logits[:, -1, :].float(), out.cache  # (B, V)

    def _admit(self, new: list[Row]) -> None:
        """Prefill newcomers as one left-padded batch, sample their first token, merge their cache."""
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in new)
        ids = torch.full((len(new), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, pos, DynamicCache(), new)
        self._join(new, cache, mask, self._pick(logits, new))

    def _prefill_chunk(self) -> None:
        p = self.prefilling
        assert p is not None
        end = min(p.done + self.prefill_chunk, len(p.row.prompt))
        ids = torch.tensor([p.row.prompt[p.done : end]], device=self.device)
        mask = torch.ones((1, end), dtype=torch.long, device=self.device)
        pos = torch.arange(p.done, end, device=self.device)[None]
        logits, p.cache = self._forward(ids, mask, pos, p.cache, [p.row])
        p.done = end
        if end == len(p.row.prompt):
            self.prefilling = None
            self._join([p.row], p.cache, mask, self._pick(logits, [p.row]))

    def _join(self, new: list[Row], cache: Any, mask: torch.Tensor, first: torch.Tensor) -> None:
        """Merge newcomers (their cache, mask and first token) into the batch, then record their token."""
        if self.cache is None:
            self.rows, self.cache, self.mask, self.last = list(new), cache, mask, first
        else:
            assert self.mask is not None and self.last is not None
            self.joined_running += len(new)
            old_w, new_w = self.mask.shape[1], mask.shape[1]
            width = max(old_w, new_w)
            for old_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
                for attr in ("keys", "values"):  # left-pad the sequence dim (-2) of the shorter side
                    a = F.pad(getattr(old_layer, attr), (0, 0, width - old_w, 0))
                    b = F.pad(getattr(new_layer, attr), (0, 0, width - new_w, 0))
                    setattr(old_layer, attr, torch.cat([a, b]))
            self.mask = torch.cat([F.pad(self.mask, (width - old_w, 0)), F.pad(mask, (width - new_w, 0))])
            self.rows += new
            self.last = torch.cat([self.last, first])
        n = len(self.rows)
        self._after_step(list(range(n - len(new), n)), first)

    def _decode(self) -> None:
        assert self.mask is not None and self.last is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        pos = self.mask.sum(-1, keepdim=True) - 1  # each row's own position, whatever its padding
        logits, self.cache = self._forward(self.last[:, None], self.mask, pos, self.cache, self.rows)
        self.last = self._pick(logits, self.rows)
        self.steps += 1
        self.batch_sizes[len(self.rows)] += 1
        self._after_step(list(range(len(self.rows))), self.last)

    def _pick(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Next token per row (B,): argmax for greedy rows; temperature, top-p and a draw for the others."""
        out = logits.argmax(-1)
        hot = [i for i, r in enumerate(rows) if r.temperature > 0]
        if hot:
            sub = logits[hot] / torch.tensor([rows[i].temperature for i in hot], device=logits.device)[:, None]
            top_p = torch.tensor([rows[i].top_p for i in hot], device=logits.device)
            ordered, order = sub.sort(-1)  # ascending
            drop = ordered.softmax(-1).cumsum(-1) <= (1 - top_p)[:, None]
            drop[:, -1] = False  # the most likely token always stays
            sub = sub.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
            probs = sub.softmax(-1)
            for j, i in enumerate(hot):  # the row's own generator: its own stream of draws
                out[i] = torch.multinomial(probs[j], 1, generator=rows[i].generator)[0]
        return out

    def _after_step(self, idx: list[int], tokens: torch.Tensor) -> None:
        ended = []
        for i, t in zip(idx, tokens.tolist(), strict=True):
            r = self.rows[i]
            r.tokens.append(t)
            self.generated += 1
            reason: FinishReason | None = None
            if t in self.eos:
                reason = "stop"
            else:
                if self._detokenize(r):
                    reason = "stop"
                elif len(r.tokens) >= r.max_tokens:
                    reason = "length"
            if r.on_delta is not None:
                self._stream(r, final=reason is not None)
            if reason is not None:
                ended.append(i)
                r.on_done(Completion(text=r.text, finish_reason=reason, tokens=len(r.tokens)), None)
        self._drop(ended)

    def _detokenize(self, r: Row) -> bool:
        """Extend ``r.text`` with the newest token's text (incrementally, not the whole answer each
        step); True when that completed a stop string (the text is cut before it)."""
        before = self.tokenizer.decode(r.tokens[r._prefix : r._read], skip_special_tokens=True)
        now = self.tokenizer.decode(r.tokens[r._prefix :], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):  # nothing new yet, or half a character
            return False
        old = len(r.text)
        r.text += now[len(before) :]
        r._prefix, r._read = r._read, len(r.tokens)
        if not r.stop:
            return False
        start = max(0, old - max(len(s) for s in r.stop) + 1)
        cuts = [p for p in (r.text.find(s, start) for s in r.stop if s) if p >= 0]
        if cuts:
            r.text = r.text[: min(cuts)]
            return True
        return False

    def _stream(self, r: Row, final: bool) -> None:
        assert r.on_delta is not None
        end = len(r.text)
        if not final and r.stop:  # hold back a tail that may still become a stop string
            tail = r.text[r._sent :]
            end -= max((k for s in r.stop for k in range(1, len(s)) if tail.endswith(s[:k])), default=0)
        if end > r._sent:
            r.on_delta(r.text[r._sent : end])
            r._sent = end

    def _drop(self, idx: list[int]) -> None:
        """Remove rows ``idx`` from the batch (cache rows included) and crop columns that are padding in every row."""
        if not idx:
            return
        gone = set(idx)
        keep = [i for i in range(len(self.rows)) if i not in gone]
        if not keep:
            self.rows, self.cache, self.mask, self.last = [], None, None, None
            if not self._waiting and self.prefilling is None:
                _return_free_memory()
            return
        assert self.mask is not None and self.last is not None
        k = torch.tensor(keep, device=self.device)
        self.cache.batch_select_indices(k)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.last = self.mask[k], self.last[k]
        lead = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading all-pad columns
        if lead:
            self.mask = self.mask[:, lead:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, lead:], layer.values[:, :, lead:]


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _return_free_memory() -> None:
    """Hand the heap that a drained batch freed back to the OS (glibc keeps it otherwise: the
    serving process stayed ~200 MiB above its warm size after a load run, docs/serving.md)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):  # glibc's; musl has none
        _LIBC.malloc_trim(0)
