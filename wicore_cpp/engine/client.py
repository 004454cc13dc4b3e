"""`EngineClient`: the one engine object the HTTP edge holds.

Everything behind it (the scheduler and its queue, the worker processes, the prompt
tokenizers) can change shape without the edge noticing. The edge asks for a generation with
messages, sampling parameters and a priority, and gets a `Generation`: an async iterator of
typed events, `TokenDelta`s then one `RequestEnded`. Anything that stops a request from being
accepted (unknown model, draining, a full queue, a prompt too long) is raised by `generate`
before the first event, as a `WicoreError` the edge maps to HTTP.

The edge also imports the engine's request-side types from here (and only from here), so
this module re-exports them: sampling parameters, the tool-call format (`ToolSpec`,
`ToolCallParser`) and the output constraints (`ResponseFormat`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from wicore_cpp.config import DEMO_MODEL_ID, REAL_MODEL_FILE, REAL_MODEL_ID, Config
from wicore_cpp.engine.messages import (
    GenerateRequest,
    PromptCacheStats,
    SamplingParams,
    TokenLogprob,
)
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
from wicore_cpp.engine.schema_grammar import check_schema
from wicore_cpp.engine.stats import EngineObserver, EngineStats, RequestRecord, WorkerStats
from wicore_cpp.engine.tokenizer import PromptJob, PromptTokenizer
from wicore_cpp.engine.tool_calls import (
    ToolCall,
    ToolCallParser,
    ToolFunction,
    ToolSpec,
    call_schema,
    render_conversation,
)
from wicore_cpp.engine.workers import ModelFiles
from wicore_cpp.errors import ContextLengthExceeded, InvalidRequest, ModelNotFound, excerpt
from wicore_cpp.gguf_file import GGUFFile
from wicore_cpp.logs import LogSettings

__all__ = [
    "FINISH_TIMEOUT",
    "EngineClient",
    "EngineHealth",
    "EngineObserver",
    "EngineStats",
    "Event",
    "Generation",
    "Priority",
    "PromptCacheStats",
    "RequestEnded",
    "RequestRecord",
    "ResponseFormat",
    "SamplingParams",
    "ServedModel",
    "TokenDelta",
    "TokenLogprob",
    "ToolCall",
    "ToolCallParser",
    "ToolFunction",
    "ToolSpec",
    "WorkerStats",
]

log = logging.getLogger("wicore.engine")

DEFAULT_CTX_SIZE = 32768
CAPABILITIES = ("chat", "completions", "tools", "json_object", "json_schema", "logprobs",
                "tokenize")
MAX_TOP_LOGPROBS = 20

# The lazy tool-call grammar (tool_choice "auto") takes over when the whole answer so far is
# the start of a call, exactly as the grammar would write it (so what llama.cpp replays into
# the grammar always fits it): `{"name": "` or `[{"name": "`, with the optional single
# spaces the grammar allows. The list form only where the grammar allows several calls: a
# replayed text the grammar refuses would abort the worker.
CALL_TRIGGER = r'^\s*(\{ ?"name" ?: ?"?)$'
CALLS_TRIGGER = r'^\s*(\[ ?\{ ?"name" ?: ?"?)$'


@dataclass(slots=True, frozen=True)
class ServedModel:
    """A model the engine serves, as clients may see it."""

    model_id: str
    created: int  # unix time of the model file
    context_length: int  # the longest sequence (prompt + completion) a request may have
    capabilities: tuple[str, ...] = CAPABILITIES
    max_choices: int = 1  # the largest `n`


@dataclass(slots=True, frozen=True)
class ResponseFormat:
    """`response_format`: free text, any JSON object, or JSON following `schema`."""

    type: str = "text"  # "text", "json_object" or "json_schema"
    schema: Any = None


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

    @property
    def prompt_tokens(self) -> list[int]:
        return self._tracked.generate.prompt_tokens

    @property
    def num_choices(self) -> int:
        return self._tracked.num_choices

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens taken from the prompt cache rather than prefilled (known once the
        first event has arrived)."""
        return self._tracked.num_cached_tokens

    @property
    def num_tokens_used(self) -> int:
        """Tokens this request has cost so far: its prompt once a worker took it on, and
        every token generated (also those a client that went away never read)."""
        t = self._tracked
        return (t.num_prompt_tokens if t.started is not None else 0) + t.num_tokens

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
        observers: Sequence[EngineObserver] = (),
    ):
        """`models` maps each served model id to its checked GGUF file; `observers` are told
        about every request that ends and every decode step's token gaps."""
        self.config = config
        n_ctx = config.ctx_size or DEFAULT_CTX_SIZE
        self._scheduler = Scheduler(
            config,
            {mid: (ModelFiles(m.path, n_ctx), m.context_length) for mid, m in models.items()},
            on_fatal,
            observers,
        )
        self._tokenizers = {
            mid: PromptTokenizer(m.path, LogSettings.from_config(config),
                                 config.max_concurrent_requests)
            for mid, m in models.items()
        }
        self.n_ctx = n_ctx
        self.max_choices = min(config.max_choices, config.max_batch_size)
        self.models: dict[str, ServedModel] = {
            mid: ServedModel(mid, int(m.path.stat().st_mtime),
                             self._scheduler.queues[mid].max_seq_len,
                             max_choices=self.max_choices)
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
            message = f"The model {excerpt(model_id)} does not exist"
            if model_id == REAL_MODEL_ID and list(self.models) == [DEMO_MODEL_ID]:
                message = (
                    f"The model '{REAL_MODEL_ID}' is not served here: this server runs only the "
                    f"demo model '{DEMO_MODEL_ID}' (random weights) because "
                    f"{self.config.models_dir}/{REAL_MODEL_FILE} was not found. Put the real "
                    f"GGUF there (see models/README.md) and restart the server, or ask for "
                    f"'{DEMO_MODEL_ID}'."
                )
            raise ModelNotFound(message, param="model")
        return model

    async def generate(
        self,
        model_id: str | None,
        messages: list[dict[str, Any]],
        params: SamplingParams,
        priority: Priority,
        *,
        tools: ToolSpec | None = None,
        response_format: ResponseFormat | None = None,
        tenant: str | None = None,
    ) -> Generation:
        """Render and tokenize the conversation, check it fits, and queue it.

        `messages` are OpenAI's, as plain dicts: `role`, `content` (text or None), and
        `tool_calls` ([{id, name, arguments}]) or `tool_call_id` where they apply. With
        tools in use (not `none`), the tool list goes into the prompt (see tool_calls.py);
        a forced call (`required`, a named function) is held to its schema by a grammar, and
        so is a call the model starts by itself (`auto`). `response_format` holds the answer
        to JSON. `params.max_tokens` is what the client asked for; it is capped by the
        context left after the prompt. `tenant` (an API key's name) is whose fair share of
        the queue the request takes. Raises a WicoreError when the request cannot be
        accepted.
        """
        received = time.monotonic()
        model = self.model(model_id)
        self._check_params(params)
        self._scheduler.check_admission(model.model_id)
        turns = render_conversation(messages, tools)
        job = PromptJob(messages=turns, token_params=_bias_params(params),
                        **_constraint(tools, response_format))
        return await self._submit(model, job, params, priority, "messages", tenant, received)

    async def complete(
        self,
        model_id: str | None,
        prompt: str | list[int],
        params: SamplingParams,
        priority: Priority,
        *,
        tenant: str | None = None,
    ) -> Generation:
        """A plain completion of `prompt` (text, tokenized with the model's BOS; or token
        ids, taken as they are), through the same queue, priorities, limits and fair share
        as chat."""
        received = time.monotonic()
        model = self.model(model_id)
        self._check_params(params)
        self._scheduler.check_admission(model.model_id)
        if isinstance(prompt, str):
            job = PromptJob(text=prompt, token_params=_bias_params(params))
        else:
            job = PromptJob(token_ids=list(prompt), token_params=_bias_params(params))
        return await self._submit(model, job, params, priority, "prompt", tenant, received)

    async def tokenize(self, model_id: str | None, text: str, *, add_special: bool = False,
                       parse_special: bool = True,
                       with_pieces: bool = False) -> list[int] | list[tuple[int, bytes]]:
        """llama-server's /tokenize: token ids, or (id, bytes) pairs with `with_pieces`."""
        model = self.model(model_id)
        return await self._tokenizers[model.model_id].tokenize(
            text, add_special=add_special, parse_special=parse_special, with_pieces=with_pieces)

    async def detokenize(self, model_id: str | None, tokens: list[int]) -> str:
        """The text of `tokens` (special tokens written out). InvalidRequest for an id that
        is not in the vocabulary."""
        model = self.model(model_id)
        return await self._tokenizers[model.model_id].detokenize(tokens)

    def _check_params(self, params: SamplingParams) -> None:
        if params.n > self.max_choices:
            raise InvalidRequest(f"n must be at most {self.max_choices} on this server",
                                 param="n")
        if params.logprobs is not None and not 0 <= params.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}",
                                 param="top_logprobs")

    async def _submit(self, model: ServedModel, job: PromptJob, params: SamplingParams,
                      priority: Priority, prompt_param: str, tenant: str | None,
                      received: float) -> Generation:
        tokenizer = self._tokenizers[model.model_id]
        limit = model.context_length
        # What cannot fit however it tokenizes is refused before the costly part.
        if job.token_ids is not None:
            at_least = len(job.token_ids)
        else:
            at_least = (await tokenizer.bounds()).min_tokens(job.size)
        if at_least >= limit:
            size = job.size
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{prompt_param} ({size.num_messages} messages, {size.num_bytes} bytes of text) "
                f"come to at least {at_least} tokens.",
                param=prompt_param,
            )
        prepared = await tokenizer.prepare(job)
        prompt = prepared.tokens
        if not prompt:
            raise InvalidRequest("the prompt is empty", param=prompt_param)
        n = params.n
        # Every choice must fit one sequence, and all of them the KV pool, beside the
        # prompt they share.
        room = min(limit - len(prompt), (self.n_ctx - len(prompt)) // n)
        if len(prompt) >= limit or room < min(params.max_tokens, 1):
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{prompt_param} resulted in {len(prompt)} tokens"
                + (f" and {n} choices need room for their completions." if n > 1 else "."),
                param=prompt_param,
            )
        params = dataclasses.replace(
            params, max_tokens=min(params.max_tokens, room), grammar=prepared.grammar,
            grammar_triggers=job.grammar_triggers if prepared.grammar else ())
        request_id = new_request_id()
        generate = GenerateRequest(request_id, prompt, params, int(priority), tenant)
        tracked = self._scheduler.submit(model.model_id, generate, priority, tenant,
                                         received)
        log.debug("request %s: %d prompt tokens, max_tokens %d, n %d, priority %s%s",
                  request_id, len(prompt), params.max_tokens, n, priority.name.lower(),
                  ", constrained" if prepared.grammar else "")
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


