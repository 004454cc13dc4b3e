"""HTTP routes: thin handlers that parse, call the service or scheduler, and shape the reply."""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from wicore_cpp import ENGINE_NAME, __version__
from wicore_cpp.errors import ModelNotFound, RateLimited, ServiceUnavailable
from wicore_cpp.http.protocol import parse_chat_request
from wicore_cpp.http.serving import resolve_priority
from wicore_cpp.http.state import AppState, STATE

routes = web.RouteTableDef()

_LEVEL_NAMES = {"low": "低优先级", "normal": "普通优先级", "high": "高优先级", "urgent": "紧急优先级"}


def _json(data: dict, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _pct(x: float | None) -> str:
    return "N/A" if x is None else f"{x * 100:.1f}%"


@routes.get("/")
async def root(request: web.Request) -> web.Response:
    """Engine name and version (API document §5), plus where to look next."""
    state = request.app[STATE]
    return _json({
        "message": f"{ENGINE_NAME} 推理引擎",
        "version": __version__,
        "engine": ENGINE_NAME,
        "models": list(state.model_created),
        "endpoints": ["/v1/chat/completions", "/v1/models", "/health", "/status"],
    })


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    """OpenAI model list (API document §2)."""
    state = request.app[STATE]
    return _json({"object": "list", "data": [_model_card(m, c) for m, c in state.model_created.items()]})


@routes.get("/v1/models/{model_id}")
async def get_model(request: web.Request) -> web.Response:
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    if model_id not in state.model_created:
        raise ModelNotFound(f"The model '{model_id}' does not exist", param="model")
    return _json(_model_card(model_id, state.model_created[model_id]))


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "wicore"}


@routes.get("/health")
async def health(request: web.Request) -> web.Response:
    """200 while serving; 503 in the error shape while loading, draining or with no worker."""
    state = request.app[STATE]
    sched = state.scheduler
    s = sched.stats()
    errors = s["failed"] + s["timed_out"]
    body = {
        "status": "healthy",
        "engine": ENGINE_NAME,
        "version": __version__,
        "uptime": f"{time.time() - sched.started_at:.1f}",
        "scheduler": "running",
        "total_requests": str(s["total_requests"]),
        "error_count": str(errors),
        "error_rate": _pct(errors / s["total_requests"]) if s["total_requests"] else "0.0%",
    }
    if sched.is_ready and not sched.is_draining:
        return _json(body)
    if sched.is_draining:
        status, message = "draining", "the server is shutting down"
    elif sched.is_loading:
        status, message = "loading", "the model is loading"
    else:
        status, message = "unhealthy", "no worker process is alive"
    err = ServiceUnavailable(message).to_dict()
    body.update(err, status=status, scheduler=status)
    return _json(body, status=503)


@routes.get("/status")
async def status(request: web.Request) -> web.Response:
    """The API document's §4 fields as formatted strings, plus `metrics` as numbers."""
    state = request.app[STATE]
    sched = state.scheduler
    s = sched.stats()
    q = s["queued_by_priority"]
    uptime = time.time() - sched.started_at
    errors = s["failed"] + s["timed_out"]
    # The port this request arrived on: right even when the server was started with port 0.
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else state.config.port
    yes_no = "是" if s["running"] else "否"
    scheduler_status = "\n".join([
        "调度器状态:",
        f"  运行中: {yes_no}",
        f"  总请求数: {s['total_requests']}",
        f"  已完成: {s['completed']}",
        f"  失败: {s['failed']}",
        f"  取消: {s['cancelled']}",
        f"  超时: {s['timed_out']}",
        f"  活跃请求: {s['active']}",
        f"  队列长度: {s['queue_length']}",
        f"  成功率: {_pct(s['success_rate'])}",
        f"  平均处理时间: {s['mean_processing_s']:.3f}s",
        f"  平均等待时间: {s['mean_wait_s']:.3f}s",
    ])
    queue_summary = "\n".join(
        ["队列状态:"]
        + [f"  {_LEVEL_NAMES[level]}: {n} 个请求" for level, n in q.items()]
        + [f"  活跃处理: {s['active']} 个请求"]
    )
    return _json({
        "server_running": "是",
        "port": str(port),
        "uptime": f"{uptime:.1f}s",
        "total_requests": str(s["total_requests"]),
        "error_count": str(errors),
        "scheduler_status": scheduler_status,
        "queue_summary": queue_summary,
        "metrics": {**s, "uptime_s": round(uptime, 3), "error_count": errors,
                    "port": port, "engine": ENGINE_NAME, "version": __version__},
    })


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    """OpenAI chat completions (API document §1): JSON, or SSE when `stream` is true."""
    state: AppState = request.app[STATE]
    retry = state.rate_limiter.check(request.remote or "unknown")
    if retry is not None:
        raise RateLimited(
            f"rate limit of {state.rate_limiter.per_minute} requests a minute exceeded",
            retry_after=retry,
        )
    chat = parse_chat_request(await request.read())
    priority = resolve_priority(chat.priority, request.headers.get("X-Priority"))
    service = state.chat
    req = await service.submit(chat, priority)
    try:
        if chat.stream:
            return await service.stream(request, chat, req)
        return await service.complete(chat, req)
    finally:
        # Whatever happened (client gone, handler cancelled), an unfinished request must not
        # keep its queue place or decode slot.
        service.scheduler.cancel(req.request_id)
