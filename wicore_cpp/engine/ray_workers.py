"""Workers as Ray actors: the same worker loop, on whatever node Ray places it.

The scheduler, its queue, priorities, limits and accounting stay in the front end; only the
worker moves. A `RayWorker` is one more `WorkerHandle`: commands go to the actor as method
calls, and the actor's results come back through one streaming generator, one item per decode
step (the same `StepOutput` a local worker sends down its pipe), never per token.

Inside the actor, `run_worker` (engine/worker.py) runs unchanged on a thread of its own, over
two in-memory channels with the pipe methods it uses (`poll` / `recv` for commands, `send` for
results). Ray runs an actor's methods on its own threads, and a threaded actor does not promise
to run one caller's calls in order, so each command carries a sequence number and the actor
puts them back in order: a cancel can never overtake the request it cancels.

Faults: when the actor or its node dies, the generator raises; the reader thread turns that
into EOF, exactly like a local worker's closed pipe, and the scheduler requeues or fails the
worker's requests and starts a replacement actor. Ray's own restarts are off (`max_restarts=0`)
so that there is one restart policy, the scheduler's.

Imported only when `ray_address` is set.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import queue
import signal
import threading
from pathlib import Path

try:
    import ray
    from ray.exceptions import RayError
except ImportError as exc:  # the setting exists without the extra: say which extra
    raise ImportError(
        "ray_address needs Ray: install the `ray` extra (pip install 'wicore-cpp[ray]')"
    ) from exc

from wicore_cpp.config import Config
from wicore_cpp.engine.worker import WorkerSpec, run_worker
from wicore_cpp.engine.workers import WorkerHandle
from wicore_cpp.logs import LogSettings, configure_logging

log = logging.getLogger("wicore.ray")

NAMESPACE = "wicore"
_END = object()  # the worker loop has returned


def actor_name(worker_id: int) -> str:
    """Every worker actor is named, so an operator (or a test) can find it in the cluster."""
    return f"wicore-worker-{worker_id}"


class _Commands:
    """Actor side: commands in submission order, with the `poll` / `recv` of a pipe."""

    def __init__(self) -> None:
        self._ready: collections.deque[object] = collections.deque()
        self._early: dict[int, object] = {}  # arrived ahead of an earlier command
        self._next_seq = 0
        self._cv = threading.Condition()

    def put(self, seq: int, msg: object) -> None:
        with self._cv:
            self._early[seq] = msg
            while self._next_seq in self._early:
                self._ready.append(self._early.pop(self._next_seq))
                self._next_seq += 1
            self._cv.notify()

    def poll(self, timeout: float | None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: bool(self._ready), timeout)

    def recv(self) -> object:
        with self._cv:
            return self._ready.popleft()


class _Results:
    """Actor side: what the worker loop sends, handed to the streaming generator."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[object] = queue.SimpleQueue()

    def send(self, msg: object) -> None:
        self._q.put(msg)

    def get(self) -> object:
        return self._q.get()


class WorkerActor:
    """The Ray actor: runs the worker loop on a thread, streams its messages out."""

    def __init__(self, spec: WorkerSpec):
        self._commands = _Commands()
        self._results = _Results()
        configure_logging(LogSettings.from_config(spec.config), f"worker-{spec.worker_id}")
        threading.Thread(target=self._run, args=(spec,), name="wicore-worker-loop",
                         daemon=True).start()

    def _run(self, spec: WorkerSpec) -> None:
        try:
            run_worker(spec, self._commands, self._results)
        except Exception:
            log.exception("worker %d failed", spec.worker_id)
        finally:
            self._results.send(_END)

    def where(self) -> dict:
        """Node, process and GPUs of this actor, for /status."""
        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    def send(self, seq: int, msg: object) -> None:
        self._commands.put(seq, msg)

    def results(self):
        """One item per message of the worker loop, until it returns."""
        while (msg := self._results.get()) is not _END:
            yield msg


