"""The OpenAI-style wire format: request models (validated once, at the edge) and responses.

Pydantic stays here; the engine gets plain dataclasses (`to_sampling_params`). Types are
strict, so `"temperature": "hot"` or `"max_tokens": 1.5` is a 400 naming the parameter rather
than a silent coercion.
"""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from wicore_cpp.engine.client import Priority, SamplingParams
from wicore_cpp.errors import InvalidRequest, excerpt

MAX_STOP_SEQUENCES = 4
# low, normal, high or urgent in any letter case, as a JSON Schema (ECMA 262) pattern.
PRIORITY_PATTERN = "^(" + "|".join(
    "".join(f"[{c}{c.upper()}]" for c in p.name.lower()) for p in Priority) + ")$"


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: str = Field(json_schema_extra={"enum": ["text"]})
    text: str

    @field_validator("type")
    @classmethod
    def _only_text(cls, value: str) -> str:
        if value != "text":
            raise ValueError(
                f"content parts of type {excerpt(value)} are not supported; only 'text'")
        return value


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    # Text parts are tried first so that a bad part's own message reaches the client.
    content: Annotated[list[TextPart], Field(min_length=1)] | str
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class ChatCompletionRequest(BaseModel):
    """`POST /v1/chat/completions`. Unknown fields are ignored, as OpenAI clients send many."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: Probability = 1.0
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The validator below checks these; the schema says them too.
    stop: str | list[str] | None = Field(None, json_schema_extra={
        "minLength": 1, "maxItems": MAX_STOP_SEQUENCES,
        "items": {"type": "string", "minLength": 1}})
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1, le=1)
    # Checked with the X-Priority header by the lifecycle; the pattern documents it.
    priority: str | None = Field(None, json_schema_extra={"pattern": PRIORITY_PATTERN})
    user: str | None = None
    # Beyond OpenAI: the generated token ids in the response, for debugging and tests.
    return_token_ids: bool = False

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template expects them (`developer` is OpenAI's new `system`)."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            stop=self.stop_sequences,
        )


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Raw body -> request, or InvalidRequest naming the first bad parameter."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param_name(err["loc"])
        raise InvalidRequest(f"invalid value for '{param}': {err['msg']}", param=param) from None


def _param_name(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; drop pydantic's union-branch labels."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[TextPart]", "list[str]", "StreamOptions") or "[" in str(part):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


# -- responses ---------------------------------------------------------------------------------


def json_response(
    body: dict, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    """The one way a JSON body leaves the server (orjson, `application/json`)."""
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json",
                        headers=headers)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_completion(
    request_id: str, created: int, model: str, text: str, finish_reason: str,
    prompt_tokens: int, token_ids: list[int] | None,
) -> dict:
    choice: dict = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, len(token_ids) if token_ids is not None else 0),
    }


class ChunkEncoder:
    """Pre-encodes the invariant parts of one stream's chunks.

    A content chunk is the same JSON every time but for the text, so the per-token path is
    one `orjson.dumps` of the text between two byte strings, not a dict built and serialised.
    """

    def __init__(self, request_id: str, created: int, model: str):
        self._head = orjson.dumps(
            {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model}
        )[:-1]
        self._content_prefix = b"data: " + self._head + b',"choices":[{"index":0,"delta":{"content":'
        self.request_id = request_id

    def _event(self, choices: list, **extra) -> bytes:
        body = self._head + b',"choices":' + orjson.dumps(choices)
        if extra:
            body += b"," + orjson.dumps(extra)[1:-1]
        return b"data: " + body + b"}\n\n"

    def role(self) -> bytes:
        return self._event([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])

    def content(self, text: str, token_ids: list[int] | None = None) -> bytes:
        if token_ids is not None:
            return self._event(
                [{"index": 0, "delta": {"content": text}, "finish_reason": None,
                  "token_ids": token_ids}]
            )
        return self._content_prefix + orjson.dumps(text) + b'},"finish_reason":null}]}\n\n'

    def finish(self, reason: str) -> bytes:
        return self._event([{"index": 0, "delta": {}, "finish_reason": reason}])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        return self._event([], usage=usage(prompt_tokens, completion_tokens))

    @staticmethod
    def error(payload: dict) -> bytes:
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    DONE = b"data: [DONE]\n\n"
