"""`POST /v1/chat/completions` (API document §1): JSON, or SSE when `stream` is true."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from wicore_cpp.engine.client import FINISH_TIMEOUT, Generation, RequestEnded, TokenDelta
from wicore_cpp.http.lifecycle import (
    PRIORITY_HEADER,
    event_stream,
    generating,
    generation,
    request_id_header,
)
from wicore_cpp.http.openapi import documented
from wicore_cpp.http.protocol import (
    ChatCompletionRequest,
    ChunkEncoder,
    chat_completion,
    json_response,
    parse_chat_request,
)
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
    max_tokens = chat.requested_max_tokens(request.app[STATE].config.default_max_tokens)
    async with generation(request, chat.model, chat.template_messages(),
                          chat.to_sampling_params(max_tokens), chat.priority) as gen:
        if chat.stream:
            return await _stream(request, chat, gen)
        return await _complete(chat, gen)


async def _complete(chat: ChatCompletionRequest, gen: Generation) -> web.Response:
    """Wait for the whole completion; failures become their HTTP error."""
    texts: list[str] = []
    token_ids: list[int] = []
    async for event in gen:
        if isinstance(event, TokenDelta):
            texts.append(event.text)
            token_ids.extend(event.token_ids)
            continue
        if event.error is not None:
            raise event.error
        body = chat_completion(
            gen.request_id, int(time.time()), gen.model_id, "".join(texts),
            event.finish_reason, gen.num_prompt_tokens, token_ids,
        )
        if not chat.return_token_ids:
            del body["choices"][0]["token_ids"]
        return json_response(body, headers=request_id_header(gen))
    raise AssertionError("a generation always ends with RequestEnded")


async def _stream(request: web.Request, chat: ChatCompletionRequest,
                  gen: Generation) -> web.StreamResponse:
    """SSE: role chunk, content chunks (one per decode step), finish chunk, usage, [DONE]."""
    enc = ChunkEncoder(gen.request_id, int(time.time()), gen.model_id)
    with_ids = chat.return_token_ids
    num_completion = 0
    response = event_stream(gen)
    try:
        await response.prepare(request)
        await response.write(enc.role())
        async for event in gen:
            if isinstance(event, TokenDelta):
                num_completion += len(event.token_ids)
                if event.text or with_ids:
                    await response.write(
                        enc.content(event.text, event.token_ids if with_ids else None))
                continue
            await response.write(_stream_end(enc, event))
            if chat.include_usage:
                await response.write(enc.usage(gen.num_prompt_tokens, num_completion))
            await response.write(ChunkEncoder.DONE)
    except (ConnectionResetError, ConnectionError):
        # The lifecycle aborts the request as the handler leaves.
        log.info("client went away from stream %s", gen.request_id)
    return response


def _stream_end(enc: ChunkEncoder, event: RequestEnded) -> bytes:
    """A finish chunk for a normal end or a timeout; an error event for a failure."""
    if event.error is None or event.finish_reason == FINISH_TIMEOUT:
        return enc.finish(event.finish_reason)
    return ChunkEncoder.error(event.error.to_dict())
