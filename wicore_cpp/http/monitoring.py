"""`GET /`, `GET /health`, `GET /status` (API document §3-§5): is it up, and how is it doing."""

from __future__ import annotations

from aiohttp import web

from wicore_cpp import ENGINE_NAME, __version__
from wicore_cpp.engine.client import EngineHealth, EngineStats, PromptCacheStats, WorkerStats
from wicore_cpp.errors import ServiceUnavailable
from wicore_cpp.http.openapi import documented
from wicore_cpp.http.protocol import json_response
from wicore_cpp.http.responses import Health, HealthProblem, Root, Status
from wicore_cpp.http.state import STATE

routes = web.RouteTableDef()

_LEVEL_NAMES = {"low": "低优先级", "normal": "普通优先级", "high": "高优先级", "urgent": "紧急优先级"}
_UNHEALTHY_MESSAGES = {
    EngineHealth.DRAINING: "the server is shutting down",
    EngineHealth.LOADING: "the model is loading",
    EngineHealth.UNHEALTHY: "no worker process is alive",
}


def _pct(x: float | None) -> str:
    return "N/A" if x is None else f"{x * 100:.1f}%"


@routes.get("/")
@documented("Engine name and version", responses={200: Root})
async def root(request: web.Request) -> web.Response:
    """Engine name and version (API document §5), plus where to look next."""
    engine = request.app[STATE].engine
    return json_response({
        "message": f"{ENGINE_NAME} 推理引擎",
        "version": __version__,
        "engine": ENGINE_NAME,
        "models": list(engine.models),
        "endpoints": ["/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize",
                      "/detokenize", "/health", "/status", "/metrics"],
    })


@routes.get("/health")
@documented("Is it serving", responses={200: Health, 503: HealthProblem})
async def health(request: web.Request) -> web.Response:
    """200 while serving; 503 in the error shape while loading, draining or with no worker."""
    engine = request.app[STATE].engine
    s = engine.stats()
    total = s.counters.submitted
    body = {
        "status": "healthy",
        "engine": ENGINE_NAME,
        "version": __version__,
        "uptime": f"{s.uptime_s:.1f}",
        "scheduler": "running",
        "total_requests": str(total),
        "error_count": str(s.error_count),
        "error_rate": _pct(s.error_count / total) if total else "0.0%",
    }
    state = engine.health()
    if state is EngineHealth.HEALTHY:
        return json_response(body)
    body.update(ServiceUnavailable(_UNHEALTHY_MESSAGES[state]).to_dict(),
                status=state.value, scheduler=state.value)
    return json_response(body, status=503)


@routes.get("/status")
@documented("Figures: requests, queue, workers", responses={200: Status})
async def status(request: web.Request) -> web.Response:
    """The API document's §4 fields as formatted strings, plus `metrics` as numbers."""
    state = request.app[STATE]
    s = state.engine.stats()
    c = s.counters
    # The port this request arrived on: right even when the server was started with port 0.
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else state.config.port
    scheduler_status = "\n".join([
        "调度器状态:",
        f"  运行中: {'是' if s.is_running else '否'}",
        f"  总请求数: {c.submitted}",
        f"  已完成: {c.completed}",
        f"  失败: {c.failed}",
        f"  取消: {c.cancelled}",
        f"  超时: {c.timed_out}",
        f"  活跃请求: {s.num_active}",
        f"  队列长度: {s.queue_length}",
        f"  成功率: {_pct(s.success_rate)}",
        f"  平均处理时间: {s.mean_processing_s:.3f}s",
        f"  平均等待时间: {s.mean_wait_s:.3f}s",
    ])
    queue_summary = "\n".join(
        ["队列状态:"]
        + [f"  {_LEVEL_NAMES[level]}: {n} 个请求" for level, n in s.queued_by_priority.items()]
        + [f"  活跃处理: {s.num_active} 个请求"]
    )
    return json_response({
        "server_running": "是",
        "port": str(port),
        "uptime": f"{s.uptime_s:.1f}s",
        "total_requests": str(c.submitted),
        "error_count": str(s.error_count),
        "scheduler_status": scheduler_status,
        "queue_summary": queue_summary,
        "metrics": {**_metrics(s), "port": port},
    })


def _metrics(s: EngineStats) -> dict:
    """The figures as numbers, under the names `/status` has always used."""
    c = s.counters
    return {
        "running": s.is_running,
        "draining": s.is_draining,
        "total_requests": c.submitted,
        "completed": c.completed,
        "failed": c.failed,
        "cancelled": c.cancelled,
        "timed_out": c.timed_out,
        "rejected": c.rejected,
        "active": s.num_active,
        "in_flight": s.num_in_flight,
        "running_sequences": s.num_running_sequences,
        "queue_length": s.queue_length,
        "queued_by_priority": s.queued_by_priority,
        "success_rate": s.success_rate,
        "mean_processing_s": s.mean_processing_s,
        "mean_wait_s": s.mean_wait_s,
        "tokens_generated": c.tokens_generated,
        "worker_messages": c.step_messages,
        "prompt_cache": {"hits": c.cache_hits, "cached_tokens": c.cached_tokens,
                         **_prompt_cache(s.prompt_cache)},
        "workers": [_worker(w) for w in s.workers],
        "uptime_s": round(s.uptime_s, 3),
        "error_count": s.error_count,
        "engine": ENGINE_NAME,
        "version": __version__,
    }


def _worker(w: WorkerStats) -> dict:
    return {
        "id": w.worker_id,
        "model": w.model_id,
        "pid": w.pid,
        "ready": w.is_ready,
        "gpu_id": w.gpu_id,
        "gpu_offload": w.gpu_offload,
        "cuda_visible_devices": w.visible_devices,
        "running": w.num_running,
        "node": w.node,
        "prompt_cache": {"hits": w.prompt_cache.hits,
                         "cached_tokens": w.prompt_cache.tokens_reused,
                         **_prompt_cache(w.prompt_cache)},
    }


def _prompt_cache(p: PromptCacheStats) -> dict:
    """What a prompt cache holds and has done (the hit counts of the engine as a whole come
    from the requests, so they outlive a worker)."""
    return {
        "entries": p.entries,
        "cells": p.cells,
        "evictions": p.evictions,
        "window_misses": p.window_misses,
        "host_entries": p.host_entries,
        "host_bytes": p.host_bytes,
        "host_saves": p.host_saves,
        "host_restores": p.host_restores,
    }
