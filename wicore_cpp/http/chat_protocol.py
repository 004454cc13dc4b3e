"""`POST /v1/chat/completions` on the wire: the request (messages with tool calls and tool
results, tools, tool_choice, response_format, logprobs) and the JSON response."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from wicore_cpp.engine.client import (
    ResponseFormat,
    SamplingParams,
    ToolCall,
    ToolFunction,
    ToolSpec,
)
from wicore_cpp.errors import InvalidRequest, excerpt
from wicore_cpp.http.protocol import (
    Refusal,
    SamplingFields,
    _is,
    chat_logprobs,
    parse_body,
    usage,
)

CHAT_REFUSED: dict[str, Refusal] = {
    "audio": (None, ": audio output is not available"),
    "modalities": (lambda v: v == ["text"], ": only [\"text\"]"),
    "prediction": (None, ": predicted outputs are not available"),
    "web_search_options": (None, ": there is no web search"),
    "functions": (None, "; use 'tools'"),
    "function_call": (None, "; use 'tool_choice'"),
    "reasoning_effort": (None, ": this model does not reason in a separate channel"),
    "verbosity": (None, ""),
    "store": (_is(False), ": completions are not stored"),
    "service_tier": (_is("auto", "default"), ": one tier only ('auto' or 'default')"),
}


class ImageURL(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    url: str = Field(description="A data: URL (PNG, JPEG, WebP or GIF, base64), or an http(s) "
                     "URL on a host the server allows (image_url_hosts).")
    detail: str | None = Field(None, json_schema_extra={"enum": ["auto", "high"]})

    @field_validator("detail")
    @classmethod
    def _check_detail(cls, value: str | None) -> str | None:
        if value not in (None, "auto", "high"):
            raise ValueError(f"{excerpt(value)} is not available: Gemma 3 sees every image at "
                             "its one input size (256 tokens); use 'auto' or 'high'")
        return value


class ContentPart(BaseModel):
    """A text part, or (in a user message) an image part."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: str = Field(json_schema_extra={"enum": ["text", "image_url"]})
    text: str | None = None
    image_url: ImageURL | None = None

    @field_validator("type")
    @classmethod
    def _known_type(cls, value: str) -> str:
        if value not in ("text", "image_url"):
            raise ValueError(f"content parts of type {excerpt(value)} are not supported; only "
                             "'text' and 'image_url'")
        return value

    @model_validator(mode="after")
    def _check_fields(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url': {\"url\": ...}")
        return self


@dataclass(slots=True, frozen=True)
class ImageRef:
    """An image part as the edge fetches it: its URL and where it was in the request."""

    param: str  # messages[i].content[j].image_url
    url: str


class FunctionCallIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str


class ToolCallIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    # Text parts are tried first so that a bad part's own message reaches the client. After
    # the fields it depends on, and checked when absent too.
    content: Annotated[list[ContentPart], Field(min_length=1)] | str | None = Field(
        None, validate_default=True)

    @field_validator("content")
    @classmethod
    def _content_or_calls(cls, value, info: ValidationInfo):
        if value is None and not (info.data.get("role") == "assistant"
                                  and info.data.get("tool_calls")):
            raise ValueError("a string or a non-empty array of content parts is required "
                             "(null only for an assistant message with tool_calls)")
        if isinstance(value, list) and info.data.get("role") != "user" \
                and any(part.type == "image_url" for part in value):
            raise ValueError("image_url parts are taken in user messages only")
        return value

    @model_validator(mode="after")
    def _check_role_fields(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        return self

    def text(self) -> str | None:
        if self.content is None or isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content if part.type == "text")

    @property
    def has_images(self) -> bool:
        return isinstance(self.content, list) and any(p.type == "image_url"
                                                      for p in self.content)

    def parts(self) -> list[dict[str, str]]:
        """Content with images as the engine takes it: text parts (neighbours joined by a
        newline, as a message without images joins them) and `{"type": "image"}` parts."""
        out: list[dict[str, str]] = []
        for part in self.content or []:
            if part.type == "image_url":
                out.append({"type": "image"})
            elif out and out[-1]["type"] == "text":
                out[-1]["text"] += "\n" + part.text
            else:
                out.append({"type": "text", "text": part.text})
        return out


class FunctionDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormatIn(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self) -> ResponseFormatIn:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormatIn | None = None
    metadata: dict[str, str] | None = None  # only meaningful for stored completions
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # prompt reuse needs no key here

    @model_validator(mode="after")
    def _check_tools(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        if self.tool_choice is not None and not self.tools and self.tool_choice != "none":
            raise ValueError("tool_choice needs tools")
        if isinstance(self.tool_choice, NamedToolChoice) \
                and self.tool_choice.function.name not in names:
            raise ValueError(f"tool_choice names the function "
                             f"{self.tool_choice.function.name!r}, which is not in tools")
        return self

    def requested_max_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default

    def image_refs(self) -> list[ImageRef]:
        """Every image part, in order, with the parameter that names it."""
        return [ImageRef(f"messages[{i}].content[{j}].image_url", part.image_url.url)
                for i, m in enumerate(self.messages) if m.has_images
                for j, part in enumerate(m.content) if part.type == "image_url"]

    def engine_messages(self) -> list[dict[str, Any]]:
        """Messages for the engine (`developer` is OpenAI's new `system`); a user message with
        images keeps its parts (see ChatMessage.parts), their images in `image_refs` order."""
        out = []
        for m in self.messages:
            msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                   "content": m.parts() if m.has_images else m.text()}
            if m.tool_calls:
                msg["tool_calls"] = [{"id": c.id, "name": c.function.name,
                                      "arguments": c.function.arguments} for c in m.tool_calls]
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out

    def tool_spec(self) -> ToolSpec | None:
        if not self.tools:
            return None
        functions = tuple(ToolFunction(t.function.name, t.function.description,
                                       t.function.parameters) for t in self.tools)
        choice, named = "auto", None
        if isinstance(self.tool_choice, NamedToolChoice):
            choice, named = "function", self.tool_choice.function.name
        elif self.tool_choice is not None:
            choice = self.tool_choice
        return ToolSpec(functions, choice, named, self.parallel_tool_calls)

    def output_format(self) -> ResponseFormat | None:
        rf = self.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_schema" and rf.json_schema.schema_ is not None:
            return ResponseFormat("json_schema", rf.json_schema.schema_)
        return ResponseFormat("json_object")

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self.sampling_params(max_tokens, logprobs)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Raw body -> request, or InvalidRequest naming the first bad parameter."""
    chat = parse_body(body, ChatCompletionRequest, CHAT_REFUSED)
    if chat.response_format is not None and chat.response_format.type != "text" \
            and chat.tool_spec() is not None and chat.tool_spec().is_forced:
        # Nothing is left for the answer format to shape: the answer is the forced call.
        raise InvalidRequest("response_format cannot be combined with a forced tool call "
                             "(tool_choice 'required' or a named function)",
                             param="response_format")
    return chat


def chat_completion(
    request_id: str, created: int, model: str, choices: list[dict], prompt_tokens: int,
    completion_tokens: int, cached_tokens: int = 0,
) -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens),
    }


def chat_choice(index: int, text: str | None, calls: list[ToolCall], finish_reason: str,
                logprobs: list | None, token_ids: list[int] | None) -> dict:
    message: dict = {"role": "assistant", "content": text}
    if calls:
        message["content"] = text or None
        message["tool_calls"] = [tool_call(c) for c in calls]
        finish_reason = "tool_calls"
    choice: dict = {"index": index, "message": message, "finish_reason": finish_reason}
    if logprobs is not None:
        choice["logprobs"] = {"content": chat_logprobs(logprobs), "refusal": None}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def tool_call(call: ToolCall) -> dict:
    return {"id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": call.arguments}}
