"""Request and response bodies (the OpenAPI schema at /docs comes from these)."""
from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..jobs.options import SEED_MAX
from .text import Name, Reason, StoredText, Text, valid_unicode


# ids are 32-bit integer columns on PostgreSQL (2^31 and more: "integer out of range", a 500) and start at 1 (0 is
# no id: a base_version_id of 0 passed as "unset" to validation and was stored, a foreign-key error);
# offsets: beyond a signed 64-bit integer the database cannot even compare them
DB_ID_MAX = 2**31 - 1
DB_INT_MAX = 2**63 - 1
Id = Annotated[int, Field(ge=1, le=DB_ID_MAX)]
IdPath = Annotated[int, Path(ge=1, le=DB_ID_MAX)]
IdQuery = Annotated[int | None, Query(ge=1, le=DB_ID_MAX)]
Offset = Annotated[int, Query(ge=0, le=DB_INT_MAX)]


class SamplingFields(BaseModel):
    max_tokens: int | None = Field(None, ge=1, description="default PEER_DEFAULT_MAX_TOKENS; at most PEER_MAX_TOKENS_LIMIT")
    temperature: float = Field(1.0, ge=0.0, le=100.0, description="0 = greedy")
    top_k: int = Field(0, ge=0, description="0 = off")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="1 = off")
    stop: Text | list[Text] | None = Field(None, description="generation ends before the first of these strings")
    seed: int | None = Field(None, ge=0, le=SEED_MAX)


class GenerateRequest(SamplingFields):
    prompt: Text = Field(..., description="text to complete (a prompt longer than the context window is a 422)")
    stream: bool = Field(False, description="server-sent events: token events, then one done (or error) event")


class GenerateResponse(BaseModel):
    text: str
    finish_reason: Literal["stop", "length", "eos"]
    prompt_tokens: int
    completion_tokens: int
    version: int = Field(..., description="the pool version that served the whole request")
    latency_ms: float
    warning: str | None = Field(None, description="set while the serving version is untrained (a fresh model "
                                                  "before its bootstrap job is done), with that job's progress")


class OpenAIRequest(BaseModel):
    """The sampling fields /v1/completions and /v1/chat/completions share; fields this server cannot
    honour are refused, unknown ones ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=1, description="only 1")
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    user: str | None = None


class CompletionRequest(OpenAIRequest):
    """OpenAI ``/v1/completions``."""

    prompt: Text | list[Text]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = Field(False, description="only false")
    logprobs: int | None = Field(None, le=0, description="not supported: null or 0")
    best_of: int | None = Field(None, ge=1, le=1)


class ChatMessage(BaseModel):
    """One message; ``content`` a string or a list of text parts (joined by newlines, as vLLM does)."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: Text | list[dict[str, Any]]

    @field_validator("content")
    @classmethod
    def _text_only(cls, value: str | list[dict[str, Any]]) -> str:
        if isinstance(value, str):
            return value
        if not all(part.get("type") == "text" and isinstance(part.get("text"), str) for part in value):
            raise ValueError('content parts must be {"type": "text", "text": "..."}: only text is supported')
        return valid_unicode("\n".join(part["text"] for part in value))


class ChatCompletionRequest(OpenAIRequest):
    """OpenAI ``/v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default PEER_DEFAULT_MAX_TOKENS")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens; wins over it")
    logprobs: bool | None = Field(False, description="only false")


class TextCorpusRequest(BaseModel):
    name: Name
    text: Text | None = Field(None, description="one plain-text document")
    documents: list[Text] | None = Field(None, description="several documents")
    train: bool = Field(True, description="start a training job once the corpus is ingested")
    train_options: dict[str, Any] = Field(default_factory=dict, description="options of that job, as POST /v1/jobs")


class CorpusOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    source: str
    stream_id: int | None
    state: str
    error: str | None
    sha256: str
    raw_bytes: int
    documents: int
    duplicates_removed: int | None
    train_bytes: int | None
    val_bytes: int | None
    created_at: datetime
    ingested_at: datetime | None
    deleted_at: datetime | None = None  # state "deleted": its text is gone, the row stays


class ProbeOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    sha256: str
    raw_bytes: int
    items: int
    kinds: dict[str, int] = Field(description="items per kind")
    created_at: datetime


class JobOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str
    state: str
    corpus_ids: list[int]
    options: dict[str, Any]
    base_version_id: int | None = Field(description="the version trained from: the pinned one, or once the job "
                                                    "started, the one that was active then")
    result_version_id: int | None
    next_job_id: int | None
    progress: float
    tokens_per_s: float | None
    eta_s: float | None
    metrics: dict[str, Any]
    error: str | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None


class CorpusAccepted(BaseModel):
    corpus: CorpusOut
    job: JobOut


class DocumentsRequest(BaseModel):
    documents: list[StoredText] = Field(..., min_length=1)


class JobRequest(BaseModel):
    corpus_ids: list[Id] = Field(..., min_length=1)
    base_version_id: Id | None = Field(None, description="default: the version active when the job starts (and an "
                                                         "automatic activation only while it still is)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="strategy, new_experts, steps, freeze_old_experts, replay_fraction, distill_weight, train_dense, "
                    "sparse_top_experts, old_lr_scale, review_steps, activate (auto|always|never), seed")


class ForgetRequest(BaseModel):
    base_version_id: Id | None = Field(None, description="default: the version active when the job starts (and an "
                                                         "automatic activation only while it still is)")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="repair_steps (training steps on the remaining corpora with distillation to the parent; default "
                    "PEER_FORGET_REPAIR_STEPS), "
                    "activate (auto|always|never), seed, probe (an uploaded probe: the job scores the new version "
                    "and its parent on it)")


class ActivateRequest(BaseModel):
    reason: Reason = "requested through the API"


class ErrorDetail(BaseModel):
    message: str
    type: str = Field(..., description="the error's kind, e.g. InvalidInput, NotFound, Conflict, InternalError")
    code: int = Field(..., description="the HTTP status")


class ErrorBody(BaseModel):
    """Every error answer (4xx and 500): ``detail`` for people and FastAPI clients, ``error`` in the OpenAI shape."""

    detail: str
    error: ErrorDetail
    request_id: str | None = Field(None, description="on a 500: the id to quote (also in X-Request-Id and the logs)")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorBody, "description": "refused: the message says why (422 invalid input, 404 not found, "
                                                "409 conflict, 413 too large, 429 overloaded, 401/403 key)"},
    500: {"model": ErrorBody, "description": "a bug: logged with the request id given here"},
}
