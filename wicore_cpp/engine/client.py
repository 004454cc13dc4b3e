"""`EngineClient`: the one engine object the HTTP edge holds.

Everything behind it (the scheduler and its queue, the worker processes, the prompt
tokenizers) can change shape without the edge noticing. The edge asks for a generation with
messages, sampling parameters and a priority, and gets a `Generation`: an async iterator of
typed events, `TokenDelta`s then one `RequestEnded`. Anything that stops a request from being
accepted (unknown model, draining, a full queue, a prompt too long) is raised by `generate`
before the first event, as a `WicoreError` the edge maps to HTTP.

The edge also imports the engine's request-side types from here (and only from here), so
this module re-exports them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from wicore_cpp.config import Config
from wicore_cpp.engine.messages import GenerateRequest, SamplingParams
from wicore_cpp.engine.queue import Priority
from wicore_cpp.engine.request import (
    FINISH_TIMEOUT,
    Event,
    RequestEnded,
    TokenDelta,
    TrackedRequest,
    new_request_id,
)
from wicore_cpp.engine.scheduler import Scheduler
from wicore_cpp.engine.stats import EngineStats, WorkerStats
from wicore_cpp.engine.tokenizer import PromptSize, PromptTokenizer
from wicore_cpp.engine.workers import ModelFiles
from wicore_cpp.errors import ContextLengthExceeded, ModelNotFound, excerpt
from wicore_cpp.gguf_file import GGUFFile

__all__ = [
    "FINISH_TIMEOUT",
    "EngineClient",
    "EngineHealth",
    "EngineStats",
    "Event",
    "Generation",
    "Priority",
    "RequestEnded",
    "SamplingParams",
    "ServedModel",
    "TokenDelta",
    "WorkerStats",
]

log = logging.getLogger("wicore.engine")

DEFAULT_CTX_SIZE = 32768


@dataclass(slots=True, frozen=True)
class ServedModel:
    """A model the engine serves, as clients may see it."""

    model_id: str
    created: int  # unix time of the model file
    context_length: int  # the longest sequence (prompt + completion) a request may have
    capabilities: tuple[str, ...] = ("chat",)


class EngineHealth(enum.Enum):
    HEALTHY = "healthy"
    LOADING = "loading"  # a model is still loading and no worker serves it yet
    DRAINING = "draining"  # shutting down: requests in flight finish, new ones are refused
    UNHEALTHY = "unhealthy"  # no live worker for some model


class Generation:
    """One accepted request: its id and prompt size, and its events as they come."""

    def __init__(self, tracked: TrackedRequest):
        self._tracked = tracked
        self._is_done = False

    @property
    def request_id(self) -> str:
        return self._tracked.request_id

    @property
    def model_id(self) -> str:
        return self._tracked.model_id

    @property
    def num_prompt_tokens(self) -> int:
        return self._tracked.num_prompt_tokens

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Event:
        if self._is_done:
            raise StopAsyncIteration
        event = await self._tracked.events.get()
        self._is_done = isinstance(event, RequestEnded)
        return event


class EngineClient:
    """Starts, feeds and stops the engine; the HTTP edge's only way in."""

    def __init__(
        self,
        config: Config,
        models: dict[str, GGUFFile],
        on_fatal: Callable[[str], None] | None = None,
    ):
        """`models` maps each served model id to its checked GGUF file."""
        self.config = config
        n_ctx = config.ctx_size or DEFAULT_CTX_SIZE
        self._scheduler = Scheduler(
            config,
            {mid: (ModelFiles(m.path, n_ctx), m.context_length) for mid, m in models.items()},
            on_fatal,
        )
        self._tokenizers = {
            mid: PromptTokenizer(m.path, config.log_level, config.max_concurrent_requests)
            for mid, m in models.items()
        }
        self.models: dict[str, ServedModel] = {
            mid: ServedModel(mid, int(m.path.stat().st_mtime),
                             self._scheduler.queues[mid].max_seq_len)
            for mid, m in models.items()
        }
        self.default_model_id = next(iter(models))
        self._warmups: list[asyncio.Task] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the workers and the tokenizers; both load in the background (see `health`)."""
        self._scheduler.start()
        self._warmups = [asyncio.create_task(t.start()) for t in self._tokenizers.values()]

    def begin_drain(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        self._scheduler.begin_drain()

    async def stop(self) -> None:
        """End what is left, stop the workers and the tokenizers."""
        for task in self._warmups:
            task.cancel()
        await self._scheduler.stop()
        await asyncio.gather(*(asyncio.to_thread(t.close) for t in self._tokenizers.values()))

    # -- requests ----------------------------------------------------------------------------

    def model(self, model_id: str | None) -> ServedModel:
        """The served model of that id (None: the default one). Raises ModelNotFound."""
        model = self.models.get(model_id or self.default_model_id)
        if model is None:
            raise ModelNotFound(f"The model {excerpt(model_id)} does not exist", param="model")
        return model

    async def generate(
        self,
        model_id: str | None,
        messages: list[dict[str, str]],
        params: SamplingParams,
        priority: Priority,
    ) -> Generation:
        """Render and tokenize the conversation, check it fits, and queue it.

        `params.max_tokens` is what the client asked for; it is capped by the context left
        after the prompt. Raises a WicoreError when the request cannot be accepted.
        """
        model = self.model(model_id)
        self._scheduler.check_admission(model.model_id)
        tokenizer = self._tokenizers[model.model_id]
        limit = model.context_length
        # What cannot fit however it tokenizes is refused before the costly part.
        size = PromptSize.of(messages)
        at_least = (await tokenizer.bounds()).min_tokens(size)
        if at_least >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"messages ({size.num_messages} messages, {size.num_bytes} bytes of text) "
                f"come to at least {at_least} tokens.",
                param="messages",
            )
        prompt = await tokenizer.encode_chat(messages, size)
        if len(prompt) >= limit:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"messages resulted in {len(prompt)} tokens.",
                param="messages",
            )
        params = dataclasses.replace(params, max_tokens=min(params.max_tokens, limit - len(prompt)))
        request_id = new_request_id()
        generate = GenerateRequest(request_id, prompt, params, int(priority))
        tracked = self._scheduler.submit(model.model_id, generate, priority)
        log.debug("request %s: %d prompt tokens, max_tokens %d, priority %s",
                  request_id, len(prompt), params.max_tokens, priority.name.lower())
        return Generation(tracked)

    def abort(self, request_id: str) -> None:
        """End a request that is not over yet (the client went away); no-op otherwise."""
        self._scheduler.cancel(request_id)

    # -- state -------------------------------------------------------------------------------

    def health(self) -> EngineHealth:
        s = self._scheduler
        if s.is_draining:
            return EngineHealth.DRAINING
        if s.is_ready:
            return EngineHealth.HEALTHY
        return EngineHealth.LOADING if s.is_loading else EngineHealth.UNHEALTHY

    def stats(self) -> EngineStats:
        return self._scheduler.stats()

    def tokenizer_pids(self) -> dict[str, dict[str, int | None]]:
        """Model id -> each tokenizer lane's helper process id (for operators and tests)."""
        return {mid: t.helper_pids() for mid, t in self._tokenizers.items()}