class RayWorker(WorkerHandle):
    """The front end's side of one worker actor."""

    def __init__(self, spec: WorkerSpec, actor):
        super().__init__(spec.worker_id, spec.model_id, gpu_id=None)
        self._actor = actor
        self._seq = itertools.count()
        self._results = actor.results.remote()
        self._exited = threading.Event()
        self._exit_reason = "the worker loop returned"
        self._pid: int | None = None

    def send(self, msg: object) -> None:
        # Never blocks: the call is queued by Ray; a dead actor shows up in `receive`.
        self._actor.send.remote(next(self._seq), msg)

    def receive(self) -> object:
        if self._pid is None and not self._exited.is_set():
            self._locate()
        try:
            return ray.get(next(self._results))
        except StopIteration:
            raise EOFError from None
        except RayError as exc:
            self._exit_reason = f"actor died: {type(exc).__name__}"
            log.warning("worker %d: %s", self.worker_id, str(exc).splitlines()[0])
            raise EOFError from None

    def _locate(self) -> None:
        """Ask the actor where it runs (on the reader thread: it waits for the actor to start)."""
        try:
            where = ray.get(self._actor.where.remote())
        except RayError:
            return  # it died while starting; `receive` reports how
        self._pid = where["pid"]
        gpus = ",".join(where["gpu_ids"])
        self.node = f"{where['ip']} ({where['node_id'][:12]})" + (f" GPU {gpus}" if gpus else "")

    @property
    def pid(self) -> int | None:
        return self._pid

    def describe(self) -> str:
        return f"Ray actor {actor_name(self.worker_id)}" + (f" on {self.node}" if self.node else "")

    def exit_reason(self) -> str:
        return self._exit_reason

    def reap(self) -> None:
        self._exited.set()

    def join(self, timeout: float) -> bool:
        return self._exited.wait(timeout)

    def kill(self) -> None:
        ray.kill(self._actor, no_restart=True)

    def close(self) -> None:
        # The loop has returned (or was killed); the actor process would otherwise stay.
        try:
            ray.kill(self._actor, no_restart=True)
        except RayError:
            pass


class RayLauncher:
    """Starts worker actors on the cluster at `config.ray_address`."""

    def __init__(self, config: Config):
        self._config = config
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            address = None if config.ray_address == "local" else config.ray_address
            # ray.init makes SIGTERM exit the driver at once; the server's own handler (drain
            # the requests in flight, then stop the workers) must stay in charge.
            on_sigterm = signal.getsignal(signal.SIGTERM)
            ray.init(address=address, namespace=NAMESPACE, include_dashboard=False,
                     log_to_driver=True)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, on_sigterm)
        resources = dict(config.ray_resources) or (
            {"GPU": 1.0} if ray.cluster_resources().get("GPU", 0) > 0 else {"CPU": 1.0})
        self._options = {
            "num_cpus": resources.pop("CPU", 0),
            "num_gpus": resources.pop("GPU", 0),
            "resources": resources,
            "max_restarts": 0,  # the scheduler restarts workers, as for local processes
            "max_concurrency": 2,  # the result stream, and `send`/`where` beside it
            "namespace": NAMESPACE,
        }
        self._actor_class = ray.remote(WorkerActor)
        log.info("Ray cluster at %s: %s; each worker asks for %s", config.ray_address,
                 {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
                 dict(config.ray_resources) or "the default")

    def spawn(self, spec: WorkerSpec) -> RayWorker:
        path = self._config.ray_model_paths.get(spec.model_id)
        if path is not None:
            spec = dataclasses.replace(spec, model_path=Path(path))
        actor = self._actor_class.options(
            name=actor_name(spec.worker_id), **self._options).remote(spec)
        return RayWorker(spec, actor)

    def shutdown(self) -> None:
        if self._owns_ray:
            ray.shutdown()
