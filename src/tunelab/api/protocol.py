"""Wire types: what goes over HTTP, in the order the OpenAI API reference lists the fields.

Reference: https://platform.openai.com/docs/api-reference (files, fine-tuning, models, chat) and
Azure's Cognitive Services deployments REST API (management plane). tunelab extensions are
marked. Database rows never cross the HTTP boundary: the ``from_row`` helpers convert explicitly.
"""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, model_validator

from tunelab.evals.graders import SimilarityMetric
from tunelab.serving.generation import SamplingParams
from tunelab.store.eval_lifecycle import EvalRunStatus
from tunelab.store.lifecycle import JobStatus
from tunelab.store.tables import (
    ApiKeyRow,
    DeploymentRow,
    EvalOutputItemRow,
    EvalRow,
    EvalRunRow,
    EventRow,
    FileRow,
    JobRow,
    ModelRow,
    ProjectRow,
)
from tunelab.training.hparams import JobSpec

T = TypeVar("T")
Auto = Literal["auto"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def omitted_if_none(default: Any = None, **kwargs: Any) -> Any:
    """A field the OpenAI spec has optional but not nullable: left out of the response while None."""
    return Field(default=default, exclude_if=lambda v: v is None, **kwargs)


# Bounds of what a request may carry (the database columns are no wider).
FileId = Annotated[StrictStr, Field(min_length=1, max_length=64)]
ModelId = Annotated[StrictStr, Field(min_length=1, max_length=512)]
Cursor = Annotated[str, Field(min_length=1, max_length=512)]
Metadata = Annotated[
    dict[Annotated[StrictStr, Field(min_length=1, max_length=64)], Annotated[StrictStr, Field(max_length=512)]],
    Field(max_length=16, description="Up to 16 key-value pairs; keys up to 64 characters, values up to 512."),
]


class ListPage(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool = False
    first_id: str | None = omitted_if_none()
    last_id: str | None = omitted_if_none()

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
    expires_at: int | None = omitted_if_none()
    filename: str
    purpose: str
    status: str
    status_details: str | None = omitted_if_none()

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


class FileExample(BaseModel):
    """tunelab extension: one example of a file as training tokenizes it with a model's chat template."""

    object: Literal["file.example"] = "file.example"
    line: int
    tokens: list[tuple[str, bool]]
    """Each token's text and whether it takes loss (trained assistant turns, weight 1); the texts
    join to the rendered chat."""
    n_tokens: int
    n_trained: int
    max_tokens: int | None
    """The model's context: tokens after it are cut off in training."""
    error: str | None = None
    """Why the chat template could not render this example (then ``tokens`` is empty)."""

    @classmethod
    def of(cls, line: int, tokens: list[tuple[str, bool]], max_tokens: int | None) -> FileExample:
        kept = tokens[:max_tokens] if max_tokens is not None else tokens
        return cls(
            line=line,
            tokens=tokens,
            n_tokens=len(tokens),
            n_trained=sum(trained for _text, trained in kept),
            max_tokens=max_tokens,
        )


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


# -- fine-tuning ---------------------------------------------------------------------------------
MAX_LORA_RANK = 1024
"""A static bound; a job's lora_rank is also at most its model's hidden size (checked at create)."""


class Hyperparameters(Strict):
    # OpenAI's bounds. Strict: a boolean or a string is not a number, 3.0 is not an integer.
    batch_size: Annotated[StrictInt, Field(ge=1, le=256)] | Auto = Field(
        default="auto", description="Examples per optimizer step: 1-256 or 'auto'."
    )
    learning_rate_multiplier: Annotated[float, Field(gt=0, le=100, strict=True, allow_inf_nan=False)] | Auto = Field(
        default="auto", description="Times the method's base LR: a number in (0, 100] or 'auto'."
    )
    n_epochs: Annotated[StrictInt, Field(ge=1, le=50)] | Auto = Field(
        default="auto", description="Passes over the training file: 1-50 or 'auto'."
    )
    # tunelab extensions
    lora_rank: Annotated[StrictInt, Field(ge=0, le=MAX_LORA_RANK)] | None = Field(
        default=None, description="LoRA rank; 0 = full fine-tuning; at most the model's hidden size."
    )
    lora_alpha: Annotated[StrictInt, Field(ge=1, le=65536)] | None = None
    lora_dropout: Annotated[float, Field(ge=0, lt=1, strict=True, allow_inf_nan=False)] | None = None


class DpoHyperparameters(Hyperparameters):
    beta: Annotated[float, Field(gt=0, le=2, strict=True, allow_inf_nan=False)] | Auto = Field(
        default="auto",
        description="How far the model may move from the reference: a number in (0, 2] or 'auto' (0.1).",
    )


class Supervised(Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Dpo(Strict):
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(Strict):
    """https://platform.openai.com/docs/api-reference/fine-tuning/create#fine-tuning-create-method"""

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Method:
        other = "dpo" if self.type == "supervised" else "supervised"
        if getattr(self, other) is not None:
            raise ValueError(f"method.{other} is given but method.type is '{self.type}'")
        return self


class CreateJobRequest(Strict):
    model: ModelId
    training_file: FileId
    hyperparameters: Hyperparameters | None = None
    integrations: list[dict[str, Any]] | None = Field(default=None, max_length=16)  # refused when given
    metadata: Metadata | None = None
    method: Method | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**31 - 1)] | None = None
    suffix: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")] | None = Field(
        default=None, description="Up to 64 letters, digits, '.', '_' or '-': it becomes part of the model id."
    )
    validation_file: FileId | None = None
    # tunelab extension: {"eval": {"eval_id", "data_source"}} run on the final model and its base
    tunelab: TunelabJobOptions | None = None

    def to_spec(self) -> JobSpec:
        """Top-level ``hyperparameters`` (deprecated upstream) overlaid by ``method.<type>``'s."""
        method = self.method or Method()
        merged: Hyperparameters = DpoHyperparameters() if method.type == "dpo" else Hyperparameters()
        own = method.dpo if method.type == "dpo" else method.supervised
        for source in (self.hyperparameters, own.hyperparameters if own else None):
            if source is not None:
                merged = merged.model_copy(update=source.model_dump(exclude_unset=True))
        return JobSpec(**merged.model_dump(), objective=method.type)


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class MlflowRun(BaseModel):
    """Where the job is tracked in MLflow; the server's tracking URI is not shown."""

    run_id: str
    run_name: str | None = omitted_if_none()
    experiment: str | None = omitted_if_none()
    experiment_id: str | None = omitted_if_none()
    registered_model: dict[str, Any] | None = omitted_if_none()
    """``{"name", "version"}`` once the job's model is registered."""


