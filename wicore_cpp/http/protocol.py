"""The OpenAI-style wire format shared by the endpoints: the sampling fields chat and
completions both take, body parsing, the refusal of fields OpenAI defines but this server does
not honour, JSON responses, log-probabilities, and SSE chunk encoding.

Pydantic stays here (and in chat_protocol.py, completion_protocol.py); the engine gets plain
dataclasses (`to_sampling_params`). Types are strict, so `"temperature": "hot"` or
`"max_tokens": 1.5` is a 400 naming the parameter rather than a silent coercion. A top-level
`null` means the default, as it does for OpenAI. Unknown fields are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import orjson
from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from wicore_cpp.engine.client import Priority, SamplingParams, TokenLogprob
from wicore_cpp.errors import InvalidRequest, UnsupportedParameter

MAX_STOP_SEQUENCES = 4
MAX_LOGIT_BIAS = 1024
# low, normal, high or urgent in any letter case, as a JSON Schema (ECMA 262) pattern.
PRIORITY_PATTERN = "^(" + "|".join(
    "".join(f"[{c}{c.upper()}]" for c in p.name.lower()) for p in Priority) + ")$"

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]

# A field OpenAI defines that this server does not honour is refused, not dropped: the name
# maps to what is accepted (None: only null) and a hint.
Refusal = tuple[Callable[[Any], bool] | None, str]


def _is(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(v == x and type(v) is type(x) for x in values)


def refuse_unsupported(data: dict, refused: dict[str, Refusal]) -> None:
    """Raise UnsupportedParameter for the first refused field set to something not honoured."""
    for name, (accepted, hint) in refused.items():
        value = data.get(name)
        if value is None or (accepted is not None and accepted(value)):
            continue
        raise UnsupportedParameter(f"'{name}' is not supported by this server{hint}", param=name)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = False


class SamplingFields(BaseModel):
    """The fields chat and completions share."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: Probability = 1.0
    # llama-server's and vLLM's extensions; 0 and -1 turn top_k off, 1.0 the repetition penalty
    top_k: int = Field(0, ge=-1)
    min_p: Probability = 0.0
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    repeat_penalty: float | None = Field(None, gt=0.0, le=10.0)  # llama-server's name
    frequency_penalty: Penalty = 0.0
    presence_penalty: Penalty = 0.0
    logit_bias: dict[str, float] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # The validator below checks these; the schema says them too.
    stop: str | list[str] | None = Field(None, json_schema_extra={
        "minLength": 1, "maxItems": MAX_STOP_SEQUENCES,
        "items": {"type": "string", "minLength": 1}})
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    n: int = Field(1, ge=1)
    # Checked with the X-Priority header by the lifecycle; the pattern documents it.
    priority: str | None = Field(None, json_schema_extra={"pattern": PRIORITY_PATTERN})
    user: str | None = None
    # Beyond OpenAI: the generated token ids in the response, for debugging and tests.
    return_token_ids: bool = False
    # llama-server's name: false neither reuses cached KV nor leaves this prompt's KV cached.
    cache_prompt: bool = True

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, bias in value.items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, not {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases must be between -100 and 100, not {bias}")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @model_validator(mode="after")
    def _one_repetition_penalty(self) -> SamplingFields:
        a, b = self.repetition_penalty, self.repeat_penalty
        if a is not None and b is not None and a != b:
            raise InvalidRequest("repetition_penalty and repeat_penalty differ; send one",
                                 param="repeat_penalty")
        return self

    def _repetition_penalty(self) -> float:
        a, b = self.repetition_penalty, self.repeat_penalty
        return a if a is not None else (b if b is not None else 1.0)

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            min_p=self.min_p,
            repetition_penalty=self._repetition_penalty(),
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            logit_bias=tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items()),
            seed=self.seed,
            stop=self.stop_sequences,
            n=self.n,
            logprobs=logprobs,
            cache_prompt=self.cache_prompt,
        )


Request = TypeVar("Request", bound=BaseModel)


