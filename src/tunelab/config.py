"""Service configuration: every setting and default in one place (env prefix ``TUNELAB_``)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_NAME = "{base}-{suffix}"
"""Registered model name of a job's model; ``{base}``: base id after its last '/', ``{suffix}``: the job's."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNELAB_", extra="forbid", populate_by_name=True)

    data_dir: Path = Field(default=Path("~/.tunelab"), description="Database, blobs and job outputs.")
    cache_dir: Path = Field(
        default=Path("~/.cache/tunelab"),
        description="Per-user cache shared by every data dir: imported base models, token encodings.",
    )
    api_key: str | None = Field(
        default=None, description="The admin API key; with none, one is generated on first start and printed once."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/tunelab.db."
    )
    max_upload_bytes: int = Field(default=512 * 1024 * 1024, description="Largest accepted upload.")
    max_request_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest accepted request body other than a file upload."
    )
    worker_poll_seconds: float = Field(default=1.0, description="How often an idle worker looks for jobs.")
    worker_heartbeat_seconds: float = Field(
        default=5.0, gt=0, description="How often a worker records in the store that it is alive."
    )
    worker_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A worker whose last heartbeat is older than this is dead: its job is queued again.",
    )
    resume_every: float = Field(
        default=600.0,
        ge=0,
        description="Seconds between saves of a running job's resumable state (also saved at every epoch end), "
        "so that a worker killed outright loses at most this much training.",
    )
    min_free_disk_bytes: int = Field(
        default=1024**3, ge=0, description="GET /ready fails while the data dir's disk has less free space than this."
    )
    device: str = Field(default="auto", description="'auto', 'cpu' or 'cuda[:N]' for training and serving.")
    train_threads: int | None = Field(
        default=None,
        description="CPU threads per training job; default every core (set 1 for several workers on one CPU).",
    )
    worker_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="Niceness of a training worker (and its rank processes): on a CPU shared with serving, "
        "chats and the control plane go first; 0 keeps the worker at the server's priority.",
    )
    train_procs: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Processes per training job (data-parallel, torch.distributed on this host: NCCL on GPUs, "
        "gloo on CPU); default one per visible GPU, 1 on a CPU; on CPU each gets its share of the cores. "
        "docs/training.md#several-processes-per-job",
    )
    train_sharding: Literal["none", "fsdp"] = Field(
        default="none",
        description="A job on several processes: 'none' copies the model to every process, 'fsdp' shards its "
        "weights, gradients and optimizer state over them (FSDP2), for models that do not fit one device.",
    )
    # -- serving (docs/serving.md explains each default) -------------------------------------------
    serving_engine: Literal["auto", "builtin", "vllm"] = Field(
        default="auto",
        description="Which engine generates: 'builtin' (transformers + PEFT in this process), 'vllm' (a supervised "
        "vLLM server per base model), 'auto' (vLLM where it is installed and supports the model, else built-in).",
    )
    max_batch: int | None = Field(
        default=None, ge=1, description="Built-in engine: most rows decoded together per base; default: the KV budget."
    )
    kv_cache_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Built-in engine: KV-cache bytes per base (the batch limit); default 20% of available memory "
        "on a CPU, 50% of free GPU memory.",
    )
    serving_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto", description="Built-in engine: 'auto' = bf16 on CUDA and on CPUs with native bf16, else fp32."
    )
    serve_threads: int | None = Field(
        default=None, ge=1, description="CPU threads of the serving process (built-in engine); default every core."
    )
    decode_nice: int = Field(
        default=5,
        ge=0,
        le=19,
        description="Built-in engine on Linux: niceness of each model's decode thread (and its OpenMP team), so "
        "that the API's own threads (files, jobs, health) go first on a busy CPU; 0 keeps it at the server's.",
    )
    serve_wait_policy: Literal["auto", "active", "passive"] = Field(
        default="auto",
        description="OpenMP waiting of the serving process: 'auto' = passive beside an embedded worker, active "
        "with --no-worker (set before torch loads).",
    )
    train_wait_policy: Literal["active", "passive"] = Field(
        default="passive", description="OpenMP waiting of training workers (set before torch loads)."
    )
    default_max_tokens: int = Field(
        default=1024, ge=1, description="Answer tokens when a chat request names no max_tokens."
    )
    max_tokens_limit: int = Field(
        default=8192, ge=1, description="Largest max_tokens a chat request may ask for (400 above)."
    )
    max_pending_chats: int = Field(
        default=128,
        ge=1,
        description="Chat requests admitted at once (decoding or queued in the engine); more get 429 + retry-after.",
    )
    shutdown_grace_seconds: float = Field(
        default=10.0, ge=0, description="On shutdown, in-flight generations may finish this long, then are cancelled."
    )
    vllm_venv: Path | None = Field(
        default=None,
        description="vLLM's virtualenv (`tunelab engines install vllm`); default .venv-vllm beside tunelab's.",
    )
    vllm_kv_cache_gib: int = Field(default=2, ge=1, description="vLLM on a CPU: KV-cache GiB per vLLM process.")
    vllm_threads: int = Field(default=1, ge=1, description="vLLM on a CPU: OpenMP threads per vLLM process.")
    vllm_cpu_bind: str = Field(
        default="nobind",
        description="vLLM on a CPU: VLLM_CPU_OMP_THREADS_BIND ('nobind', 'auto', or cores like '0-1': only on a "
        "machine nothing else uses).",
    )
    vllm_max_loras: int = Field(default=4, ge=1, description="vLLM: adapters active in one batch per base process.")
    vllm_max_lora_rank: Literal[8, 16, 32, 64, 128, 256] = Field(
        default=64, description="vLLM: the largest LoRA rank a base process accepts."
    )
    vllm_max_model_len: int | None = Field(
        default=4096, ge=16, description="vLLM: context length per sequence (None: the model's own)."
    )
    vllm_gpu_memory_utilization: float = Field(
        default=0.45, gt=0, le=1, description="vLLM on CUDA: share of the GPU each vLLM process takes."
    )
    vllm_start_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a vLLM process may take to answer /health (58-260 s on 2 cores)."
    )
    rate_limits: bool = Field(
        default=False,
        description="Enforce each deployment's sku capacity as Azure does (1000 tokens, 6 requests/min per unit).",
    )
    session_hours: float = Field(
        default=12.0, gt=0, description="How long a console login lasts (the session cookie expires then)."
    )
    session_secret: str | None = Field(
        default=None,
        description="Signs console session cookies; default one generated on first start and kept in the "
        "database. Changing it (or the API key) ends every console session.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TUNELAB_MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_URI"),
        description="Where jobs are tracked (MLflow's own MLFLOW_TRACKING_URI works too); default a SQLite "
        "store in the data dir.",
    )
    mlflow_experiment: str = Field(default="tunelab", description="MLflow experiment of every job's run.")
    mlflow_model_name: str = Field(
        default=DEFAULT_MODEL_NAME, description="Registered model name; {base}: base id after its last '/'."
    )

    @cached_property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @cached_property
    def cache_path(self) -> Path:
        return self.cache_dir.expanduser().resolve()

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_path / 'tunelab.db'}"

    @property
    def blob_path(self) -> Path:
        return self.data_path / "files"

    @property
    def jobs_path(self) -> Path:
        return self.data_path / "jobs"
