"""The scheduler: the one owner of every request's state, and of the queue in front of the workers.

It lives in the front-end process, on the event loop. Requests wait in one priority queue per
model; a worker is handed a request only when it has a free sequence slot (workers pull as
slots free up, so nothing waits behind one worker's backlog). The worker processes themselves
are `WorkerProcesses`'; what their messages mean for the requests is decided here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wicore_cpp.config import Config
from wicore_cpp.engine.messages import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    CacheReport,
    CancelRequest,
    GenerateRequest,
    StepOutput,
)
from wicore_cpp.engine.prefix_routing import pick_worker
from wicore_cpp.engine.queue import Priority, PriorityRequestQueue, QueueFull
from wicore_cpp.engine.request import (
    FINISH_TIMEOUT,
    RequestEnded,
    RequestState,
    TokenDelta,
    TrackedRequest,
)
from wicore_cpp.engine.stats import EngineObserver, EngineStats, RequestCounters, RequestRecord
from wicore_cpp.engine.workers import ModelFiles, WorkerHandle, WorkerProcesses
from wicore_cpp.errors import (
    GenerationFailed,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
)

log = logging.getLogger("wicore.scheduler")


@dataclass(slots=True, eq=False)
class ModelQueue:
    """The waiting requests of one served model, and how long its sequences may be."""

    model_id: str
    max_seq_len: int
    queue: PriorityRequestQueue[TrackedRequest]


class Scheduler:
    """Accepts requests, orders them, hands them to workers, and keeps the figures."""

    def __init__(
        self,
        config: Config,
        models: dict[str, tuple[ModelFiles, int]],
        on_fatal: Callable[[str], None] | None = None,
        observers: Sequence[EngineObserver] = (),
    ):
        """`models` maps a model id to its files and its trained context length; `observers`
        are told about every ended request and every step's token gaps."""
        self.config = config
        self._observers = tuple(observers)
        self.queues: dict[str, ModelQueue] = {
            model_id: ModelQueue(
                model_id,
                max_seq_len=min(config.max_seq_len, n_ctx_train or files.n_ctx, files.n_ctx),
                queue=PriorityRequestQueue(config.max_queue_size, config.aging_s),
            )
            for model_id, (files, n_ctx_train) in models.items()
        }
        self.workers = WorkerProcesses(
            config, {model_id: files for model_id, (files, _) in models.items()}, self,
            on_fatal or (lambda message: None),
        )
        self._requests: dict[str, TrackedRequest] = {}  # not yet ended
        self.counters = RequestCounters()
        self.started_at = time.time()
        self.is_draining = False
        self._is_stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker; they load in the background (see `is_ready`)."""
        self._loop = asyncio.get_running_loop()
        self.workers.start()

    @property
    def is_ready(self) -> bool:
        """Every model has at least one loaded, live worker."""
        return not self._is_stopped and all(self.workers.num_ready(m) for m in self.queues)

    @property
    def is_loading(self) -> bool:
        return not self.is_ready and self.workers.is_loading

    def begin_drain(self) -> None:
        """Refuse new requests from now on; those in flight go on."""
        if not self.is_draining:
            log.info("draining: %d requests in flight", len(self._requests))
        self.is_draining = True

    async def stop(self, grace_s: float = 5.0) -> None:
        """Cancel what is left, tell workers to exit, and make sure they did."""
        self.is_draining = True
        for req in list(self._requests.values()):
            self._end(req, RequestState.CANCELLED, RequestEnded(FINISH_CANCELLED,
                      ServiceUnavailable("the server is shutting down")))
        self._is_stopped = True
        await self.workers.stop(grace_s)

    # -- requests ----------------------------------------------------------------------------

    def check_admission(self, model_id: str) -> None:
        """Raise (503 draining or unavailable, 429 too many) if `model_id` takes no request now.

        Cheap, so callers run it before expensive work (tokenizing) as well as at `submit`.
        """
        if self.is_draining:
            self._reject()
            raise ServiceUnavailable("the server is shutting down", retry_after=5)
        if not self.workers.num_ready(model_id):
            self._reject()
            what = "loading" if self.is_loading else "unavailable (no live worker)"
            raise ServiceUnavailable(f"the model {model_id!r} is {what}", retry_after=2)
        if len(self._requests) >= self.config.max_concurrent_requests:
            self._reject()
            raise RateLimited(
                f"{len(self._requests)} requests are already active "
                f"(max_concurrent_requests={self.config.max_concurrent_requests})",
                retry_after=1,
            )

    def submit(self, model_id: str, generate: GenerateRequest, priority: Priority,
               tenant: str | None = None, received: float | None = None) -> TrackedRequest:
        """Accept a request or raise (503 unavailable, 429 full). Never blocks.

        `tenant` (an API key's name) is who gets a fair share of the queue; `received` is when
        the engine was asked (monotonic), for the request's figures.
        """
        self.check_admission(model_id)
        now = time.monotonic()
        req = TrackedRequest(generate.request_id, model_id, generate, priority, now, tenant,
                             received if received is not None else now)
        try:
            self.queues[model_id].queue.push(req.request_id, req, priority, now, tenant)
        except QueueFull:
            self._reject()
            raise RateLimited(
                f"the queue is full ({self.config.max_queue_size} waiting)", retry_after=1
            ) from None
        self._requests[req.request_id] = req
        self.counters.submitted += 1
        assert self._loop is not None
        req.timer = self._loop.call_later(self.config.request_timeout_s, self._on_timeout, req)
        self._dispatch(model_id)
        return req

    def cancel(self, request_id: str) -> None:
        """The client went away: free the request's place (queue now, slot within one step)."""
        req = self._requests.get(request_id)
        if req is not None:
            self._end(req, RequestState.CANCELLED, RequestEnded(FINISH_CANCELLED))

    def _reject(self) -> None:
        self.counters.rejected += 1

    def _on_timeout(self, req: TrackedRequest) -> None:
        if not req.state.is_terminal:
            waited = time.monotonic() - req.arrival
            log.info("request %s timed out after %.1fs (%s)", req.request_id, waited, req.state.value)
            self._end(req, RequestState.TIMED_OUT, RequestEnded(FINISH_TIMEOUT, RequestTimeout(
                f"the request did not finish within {self.config.request_timeout_s:g}s")))

    def _end(self, req: TrackedRequest, state: RequestState, event: RequestEnded) -> None:
        """The single place a request reaches a terminal state."""
        if req.state.is_terminal:
            return
        if req.state is RequestState.QUEUED:
            self.queues[req.model_id].queue.remove(req.request_id)
        else:
            worker = self._worker(req)
            if worker is not None and req.request_id in worker.running:
                # Choices still decoding (cancelled, timed out, or a sibling choice failed):
                # the worker frees their slots at its next step and acknowledges; until then
                # the slots stay counted as busy so we never over-fill the worker.
                worker.send(CancelRequest(req.request_id))
        req.state = state
        if req.timer is not None:
            req.timer.cancel()
        now = time.monotonic()
        self.counters.count_end(state, now - (req.started or now))
        req.events.put_nowait(event)
        del self._requests[req.request_id]
        if self._observers:
            self._tell_ended(req, event.finish_reason, now)

    def _tell_ended(self, req: TrackedRequest, outcome: str, now: float) -> None:
        received = req.received if req.received is not None else req.arrival
        record = RequestRecord(
            request_id=req.request_id,
            model_id=req.model_id,
            tenant=req.tenant,
            priority=req.priority.name.lower(),
            outcome=outcome,
            num_prompt_tokens=req.num_prompt_tokens,
            num_completion_tokens=req.num_tokens,
            queue_s=None if req.started is None else req.started - req.arrival,
            ttft_s=None if req.first_token_at is None else req.first_token_at - received,
            total_s=now - received,
        )
        for observer in self._observers:
            try:
                observer.on_request_ended(record)
            except Exception:
                log.exception("observer %r failed on request %s", observer, req.request_id)

    def _worker(self, req: TrackedRequest) -> WorkerHandle | None:
        return next((w for w in self.workers.of_model(req.model_id)
                     if w.worker_id == req.worker_id), None)

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, model_id: str) -> None:
        queue = self.queues[model_id].queue
        batch = self.config.max_batch_size
        while len(queue):
            ready = [w for w in self.workers.of_model(model_id) if w.is_ready]
            head = queue.peek()
            assert head is not None
            # A request takes one slot per choice; the head waits for room rather than be
            # overtaken (its choices share one prefill, so they start together).
            free = [w for w in ready if w.num_slots + head.num_choices <= batch]
            if free:
                req = queue.pop()
            else:
                req, free = self._beyond_batch(queue.peek(Priority.URGENT), head, ready)
                if req is None:
                    return
                queue.remove(req.request_id)
            # The worker whose prompt cache holds the longest prefix of the prompt, if one
            # of them is free; else the least loaded.
            worker = pick_worker(free, req.generate.prompt_tokens, lambda w: w.num_slots)
            req.state = RequestState.RUNNING
            req.started = time.monotonic()
            req.worker_id = worker.worker_id
            req.open_choices = req.num_choices
            worker.running[req.request_id] = req
            # Fair share counts the prompt as served when a worker takes it on.
            queue.charge(req.tenant, req.num_prompt_tokens)
            self.counters.dispatched += 1
            self.counters.wait_s += req.started - req.arrival
            log.debug("request %s (%s) to worker %d after %.3fs in the queue", req.request_id,
                      req.priority.name.lower(), worker.worker_id, req.started - req.arrival)
            worker.send(req.generate)

    def _beyond_batch(self, urgent: TrackedRequest | None, head: TrackedRequest,
                      ready: list[WorkerHandle]) -> tuple[TrackedRequest | None,
                                                          list[WorkerHandle]]:
        """Every batch slot is busy: a request that starts at once anyway, and the workers
        that can take it, or (None, [])."""
        batch = self.config.max_batch_size
        fair = self.config.num_fair_slots
        if urgent is not None:
            # The urgent slots are the urgent class's own: the longest-waiting urgent request
            # takes one even if aged requests wait ahead (and a free fair slot too).
            limit = batch + self.config.urgent_slots + fair
            free = [w for w in ready if w.num_slots + urgent.num_choices <= limit]
            return (urgent, free) if free else (None, [])
        # A fair slot: the key whose turn it is has nothing running while another key runs
        # several sequences of its level or lower; it starts now, and the worker pauses the
        # newest sequence of the key running the most (ContinuousBatcher._unpaused), so a key
        # sending one request at a time keeps its idle TTFT beside a flood.
        if not fair or head.tenant is None or any(
                r.tenant == head.tenant for w in ready for r in w.running.values()):
            return None, []
        free = [w for w in ready if w.num_slots + head.num_choices <= batch + fair
                and self._crowded(w, head)]
        return (head, free) if free else (None, [])

    @staticmethod
    def _crowded(worker: WorkerHandle, newcomer: TrackedRequest) -> bool:
        """Whether another key runs two or more sequences on `worker` at `newcomer`'s level or
        lower: one of them is what would pause for it."""
        held: dict[str | None, int] = {}
        for r in worker.running.values():
            if r.tenant != newcomer.tenant and r.priority <= newcomer.priority:
                held[r.tenant] = held.get(r.tenant, 0) + r.num_choices
        return any(n >= 2 for n in held.values())

    # -- what the workers report (WorkerListener) --------------------------------------------

    def on_worker_ready(self, worker: WorkerHandle) -> None:
        self._dispatch(worker.model_id)

    def on_worker_step(self, worker: WorkerHandle, msg: StepOutput) -> None:
        self.counters.step_messages += 1
        if msg.cache is not None:
            self._on_cache_report(worker, msg.cache)
        queue = self.queues[worker.model_id].queue
        now = time.monotonic()
        gaps: list[float] = []
        for request_id, index, text, token_ids, finish, error, logprobs in msg.updates:
            req = worker.running.get(request_id)
            if req is None:
                continue
            if finish is not None:
                # Each choice ends with exactly one update; the request leaves the worker's
                # slots when its last choice has.
                req.open_choices -= 1
                if req.open_choices <= 0:
                    del worker.running[request_id]
            if req.state.is_terminal:
                continue  # cancelled or timed out here; the worker's ack only freed the slot
            ended = finish if finish not in (FINISH_ERROR, FINISH_CANCELLED) else None
            if token_ids or text or ended:
                req.num_tokens += len(token_ids)
                self.counters.tokens_generated += len(token_ids)
                queue.charge(req.tenant, len(token_ids))
                if req.last_token_at is None:
                    req.first_token_at = now
                elif req.last_token_at != now:  # one gap per request per step, whatever n
                    gaps.append(now - req.last_token_at)
                req.last_token_at = now
                req.events.put_nowait(TokenDelta(text, token_ids, index, logprobs, ended))
            if finish == FINISH_ERROR:
                log.error("request %s failed in worker %d: %s", request_id, worker.worker_id, error)
                self._end(req, RequestState.FAILED,
                          RequestEnded(FINISH_ERROR, GenerationFailed(error or "generation failed")))
            elif finish == FINISH_CANCELLED:
                self._end(req, RequestState.CANCELLED, RequestEnded(FINISH_CANCELLED))
            elif ended is not None and req.open_choices <= 0:
                self._end(req, RequestState.FINISHED, RequestEnded(ended))
        if gaps:
            for observer in self._observers:
                try:
                    observer.on_token_gaps(worker.model_id, gaps)
                except Exception:
                    log.exception("observer %r failed on a step", observer)
        self._dispatch(worker.model_id)

    def _on_cache_report(self, worker: WorkerHandle, report: CacheReport) -> None:
        worker.cached_prefixes.apply(report.added, report.removed)
        worker.prompt_cache = report.stats
        for request_id, n in report.cached_tokens:
            req = worker.running.get(request_id)
            if req is not None:
                req.num_cached_tokens = n
            if n:
                self.counters.cache_hits += 1
                self.counters.cached_tokens += n

    def on_worker_lost(self, worker: WorkerHandle) -> None:
        queue = self.queues[worker.model_id].queue
        for req in list(worker.running.values()):
            if req.state.is_terminal:
                continue
            if req.num_tokens == 0:
                # Nothing reached the client yet: run it again elsewhere, keeping its place.
                req.state = RequestState.QUEUED
                req.worker_id = None
                req.num_cached_tokens = 0
                try:
                    queue.push(req.request_id, req, req.priority, req.arrival, req.tenant)
                    log.warning("request %s requeued after worker %d died",
                                req.request_id, worker.worker_id)
                    continue
                except QueueFull:
                    pass
            log.error("request %s failed: worker %d died mid-stream", req.request_id,
                      worker.worker_id)
            self._end(req, RequestState.FAILED, RequestEnded(FINISH_ERROR, GenerationFailed(
                f"worker process {worker.worker_id} died ({worker.exit_reason()}) during "
                "generation")))
        self._dispatch(worker.model_id)

    # -- figures -----------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        queued = {level.name.lower(): 0 for level in Priority}
        for mq in self.queues.values():
            for level, n in mq.queue.lengths().items():
                queued[level.name.lower()] += n
        workers = list(self.workers)
        return EngineStats(
            is_running=not self._is_stopped,
            is_draining=self.is_draining,
            uptime_s=time.time() - self.started_at,
            counters=dataclasses.replace(self.counters),
            num_active=sum(r.state is RequestState.RUNNING for r in self._requests.values()),
            num_in_flight=len(self._requests),
            num_running_sequences=sum(w.num_slots for w in workers),
            queued_by_priority=queued,
            workers=[w.stats() for w in workers],
            worker_restarts=dict(self.workers.num_restarts),
        )
