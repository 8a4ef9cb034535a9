"""Wire types: what goes over HTTP, in the order the OpenAI API reference lists the fields.

Reference: https://platform.openai.com/docs/api-reference (files, fine-tuning, models, chat) and
Azure's Cognitive Services deployments REST API (management plane). tunelab extensions are
marked. Database rows never cross the HTTP boundary: the ``from_row`` helpers convert explicitly.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt

from tunelab.serving.generation import SamplingParams
from tunelab.store.lifecycle import JobStatus
from tunelab.store.tables import DeploymentRow, EventRow, FileRow, JobRow, ModelRow
from tunelab.training.hparams import JobSpec

T = TypeVar("T")
Auto = Literal["auto"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = None
    last_id: str | None = None

    @classmethod
    def of(cls, items: list[Any], has_more: bool = False) -> ListPage[Any]:
        ids = [getattr(i, "id", None) for i in items]
        return cls(data=items, has_more=has_more, first_id=ids[0] if ids else None, last_id=ids[-1] if ids else None)


# -- files ---------------------------------------------------------------------------------------
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: str
    status: str
    status_details: str | None = None

    @classmethod
    def from_row(cls, row: FileRow) -> FileObject:
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=row.created_at,
            filename=row.filename,
            purpose=row.purpose,
            status=row.status,
            status_details=row.status_details,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# -- fine-tuning ---------------------------------------------------------------------------------
class Hyperparameters(Strict):
    batch_size: int | Auto = Field(default="auto", description="Examples per optimizer step.")
    learning_rate_multiplier: float | Auto = Field(default="auto", description="Times the method's base LR.")
    n_epochs: int | Auto = Field(default="auto", description="Passes over the training file.")
    # tunelab extensions
    lora_rank: int | None = Field(default=None, ge=0, description="LoRA rank; 0 = full fine-tuning.")
    lora_alpha: int | None = Field(default=None, gt=0)
    lora_dropout: float | None = Field(default=None, ge=0, lt=1)


class Supervised(Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(Strict):
    type: Literal["supervised"] = "supervised"
    supervised: Supervised | None = None


class CreateJobRequest(Strict):
    model: str
    training_file: str
    hyperparameters: Hyperparameters | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: Method | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    suffix: str | None = Field(default=None, max_length=64)
    validation_file: str | None = None

    def to_spec(self) -> JobSpec:
        """Top-level ``hyperparameters`` (deprecated upstream) overlaid by ``method.supervised``."""
        merged = Hyperparameters()
        supervised = self.method.supervised if self.method else None
        for source in (self.hyperparameters, supervised.hyperparameters if supervised else None):
            if source is not None:
                merged = merged.model_copy(update=source.model_dump(exclude_unset=True))
        return JobSpec(**merged.model_dump())


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    error: JobError | None = None
    fine_tuned_model: str | None = None
    finished_at: int | None = None
    hyperparameters: dict[str, Any]
    model: str
    organization_id: str = "org-tunelab"
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None = None
    training_file: str
    validation_file: str | None = None
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = None

    @classmethod
    def from_row(cls, row: JobRow) -> FineTuningJob:
        # The values it trains with once they are resolved; until then the ones asked for.
        reported = row.resolved_hyperparameters or {
            k: v for k, v in JobSpec.from_json(row.hyperparameters).to_json().items() if v is not None
        }
        openai_hp = {k: reported.get(k) for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}
        return cls(
            id=row.id,
            created_at=row.created_at,
            error=JobError(**row.error) if row.error else None,
            fine_tuned_model=row.fine_tuned_model,
            finished_at=row.finished_at,
            hyperparameters=openai_hp,
            model=row.model,
            result_files=list(row.result_files or []),
            seed=row.seed,
            status=row.status,
            trained_tokens=row.trained_tokens,
            training_file=row.training_file,
            validation_file=row.validation_file,
            integrations=list(row.integrations or []) or None,
            metadata=row.user_metadata,
            method={"type": "supervised", "supervised": {"hyperparameters": reported}},
            user_provided_suffix=row.suffix,
        )


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None = None
    type: str

    @classmethod
    def from_row(cls, row: EventRow) -> JobEvent:
        return cls(
            id=row.id, created_at=row.created_at, level=row.level, message=row.message, data=row.data, type=row.type
        )


class JobCheckpoint(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float | None]
    step_number: int

    @classmethod
    def from_row(cls, row: ModelRow) -> JobCheckpoint:
        return cls(
            id=row.checkpoint_id or row.id,
            created_at=row.created_at,
            fine_tuned_model_checkpoint=row.id,
            fine_tuning_job_id=row.job_id or "",
            metrics=dict(row.metrics or {}),
            step_number=row.step or 0,
        )


# -- models --------------------------------------------------------------------------------------
class ModelObject(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    # tunelab extensions
    kind: str
    base_model: str | None = None

    @classmethod
    def from_row(cls, row: ModelRow) -> ModelObject:
        return cls(id=row.id, created=row.created_at, owned_by=row.owned_by, kind=row.kind, base_model=row.base_model)


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


# -- chat completions ----------------------------------------------------------------------------
INT64 = Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)]
MAX_MESSAGES = 2048
MAX_CONTENT_PARTS = 256
MAX_STOP = 4
"""OpenAI's limit on stop sequences."""
MAX_N = 8
MAX_TOKENS = 2**20
"""The door's bound; the server's own, lower limit is TUNELAB_MAX_TOKENS_LIMIT (checked by the route)."""
StopString = Annotated[str, Field(max_length=256)]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | Annotated[list[dict[str, Any]], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = Field(default=None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None


class ChatCompletionRequest(Strict):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    model: str = Field(min_length=1, max_length=512)
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2, le=2)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=MAX_TOKENS)] | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    presence_penalty: Annotated[StrictFloat, Field(ge=-2, le=2)] | None = None
    seed: INT64 | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP)] | None = None
    store: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[StrictFloat, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0, le=1)] = 1.0
    user: str | None = Field(default=None, max_length=256)

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def chat_messages(self) -> list[dict[str, str]]:
        """The messages as chat templates take them: text content; ``developer`` is ``system``."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]

    def sampling_params(self) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop_list(),
            seed=self.seed,
            n=self.n,
        )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


# ``system_fingerprint`` is left out of both: the spec has it optional, not nullable, and tunelab
# has no fingerprint to give.
class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    """Sent, null until the last chunk, only when ``stream_options.include_usage`` asks for it."""

    def sse(self, include_usage: bool) -> str:
        body = self.model_dump(exclude=None if include_usage else {"usage"}, exclude_none=False)
        for choice in body["choices"]:  # a delta carries only what it has
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        return f"data: {json.dumps(body)}\n\n"


# -- Azure management plane ----------------------------------------------------------------------
class DeploymentModel(BaseModel):
    format: str = "OpenAI"
    name: str
    version: str = "1"


class DeploymentProperties(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: DeploymentModel


class DeploymentSku(BaseModel):
    name: str = "standard"
    capacity: int = 1


class DeploymentRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # Azure clients send tags, identity, etc.
    sku: DeploymentSku = Field(default_factory=DeploymentSku)
    properties: DeploymentProperties


class Deployment(BaseModel):
    id: str
    type: str = "Microsoft.CognitiveServices/accounts/deployments"
    name: str
    sku: DeploymentSku
    properties: dict[str, Any]

    @classmethod
    def from_row(cls, row: DeploymentRow) -> Deployment:
        props: dict[str, Any] = {
            "model": {"format": row.model_format, "name": row.model, "version": row.model_version},
            "provisioningState": row.state,
        }
        if row.error:
            props["error"] = {"code": "DeploymentFailed", "message": row.error}
        return cls(
            id=f"{row.scope}/deployments/{row.name}", name=row.name, sku=DeploymentSku(**row.sku), properties=props
        )
