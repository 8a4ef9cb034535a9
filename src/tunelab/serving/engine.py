"""The generation engine: loads served models and generates chat completions.

Many fine-tuned LoRA adapters share one copy of their base model in memory: each base is loaded
once and wrapped in a ``PeftModel`` holding every adapter deployed on it. Concurrent requests on
one base are batched (batcher.py), each row with its own adapter; streamed and seeded requests run
alone under the base's lock. Full fine-tunes are models of their own. The engine loads artefacts
only (HF folders and PEFT adapter folders) and never imports the trainer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tunelab.models.catalog import ModelSource
from tunelab.models.folder import context_length, eos_ids, resolve_device
from tunelab.serving.batcher import Batcher, Request


@dataclass
class SamplingParams:
    max_tokens: int | None = None
    temperature: float = 1.0
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


@dataclass
class _Loaded:
    model: Any
    tokenizer: Any
    context: int
    """Tokens of prompt and answer together."""
    eos: set[int]
    """Tokens that end a turn."""
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: dict[str, str | None] = field(default_factory=dict)  # model id -> adapter name
    batcher: Batcher | None = None


DEFAULT_CONTEXT = 2048
"""For a model whose config names no context length."""


class Engine:
    def __init__(self, device: str = "auto", max_batch: int = 8) -> None:
        self.device = resolve_device(device)
        self.max_batch = max_batch
        self._bases: dict[Path, _Loaded] = {}
        self._where: dict[str, Path] = {}  # model id -> key into _bases
        self._lock = threading.Lock()

    def load(self, spec: ModelSource) -> None:
        """Load ``spec`` (idempotent). Blocking: seconds for small models."""
        with self._lock:
            if spec.model_id in self._where:
                return
            loaded = self._bases.get(spec.model_dir) or self._load_base(spec.model_dir)
            self._bases[spec.model_dir] = loaded
            adapter = None
            if spec.adapter_dir is not None:
                adapter = f"a{len(loaded.users)}_{abs(hash(spec.model_id)) % 10**8}"
                with loaded.lock:
                    loaded.model = _add_adapter(loaded.model, spec.adapter_dir, adapter)
            loaded.users[spec.model_id] = adapter
            self._where[spec.model_id] = spec.model_dir

    def unload(self, model_id: str) -> None:
        """Forget ``model_id``; the base leaves memory with its last user."""
        with self._lock:
            key = self._where.pop(model_id, None)
            if key is None:
                return
            loaded = self._bases[key]
            adapter = loaded.users.pop(model_id)
            if adapter is not None:
                with loaded.lock:
                    loaded.model.delete_adapter(adapter)
            if not loaded.users:
                del self._bases[key]
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()

    def batch_sizes(self, model_id: str) -> dict[int, int]:
        """Batches run so far on ``model_id``'s base: {requests in the batch: how many such batches}."""
        loaded, _ = self._get(model_id)
        return dict(loaded.batcher.sizes) if loaded.batcher else {}

    def prompt_tokens(self, model_id: str, messages: list[dict]) -> int:
        loaded, _ = self._get(model_id)
        return int(self._prompt(loaded, messages).shape[1])

    def generate(self, model_id: str, messages: list[dict], params: SamplingParams) -> tuple[list[Completion], int]:
        """Return ``params.n`` completions and the prompt's token count."""
        loaded, adapter = self._get(model_id)
        if params.n == 1 and params.seed is None and loaded.batcher is not None:
            prompt = self._prompt(loaded, messages)
            self._room(loaded, prompt.shape[1])
            request = Request(prompt[0].tolist(), adapter, params)
            return [loaded.batcher.submit(request).result()], int(prompt.shape[1])
        # n > 1 samples one prompt n times; a seed must not share its RNG stream with other rows.
        with loaded.lock, _selected(loaded.model, adapter):
            prompt = self._prompt(loaded, messages)
            _seed(params.seed)
            out = loaded.model.generate(
                prompt, **self._generate_kwargs(loaded, prompt, params), num_return_sequences=params.n
            )
        completions = [self._finish(loaded, row[prompt.shape[1] :], params) for row in out]
        return completions, int(prompt.shape[1])

    def stream(self, model_id: str, messages: list[dict], params: SamplingParams) -> Iterator[str | Completion]:
        """Yield text deltas, then one final ``Completion`` for the whole answer (n is 1)."""
        from transformers import TextIteratorStreamer

        loaded, adapter = self._get(model_id)
        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with loaded.lock, _selected(loaded.model, adapter):
                    _seed(params.seed)
                    kwargs = self._generate_kwargs(loaded, prompt, params)
                    result["out"] = loaded.model.generate(prompt, **kwargs, streamer=streamer)
            except BaseException as exc:  # surfaced to the caller after the stream ends
                result["error"] = exc
                streamer.end()

        prompt = self._prompt(loaded, messages)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        held = StopTrimmer(params.stop)
        for delta in streamer:
            text = held.feed(delta)
            if text:
                yield text
            if held.stopped:
                for _ in streamer:  # drain: generate stops by itself at the stop string
                    pass
                break
        thread.join()
        if "error" in result:
            raise result["error"]
        tail = held.flush()
        if tail:
            yield tail
        final = self._finish(loaded, result["out"][0][prompt.shape[1] :], params)
        yield Completion(text=final.text, finish_reason=final.finish_reason, tokens=final.tokens)

    # -- internals -------------------------------------------------------------------------------
    def _get(self, model_id: str) -> tuple[_Loaded, str | None]:
        with self._lock:
            loaded = self._bases[self._where[model_id]]
            return loaded, loaded.users[model_id]

    def _load_base(self, model_dir: Path) -> _Loaded:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        model = model.to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        loaded = _Loaded(
            model=model,
            tokenizer=tokenizer,
            context=context_length(model_dir) or DEFAULT_CONTEXT,
            eos=set(eos_ids(model.generation_config, tokenizer)),
        )
        if self.max_batch > 1:
            loaded.batcher = Batcher(lambda batch: self._run_batch(loaded, batch), self.max_batch, model_dir.name)
        return loaded

    def _run_batch(self, loaded: _Loaded, batch: list[Request]) -> None:
        """One ``generate`` for requests of one key: prompts left-padded, an adapter per row."""
        from peft import PeftModel

        width = max(len(r.prompt) for r in batch)
        ids = torch.full((len(batch), width), loaded.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, width - len(r.prompt) :] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt) :] = 1
        room = self._room(loaded, width)
        longest = max(min(r.params.max_tokens or room, room) for r in batch)
        kwargs = self._decoding_kwargs(loaded, batch[0].params)
        with loaded.lock:
            if isinstance(loaded.model, PeftModel):
                kwargs["adapter_names"] = [r.adapter or "__base__" for r in batch]
            out = loaded.model.generate(
                ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=longest, **kwargs
            )
        for i, r in enumerate(batch):
            r.future.set_result(self._finish(loaded, out[i, width : width + (r.params.max_tokens or room)], r.params))

    def _prompt(self, loaded: _Loaded, messages: list[dict]) -> torch.Tensor:
        ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
        return torch.tensor([ids], device=self.device)

    def _room(self, loaded: _Loaded, prompt_tokens: int) -> int:
        """Tokens left in the context after the prompt; PromptTooLong when none."""
        if prompt_tokens >= loaded.context:
            raise PromptTooLong(prompt_tokens, loaded.context)
        return loaded.context - prompt_tokens

    def _generate_kwargs(self, loaded: _Loaded, prompt: torch.Tensor, params: SamplingParams) -> dict[str, Any]:
        room = self._room(loaded, prompt.shape[1])
        return {
            "max_new_tokens": min(params.max_tokens or room, room),
            "attention_mask": torch.ones_like(prompt),
            **self._decoding_kwargs(loaded, params),
        }

    def _decoding_kwargs(self, loaded: _Loaded, params: SamplingParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"pad_token_id": loaded.tokenizer.pad_token_id}
        if params.temperature == 0:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=None)
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=loaded.tokenizer)
        return kwargs

    def _finish(self, loaded: _Loaded, tokens: torch.Tensor, params: SamplingParams) -> Completion:
        tok = loaded.tokenizer
        ids = tokens.tolist()
        # Generated rows of a batch are right-padded with pad (== eos here): cut at the first eos.
        ended = next((i for i, t in enumerate(ids) if t in loaded.eos), None)
        if ended is not None:
            ids = ids[: ended + 1]
        text = tok.decode(ids, skip_special_tokens=True)
        trimmed = _cut_at_stop(text, params.stop)
        finish: FinishReason = "stop" if ended is not None or trimmed != text else "length"
        return Completion(text=trimmed, finish_reason=finish, tokens=len(ids))


