"""The worker processes: spawn them, watch them, restart them when they die, stop them.

Each worker has its own pair of pipes, so a worker killed mid-write cannot corrupt another
worker's channel. One reader thread per worker hands that worker's messages (one StepOutput
per decode step) to the event loop as they are, and notices at once (pipe EOF) when the
process dies. What a message means for the requests is the listener's business (the
scheduler); this module only knows processes.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from wicore_cpp.config import Config
from wicore_cpp.engine.messages import (
    PromptCacheStats,
    Shutdown,
    StepOutput,
    WorkerFailed,
    WorkerReady,
)
from wicore_cpp.engine.prefix_routing import CachedPrefixes
from wicore_cpp.engine.request import TrackedRequest
from wicore_cpp.engine.stats import WorkerStats
from wicore_cpp.engine.worker import WorkerSpec, worker_main

log = logging.getLogger("wicore.workers")

MAX_LOAD_FAILURES = 3  # consecutive failed loads of one model before the server gives up


@dataclass(slots=True, frozen=True)
class ModelFiles:
    """What a worker loads for one served model."""

    path: Path
    n_ctx: int  # the KV pool of one worker, in tokens
    mmproj_path: Path | None = None  # its vision projector, when it takes images


class WorkerHandle:
    """The front end's side of one worker, wherever it runs (a local process, a Ray actor).

    Only the event loop changes the state here, except `receive`, which the worker's reader
    thread calls.
    """

    def __init__(self, worker_id: int, model_id: str, gpu_id: int | None):
        self.worker_id = worker_id
        self.model_id = model_id
        self.gpu_id = gpu_id
        self.is_ready = False
        self.gpu_offload = False
        self.visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES as the worker sees it
        self.n_ctx = 0  # its KV pool in cells, once loaded
        self.node: str | None = None  # where it runs, when that is not this machine
        self.running: dict[str, TrackedRequest] = {}  # requests holding a decode slot
        # What its prompt cache holds, as it last reported (gone with the worker).
        self.cached_prefixes = CachedPrefixes()
        self.prompt_cache = PromptCacheStats()

    @property
    def num_slots(self) -> int:
        """Sequence slots its requests hold (one per choice not yet finished)."""
        return sum(r.open_choices for r in self.running.values())

    def send(self, msg: object) -> None:
        """Hand the worker a command; never blocks, never raises (a dead worker is noticed by
        its reader thread)."""
        raise NotImplementedError

    def receive(self) -> object:
        """The worker's next message (one per decode step); EOFError once the worker is gone."""
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        raise NotImplementedError

    def describe(self) -> str:
        """Which worker this is, for logs (e.g. "pid 1234")."""
        raise NotImplementedError

    def exit_reason(self) -> str:
        """How the worker ended, for logs and error messages (e.g. "exit code -9")."""
        raise NotImplementedError

    def reap(self) -> None:
        """After `receive` said EOF: wait briefly for the worker to be fully gone."""

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the worker to exit; True if it has."""
        raise NotImplementedError

    def kill(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the front end holds for this worker, after it exited or was killed."""

    def stats(self) -> WorkerStats:
        # A running sequence holds a KV cell per token it has: its prompt and what it generated.
        kv_used = sum(r.num_prompt_tokens + r.num_tokens for r in self.running.values())
        return WorkerStats(self.worker_id, self.model_id, self.pid, self.is_ready, self.gpu_id,
                           self.gpu_offload, self.visible_devices, self.num_slots, self.node,
                           self.n_ctx, kv_used, self.prompt_cache)


class ProcessWorker(WorkerHandle):
    """A worker process on this machine, with its own pair of pipes."""

    def __init__(self, spec: WorkerSpec, process: multiprocessing.process.BaseProcess,
                 cmd_conn: multiprocessing.connection.Connection,
                 evt_conn: multiprocessing.connection.Connection):
        super().__init__(spec.worker_id, spec.model_id, spec.gpu_id)
        self.process = process
        self._cmd_conn = cmd_conn
        self._evt_conn = evt_conn

    def send(self, msg: object) -> None:
        try:
            self._cmd_conn.send(msg)
        except OSError:
            # The worker is dying; its reader thread reports the exit and the requests it
            # held are put back or failed there.
            self.is_ready = False

    def receive(self) -> object:
        try:
            return self._evt_conn.recv()
        except OSError:
            raise EOFError from None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def describe(self) -> str:
        return f"pid {self.process.pid}"

    def exit_reason(self) -> str:
        return f"exit code {self.process.exitcode}"

    def reap(self) -> None:
        self.process.join(1.0)

    def join(self, timeout: float) -> bool:
        self.process.join(timeout)
        return not self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()

    def close(self) -> None:
        self._cmd_conn.close()


