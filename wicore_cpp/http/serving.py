"""Chat completions: from a validated request to a JSON response or an SSE stream.

The route hands over a parsed request; this layer resolves the model, prepares and measures
the prompt (before anything is queued), submits to the scheduler, and turns the request's
events into the OpenAI response shapes.
"""

from __future__ import annotations

import logging
import time
import uuid

import orjson
from aiohttp import web

from wicore_cpp.config import Config
from wicore_cpp.engine.messages import GenerateRequest
from wicore_cpp.engine.queue import Priority
from wicore_cpp.engine.scheduler import (
    FINISH_TIMEOUT,
    RequestEnded,
    Scheduler,
    TokenDelta,
    TrackedRequest,
)
from wicore_cpp.engine.tokenizer import PromptTokenizer
from wicore_cpp.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    ServiceUnavailable,
)
from wicore_cpp.http.protocol import ChatCompletionRequest, ChunkEncoder, chat_completion

log = logging.getLogger("wicore.serving")


def new_request_id() -> str:
    """`req_<ms timestamp>` as in the API document, plus random hex so ids never collide."""
    return f"req_{int(time.time() * 1000)}{uuid.uuid4().hex[:12]}"


def resolve_priority(body_value: str | None, header_value: str | None) -> Priority:
    """Body field `priority` wins over header `X-Priority`; default normal."""
    value = body_value if body_value is not None else header_value
    if value is None:
        return Priority.NORMAL
    try:
        return Priority.parse(value)
    except ValueError as exc:
        param = "priority" if body_value is not None else "X-Priority"
        raise InvalidRequest(str(exc), param=param) from None


class ChatService:
    def __init__(self, config: Config, scheduler: Scheduler, tokenizers: dict[str, PromptTokenizer]):
        self.config = config
        self.scheduler = scheduler
        self.tokenizers = tokenizers
        self.default_model = next(iter(tokenizers))

    async def submit(self, chat: ChatCompletionRequest, priority: Priority) -> TrackedRequest:
        """Validate against the model, tokenize, and queue. Raises WicoreError."""
        model_id = chat.model or self.default_model
        if model_id not in self.tokenizers:
            raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
        if self.scheduler.is_draining:
            raise ServiceUnavailable("the server is shutting down", retry_after=5)
        prompt = await self.tokenizers[model_id].encode_chat(chat.template_messages())
        limit = self.scheduler.pools[model_id].max_seq_len
        if len(prompt) >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"messages resulted in {len(prompt)} tokens.",
                param="messages",
            )
        max_tokens = min(chat.requested_max_tokens(self.config.default_max_tokens), limit - len(prompt))
        request_id = new_request_id()
        generate = GenerateRequest(request_id, prompt, chat.to_sampling_params(max_tokens),
                                   int(priority))
        req = self.scheduler.submit(model_id, generate, priority)
        log.debug("request %s: %d prompt tokens, max_tokens %d, priority %s",
                  request_id, len(prompt), max_tokens, priority.name.lower())
        return req

    async def complete(self, chat: ChatCompletionRequest, req: TrackedRequest) -> web.Response:
        """Wait for the whole completion; failures become their HTTP error."""
        texts: list[str] = []
        token_ids: list[int] = []
        while True:
            event = await req.events.get()
            if isinstance(event, TokenDelta):
                texts.append(event.text)
                token_ids.extend(event.token_ids)
                continue
            if event.error is not None:
                raise event.error
            body = chat_completion(
                req.request_id, int(time.time()), req.model_id, "".join(texts),
                event.finish_reason, req.num_prompt_tokens, token_ids,
            )
            if not chat.return_token_ids:
                del body["choices"][0]["token_ids"]
            return web.Response(body=orjson.dumps(body), content_type="application/json",
                                headers={"X-Request-Id": req.request_id})

    async def stream(self, http_request: web.Request, chat: ChatCompletionRequest,
                     req: TrackedRequest) -> web.StreamResponse:
        """SSE: role chunk, content chunks (one per decode step), finish chunk, usage, [DONE]."""
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
            "X-Request-Id": req.request_id,
        })
        enc = ChunkEncoder(req.request_id, int(time.time()), req.model_id)
        with_ids = chat.return_token_ids
        num_completion = 0
        try:
            await response.prepare(http_request)
            await response.write(enc.role())
            while True:
                event = await req.events.get()
                if isinstance(event, TokenDelta):
                    num_completion += len(event.token_ids)
                    if event.text or with_ids:
                        await response.write(
                            enc.content(event.text, event.token_ids if with_ids else None))
                    continue
                await response.write(self._stream_end(enc, event))
                if chat.include_usage:
                    await response.write(enc.usage(req.num_prompt_tokens, num_completion))
                await response.write(ChunkEncoder.DONE)
                break
        except (ConnectionResetError, ConnectionError):
            log.info("client went away from stream %s", req.request_id)
            self.scheduler.cancel(req.request_id)
        return response

    @staticmethod
    def _stream_end(enc: ChunkEncoder, event: RequestEnded) -> bytes:
        """A finish chunk for a normal end or a timeout; an error event for a failure."""
        if event.error is None or event.finish_reason == FINISH_TIMEOUT:
            return enc.finish(event.finish_reason)
        return ChunkEncoder.error(event.error.to_dict())