class TunelabJobExtras(BaseModel):
    """tunelab's additions to the job object, under a name the OpenAI spec does not use."""

    project_id: str
    mlflow: MlflowRun | None = omitted_if_none()


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
    estimated_finish: int | None = omitted_if_none()
    integrations: list[dict[str, Any]] | None = omitted_if_none()
    """OpenAI's third-party integrations (W&B); tunelab has none (MLflow is in ``tunelab``)."""
    metadata: dict[str, str] | None = None
    method: dict[str, Any]
    user_provided_suffix: str | None = omitted_if_none()
    # tunelab extension
    tunelab: TunelabJobExtras

    @classmethod
    def from_row(cls, row: JobRow) -> FineTuningJob:
        # The values it trains with once they are resolved; until then the ones asked for.
        reported = row.resolved_hyperparameters or {
            k: v
            for k, v in JobSpec.from_json(row.hyperparameters).to_json().items()
            if v is not None and k != "objective"  # the objective is method.type
        }
        openai_hp = {k: reported.get(k) for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}
        objective = (row.method or {}).get("type", "supervised")
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
            metadata=row.user_metadata,
            method={"type": objective, objective: {"hyperparameters": reported}},
            user_provided_suffix=row.suffix,
            tunelab=TunelabJobExtras(project_id=row.project_id, mlflow=_mlflow_run(row)),
        )


def _mlflow_run(row: JobRow) -> MlflowRun | None:
    """The job's MLflow run from the worker's record of it, without the tracking URI (a server path)."""
    for entry in row.integrations or []:
        if entry.get("type") == "mlflow" and entry.get("mlflow", {}).get("run_id"):
            run = entry["mlflow"]
            return MlflowRun(
                run_id=run["run_id"],
                run_name=run.get("run_name"),
                experiment=run.get("experiment"),
                experiment_id=run.get("experiment_id"),
                registered_model=run.get("registered_model"),
            )
    return None