class WorkerLauncher(Protocol):
    """Starts workers somewhere: local processes (`ProcessLauncher`) or Ray actors."""

    def spawn(self, spec: WorkerSpec) -> WorkerHandle: ...

    def shutdown(self) -> None: ...


class ProcessLauncher:
    """Workers as spawned processes on this machine."""

    def __init__(self) -> None:
        self._mp = multiprocessing.get_context("spawn")

    def spawn(self, spec: WorkerSpec) -> ProcessWorker:
        cmd_r, cmd_w = self._mp.Pipe(duplex=False)
        evt_r, evt_w = self._mp.Pipe(duplex=False)
        process = self._mp.Process(
            target=worker_main, args=(spec, cmd_r, evt_w),
            name=f"wicore-worker-{spec.worker_id}", daemon=True,
        )
        process.start()
        # Close our copies of the child's ends: the worker's death then shows up at once as
        # EOF on evt_r, and the worker sees EOF on cmd_r if this process dies.
        cmd_r.close()
        evt_w.close()
        return ProcessWorker(spec, process, cmd_w, evt_r)

    def shutdown(self) -> None:
        pass


def make_launcher(config: Config) -> WorkerLauncher:
    """Local processes, or Ray actors when `ray_address` is set."""
    if config.ray_address is None:
        return ProcessLauncher()
    from wicore_cpp.engine.ray_workers import RayLauncher  # only with the `ray` extra

    return RayLauncher(config)


def _where_it_runs(msg: WorkerReady) -> str:
    """GPU offload (layers, device) or, clearly, the CPU and why."""
    if msg.gpu_offload and msg.n_gpu_layers > 0:
        device = (f"CUDA_VISIBLE_DEVICES={msg.visible_devices}" if msg.visible_devices is not None
                  else "every visible GPU")
        return f"{msg.n_gpu_layers} layers offloaded to the GPU ({device})"
    if not msg.gpu_offload:
        return ("running on the CPU: this llama.cpp build has no GPU backend "
                "(`make install-cuda` rebuilds it with CUDA)")
    return "running on the CPU: n_gpu_layers is 0"


class WorkerListener(Protocol):
    """What the worker processes tell their owner, always on the event loop."""

    def on_worker_ready(self, worker: WorkerHandle) -> None: ...

    def on_worker_step(self, worker: WorkerHandle, msg: StepOutput) -> None: ...

    def on_worker_lost(self, worker: WorkerHandle) -> None:
        """The process died unexpectedly; `worker.running` still holds its requests."""


