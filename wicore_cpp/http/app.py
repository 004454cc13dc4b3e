"""The aiohttp application: the endpoint families, the middlewares, and the engine's lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from aiohttp import web

from wicore_cpp.config import Config
from wicore_cpp.engine.client import EngineClient
from wicore_cpp.gguf_file import GGUFFile
from wicore_cpp.http import chat, completions, models, monitoring, openapi, tokenize
from wicore_cpp.http.middlewares import MAX_BODY_BYTES, error_middleware, rate_limit_middleware
from wicore_cpp.http.ratelimit import RateLimiter
from wicore_cpp.http.state import STATE, AppState


def create_app(
    config: Config,
    served: dict[str, GGUFFile],
    on_fatal: Callable[[str], None] | None = None,
) -> web.Application:
    """Build the application for `served` (model id -> checked GGUF file)."""
    # The error middleware comes first, so it wraps everything after it.
    app = web.Application(middlewares=[error_middleware, rate_limit_middleware],
                          client_max_size=MAX_BODY_BYTES)
    app[STATE] = AppState(
        config=config,
        engine=EngineClient(config, served, on_fatal),
        rate_limiter=RateLimiter(config.rate_limit_per_minute),
    )
    for family in (chat, completions, tokenize, models, monitoring, openapi):
        app.add_routes(family.routes)
    app.cleanup_ctx.append(_engine_lifetime)
    app.on_shutdown.append(_begin_drain)
    return app


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    # The server listens (and /health says "loading") while the workers and tokenizers load.
    engine = app[STATE].engine
    await engine.start()
    yield
    await engine.stop()


async def _begin_drain(app: web.Application) -> None:
    # Runs after the listening socket closed and before aiohttp waits (up to
    # shutdown_grace_s) for in-flight handlers: streams already running finish.
    app[STATE].engine.begin_drain()
