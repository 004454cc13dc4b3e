"""`POST /v1/chat/completions` (API document §1): JSON, or SSE when `stream` is true; `n`
choices, log-probabilities, tool calls and JSON output."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from aiohttp import web

from wicore_cpp.engine.client import (
    FINISH_TIMEOUT,
    CallDelta,
    Generation,
    TokenDelta,
    TokenLogprob,
    ToolCall,
    ToolCallParser,
    ToolSpec,
    call_triggers,
)
from wicore_cpp.errors import InvalidRequest
from wicore_cpp.http.chat_protocol import (
    ChatCompletionRequest,
    chat_choice,
    chat_completion,
    parse_chat_request,
)
from wicore_cpp.http.images import load_images
from wicore_cpp.http.lifecycle import (
    PRIORITY_HEADER,
    event_stream,
    generating,
    generation,
    request_id_header,
)
from wicore_cpp.http.openapi import documented
from wicore_cpp.http.protocol import ChunkEncoder, json_response
from wicore_cpp.http.responses import ChatCompletion
from wicore_cpp.http.state import STATE

log = logging.getLogger("wicore.chat")

routes = web.RouteTableDef()


@routes.post("/v1/chat/completions")
@generating
@documented("Chat completion, as JSON or (stream: true) server-sent events",
            request=ChatCompletionRequest, responses={200: ChatCompletion},
            errors=(400, 404, 408, 413, 429, 500, 503, 504), event_stream=True,
            headers=(PRIORITY_HEADER,), response_headers=("X-Request-Id",))
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions: the whole completion as JSON, or a stream of SSE chunks."""
    chat = parse_chat_request(await request.read())
    state = request.app[STATE]
    max_tokens = chat.requested_max_tokens(state.config.default_max_tokens)
    tools = chat.tool_spec()
    images = []
    if refs := chat.image_refs():
        if not state.engine.model(chat.model).takes_images:  # refused before any fetch
            raise InvalidRequest(f"the model {chat.model or state.engine.default_model_id!r} "
                                 "does not take images: no vision projector (mmproj) is loaded "
                                 "for it", param=refs[0].param)
        images = await load_images(refs, state.config)

    def submit(engine, priority, tenant):
        return engine.generate(chat.model, chat.engine_messages(),
                               chat.to_sampling_params(max_tokens), priority,
                               tools=tools, response_format=chat.output_format(), tenant=tenant,
                               images=images)

    # Streamed calls go out as they are written wherever a grammar holds the text to a call
    # (see ToolCallParser): not where a JSON answer is the alternative to calls, and not with
    # stop strings (text held back for them would hide where the trigger matched).
    stream_calls = (chat.stream and tools is not None and tools.is_active
                    and (tools.is_forced or (chat.output_format() is None
                                             and not chat.stop_sequences)))
    async with generation(request, chat.priority, submit) as gen:
        choices = [_Choice(i, tools, chat.logprobs, stream_calls)
                   for i in range(gen.num_choices)]
        if chat.stream:
            return await _stream(request, chat, gen, choices)
        return await _complete(chat, gen, choices)


@dataclass(slots=True)
class _Choice:
    """One choice's output as it arrives; tool calls are separated from its text."""

    index: int
    tools: ToolSpec | None
    wants_logprobs: bool
    stream_calls: bool = False
    parser: ToolCallParser | None = None
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        if self.tools is not None and self.tools.is_active:
            self.parser = ToolCallParser(
                self.tools, stream_calls=self.stream_calls,
                trigger_patterns=() if self.tools.is_forced else call_triggers(self.tools))

    def add(self, event: TokenDelta) -> tuple[str, list[CallDelta]]:
        """Take a delta; returns the text that may be shown now and the pieces of tool calls
        that may be sent now."""
        self.token_ids.extend(event.token_ids)
        if event.logprobs:
            self.logprobs.extend(event.logprobs)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
        if self.parser is None:
            text, calls = event.text, []
        else:
            text, calls = self.parser.feed_stream(event.text)
        self.texts.append(text)
        return text, calls

    def end(self) -> tuple[str, list[ToolCall]]:
        """Text held back and the tool calls found, once the choice is over."""
        if self.parser is None:
            return "", []
        rest, calls = self.parser.finish()
        self.texts.append(rest)
        return rest, calls


