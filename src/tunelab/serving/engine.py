"""The built-in engine: transformers + PEFT in tunelab's own process, with continuous batching.

Many fine-tuned LoRA adapters share one copy of their base model in memory: each base is loaded
once (wrapped in a ``PeftModel`` holding every adapter deployed on it) and decoded by one
``Scheduler`` (scheduler.py): a request joins the running batch at the next step, leaves it the
step it ends, and every row keeps its own adapter, sampling parameters, seed and stop strings.
Full fine-tunes are models of their own. The batch limit is the KV-cache memory budget, not a
count. The engine loads artefacts only (HF folders, PEFT adapter folders), never the trainer.

The seam's types (``SamplingParams``, ``Completion``, ``PromptTooLong``, ``Generation``) live in
generation.py and are re-exported here.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.models.catalog import ModelSource
from tunelab.models.folder import context_length, eos_ids, resolve_device
from tunelab.serving.generation import (
    DEFAULT_MAX_TOKENS,
    Completion,
    Delta,
    EngineListener,
    EngineUsage,
    FinishReason,
    Generation,
    PromptTooLong,
    SamplingParams,
)
from tunelab.serving.scheduler import Row, Scheduler

__all__ = ["Completion", "Engine", "FinishReason", "Generation", "PromptTooLong", "SamplingParams"]

log = logging.getLogger("tunelab.serving")

DEFAULT_CONTEXT = 2048
"""For a model whose config names no context length."""
KV_SHARE_CPU = 0.2
"""Default KV-cache budget per base on a CPU: this share of the memory available when it loads."""
KV_SHARE_CUDA = 0.5
"""... on a GPU: this share of the device memory free after its weights are loaded."""
MIN_KV_BYTES = 256 * 1024**2


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    scheduler: Scheduler
    context: int
    """Tokens of prompt and answer together."""
    dtype: torch.dtype
    kv_budget: int
    users: dict[str, str | None] = field(default_factory=dict)  # model id -> adapter name
    retiring: set[str] = field(default_factory=set)  # unloaded adapters still used by a running row
    tokenize: threading.Lock = field(default_factory=threading.Lock)  # fast tokenizers are not re-entrant


class Engine:
    """The built-in engine (module docstring); implements generation.ServingEngine.

    Args:
        device: "auto", "cpu", "cuda" or "cuda:N".
        max_batch: an upper bound on rows decoded together per base; None: the KV budget decides.
        dtype: "auto" (bf16 on CUDA and on CPUs with native bf16, else fp32), "float32", "bfloat16".
        kv_cache_bytes: the KV-cache budget per base; None: a share of free memory (above).
        default_max_tokens: answer tokens when a request names none.
        decode_nice: niceness added to each decode thread (Linux), below the API's threads.
    """

    name = "builtin"

    def __init__(
        self,
        device: str = "auto",
        max_batch: int | None = None,
        *,
        dtype: str = "auto",
        kv_cache_bytes: int | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
        prefill_chunk: int = 512,
        decode_nice: int = 0,
    ) -> None:
        self.device = resolve_device(device)
        self.decode_nice = decode_nice
        self.max_batch, self.kv_cache_bytes = max_batch, kv_cache_bytes
        self.dtype = serving_dtype(self.device, dtype)
        self.default_max_tokens, self.prefill_chunk = default_max_tokens, prefill_chunk
        self._bases: dict[Path, _Loaded] = {}
        self._where: dict[str, Path] = {}  # model id -> key into _bases
        self._lock = threading.Lock()
        self._names = itertools.count()

    # -- models -----------------------------------------------------------------------------------
    def load(self, spec: ModelSource, *, wait: bool = True) -> None:
        """Load ``spec`` (idempotent). Blocking, whatever ``wait`` says: seconds for small models."""
        with self._lock:
            if spec.model_id in self._where:
                return
            loaded = self._bases.get(spec.model_dir) or self._load_base(spec.model_dir)
            self._bases[spec.model_dir] = loaded
            adapter = None
            if spec.adapter_dir is not None:
                adapter = f"a{next(self._names)}"
                folder = spec.adapter_dir

                def add() -> None:  # on the decode thread, between two steps
                    loaded.model = loaded.scheduler.model = _add_adapter(loaded.model, folder, adapter)

                loaded.scheduler.call(add).result()
            loaded.users[spec.model_id] = adapter
            self._where[spec.model_id] = spec.model_dir

    def unload(self, model_id: str) -> None:
        """Forget ``model_id``; the base leaves memory with its last user (rows still on it end
        with an error); an adapter leaves once no running row uses it."""
        with self._lock:
            key = self._where.pop(model_id, None)
            if key is None:
                return
            loaded = self._bases[key]
            adapter = loaded.users.pop(model_id)
            if not loaded.users:
                del self._bases[key]
                loaded.scheduler.close()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                return
            if adapter is not None:
                loaded.retiring.add(adapter)
        self._retire(loaded)

    def loaded(self, model_id: str) -> bool:
        with self._lock:
            return model_id in self._where

    def batch_sizes(self, model_id: str) -> dict[int, int]:
        """Decode steps run so far on ``model_id``'s base: {rows in the step: steps}."""
        loaded, _ = self._get(model_id)
        return dict(loaded.scheduler.batch_sizes)

    def scheduler(self, model_id: str) -> Scheduler:
        return self._get(model_id)[0].scheduler

    # -- generation -------------------------------------------------------------------------------
    def prompt_tokens(self, model_id: str, messages: list[dict]) -> int:
        loaded, _ = self._get(model_id)
        return len(self._prompt(loaded, messages))

    def start(self, model_id: str, messages: list[dict], params: SamplingParams, *, stream: bool = False) -> Generation:
        """Queue ``params.n`` rows for the prompt (returns at once); see generation.Generation."""
        loaded, adapter = self._get(model_id)
        prompt = self._prompt(loaded, messages)
        room = self._room(loaded, len(prompt))
        max_tokens = min(params.max_tokens or self.default_max_tokens, room)
        generation = Generation(params.n, len(prompt))
        rows = []
        for i in range(params.n):
            generator = None
            if params.seed is not None and params.temperature > 0:  # choice i draws from seed + i
                generator = torch.Generator(self.device).manual_seed(params.seed + i)
            rows.append(
                Row(
                    prompt=prompt,
                    max_tokens=max_tokens,
                    on_done=functools.partial(self._row_done, loaded, generation, i),
                    temperature=params.temperature,
                    top_p=params.top_p,
                    stop=tuple(s for s in params.stop if s),
                    adapter=adapter,
                    generator=generator,
                    on_delta=functools.partial(generation.delta, i) if stream else None,
                )
            )

        def cancel() -> None:
            for row in rows:
                row.cancel()

        generation.on_cancel(cancel)
        for row in rows:
            loaded.scheduler.submit(row)
        return generation

    def generate(self, model_id: str, messages: list[dict], params: SamplingParams) -> tuple[list[Completion], int]:
        """Return ``params.n`` completions and the prompt's token count (blocking)."""
        generation = self.start(model_id, messages, params)
        return generation.result(), generation.prompt_tokens

    def stream(self, model_id: str, messages: list[dict], params: SamplingParams) -> Iterator[str | Completion]:
        """Yield text deltas, then one final ``Completion`` for the whole answer (n is 1); blocking."""
        generation = self.start(model_id, messages, params, stream=True)
        try:
            for event in generation:
                yield event.text if isinstance(event, Delta) else event.completion
        finally:
            generation.cancel()  # the caller stopped reading: free the row

    def usage(self) -> EngineUsage:
        with self._lock:
            bases = list(self._bases.items())
            models = sorted(self._where)
        details = {}
        running = waiting = 0
        for path, loaded in bases:
            r, w = loaded.scheduler.counts()
            running, waiting = running + r, waiting + w
            details[path.name] = {
                "dtype": str(loaded.dtype).removeprefix("torch."),
                "kv_budget_bytes": loaded.kv_budget,
                "decode_steps": loaded.scheduler.steps,
                "generated_tokens": loaded.scheduler.generated,
            }
        return EngineUsage(self.name, models, running, waiting, details)

    def watch(self, listener: EngineListener) -> None:
        """Nothing to report: the built-in engine has no processes of its own."""

    def close(self) -> None:
        with self._lock:
            bases, self._bases, self._where = list(self._bases.values()), {}, {}
        for loaded in bases:
            loaded.scheduler.close()

    # -- internals --------------------------------------------------------------------------------
    def _get(self, model_id: str) -> tuple[_Loaded, str | None]:
        with self._lock:
            loaded = self._bases[self._where[model_id]]
            return loaded, loaded.users[model_id]

    def _load_base(self, model_dir: Path) -> _Loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype)
        model = model.to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        budget = self.kv_cache_bytes or _default_kv_budget(self.device)
        scheduler = Scheduler(
            model,
            AutoTokenizer.from_pretrained(model_dir),  # the decode thread's own: they are not re-entrant
            set(eos_ids(model.generation_config, tokenizer)),
            kv_bytes_per_token=kv_bytes_per_token(model.config, self.dtype),
            kv_budget=budget,
            max_batch=self.max_batch,
            prefill_chunk=self.prefill_chunk,
            name=model_dir.name,
            nice=self.decode_nice,
        )
        context = context_length(model_dir) or DEFAULT_CONTEXT
        log.info("serving %s on %s in %s, KV budget %.0f MiB", model_dir.name, self.device, self.dtype, budget / 2**20)
        return _Loaded(model, tokenizer, scheduler, context, self.dtype, budget)

    def _row_done(
        self, loaded: _Loaded, generation: Generation, index: int, completion: Completion | None, error: Any
    ) -> None:
        if completion is None:
            generation.fail(error)
        else:
            generation.done(index, completion)
        if loaded.retiring:
            self._retire(loaded)

    def _retire(self, loaded: _Loaded) -> None:
        """Delete unloaded adapters that no row uses any more (on the decode thread)."""
        for adapter in list(loaded.retiring):
            if not loaded.scheduler.uses(adapter):
                loaded.retiring.discard(adapter)
                loaded.scheduler.call(functools.partial(_delete_adapter, loaded.model, adapter))

    def _prompt(self, loaded: _Loaded, messages: list[dict]) -> list[int]:
        with loaded.tokenize:
            encoded = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])

    def _room(self, loaded: _Loaded, prompt_tokens: int) -> int:
        """Tokens left in the context after the prompt; PromptTooLong when none."""
        if prompt_tokens >= loaded.context:
            raise PromptTooLong(prompt_tokens, loaded.context)
        return loaded.context - prompt_tokens


def serving_dtype(device: torch.device, setting: str = "auto") -> torch.dtype:
    """bf16 on CUDA and on CPUs with native bf16 (AVX512-BF16 or AMX), else fp32.

    On an AVX2 CPU bf16 is emulated: measured 0.5x fp32 at batch 8 and 0.3x at 32 (docs/serving.md).
    """
    if setting != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@functools.cache
def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Cache bytes one token takes: keys and values of every layer."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * torch.finfo(dtype).bits // 8


def _default_kv_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(MIN_KV_BYTES, int(free * KV_SHARE_CUDA))
    return max(MIN_KV_BYTES, int(_available_memory() * KV_SHARE_CPU))


def _available_memory() -> int:
    """MemAvailable (Linux), else a quarter of physical memory."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def _delete_adapter(model: Any, name: str) -> None:
    with warnings.catch_warnings():  # rows name their adapter: which one PEFT calls "active" is moot
        warnings.filterwarnings("ignore", r"Adapter .* was active which is now deleted", UserWarning)
        model.delete_adapter(name)


def _add_adapter(model: Any, adapter_dir: Path, name: str) -> Any:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name)
        return model.eval()
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name).eval()
