"""Pydantic models of WiCore's JSON responses: what `GET /openapi.json` documents.

The handlers build the same JSON directly with orjson (the streaming path must stay lean, and
a model per response would be built only to be thrown away); these models say what that JSON
is. They cannot drift unnoticed: the schemathesis run and the API tests check every response
the server sends against them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Response(BaseModel):
    # Documentation of an output: a client should expect more fields over time.
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Response):
    message: str
    type: str = Field(description="invalid_request_error, rate_limit_exceeded, server_error "
                      "or timeout_error")
    param: str | None = Field(description="the request parameter at fault, if one is")
    code: str | None = Field(description="a specific code (context_length_exceeded, "
                             "unsupported_parameter, unsupported_value, invalid_api_key, "
                             "permission_denied, model_not_found, insufficient_quota, "
                             "timeout) or the HTTP status")


class ErrorResponse(_Response):
    """Every error, whatever its status."""

    error: ErrorDetail


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCall(_Response):
    name: str
    arguments: str = Field(description="the arguments as a JSON string")


class ToolCallOut(_Response):
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(_Response):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is tool calls only")
    tool_calls: list[ToolCallOut] | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprobOut(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprobOut] | None
    refusal: None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: ChoiceLogprobs | None = Field(None, description="with `logprobs: true` only")
    token_ids: list[int] | None = Field(None, description="with `return_token_ids` only")


class ChatCompletion(_Response):
    """`POST /v1/chat/completions` without `stream`. (With it: `text/event-stream`, one
    `data: {chat.completion.chunk}` event per decode step, then `data: [DONE]`.)"""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class TextCompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class TextChoice(_Response):
    index: int
    text: str
    logprobs: TextCompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None
    token_ids: list[int] | None = Field(None, description="with `return_token_ids` only")


class TextCompletion(_Response):
    """`POST /v1/completions` without `stream`. (With it: `text/event-stream` of
    `text_completion` chunks, then `data: [DONE]`.)"""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class TokenPiece(_Response):
    id: int
    piece: str | list[int] = Field(description="the text, or its bytes when not valid UTF-8")


class Tokens(_Response):
    """`POST /tokenize`: token ids, or with `with_pieces` each id with its piece."""

    tokens: list[int] | list[TokenPiece]


class Detokenized(_Response):
    content: str


class ModelCard(_Response):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int | None = Field(None, description="longest prompt + completion")
    capabilities: list[str] | None = None
    max_choices: int | None = Field(None, description="the most `n` a request may ask")
    image_tokens: int | None = Field(
        None, description="prompt tokens one image takes; 0: the model takes no images")


class ModelList(_Response):
    object: Literal["list"]
    data: list[ModelCard]


class Root(_Response):
    message: str
    version: str
    engine: str
    models: list[str]
    endpoints: list[str]


class Health(_Response):
    """The API document's fields; numbers are formatted strings, as it shows them."""

    status: Literal["healthy"]
    engine: str
    version: str
    uptime: str
    scheduler: str
    total_requests: str
    error_count: str
    error_rate: str


class HealthProblem(_Response):
    """503 from `/health`: the error shape, plus the health fields saying what is wrong."""

    error: ErrorDetail
    status: Literal["loading", "draining", "unhealthy"]
    scheduler: str


class WorkerStatus(_Response):
    id: int
    model: str
    pid: int | None
    ready: bool
    gpu_id: int | None
    gpu_offload: bool
    cuda_visible_devices: str | None
    running: int


class StatusMetrics(_Response):
    running: bool
    draining: bool
    total_requests: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    rejected: int
    active: int
    in_flight: int
    running_sequences: int
    queue_length: int
    queued_by_priority: dict[str, int]
    success_rate: float | None
    mean_processing_s: float
    mean_wait_s: float
    tokens_generated: int
    worker_messages: int
    workers: list[WorkerStatus]
    uptime_s: float
    error_count: int
    engine: str
    version: str
    port: int


class Status(_Response):
    """The API document's fields as formatted strings, and `metrics` as numbers."""

    server_running: str
    port: str
    uptime: str
    total_requests: str
    error_count: str
    scheduler_status: str
    queue_summary: str
    metrics: StatusMetrics


class OpenAPIDocument(_Response):
    openapi: str
    info: dict
    paths: dict