class PromptTooLong(ValueError):
    def __init__(self, tokens: int, context: int) -> None:
        super().__init__(f"the prompt has {tokens} tokens; this model's context is {context} tokens")


def _add_adapter(model: Any, adapter_dir: Path, name: str) -> Any:
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model.load_adapter(str(adapter_dir), adapter_name=name)
        return model
    return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=name).eval()


@contextmanager
def _selected(model: Any, adapter: str | None) -> Iterator[None]:
    """Route a PeftModel through ``adapter`` (None = the bare base) while the block runs."""
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        yield
    elif adapter is None:
        with model.disable_adapter():
            yield
    else:
        model.set_adapter(adapter)
        yield


def _seed(seed: int | None) -> None:
    if seed is not None:
        torch.manual_seed(seed)


def _cut_at_stop(text: str, stops: list[str]) -> str:
    cuts = [text.find(s) for s in stops if s and s in text]
    return text[: min(cuts)] if cuts else text


class StopTrimmer:
    """Holds back streamed text that might be the start of a stop sequence."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def feed(self, delta: str) -> str:
        if not self.stops:
            return delta
        self.buffer += delta
        cut = _cut_at_stop(self.buffer, self.stops)
        if cut != self.buffer:
            self.stopped, self.buffer = True, ""
            return cut
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out, self.buffer = self.buffer[: len(self.buffer) - keep], self.buffer[len(self.buffer) - keep :]
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out