async def _complete(chat: ChatCompletionRequest, gen: Generation,
                    choices: list[_Choice]) -> web.Response:
    """Wait for the whole completion; failures become their HTTP error."""
    async for event in gen:
        if isinstance(event, TokenDelta):
            choices[event.index].add(event)  # calls are taken whole at the end
            continue
        if event.error is not None:
            raise event.error  # a timeout too is its error (504): nothing was sent yet
        body_choices = []
        for c in choices:
            _, calls = c.end()
            body_choices.append(chat_choice(
                c.index, "".join(c.texts), calls, c.finish_reason or event.finish_reason,
                c.logprobs if chat.logprobs else None,
                c.token_ids if chat.return_token_ids else None))
        body = chat_completion(gen.request_id, int(time.time()), gen.model_id, body_choices,
                               gen.num_prompt_tokens, sum(len(c.token_ids) for c in choices),
                               gen.num_cached_tokens)
        return json_response(body, headers=request_id_header(gen))
    raise AssertionError("a generation always ends with RequestEnded")


async def _stream(request: web.Request, chat: ChatCompletionRequest, gen: Generation,
                  choices: list[_Choice]) -> web.StreamResponse:
    """SSE: a role chunk per choice, content chunks (one per decode step and choice), each
    choice's tool calls and finish chunk as it ends, usage, [DONE]."""
    enc = ChunkEncoder(gen.request_id, int(time.time()), gen.model_id)
    with_ids = chat.return_token_ids
    response = event_stream(gen)
    try:
        await response.prepare(request)
        for c in choices:
            await response.write(enc.role(c.index))
        async for event in gen:
            if isinstance(event, TokenDelta):
                c = choices[event.index]
                text, calls = c.add(event)
                logprobs = event.logprobs if chat.logprobs else None
                if text or with_ids or logprobs:
                    await response.write(enc.content(
                        text, event.token_ids if with_ids else None, c.index, logprobs))
                for part in calls:
                    await response.write(enc.tool_call_delta(c.index, part))
                if c.finish_reason is not None:
                    await _end_choice(response, enc, c, c.finish_reason)
                continue
            if event.error is not None and event.finish_reason != FINISH_TIMEOUT:
                await response.write(ChunkEncoder.error(event.error.to_dict()))
            else:
                for c in choices:
                    if c.finish_reason is None:
                        c.finish_reason = event.finish_reason
                        await _end_choice(response, enc, c, event.finish_reason)
            if chat.include_usage:
                await response.write(enc.usage(gen.num_prompt_tokens,
                                               sum(len(c.token_ids) for c in choices),
                                               gen.num_cached_tokens))
            await response.write(ChunkEncoder.DONE)
    except (ConnectionResetError, ConnectionError):
        # The lifecycle aborts the request as the handler leaves.
        log.info("client went away from stream %s", gen.request_id)
    return response


async def _end_choice(response: web.StreamResponse, enc: ChunkEncoder, c: _Choice,
                      reason: str) -> None:
    streamed = c.parser is not None and c.parser.streams_calls
    rest, calls = c.end()
    if rest:
        await response.write(enc.content(rest, index=c.index))
    if not streamed:
        for chunk in enc.tool_calls(c.index, calls):
            await response.write(chunk)
    # A call cut short (max_tokens) was streamed in part: the reason stays "length".
    complete = not streamed or c.parser.calls_complete
    await response.write(enc.finish("tool_calls" if calls and complete else reason, c.index))