def parse_body(body: bytes, model: type[Request], refused: dict[str, Refusal]) -> Request:
    """Raw body -> request, or InvalidRequest naming the first bad parameter."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    refuse_unsupported(data, refused)
    # OpenAI takes null for "the default" on every optional field.
    data = {k: v for k, v in data.items() if v is not None}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        param = _param_name(err["loc"])
        message = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"invalid value for '{param}': {message}", param=param) from None


def _param_name(loc: tuple) -> str:
    """('messages', 0, 'role') -> 'messages[0].role'; drop pydantic's union-branch labels."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "none", "list[ContentPart]", "list[str]", "list[int]",
                      "StreamOptions", "NamedToolChoice", "function-after", "function-before") \
                or "[" in str(part) or str(part).startswith(("literal", "function-")):
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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def _token_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(items: list[TokenLogprob]) -> list[dict]:
    """Chat's `logprobs.content`: each token with its logprob, bytes and alternatives."""
    return [{
        "token": _token_text(piece),
        "logprob": logprob,
        "bytes": list(piece),
        "top_logprobs": [{"token": _token_text(p), "logprob": lp, "bytes": list(p)}
                         for p, lp in top],
    } for piece, logprob, top in items]


def completion_logprobs(items: list[TokenLogprob], text_offset: int) -> dict:
    """The completions endpoint's `logprobs`: parallel lists, offsets into the choice's text."""
    tokens, offsets = [], []
    for piece, _, _ in items:
        tokens.append(_token_text(piece))
        offsets.append(text_offset)
        text_offset += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in items],
        "top_logprobs": [None if lp is None else {_token_text(p): lp for p, lp in top}
                         for _, lp, top in items],
        "text_offset": offsets,
    }


class ChunkEncoder:
    """Pre-encodes the invariant parts of one stream's chunks.

    A content chunk of choice 0 without extras is the same JSON every time but for the text,
    so the common per-token path is one `orjson.dumps` of the text between two byte strings,
    not a dict built and serialised.
    """

    def __init__(self, request_id: str, created: int, model: str,
                 obj: str = "chat.completion.chunk"):
        self._head = orjson.dumps(
            {"id": request_id, "object": obj, "created": created, "model": model}
        )[:-1]
        self._content_prefix = (b"data: " + self._head
                                + b',"choices":[{"index":0,"delta":{"content":')
        self.request_id = request_id

    def event(self, choices: list, **extra) -> bytes:
        body = self._head + b',"choices":' + orjson.dumps(choices)
        if extra:
            body += b"," + orjson.dumps(extra)[1:-1]
        return b"data: " + body + b"}\n\n"

    def role(self, index: int = 0) -> bytes:
        return self.event([{"index": index, "delta": {"role": "assistant"}, "finish_reason": None}])

    def content(self, text: str, token_ids: list[int] | None = None, index: int = 0,
                logprobs: list[TokenLogprob] | None = None) -> bytes:
        if token_ids is None and index == 0 and logprobs is None:
            return self._content_prefix + orjson.dumps(text) + b'},"finish_reason":null}]}\n\n'
        choice: dict = {"index": index, "delta": {"content": text}, "finish_reason": None}
        if logprobs is not None:
            choice["logprobs"] = {"content": chat_logprobs(logprobs), "refusal": None}
        if token_ids is not None:
            choice["token_ids"] = token_ids
        return self.event([choice])

    def tool_calls(self, index: int, calls: list) -> list[bytes]:
        """OpenAI's streamed tool calls: per call, a chunk with its id, type and name (and
        empty arguments), then one with the arguments."""
        out = []
        for i, call in enumerate(calls):
            head = {"index": i, "id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": ""}}
            args = {"index": i, "function": {"arguments": call.arguments}}
            for part in (head, args):
                out.append(self.event([{"index": index, "delta": {"tool_calls": [part]},
                                        "finish_reason": None}]))
        return out

    def tool_call_delta(self, index: int, part) -> bytes:
        """One piece of a tool call being streamed (a `CallDelta`): its head (id, type,
        name, empty arguments) or a piece of its arguments."""
        if part.id is not None:
            call = {"index": part.index, "id": part.id, "type": "function",
                    "function": {"name": part.name, "arguments": part.arguments}}
        else:
            call = {"index": part.index, "function": {"arguments": part.arguments}}
        return self.event([{"index": index, "delta": {"tool_calls": [call]},
                            "finish_reason": None}])

    def finish(self, reason: str, index: int = 0) -> bytes:
        return self.event([{"index": index, "delta": {}, "finish_reason": reason}])

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> bytes:
        return self.event([], usage=usage(prompt_tokens, completion_tokens, cached_tokens))

    @staticmethod
    def error(payload: dict) -> bytes:
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    DONE = b"data: [DONE]\n\n"
