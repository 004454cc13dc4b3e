"""The scheduler: the one owner of every request's state, the queue, and the worker processes.

It lives in the front-end process, on the event loop. Requests wait in one priority queue per
model; a worker is handed a request only when it has a free sequence slot (workers pull as
slots free up, so nothing waits behind one worker's backlog). One reader thread per worker
turns that worker's StepOutput messages into per-request events on the loop, and notices at
once (pipe EOF) when the worker process dies.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from wicore_cpp.config import Config
from wicore_cpp.engine.messages import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    CancelRequest,
    GenerateRequest,
    Shutdown,
    StepOutput,
    WorkerFailed,
    WorkerReady,
)
from wicore_cpp.engine.queue import Priority, PriorityRequestQueue, QueueFull
from wicore_cpp.engine.worker import WorkerSpec, worker_main
from wicore_cpp.errors import (
    GenerationFailed,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    WicoreError,
)

log = logging.getLogger("wicore.scheduler")

FINISH_TIMEOUT = "timeout"
MAX_LOAD_FAILURES = 3  # consecutive failed loads of one model before the server gives up


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
    """Event: text (never a split UTF-8 character, never part of a stop string) and its tokens."""

    text: str
    token_ids: list[int]


@dataclass(slots=True)
class RequestEnded:
    """Event: the last one of every request. `error` is set for failures and timeouts."""

    finish_reason: str
    error: WicoreError | None = None


@dataclass(slots=True, eq=False)
class TrackedRequest:
    """A request from acceptance to its end. Only the Scheduler changes `state`."""

    request_id: str
    model_id: str
    generate: GenerateRequest
    priority: Priority
    arrival: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    state: RequestState = RequestState.QUEUED
    worker: WorkerHandle | None = None
    started: float | None = None
    num_tokens: int = 0
    timer: asyncio.TimerHandle | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.generate.prompt_tokens)


@dataclass(slots=True, eq=False)
class WorkerHandle:
    worker_id: int
    pool: ModelPool
    process: multiprocessing.process.BaseProcess
    cmd_conn: multiprocessing.connection.Connection
    evt_conn: multiprocessing.connection.Connection
    gpu_id: int | None
    is_ready: bool = False
    gpu_offload: bool = False
    visible_devices: str | None = None
    running: dict[str, TrackedRequest] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class ModelPool:
    """The workers and the waiting requests of one served model."""

    model_id: str
    path: Path
    n_ctx: int
    max_seq_len: int
    queue: PriorityRequestQueue[TrackedRequest]
    workers: list[WorkerHandle] = field(default_factory=list)
    load_failures: int = 0

    @property
    def num_ready(self) -> int:
        return sum(w.is_ready for w in self.workers)


@dataclass(slots=True)
class Totals:
    submitted: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    rejected: int = 0
    dispatched: int = 0
    step_messages: int = 0  # StepOutput messages received from workers
    tokens_generated: int = 0
    wait_s: float = 0.0  # summed over dispatched requests
    processing_s: float = 0.0  # summed over completed requests


class Scheduler:
    """Accepts requests, orders them, hands them to workers, and keeps the figures."""

    def __init__(
        self,
        config: Config,
        models: dict[str, tuple[Path, int]],
        on_fatal: Callable[[str], None] | None = None,
    ):
        """`models` maps a model id to its GGUF path and trained context length."""
        self.config = config
        self._on_fatal = on_fatal or (lambda message: None)
        n_ctx = config.ctx_size or 32768
        self.pools: dict[str, ModelPool] = {
            model_id: ModelPool(
                model_id,
                path,
                n_ctx,
                max_seq_len=min(config.max_seq_len, n_ctx_train or n_ctx, n_ctx),
                queue=PriorityRequestQueue(config.max_queue_size, config.aging_s),
            )
            for model_id, (path, n_ctx_train) in models.items()
        }
        self._requests: dict[str, TrackedRequest] = {}  # not yet ended
        self.totals = Totals()
        self.started_at = time.time()
        self.is_draining = False
        self._is_stopped = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mp = multiprocessing.get_context("spawn")
        self._next_worker_id = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start every worker; they load in the background (see `is_ready`)."""
        self._loop = asyncio.get_running_loop()
        for pool in self.pools.values():
            for i in range(self.config.workers):
                gpu_ids = self.config.gpu_ids
                self._spawn(pool, gpu_ids[i % len(gpu_ids)] if gpu_ids else None)

    @property
    def is_ready(self) -> bool:
        """Every model has at least one loaded, live worker."""
        return not self._is_stopped and all(p.num_ready for p in self.pools.values())

    @property
    def is_loading(self) -> bool:
        return not self.is_ready and any(
            not w.is_ready for p in self.pools.values() for w in p.workers
        )

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
        workers = [w for p in self.pools.values() for w in p.workers]
        for w in workers:
            try:
                w.cmd_conn.send(Shutdown())
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for w in workers:
            await asyncio.to_thread(w.process.join, max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                log.warning("worker %d did not exit; killing it", w.worker_id)
                w.process.kill()
                await asyncio.to_thread(w.process.join, 5)
            w.cmd_conn.close()
        log.info("all workers stopped")

    # -- requests ----------------------------------------------------------------------------

    def submit(self, model_id: str, generate: GenerateRequest, priority: Priority) -> TrackedRequest:
        """Accept a request or raise (503 unavailable, 429 full). Never blocks."""
        pool = self.pools[model_id]
        if self.is_draining:
            self._reject()
            raise ServiceUnavailable("the server is shutting down", retry_after=5)
        if not pool.num_ready:
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
        now = time.monotonic()
        req = TrackedRequest(generate.request_id, model_id, generate, priority, now)
        try:
            pool.queue.push(req.request_id, req, priority, now)
        except QueueFull:
            self._reject()
            raise RateLimited(
                f"the queue is full ({self.config.max_queue_size} waiting)", retry_after=1
            ) from None
        self._requests[req.request_id] = req
        self.totals.submitted += 1
        assert self._loop is not None
        req.timer = self._loop.call_later(self.config.request_timeout_s, self._on_timeout, req)
        self._dispatch(pool)
        return req

    def cancel(self, request_id: str) -> None:
        """The client went away: free the request's place (queue now, slot within one step)."""
        req = self._requests.get(request_id)
        if req is not None:
            self._end(req, RequestState.CANCELLED, RequestEnded(FINISH_CANCELLED))

    def _reject(self) -> None:
        self.totals.rejected += 1

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
        pool = self.pools[req.model_id]
        if req.state is RequestState.QUEUED:
            pool.queue.remove(req.request_id)
        elif req.worker is not None and req.request_id in req.worker.running:
            if state is not RequestState.FINISHED and state is not RequestState.FAILED:
                # The worker frees the slot at its next step and acknowledges; until then the
                # slot stays counted as busy so we never over-fill the worker.
                self._send(req.worker, CancelRequest(req.request_id))
        req.state = state
        if req.timer is not None:
            req.timer.cancel()
        now = time.monotonic()
        t = self.totals
        if state is RequestState.FINISHED:
            t.completed += 1
            t.processing_s += now - (req.started or now)
        elif state is RequestState.FAILED:
            t.failed += 1
        elif state is RequestState.CANCELLED:
            t.cancelled += 1
        elif state is RequestState.TIMED_OUT:
            t.timed_out += 1
        req.events.put_nowait(event)
        del self._requests[req.request_id]

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, pool: ModelPool) -> None:
        batch = self.config.max_batch_size
        while len(pool.queue):
            ready = [w for w in pool.workers if w.is_ready]
            free = [w for w in ready if len(w.running) < batch]
            if free:
                req = pool.queue.pop()
            else:
                # Every batch slot is busy. The urgent slots are the urgent class's own: the
                # longest-waiting urgent request takes one even if aged requests wait ahead.
                free = [w for w in ready if len(w.running) < batch + self.config.urgent_slots]
                if not free:
                    return
                req = pool.queue.pop_level(Priority.URGENT)
            if req is None:
                return
            worker = min(free, key=lambda w: len(w.running))
            req.state = RequestState.RUNNING
            req.started = time.monotonic()
            req.worker = worker
            worker.running[req.request_id] = req
            self.totals.dispatched += 1
            self.totals.wait_s += req.started - req.arrival
            log.debug("request %s (%s) to worker %d after %.3fs in the queue", req.request_id,
                      req.priority.name.lower(), worker.worker_id, req.started - req.arrival)
            self._send(worker, req.generate)

    def _send(self, worker: WorkerHandle, msg: object) -> None:
        try:
            worker.cmd_conn.send(msg)
        except OSError:
            # The worker is dying; its reader thread reports the exit and the requests it
            # held are put back or failed there.
            worker.is_ready = False

    # -- workers -----------------------------------------------------------------------------

    def _spawn(self, pool: ModelPool, gpu_id: int | None) -> WorkerHandle:
        worker_id = self._next_worker_id
        self._next_worker_id += 1
        cmd_r, cmd_w = self._mp.Pipe(duplex=False)
        evt_r, evt_w = self._mp.Pipe(duplex=False)
        spec = WorkerSpec(worker_id, pool.model_id, pool.path, pool.n_ctx, self.config, gpu_id)
        process = self._mp.Process(
            target=worker_main, args=(spec, cmd_r, evt_w), name=f"wicore-worker-{worker_id}",
            daemon=True,
        )
        process.start()
        # Close our copies of the child's ends: the worker's death then shows up at once as
        # EOF on evt_r, and the worker sees EOF on cmd_r if this process dies.
        cmd_r.close()
        evt_w.close()
        handle = WorkerHandle(worker_id, pool, process, cmd_w, evt_r, gpu_id)
        pool.workers.append(handle)
        threading.Thread(
            target=self._read_worker, args=(handle,), name=f"wicore-reader-{worker_id}", daemon=True
        ).start()
        log.info("started worker %d (pid %d) for %s%s", worker_id, process.pid, pool.model_id,
                 f" on GPU {gpu_id}" if gpu_id is not None else "")
        return handle

    def _read_worker(self, handle: WorkerHandle) -> None:
        """Reader thread: one message per decode step, handed to the loop as it is."""
        loop = self._loop
        assert loop is not None
        try:
            while True:
                msg = handle.evt_conn.recv()
                loop.call_soon_threadsafe(self._on_message, handle, msg)
        except (EOFError, OSError):
            pass
        handle.process.join(1.0)
        try:
            loop.call_soon_threadsafe(self._on_worker_exit, handle)
        except RuntimeError:
            pass  # the loop is closed: the server is gone already

    def _on_message(self, worker: WorkerHandle, msg: object) -> None:
        if isinstance(msg, StepOutput):
            self._on_step(worker, msg)
        elif isinstance(msg, WorkerReady):
            worker.is_ready = True
            worker.gpu_offload = msg.gpu_offload
            worker.visible_devices = msg.visible_devices
            worker.pool.load_failures = 0
            log.info("worker %d ready in %.1fs (n_ctx=%d, gpu offload=%s, gpu layers=%d)",
                     msg.worker_id, msg.load_seconds, msg.n_ctx, msg.gpu_offload, msg.n_gpu_layers)
            self._dispatch(worker.pool)
        elif isinstance(msg, WorkerFailed):
            log.error("worker %d could not load %s: %s", msg.worker_id, worker.pool.path, msg.message)
            worker.pool.load_failures = MAX_LOAD_FAILURES  # a load error will not fix itself
            self._on_fatal(msg.message)

    def _on_step(self, worker: WorkerHandle, msg: StepOutput) -> None:
        pool = worker.pool
        self.totals.step_messages += 1
        for request_id, text, token_ids, finish, error in msg.updates:
            req = worker.running.get(request_id)
            if req is None:
                continue
            if finish is not None:
                del worker.running[request_id]
            if req.state.is_terminal:
                continue  # cancelled or timed out here; the worker's ack only freed the slot
            if token_ids or text:
                req.num_tokens += len(token_ids)
                self.totals.tokens_generated += len(token_ids)
                req.events.put_nowait(TokenDelta(text, token_ids))
            if finish == FINISH_ERROR:
                log.error("request %s failed in worker %d: %s", request_id, worker.worker_id, error)
                self._end(req, RequestState.FAILED,
                          RequestEnded(FINISH_ERROR, GenerationFailed(error or "generation failed")))
            elif finish == FINISH_CANCELLED:
                self._end(req, RequestState.CANCELLED, RequestEnded(FINISH_CANCELLED))
            elif finish is not None:
                self._end(req, RequestState.FINISHED, RequestEnded(finish))
        self._dispatch(pool)

    def _on_worker_exit(self, worker: WorkerHandle) -> None:
        pool = worker.pool
        if worker in pool.workers:
            pool.workers.remove(worker)
        if self._is_stopped:
            return
        code = worker.process.exitcode
        log.error("worker %d (pid %s) exited unexpectedly (exit code %s) with %d requests",
                  worker.worker_id, worker.process.pid, code, len(worker.running))
        for req in list(worker.running.values()):
            if req.state.is_terminal:
                continue
            if req.num_tokens == 0:
                # Nothing reached the client yet: run it again elsewhere, keeping its place.
                req.state = RequestState.QUEUED
                req.worker = None
                try:
                    pool.queue.push(req.request_id, req, req.priority, req.arrival)
                    log.warning("request %s requeued after worker %d died",
                                req.request_id, worker.worker_id)
                    continue
                except QueueFull:
                    pass
            log.error("request %s failed: worker %d died mid-stream", req.request_id,
                      worker.worker_id)
            self._end(req, RequestState.FAILED, RequestEnded(FINISH_ERROR, GenerationFailed(
                f"worker process {worker.worker_id} died (exit code {code}) during generation")))
        worker.running.clear()
        if not worker.is_ready:
            pool.load_failures += 1
        if pool.load_failures >= MAX_LOAD_FAILURES:
            self._on_fatal(f"workers for {pool.model_id} keep failing to start")
            return
        self._spawn(pool, worker.gpu_id)
        self._dispatch(pool)

    # -- figures -----------------------------------------------------------------------------

    def stats(self) -> dict:
        """The scheduler's figures as numbers (the HTTP layer formats them)."""
        t = self.totals
        ended = t.completed + t.failed + t.cancelled + t.timed_out
        queued = {level.name.lower(): 0 for level in Priority}
        for pool in self.pools.values():
            for level, n in pool.queue.lengths().items():
                queued[level.name.lower()] += n
        running = sum(len(w.running) for p in self.pools.values() for w in p.workers)
        return {
            "running": not self._is_stopped,
            "draining": self.is_draining,
            "total_requests": t.submitted,
            "completed": t.completed,
            "failed": t.failed,
            "cancelled": t.cancelled,
            "timed_out": t.timed_out,
            "rejected": t.rejected,
            "active": sum(r.state is RequestState.RUNNING for r in self._requests.values()),
            "in_flight": len(self._requests),
            "running_sequences": running,
            "queue_length": sum(queued.values()),
            "queued_by_priority": queued,
            "success_rate": (t.completed / ended) if ended else None,
            "mean_processing_s": (t.processing_s / t.completed) if t.completed else 0.0,
            "mean_wait_s": (t.wait_s / t.dispatched) if t.dispatched else 0.0,
            "tokens_generated": t.tokens_generated,
            "worker_messages": t.step_messages,
            "workers": [
                {
                    "id": w.worker_id,
                    "model": p.model_id,
                    "pid": w.process.pid,
                    "ready": w.is_ready,
                    "gpu_id": w.gpu_id,
                    "gpu_offload": w.gpu_offload,
                    "cuda_visible_devices": w.visible_devices,
                    "running": len(w.running),
                }
                for p in self.pools.values()
                for w in p.workers
            ],
        }