class JobEvent(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    data: dict[str, Any] | None = omitted_if_none()
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
    format: Annotated[StrictStr, Field(min_length=1, max_length=64)] = "OpenAI"
    name: ModelId
    version: Annotated[StrictStr, Field(min_length=1, max_length=64)] = "1"


class DeploymentProperties(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: DeploymentModel


MAX_CAPACITY = 100_000
"""sku.capacity is in units of 1000 tokens per minute (Azure); this bound is 100 million."""


class DeploymentSku(BaseModel):
    name: Annotated[StrictStr, Field(min_length=1, max_length=64)] = "standard"
    capacity: Annotated[StrictInt, Field(ge=1, le=MAX_CAPACITY)] = 1


DEPLOYMENT_NAME = r"^[A-Za-z0-9._-]{2,64}$"
"""Azure's rule for deployment names: 2-64 letters, digits, '.', '_' or '-'."""


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


# -- organization: projects and their API keys (OpenAI's Administration API) ----------------------
ProjectName = Annotated[StrictStr, Field(min_length=1, max_length=256)]


class Project(BaseModel):
    id: str
    object: Literal["organization.project"] = "organization.project"
    name: str
    created_at: int
    archived_at: int | None = None
    status: Literal["active", "archived"]

    @classmethod
    def from_row(cls, row: ProjectRow) -> Project:
        return cls(
            id=row.id,
            name=row.name,
            created_at=row.created_at,
            archived_at=row.archived_at,
            status="archived" if row.archived_at is not None else "active",
        )


class CreateProject(Strict):
    name: ProjectName


class ModifyProject(Strict):
    name: ProjectName


class KeyOwner(BaseModel):
    """Who a key acts as. OpenAI names a user or service account; a tunelab key is its own account."""

    type: Literal["service_account"] = "service_account"
    service_account: dict[str, Any]


class ProjectApiKey(BaseModel):
    object: Literal["organization.project.api_key"] = "organization.project.api_key"
    redacted_value: str
    name: str
    created_at: int
    last_used_at: int | None = None
    id: str
    owner: KeyOwner
    value: str | None = omitted_if_none()
    """The key itself: only in the answer to its creation (it is stored hashed)."""

    @classmethod
    def from_row(cls, row: ApiKeyRow, value: str | None = None) -> ProjectApiKey:
        account = {"id": row.id, "name": row.name, "role": row.role, "created_at": row.created_at}
        return cls(
            redacted_value=row.redacted_value,
            name=row.name,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            id=row.id,
            owner=KeyOwner(service_account=account),
            value=value,
        )


class CreateProjectApiKey(Strict):
    """tunelab extension: OpenAI creates project keys in its dashboard only."""

    name: ProjectName
    role: Literal["owner", "member", "inference"] = "member"


class AdminApiKey(BaseModel):
    object: Literal["organization.admin_api_key"] = "organization.admin_api_key"
    id: str
    name: str
    redacted_value: str
    created_at: int
    last_used_at: int | None = None
    value: str | None = omitted_if_none()

    @classmethod
    def from_row(cls, row: ApiKeyRow, value: str | None = None) -> AdminApiKey:
        return cls(
            id=row.id,
            name=row.name,
            redacted_value=row.redacted_value,
            created_at=row.created_at,
            last_used_at=row.last_used_at,
            value=value,
        )


class CreateAdminApiKey(Strict):
    name: ProjectName


class KeyDeleted(BaseModel):
    object: str
    id: str
    deleted: bool = True


# -- evals ---------------------------------------------------------------------------------------
# https://platform.openai.com/docs/api-reference/evals. Requests are parsed here, then stored in
# their echoed form (dicts): graders and the worker read those (tunelab.evals).
EvalRole = Literal["user", "assistant", "system", "developer"]


class InputText(Strict):
    type: Literal["input_text", "output_text"]
    text: str


class EvalMessage(Strict):
    role: EvalRole
    content: str | InputText
    type: Literal["message"] | None = None

    def echo(self) -> dict[str, Any]:
        """OpenAI's normal form: ``{"type": "message", "role", "content": {"type": "input_text", "text"}}``."""
        text = self.content if isinstance(self.content, str) else self.content.text
        return {"type": "message", "role": self.role, "content": {"type": "input_text", "text": text}}


class CustomDataSourceConfig(Strict):
    type: Literal["custom"]
    item_schema: dict[str, Any]
    include_sample_schema: bool = False


class StoredDataSourceConfig(BaseModel):
    """``logs`` / ``stored_completions``: parsed so that the answer is a clear 400, not a schema error."""

    model_config = ConfigDict(extra="allow")
    type: Literal["logs", "stored_completions"]


class GraderBase(Strict):
    name: str = Field(min_length=1, max_length=200)


class StringCheckGrader(GraderBase):
    type: Literal["string_check"]
    input: str
    reference: str
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarityGrader(GraderBase):
    type: Literal["text_similarity"]
    input: str
    reference: str
    evaluation_metric: Literal["cosine"] | SimilarityMetric  # cosine: a clear 400 (no embeddings model)
    pass_threshold: float = Field(ge=0, le=1)


class LabelModelGrader(GraderBase):
    type: Literal["label_model"]
    model: str
    input: list[EvalMessage] = Field(min_length=1)
    labels: list[str] = Field(min_length=1)
    passing_labels: list[str] = Field(min_length=1)


class GraderSamplingParams(Strict):
    seed: int | None = None
    top_p: float | None = Field(default=None, gt=0, le=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_completions_tokens: int | None = Field(default=None, ge=1, le=4096)
    reasoning_effort: str | None = None


class ScoreModelGrader(GraderBase):
    type: Literal["score_model"]
    model: str
    sampling_params: GraderSamplingParams | None = None
    input: list[EvalMessage] = Field(min_length=1)
    range: list[float] | None = Field(default=None, min_length=2, max_length=2)
    pass_threshold: float | None = None


class UnsupportedGrader(BaseModel):
    """``python`` and ``multi``: parsed so that the answer is a clear 400 (see docs/evals.md)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["python", "multi"]
    name: str | None = None


TestingCriterion = Annotated[
    StringCheckGrader | TextSimilarityGrader | LabelModelGrader | ScoreModelGrader | UnsupportedGrader,
    Field(discriminator="type"),
]


def _criterion_echo(criterion: BaseModel) -> dict[str, Any]:
    """The stored, echoed form: OpenAI's fields plus an ``id`` of ``<name>-<uuid4>``."""
    body = criterion.model_dump(exclude_none=False)
    if isinstance(criterion, LabelModelGrader | ScoreModelGrader):
        body["input"] = [m.echo() for m in criterion.input]
    if isinstance(criterion, ScoreModelGrader):
        body["range"] = criterion.range or [0.0, 1.0]
    return {"id": f"{criterion.name}-{uuid.uuid4()}", **body}  # type: ignore[attr-defined]


class CreateEvalRequest(Strict):
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    data_source_config: Annotated[CustomDataSourceConfig | StoredDataSourceConfig, Field(discriminator="type")]
    testing_criteria: list[TestingCriterion] = Field(min_length=1, max_length=32)

    def criteria_echo(self) -> list[dict[str, Any]]:
        return [_criterion_echo(c) for c in self.testing_criteria]


class UpdateEvalRequest(Strict):
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)


def sample_schema() -> dict[str, Any]:
    """What graders may read as ``sample`` (``include_sample_schema``)."""
    return {
        "type": "object",
        "properties": {
            "model": {"type": "string"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "output_text": {"type": "string"},
        },
        "required": ["model", "choices"],
    }


class Eval(BaseModel):
    object: Literal["eval"] = "eval"
    id: str
    name: str
    data_source_config: dict[str, Any]
    testing_criteria: list[dict[str, Any]]
    created_at: int
    metadata: dict[str, str] | None = None

    @classmethod
    def from_row(cls, row: EvalRow) -> Eval:
        config = row.data_source_config
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {"item": config["item_schema"]},
            "required": ["item"],
        }
        if config.get("include_sample_schema"):
            schema["properties"]["sample"] = sample_schema()
            schema["required"].append("sample")
        return cls(
            id=row.id,
            name=row.name,
            data_source_config={"type": "custom", "schema": schema},
            testing_criteria=row.testing_criteria,
            created_at=row.created_at,
            metadata=row.user_metadata,
        )


class EvalDeleted(BaseModel):
    object: Literal["eval.deleted"] = "eval.deleted"
    deleted: bool = True
    eval_id: str


class FileContentRow(Strict):
    item: dict[str, Any]
    sample: dict[str, Any] | None = None


class FileContentSource(Strict):
    type: Literal["file_content"]
    content: list[FileContentRow] = Field(min_length=1, max_length=100_000)


class FileIdSource(Strict):
    type: Literal["file_id"]
    id: str


class StoredCompletionsSource(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["stored_completions", "responses"]


RunSource = Annotated[FileContentSource | FileIdSource | StoredCompletionsSource, Field(discriminator="type")]


class TemplateMessages(Strict):
    type: Literal["template"]
    template: list[EvalMessage] = Field(min_length=1)


class ItemReferenceMessages(Strict):
    type: Literal["item_reference"]
    item_reference: str


class RunSamplingParams(Strict):
    """OpenAI's defaults: temperature 1, top_p 1, seed 42. ``max_completions_tokens`` (the spelling
    in OpenAI's own examples) is accepted for ``max_completion_tokens``."""

    reasoning_effort: str | None = None
    temperature: float = Field(default=1.0, ge=0, le=2)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32768)
    max_completions_tokens: int | None = Field(default=None, ge=1, le=32768)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = 42
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None

    def echo(self) -> dict[str, Any]:
        return {
            "temperature": self.temperature,
            "max_completion_tokens": self.max_completion_tokens or self.max_completions_tokens,
            "top_p": self.top_p,
            "seed": self.seed,
        }


class CompletionsDataSource(Strict):
    type: Literal["completions", "responses"]
    input_messages: Annotated[TemplateMessages | ItemReferenceMessages, Field(discriminator="type")] | None = None
    sampling_params: RunSamplingParams | None = None
    model: str | None = None
    source: RunSource


class JsonlDataSource(Strict):
    type: Literal["jsonl"]
    source: RunSource


RunDataSource = Annotated[CompletionsDataSource | JsonlDataSource, Field(discriminator="type")]


def data_source_echo(ds: CompletionsDataSource | JsonlDataSource) -> dict[str, Any]:
    """The stored, echoed form of a run's data source (OpenAI's normal form)."""
    out: dict[str, Any] = {"type": ds.type, "source": ds.source.model_dump()}
    if isinstance(ds, CompletionsDataSource):
        messages = ds.input_messages
        if isinstance(messages, TemplateMessages):
            out["input_messages"] = {"type": "template", "template": [m.echo() for m in messages.template]}
        elif messages is not None:
            out["input_messages"] = messages.model_dump()
        out["model"] = ds.model
        out["sampling_params"] = ds.sampling_params.echo() if ds.sampling_params else None
    return out


class CreateEvalRunRequest(Strict):
    name: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    data_source: RunDataSource


class EvalAPIError(BaseModel):
    code: str
    message: str


class EvalRun(BaseModel):
    object: Literal["eval.run"] = "eval.run"
    id: str
    eval_id: str
    status: EvalRunStatus
    model: str
    name: str
    created_at: int
    report_url: str
    result_counts: dict[str, int]
    per_model_usage: list[dict[str, Any]]
    per_testing_criteria_results: list[dict[str, Any]]
    data_source: dict[str, Any]
    metadata: dict[str, str] | None = None
    error: EvalAPIError | None = None
    # tunelab extensions
    classification_report: dict[str, Any] | None = None
    """Accuracy, per-label precision/recall/F1, macro-F1, confusion matrix, off-format answers."""
    tracking: dict[str, Any] | None = None
    """The MLflow run the metrics were logged to."""

    @classmethod
    def from_row(cls, row: EvalRunRow, base_url: str) -> EvalRun:
        return cls(
            id=row.id,
            eval_id=row.eval_id,
            status=row.status,
            model=row.model,
            name=row.name,
            created_at=row.created_at,
            report_url=f"{base_url}/v1/evals/{row.eval_id}/runs/{row.id}",
            result_counts=row.result_counts,
            per_model_usage=list(row.per_model_usage or []),
            per_testing_criteria_results=list(row.per_testing_criteria_results or []),
            data_source=row.data_source,
            metadata=row.user_metadata,
            error=EvalAPIError(**row.error) if row.error else None,
            classification_report=row.classification_report,
            tracking=row.tracking,
        )


class EvalRunDeleted(BaseModel):
    object: Literal["eval.run.deleted"] = "eval.run.deleted"
    deleted: bool = True
    run_id: str


class EvalOutputItem(BaseModel):
    object: Literal["eval.run.output_item"] = "eval.run.output_item"
    id: str
    run_id: str
    eval_id: str
    created_at: int
    status: Literal["pass", "fail"]
    datasource_item_id: int
    datasource_item: dict[str, Any]
    results: list[dict[str, Any]]
    sample: dict[str, Any]

    @classmethod
    def from_row(cls, row: EvalOutputItemRow) -> EvalOutputItem:
        return cls(
            id=row.id,
            run_id=row.run_id,
            eval_id=row.eval_id,
            created_at=row.created_at,
            status="pass" if row.status == "pass" else "fail",
            datasource_item_id=row.datasource_item_id,
            datasource_item=row.datasource_item,
            results=row.results,
            sample=row.sample,
        )


class TunelabJobEval(Strict):
    """tunelab extension of a fine-tuning job: an eval run on its final model and on its base at the end."""

    eval_id: str
    data_source: CompletionsDataSource


class TunelabJobOptions(Strict):
    eval: TunelabJobEval | None = None
