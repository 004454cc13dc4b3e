"""The aiohttp application: the endpoint families, the middlewares, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import aiohttp_cors
from aiohttp import web

from wicore_cpp.config import Config
from wicore_cpp.engine.client import EngineClient, EngineObserver
from wicore_cpp.gguf_file import GGUFFile
from wicore_cpp.http import chat, completions, metrics, models, monitoring, openapi, tokenize
from wicore_cpp.http.activity_log import RequestLog, log_performance
from wicore_cpp.http.keys import KeyTable
from wicore_cpp.http.limits import CallerLimits
from wicore_cpp.http.metrics import Metrics
from wicore_cpp.http.middlewares import (
    MAX_BODY_BYTES,
    add_limit_headers,
    api_key_middleware,
    error_middleware,
    rate_limit_middleware,
)
from wicore_cpp.http.quota import UsageStore
from wicore_cpp.http.state import STATE, AppState

# What a browser front end may send and read (CORS).
_CORS_REQUEST_HEADERS = ("Content-Type", "Authorization", "X-Api-Key", "X-Priority")
_CORS_EXPOSED_HEADERS = (
    "X-Request-Id", "X-Priority-Ceiling", "Retry-After",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
)


def create_app(
    config: Config,
    served: dict[str, GGUFFile],
    on_fatal: Callable[[str], None] | None = None,
) -> web.Application:
    """Build the application for `served` (model id -> checked GGUF file).

    Raises ConfigError when the API key file or the data folder cannot be used.
    """
    keys = KeyTable.load(config.api_keys) if config.api_keys else None
    usage = UsageStore(config.data_dir) if keys is not None else None
    app_metrics = Metrics()
    observers: list[EngineObserver] = [app_metrics]
    if config.log_requests:
        observers.append(RequestLog())
    engine = EngineClient(config, served, on_fatal, observers)
    app_metrics.watch(engine.stats)
    # The error middleware comes first, so it wraps everything after it.
    app = web.Application(
        middlewares=[error_middleware, api_key_middleware, rate_limit_middleware],
        client_max_size=MAX_BODY_BYTES,
    )
    app[STATE] = AppState(
        config=config,
        engine=engine,
        keys=keys,
        limits=CallerLimits(config, usage),
        metrics=app_metrics,
    )
    for family in (chat, completions, tokenize, models, monitoring, metrics, openapi):
        app.add_routes(family.routes)
    if config.cors_origins:
        _allow_origins(app, config.cors_origins)
    app.on_response_prepare.append(add_limit_headers)
    app.cleanup_ctx.append(_engine_lifetime)
    app.on_shutdown.append(_begin_drain)
    return app


def _allow_origins(app: web.Application, origins: list[str]) -> None:
    """Answer CORS preflights and mark responses for `origins` ("*": any), on every route."""
    options = aiohttp_cors.ResourceOptions(
        allow_credentials=False,
        expose_headers=_CORS_EXPOSED_HEADERS,
        allow_headers=_CORS_REQUEST_HEADERS,
        allow_methods=["GET", "POST"],
        max_age=600,
    )
    cors = aiohttp_cors.setup(app, defaults={origin: options for origin in origins})
    for route in list(app.router.routes()):
        cors.add(route)


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    # The server listens (and /health says "loading") while the workers and tokenizers load.
    state = app[STATE]
    usage = state.limits.usage
    if usage is not None:
        usage.start()
    await state.engine.start()
    perf = None
    if state.config.log_performance:
        perf = asyncio.create_task(
            log_performance(state.engine.stats, state.config.performance_log_interval_s))
    yield
    if perf is not None:
        perf.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await perf
    await state.engine.stop()
    if usage is not None:
        await usage.close()


async def _begin_drain(app: web.Application) -> None:
    # Runs after the listening socket closed and before aiohttp waits (up to
    # shutdown_grace_s) for in-flight handlers: streams already running finish.
    app[STATE].engine.begin_drain()