class WorkerProcesses:
    """Every worker process of every served model."""

    def __init__(
        self,
        config: Config,
        models: dict[str, ModelFiles],
        listener: WorkerListener,
        on_fatal: Callable[[str], None],
    ):
        self.config = config
        self.models = models
        self._listener = listener
        self._on_fatal = on_fatal
        self._workers: dict[str, list[WorkerHandle]] = {model_id: [] for model_id in models}
        self._load_failures = dict.fromkeys(models, 0)
        self._launcher: WorkerLauncher | None = None
        self.num_restarts = dict.fromkeys(models, 0)  # workers started again after dying
        self._next_worker_id = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._is_stopped = False

    def start(self) -> None:
        """Start `workers` processes per model; they load in the background."""
        self._loop = asyncio.get_running_loop()
        self._launcher = make_launcher(self.config)
        gpu_ids = self.config.gpu_ids
        for model_id in self.models:
            for i in range(self.config.workers):
                self._spawn(model_id, gpu_ids[i % len(gpu_ids)] if gpu_ids else None)

    def of_model(self, model_id: str) -> list[WorkerHandle]:
        return self._workers[model_id]

    def __iter__(self) -> Iterator[WorkerHandle]:
        for workers in self._workers.values():
            yield from workers

    def num_ready(self, model_id: str) -> int:
        return sum(w.is_ready for w in self._workers[model_id])

    @property
    def is_loading(self) -> bool:
        """Some worker is still loading its model."""
        return any(not w.is_ready for w in self)

    async def stop(self, grace_s: float) -> None:
        """Tell every worker to exit, and make sure it did."""
        self._is_stopped = True
        workers = list(self)
        for w in workers:
            w.send(Shutdown())
        deadline = time.monotonic() + grace_s
        for w in workers:
            if not await asyncio.to_thread(w.join, max(0.0, deadline - time.monotonic())):
                log.warning("worker %d did not exit; killing it", w.worker_id)
                w.kill()
                await asyncio.to_thread(w.join, 5)
            w.close()
        if self._launcher is not None:
            self._launcher.shutdown()
        log.info("all workers stopped")

    def _spawn(self, model_id: str, gpu_id: int | None) -> WorkerHandle:
        assert self._launcher is not None
        worker_id = self._next_worker_id
        self._next_worker_id += 1
        files = self.models[model_id]
        handle = self._launcher.spawn(
            WorkerSpec(worker_id, model_id, files.path, files.n_ctx, self.config, gpu_id,
                       files.mmproj_path))
        self._workers[model_id].append(handle)
        threading.Thread(
            target=self._read, args=(handle,), name=f"wicore-reader-{worker_id}", daemon=True
        ).start()
        log.info("started worker %d (%s) for %s%s", worker_id, handle.describe(), model_id,
                 f" on GPU {gpu_id}" if gpu_id is not None else "")
        return handle

    def _read(self, handle: WorkerHandle) -> None:
        """Reader thread: one message per decode step, handed to the loop as it is."""
        loop = self._loop
        assert loop is not None
        try:
            while True:
                msg = handle.receive()
                loop.call_soon_threadsafe(self._on_message, handle, msg)
        except EOFError:
            pass
        handle.reap()
        try:
            loop.call_soon_threadsafe(self._on_exit, handle)
        except RuntimeError:
            pass  # the loop is closed: the server is gone already

    def _on_message(self, worker: WorkerHandle, msg: object) -> None:
        if isinstance(msg, StepOutput):
            self._listener.on_worker_step(worker, msg)
        elif isinstance(msg, WorkerReady):
            worker.is_ready = True
            worker.gpu_offload = msg.gpu_offload
            worker.visible_devices = msg.visible_devices
            worker.n_ctx = msg.n_ctx
            self._load_failures[worker.model_id] = 0
            log.info("worker %d ready in %.1fs: %s; KV pool %d cells%s", msg.worker_id,
                     msg.load_seconds, _where_it_runs(msg), msg.n_ctx,
                     f"; images: {msg.vision}" if msg.vision else "")
            self._listener.on_worker_ready(worker)
        elif isinstance(msg, WorkerFailed):
            log.error("worker %d could not load %s: %s", msg.worker_id,
                      self.models[worker.model_id].path, msg.message)
            # A load error will not fix itself: no restarts.
            self._load_failures[worker.model_id] = MAX_LOAD_FAILURES
            self._on_fatal(msg.message)

    def _on_exit(self, worker: WorkerHandle) -> None:
        model_workers = self._workers[worker.model_id]
        if worker in model_workers:
            model_workers.remove(worker)
        if self._is_stopped:
            return
        log.error("worker %d (%s) exited unexpectedly (%s) with %d requests",
                  worker.worker_id, worker.describe(), worker.exit_reason(), len(worker.running))
        self._listener.on_worker_lost(worker)
        worker.running.clear()
        if not worker.is_ready:
            self._load_failures[worker.model_id] += 1
        if self._load_failures[worker.model_id] >= MAX_LOAD_FAILURES:
            self._on_fatal(f"workers for {worker.model_id} keep failing to start")
            return
        self.num_restarts[worker.model_id] += 1
        self._spawn(worker.model_id, worker.gpu_id)
