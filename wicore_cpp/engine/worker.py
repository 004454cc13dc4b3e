"""The worker: loads the model once, then decodes whatever the scheduler hands it.

Commands arrive on `cmd_conn` (GenerateRequest, CancelRequest, Shutdown) and are read between
decode steps; each step's results leave on `evt_conn` as one StepOutput. A local worker is a
process with its own pair of pipes (so a worker killed mid-write cannot corrupt another
worker's channel); a Ray actor runs the same loop over in-memory channels with the same
`poll` / `recv` / `send` methods (engine/ray_workers.py).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from wicore_cpp.config import Config, resolve_host_cache_bytes, resolve_threads
from wicore_cpp.engine.messages import (
    CancelRequest,
    GenerateRequest,
    Shutdown,
    StepOutput,
    WorkerFailed,
    WorkerReady,
)
from wicore_cpp.logs import LogSettings, configure_logging

log = logging.getLogger("wicore.worker")


@dataclass(slots=True, frozen=True)
class WorkerSpec:
    """What a worker process needs to start; pickled to the child."""

    worker_id: int
    model_id: str
    model_path: Path
    n_ctx: int
    config: Config
    gpu_id: int | None
    mmproj_path: Path | None = None  # the model's vision projector, when it takes images


def worker_main(spec: WorkerSpec, cmd_conn: Connection, evt_conn: Connection) -> None:
    """Process entry point. Exits when told to, or when the front end's pipe closes."""
    # Ctrl-C reaches the whole process group; the front end decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if spec.gpu_id is not None:
        # Before llama_cpp is imported: CUDA reads it once, at initialisation.
        os.environ["CUDA_VISIBLE_DEVICES"] = str(spec.gpu_id)
    configure_logging(LogSettings.from_config(spec.config), f"worker-{spec.worker_id}")
    try:
        run_worker(spec, cmd_conn, evt_conn)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("front end went away; worker %d exits", spec.worker_id)


def uses_backend_sampling(setting: str, offloaded: bool) -> bool:
    """The `backend_sampling` setting resolved: "auto" samples in the decode graph only when
    layers are on a GPU. On the CPU the graph's sampling (a softmax and a cumulative sum over
    the whole vocabulary per sequence, plus copying each row's probabilities and logits back)
    took longer than sampling from the logits row (`tools/bench.py profile`, README)."""
    return setting == "on" or (setting == "auto" and offloaded)


def serve_steps(batcher, cmd_conn, send, *, overlap: bool) -> None:
    """Serve commands and decode steps until Shutdown and idle; `send(updates, cache_report)`
    ships each step's results (once per step that has any).

    Commands are read between steps (blocking only while idle). With `overlap`, a step's
    results are held until the next step's decode has been launched (`batcher.launch`) and
    sent while the device computes, then that step is completed; results are sent at once when
    no further step follows (idle), so nothing waits on a step that will not come.
    """
    stopping = False
    held = None  # (updates, cache_report) of the step before the one in flight
    while not (stopping and batcher.is_idle):
        # Block while idle; otherwise only look at what has arrived since the last step.
        timeout = None if batcher.is_idle else 0
        while cmd_conn.poll(timeout):
            timeout = 0
            msg = cmd_conn.recv()
            if isinstance(msg, GenerateRequest):
                batcher.submit(msg)
            elif isinstance(msg, CancelRequest):
                batcher.cancel(msg.request_id)
            elif isinstance(msg, Shutdown):
                stopping = True
                batcher.cancel_all()
        batcher.launch()
        if held is not None:
            send(*held)
            held = None
        updates = batcher.complete()
        cache_report = batcher.cache.take_report()
        if updates or cache_report is not None:
            if overlap and not batcher.is_idle:
                held = (updates, cache_report)
            else:
                send(updates, cache_report)
    if held is not None:
        send(*held)


def run_worker(spec: WorkerSpec, cmd_conn: Connection, evt_conn: Connection) -> None:
    """Load, report ready (or failed), then serve commands until Shutdown and idle."""
    from wicore_cpp.engine.backend import BackendError, BatchContext, Model, supports_gpu_offload
    from wicore_cpp.engine.batcher import ContinuousBatcher

    config = spec.config
    started = time.monotonic()
    offload = supports_gpu_offload()
    n_gpu_layers = config.n_gpu_layers if offload else 0
    if n_gpu_layers < 0:
        n_gpu_layers = 10**6  # llama.cpp clamps to the model's layer count
    threads = resolve_threads(config.threads)
    try:
        model = Model(spec.model_path, n_gpu_layers=n_gpu_layers)
        ctx = BatchContext(
            model,
            n_ctx=spec.n_ctx,
            n_batch=config.prefill_chunk,
            n_seq_max=config.num_seq_ids,
            threads=threads,
            flash_attn=config.flash_attn,
            kv_cache_type=config.kv_cache_type,
            backend_sampling=uses_backend_sampling(config.backend_sampling,
                                                   offload and n_gpu_layers > 0),
        )
        vision = None
        if spec.mmproj_path is not None:
            from wicore_cpp.engine.vision import VisionEncoder

            # On the GPU when the model's layers are (libmtmd offloads all of it or nothing).
            vision = VisionEncoder(spec.mmproj_path, model, use_gpu=offload and n_gpu_layers > 0,
                                   threads=threads, flash_attn=config.flash_attn)
    except BackendError as exc:
        evt_conn.send(WorkerFailed(spec.worker_id, str(exc)))
        return
    load_s = time.monotonic() - started
    log.info(
        "loaded %s in %.1fs (n_ctx=%d, batch=%d, kv cache %s, gpu offload=%s, layers=%s)",
        spec.model_path.name, load_s, ctx.n_ctx, config.max_batch_size, config.kv_cache_type,
        offload,
        min(n_gpu_layers, model.info.n_layer) if offload else 0,
    )
    evt_conn.send(
        WorkerReady(spec.worker_id, ctx.n_ctx, offload,
                    min(n_gpu_layers, model.info.n_layer), load_s,
                    os.environ.get("CUDA_VISIBLE_DEVICES"),
                    None if vision is None else
                    f"{vision.path.name} on the {'GPU' if vision.use_gpu else 'CPU'}")
    )
    batcher = ContinuousBatcher(
        model, ctx, max_batch_size=config.max_batch_size, sample_threads=threads,
        grammar_budget_s=config.grammar_budget_ms / 1000,
        max_running=config.max_running,
        cache_cells=int(config.prompt_cache_share * ctx.n_ctx),
        cache_host_bytes=resolve_host_cache_bytes(config),
        vision=vision,
    )
    if batcher.cache.is_enabled:
        log.info("prompt cache: up to %d cells, %d extra seq ids, sliding window %d, "
                 "host tier %d MiB", batcher.cache.max_cells, config.prompt_cache_seqs,
                 model.n_swa, batcher.cache.host_limit >> 20)
    # With layers on a GPU, llama_decode returns while the device computes: ship the previous
    # step's text then, rather than after the step (on the CPU decode is synchronous, and
    # holding text back a step would only delay it).
    overlap = offload and n_gpu_layers > 0

    def send(updates, cache_report) -> None:
        evt_conn.send(StepOutput(spec.worker_id, updates, cache_report))

    serve_steps(batcher, cmd_conn, send, overlap=overlap)
    if vision is not None:
        vision.close()
    ctx.close()
    model.close()
    log.info("worker %d stopped", spec.worker_id)
