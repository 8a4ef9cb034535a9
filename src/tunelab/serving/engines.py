"""Which engine a server generates with: ``TUNELAB_SERVING_ENGINE=auto|builtin|vllm``.

``builtin``: engine.Engine. ``vllm``: vllm_engine.VllmEngine (fails at start when vLLM is not
installed). ``auto``: vLLM for the models it supports when it is installed, the built-in engine
for the rest (``Router``), so one server may run both.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from tunelab.config import Settings
from tunelab.models.catalog import ModelSource
from tunelab.serving.engine import Engine
from tunelab.serving.generation import Completion, EngineListener, EngineUsage, Generation, SamplingParams
from tunelab.serving.generation import ServingEngine as ServingEngine
from tunelab.serving.vllm_env import find as find_vllm

if TYPE_CHECKING:
    from tunelab.serving.vllm_engine import VllmEngine


class VllmNotInstalled(RuntimeError):
    pass


def builtin_engine(settings: Settings) -> Engine:
    if settings.serve_threads is not None:  # this process is the serving one (TUNELAB_SERVE_THREADS)
        import torch

        torch.set_num_threads(settings.serve_threads)
    return Engine(
        settings.device,
        max_batch=settings.max_batch,
        dtype=settings.serving_dtype,
        kv_cache_bytes=settings.kv_cache_bytes,
        default_max_tokens=settings.default_max_tokens,
        decode_nice=settings.decode_nice,
    )


def create_engine(settings: Settings) -> ServingEngine:
    """The engine ``settings.serving_engine`` names.

    Raises:
        VllmNotInstalled: ``vllm`` was asked for and there is no vLLM environment.
    """
    if settings.serving_engine == "builtin":
        return builtin_engine(settings)
    install = find_vllm(settings.vllm_venv)
    if install is None:
        if settings.serving_engine == "vllm":
            raise VllmNotInstalled(
                "TUNELAB_SERVING_ENGINE=vllm, but vLLM is not installed: run `make vllm` "
                "(or `tunelab engines install vllm`), or set TUNELAB_VLLM_VENV"
            )
        return builtin_engine(settings)
    from tunelab.serving.vllm_engine import VllmEngine

    vllm = VllmEngine.of(settings, install)
    if settings.serving_engine == "vllm":
        return vllm
    return Router(vllm, builtin_engine(settings))


class Router:
    """``auto``: each model on vLLM when vLLM serves it (its architecture; for an adapter, tunelab's
    checks: its rank within the limit, its shapes fitting the base), else on the built-in engine."""

    name = "auto"

    def __init__(self, vllm: VllmEngine, builtin: Engine) -> None:
        self.vllm, self.builtin = vllm, builtin
        self._of: dict[str, ServingEngine] = {}
        self._lock = threading.Lock()

    def _pick(self, source: ModelSource) -> ServingEngine:
        return self.vllm if self.vllm.supports(source) else self.builtin

    def _engine(self, model_id: str) -> ServingEngine:
        with self._lock:
            return self._of[model_id]

    def load(self, source: ModelSource, *, wait: bool = True) -> None:
        with self._lock:
            engine = self._of.get(source.model_id) or self._pick(source)
            self._of[source.model_id] = engine
        engine.load(source, wait=wait)

    def unload(self, model_id: str) -> None:
        with self._lock:
            engine = self._of.pop(model_id, None)
        if engine is not None:
            engine.unload(model_id)

    def loaded(self, model_id: str) -> bool:
        with self._lock:
            engine = self._of.get(model_id)
        return engine is not None and engine.loaded(model_id)

    def prompt_tokens(self, model_id: str, messages: list[dict]) -> int:
        return self._engine(model_id).prompt_tokens(model_id, messages)

    def start(self, model_id: str, messages: list[dict], params: SamplingParams, *, stream: bool = False) -> Generation:
        return self._engine(model_id).start(model_id, messages, params, stream=stream)

    def generate(self, model_id: str, messages: list[dict], params: SamplingParams) -> tuple[list[Completion], int]:
        return self._engine(model_id).generate(model_id, messages, params)

    def usage(self) -> EngineUsage:
        a, b = self.vllm.usage(), self.builtin.usage()
        return EngineUsage(
            self.name, a.models + b.models, a.running + b.running, a.waiting + b.waiting, {"vllm": a, "builtin": b}
        )

    def watch(self, listener: EngineListener) -> None:
        self.vllm.watch(listener)
        self.builtin.watch(listener)

    def close(self) -> None:
        self.vllm.close()
        self.builtin.close()
