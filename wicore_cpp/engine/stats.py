"""The engine's figures: counters the scheduler keeps, and the typed snapshot it hands out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from wicore_cpp.engine.messages import PromptCacheStats
from wicore_cpp.engine.request import RequestState


@dataclass(slots=True)
class RequestCounters:
    """Running totals since start-up."""

    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    rejected: int = 0
    dispatched: int = 0
    step_messages: int = 0  # StepOutput messages received from workers
    tokens_generated: int = 0
    cache_hits: int = 0  # requests that started from cached KV
    cached_tokens: int = 0  # prompt tokens those requests did not prefill
    wait_s: float = 0.0  # summed over dispatched requests
    processing_s: float = 0.0  # summed over completed requests

    def count_end(self, state: RequestState, processing_s: float) -> None:
        """One request reached terminal `state`, `processing_s` after it started running."""
        if state is RequestState.FINISHED:
            self.completed += 1
            self.processing_s += processing_s
        elif state is RequestState.FAILED:
            self.failed += 1
        elif state is RequestState.CANCELLED:
            self.cancelled += 1
        elif state is RequestState.TIMED_OUT:
            self.timed_out += 1

    @property
    def num_ended(self) -> int:
        return self.completed + self.failed + self.cancelled + self.timed_out


@dataclass(slots=True, frozen=True)
class WorkerStats:
    worker_id: int
    model_id: str
    pid: int | None
    is_ready: bool
    gpu_id: int | None
    gpu_offload: bool
    visible_devices: str | None  # CUDA_VISIBLE_DEVICES as the worker sees it
    num_running: int
    node: str | None = None  # the Ray node it runs on; None for a local process
    kv_cells: int = 0  # the worker's KV pool (0 until it is loaded)
    kv_cells_used: int = 0  # held by its running sequences: prompt + generated tokens
    prompt_cache: PromptCacheStats = PromptCacheStats()


@dataclass(slots=True, frozen=True)
class EngineStats:
    """A snapshot of the engine's state and figures (the HTTP edge formats it)."""

    is_running: bool
    is_draining: bool
    uptime_s: float
    counters: RequestCounters
    num_active: int  # requests running on a worker
    num_in_flight: int  # accepted and not ended: queued or running
    num_running_sequences: int  # decode slots held, cancelled ones until the worker frees them
    queued_by_priority: dict[str, int]  # "low" .. "urgent" -> waiting requests
    workers: list[WorkerStats] = field(default_factory=list)
    worker_restarts: dict[str, int] = field(default_factory=dict)  # model id -> restarts

    @property
    def prompt_cache(self) -> PromptCacheStats:
        """The live workers' prompt caches together."""
        return sum((w.prompt_cache for w in self.workers), PromptCacheStats())

    @property
    def queue_length(self) -> int:
        return sum(self.queued_by_priority.values())

    @property
    def error_count(self) -> int:
        return self.counters.failed + self.counters.timed_out

    @property
    def success_rate(self) -> float | None:
        ended = self.counters.num_ended
        return self.counters.completed / ended if ended else None

    @property
    def mean_processing_s(self) -> float:
        c = self.counters
        return c.processing_s / c.completed if c.completed else 0.0

    @property
    def mean_wait_s(self) -> float:
        c = self.counters
        return c.wait_s / c.dispatched if c.dispatched else 0.0


@dataclass(slots=True, frozen=True)
class RequestRecord:
    """The figures of one request that has ended, handed once to every observer.

    Times are seconds: `queue_s` from queueing to a worker taking it, `ttft_s` and `total_s`
    from the moment the engine was asked (before tokenizing) to the first token and to the
    end. `queue_s` and `ttft_s` are None when the request never got that far.
    """

    request_id: str
    model_id: str
    tenant: str | None  # the API key's name; None when keys are off
    priority: str  # the level it was queued at: "low" .. "urgent"
    outcome: str  # finish reason: "stop", "length", "timeout", "error" or "cancelled"
    num_prompt_tokens: int
    num_completion_tokens: int
    queue_s: float | None
    ttft_s: float | None
    total_s: float

    @property
    def was_started(self) -> bool:
        return self.queue_s is not None


class EngineObserver(Protocol):
    """Told about requests and tokens as they happen, on the event loop (metrics, logs).

    Calls are synchronous and must be quick; an observer that raises is logged and ignored.
    """

    def on_request_ended(self, record: RequestRecord) -> None: ...

    def on_token_gaps(self, model_id: str, gaps_s: list[float]) -> None:
        """One decode step's inter-token gaps: one per request that got tokens this step
        and had had tokens before."""
