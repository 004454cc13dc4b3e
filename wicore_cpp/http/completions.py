"""`POST /v1/completions`: OpenAI's text completions (a raw prompt, no chat template), JSON or
SSE, through the same scheduler, priorities and limits as chat."""

from __future__ import annotations

import logging
import time

from aiohttp import web

from wicore_cpp.engine.client import FINISH_TIMEOUT, Generation, TokenDelta, TokenLogprob
from wicore_cpp.http.completion_protocol import (
    CompletionRequest,
    parse_completion_request,
    text_completion,
)
from wicore_cpp.http.lifecycle import (
    PRIORITY_HEADER,
    event_stream,
    generating,
    generation,
    request_id_header,
)
from wicore_cpp.http.openapi import documented
from wicore_cpp.http.protocol import ChunkEncoder, completion_logprobs, json_response
from wicore_cpp.http.responses import TextCompletion
from wicore_cpp.http.state import STATE

log = logging.getLogger("wicore.completions")

routes = web.RouteTableDef()


@routes.post("/v1/completions")
@generating
@documented("Text completion of a raw prompt, as JSON or (stream: true) server-sent events",
            request=CompletionRequest, responses={200: TextCompletion},
            errors=(400, 404, 408, 413, 429, 500, 503, 504), event_stream=True,
            headers=(PRIORITY_HEADER,), response_headers=("X-Request-Id",))
async def completions(request: web.Request) -> web.StreamResponse:
    """A completion of `prompt`: JSON, or SSE chunks of `text_completion` objects."""
    req = parse_completion_request(await request.read())
    params = req.to_sampling_params(request.app[STATE].config.default_max_tokens)

    def submit(engine, priority, tenant):
        return engine.complete(req.model, req.prompt, params, priority, tenant=tenant)

    async with generation(request, req.priority, submit) as gen:
        echo = ""
        if req.echo:
            echo = req.prompt if isinstance(req.prompt, str) else \
                await request.app[STATE].engine.detokenize(gen.model_id, req.prompt)
        if req.stream:
            return await _stream(request, req, gen, echo)
        return await _complete(req, gen, echo)


def _choice(index: int, text: str, finish_reason: str | None,
            logprobs: dict | None, token_ids: list[int] | None) -> dict:
    choice: dict = {"index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


async def _complete(req: CompletionRequest, gen: Generation, echo: str) -> web.Response:
    n = gen.num_choices
    texts: list[list[str]] = [[echo] for _ in range(n)]
    ids: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finish: list[str | None] = [None] * n
    async for event in gen:
        if isinstance(event, TokenDelta):
            i = event.index
            texts[i].append(event.text)
            ids[i].extend(event.token_ids)
            logprobs[i].extend(event.logprobs or ())
            finish[i] = event.finish_reason or finish[i]
            continue
        if event.error is not None:
            raise event.error
        choices = [_choice(
            i, "".join(texts[i]), finish[i] or event.finish_reason,
            completion_logprobs(logprobs[i], len(echo)) if req.logprobs is not None else None,
            ids[i] if req.return_token_ids else None) for i in range(n)]
        body = text_completion(gen.request_id, int(time.time()), gen.model_id, choices,
                               gen.num_prompt_tokens, sum(len(x) for x in ids),
                               gen.num_cached_tokens)
        return json_response(body, headers=request_id_header(gen))
    raise AssertionError("a generation always ends with RequestEnded")


async def _stream(request: web.Request, req: CompletionRequest, gen: Generation,
                  echo: str) -> web.StreamResponse:
    """SSE: the echo (if asked), text chunks per decode step and choice, each choice's finish
    chunk, usage, [DONE]."""
    enc = ChunkEncoder(gen.request_id, int(time.time()), gen.model_id, obj="text_completion")
    n = gen.num_choices
    offsets = [len(echo)] * n
    ended = [False] * n
    num_tokens = 0
    response = event_stream(gen)
    try:
        await response.prepare(request)
        if echo:
            for i in range(n):
                await response.write(enc.event([_choice(i, echo, None, None, None)]))
        async for event in gen:
            if isinstance(event, TokenDelta):
                i = event.index
                num_tokens += len(event.token_ids)
                lp = None
                if req.logprobs is not None and event.logprobs:
                    lp = completion_logprobs(event.logprobs, offsets[i])
                offsets[i] += len(event.text)
                if event.text or lp or req.return_token_ids:
                    await response.write(enc.event([_choice(
                        i, event.text, None, lp,
                        event.token_ids if req.return_token_ids else None)]))
                if event.finish_reason is not None:
                    ended[i] = True
                    await response.write(enc.event([_choice(i, "", event.finish_reason,
                                                            None, None)]))
                continue
            if event.error is not None and event.finish_reason != FINISH_TIMEOUT:
                await response.write(ChunkEncoder.error(event.error.to_dict()))
            else:
                for i in range(n):
                    if not ended[i]:
                        await response.write(enc.event([_choice(i, "", event.finish_reason,
                                                                None, None)]))
            if req.include_usage:
                await response.write(enc.usage(gen.num_prompt_tokens, num_tokens,
                                               gen.num_cached_tokens))
            await response.write(ChunkEncoder.DONE)
    except (ConnectionResetError, ConnectionError):
        log.info("client went away from stream %s", gen.request_id)
    return response