def _bias_params(params: SamplingParams) -> tuple[tuple[int, str], ...]:
    return tuple((token, f"logit_bias.{token}") for token, _ in params.logit_bias)


def _constraint(tools: ToolSpec | None, response_format: ResponseFormat | None) -> dict:
    """The JSON schema the output must follow (checked here; the tokenizer helper compiles
    it), as PromptJob fields; empty when the output is free."""
    answer = None
    if response_format is not None and response_format.type == "json_object":
        answer = {"type": "object"}
    elif response_format is not None and response_format.type == "json_schema":
        check_schema(response_format.schema, "response_format.json_schema.schema")
        answer = response_format.schema
    if tools is None or not tools.is_active:
        if answer is None:
            return {}
        return {"schema": answer, "schema_param": "response_format"}
    for i, f in enumerate(tools.functions):
        if f.parameters is not None:
            check_schema(f.parameters, f"tools[{i}].function.parameters")
    if tools.is_forced:
        return {"schema": call_schema(tools), "schema_param": "tools"}
    calls = call_schema(dataclasses.replace(tools, choice="required"))
    if answer is not None:
        # Either calls or the JSON answer, from the first token on.
        return {"schema": {"anyOf": [calls, answer]}, "schema_param": "tools"}
    # Free text, unless the answer starts as a call: then the call is held to its schema.
    triggers = (CALL_TRIGGER, CALLS_TRIGGER) if tools.parallel else (CALL_TRIGGER,)
    return {"schema": calls, "schema_param": "tools", "grammar_triggers": triggers}
