"""One request inside the engine: its states, the record the scheduler keeps, and its events.

A tracked request names its worker by id only, so this module needs nothing from the worker
side and the scheduler, the workers and the figures can all import it.
"""

from __future__ import annotations

import asyncio
import enum
import time
import uuid
from dataclasses import dataclass, field

from wicore_cpp.engine.messages import GenerateRequest, TokenLogprob
from wicore_cpp.engine.queue import Priority
from wicore_cpp.errors import WicoreError

FINISH_TIMEOUT = "timeout"


def new_request_id() -> str:
    """`req_<ms timestamp>` as in the API document, plus random hex so ids never collide."""
    return f"req_{int(time.time() * 1000)}{uuid.uuid4().hex[:12]}"


class RequestState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def is_terminal(self) -> bool:
        return self not in (RequestState.QUEUED, RequestState.RUNNING)


@dataclass(slots=True)
class TokenDelta:
    """Event: text (never a split UTF-8 character, never part of a stop string) and its tokens,
    for choice `index`; with their log-probabilities when asked for. `finish_reason` is set on
    the last delta of its choice (`stop` or `length`)."""

    text: str
    token_ids: list[int]
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass(slots=True)
class RequestEnded:
    """Event: the last one of every request. `error` is set for failures and timeouts."""

    finish_reason: str
    error: WicoreError | None = None


Event = TokenDelta | RequestEnded


@dataclass(slots=True, eq=False)
class TrackedRequest:
    """A request from acceptance to its end. Only the Scheduler changes `state`."""

    request_id: str
    model_id: str
    generate: GenerateRequest
    priority: Priority
    arrival: float  # monotonic, when it was queued
    tenant: str | None = None  # the API key's name: fair share, figures, request log
    received: float | None = None  # monotonic, when the engine was asked (before tokenizing)
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    state: RequestState = RequestState.QUEUED
    worker_id: int | None = None
    started: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_tokens: int = 0
    open_choices: int = 0  # choices a worker still decodes (each holds a sequence slot)
    num_cached_tokens: int = 0  # prompt tokens its worker took from the prompt cache
    timer: asyncio.TimerHandle | None = None

    @property
    def num_choices(self) -> int:
        return self.generate.params.n

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.generate.prompt_tokens)
