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
    generations,
    merged_events,
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
@documented("Text completion of a raw prompt (or a list of prompts), as JSON or (stream: true) "
            "server-sent events",
            request=CompletionRequest, responses={200: TextCompletion},
            errors=(400, 404, 408, 413, 429, 500, 503, 504), event_stream=True,
            headers=(PRIORITY_HEADER,), response_headers=("X-Request-Id",))
async def completions(request: web.Request) -> web.StreamResponse:
    """A completion of each prompt: JSON, or SSE chunks of `text_completion` objects. With
    several prompts, each is an engine request of its own (same priority, each admitted like
    one request); the choices are numbered prompt-major and the usage is their sum."""
    state = request.app[STATE]
    req = parse_completion_request(await request.read(), state.config.max_concurrent_requests)
    params = req.to_sampling_params(state.config.default_max_tokens)

    def submit_for(prompt: str | list[int]):
        def submit(engine, priority, tenant):
            return engine.complete(req.model, prompt, params, priority, tenant=tenant)
        return submit

    prompts = req.prompts
    async with generations(request, req.priority, [submit_for(p) for p in prompts]) as gens:
        echoes = [""] * len(gens)
        if req.echo:
            echoes = [p if isinstance(p, str) else
                      await state.engine.detokenize(gen.model_id, p)
                      for p, gen in zip(prompts, gens, strict=True)]
        if req.stream:
            return await _stream(request, req, gens, echoes)
        return await _complete(req, gens, echoes)


def _choice(index: int, text: str, finish_reason: str | None,
            logprobs: dict | None, token_ids: list[int] | None) -> dict:
    choice: dict = {"index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": finish_reason}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return choice


def _split_prompt_logprobs(gen: Generation, logprobs: list[TokenLogprob]
                           ) -> tuple[list[TokenLogprob], list[TokenLogprob]]:
    """(the prompt's, the generated tokens') from the first delta of a prompt's choice 0
    (the worker sends one entry per prompt token first; see SamplingParams.prompt_logprobs)."""
    k = gen.num_prompt_tokens
    return logprobs[:k], logprobs[k:]


def _with_prompt(prompt: list[TokenLogprob], generated: dict) -> dict:
    """A choice's `logprobs`: the echoed prompt's tokens (offsets from 0), then its own."""
    if not prompt:
        return generated
    head = completion_logprobs(prompt, 0)
    return {key: head[key] + generated[key] for key in head}


async def _write_echoes(response: web.StreamResponse, enc: ChunkEncoder, echoes: list[str],
                        n: int, prompts, prompt_lps: list[TokenLogprob]) -> None:
    """The echo chunk of each choice of these prompts (with the prompt's logprobs, if any)."""
    for p in prompts:
        if not echoes[p]:
            continue
        lp = completion_logprobs(prompt_lps, 0) if prompt_lps else None
        for c in range(p * n, (p + 1) * n):
            await response.write(enc.event([_choice(c, echoes[p], None, lp, None)]))


def _usage_counts(gens: list[Generation]) -> tuple[int, int]:
    """(prompt tokens, cached prompt tokens) of all the prompts together."""
    return (sum(g.num_prompt_tokens for g in gens), sum(g.num_cached_tokens for g in gens))


async def _complete(req: CompletionRequest, gens: list[Generation],
                    echoes: list[str]) -> web.Response:
    n = gens[0].num_choices
    total = n * len(gens)
    texts: list[list[str]] = [[echoes[c // n]] for c in range(total)]
    ids: list[list[int]] = [[] for _ in range(total)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(total)]
    finish: list[str | None] = [None] * total
    prompt_lps: list[list[TokenLogprob]] = [[] for _ in gens]
    events = merged_events(gens)
    async for p, event in events:
        if isinstance(event, TokenDelta):
            c = p * n + event.index
            texts[c].append(event.text)
            ids[c].extend(event.token_ids)
            lps = event.logprobs or []
            if req.wants_prompt_logprobs and event.index == 0 and not prompt_lps[p]:
                prompt_lps[p], lps = _split_prompt_logprobs(gens[p], lps)
            logprobs[c].extend(lps)
            finish[c] = event.finish_reason or finish[c]
            continue
        if event.error is not None:
            raise event.error  # the lifecycle aborts the other prompts
        for c in range(p * n, (p + 1) * n):
            finish[c] = finish[c] or event.finish_reason
    choices = [_choice(
        c, "".join(texts[c]), finish[c],
        _with_prompt(prompt_lps[c // n], completion_logprobs(logprobs[c], len(echoes[c // n])))
        if req.logprobs is not None else None,
        ids[c] if req.return_token_ids else None) for c in range(total)]
    prompt_tokens, cached = _usage_counts(gens)
    body = text_completion(gens[0].request_id, int(time.time()), gens[0].model_id, choices,
                           prompt_tokens, sum(len(x) for x in ids), cached)
    return json_response(body, headers=request_id_header(gens[0]))


async def _stream(request: web.Request, req: CompletionRequest, gens: list[Generation],
                  echoes: list[str]) -> web.StreamResponse:
    """SSE: the echoes (if asked), text chunks per decode step and choice, each choice's
    finish chunk, usage, [DONE]. An error (other than a timeout) ends the stream with its
    error event; a prompt that times out finishes its choices and the others go on."""
    first = gens[0]
    enc = ChunkEncoder(first.request_id, int(time.time()), first.model_id, obj="text_completion")
    n = first.num_choices
    total = n * len(gens)
    offsets = [len(echoes[c // n]) for c in range(total)]
    ended = [False] * total
    num_tokens = 0
    response = event_stream(first)
    try:
        await response.prepare(request)
        # The echo goes first; with logprobs, once the prompt's log-probabilities have come
        # (with the first delta of the prompt's choice 0).
        # (Choice 0's first update of a step comes before the other choices'.)
        echo_due = [req.wants_prompt_logprobs] * len(gens)
        if not req.wants_prompt_logprobs:
            await _write_echoes(response, enc, echoes, n, range(len(gens)), [])
        events = merged_events(gens)
        async for p, event in events:
            if isinstance(event, TokenDelta):
                c = p * n + event.index
                num_tokens += len(event.token_ids)
                lps = event.logprobs
                if echo_due[p] and event.index == 0:
                    prompt_lps, lps = _split_prompt_logprobs(gens[p], lps or [])
                    await _write_echoes(response, enc, echoes, n, [p], prompt_lps)
                    echo_due[p] = False
                lp = None
                if req.logprobs is not None and lps:
                    lp = completion_logprobs(lps, offsets[c])
                offsets[c] += len(event.text)
                if event.text or lp or req.return_token_ids:
                    await response.write(enc.event([_choice(
                        c, event.text, None, lp,
                        event.token_ids if req.return_token_ids else None)]))
                if event.finish_reason is not None:
                    ended[c] = True
                    await response.write(enc.event([_choice(c, "", event.finish_reason,
                                                            None, None)]))
                continue
            if event.error is not None and event.finish_reason != FINISH_TIMEOUT:
                await response.write(ChunkEncoder.error(event.error.to_dict()))
                break  # the lifecycle aborts the other prompts
            for c in range(p * n, (p + 1) * n):
                if not ended[c]:
                    ended[c] = True
                    await response.write(enc.event([_choice(c, "", event.finish_reason,
                                                            None, None)]))
        if req.include_usage:
            prompt_tokens, cached = _usage_counts(gens)
            await response.write(enc.usage(prompt_tokens, num_tokens, cached))
        await response.write(ChunkEncoder.DONE)
    except (ConnectionResetError, ConnectionError):
        log.info("client went away from stream %s", first.request_id)
    return response
