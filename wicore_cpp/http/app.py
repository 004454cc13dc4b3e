"""The aiohttp application: routes, the one error middleware, and the engine's lifetime."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from wicore_cpp.config import Config
from wicore_cpp.engine.gguf_file import GGUFSummary
from wicore_cpp.engine.scheduler import Scheduler
from wicore_cpp.engine.tokenizer import PromptTokenizer
from wicore_cpp.errors import InvalidRequest, MethodNotAllowed, NotFound, WicoreError
from wicore_cpp.http.ratelimit import RateLimiter
from wicore_cpp.http.routes import routes
from wicore_cpp.http.serving import ChatService
from wicore_cpp.http.state import STATE, AppState

log = logging.getLogger("wicore.http")

MAX_BODY_BYTES = 64 * 1024 * 1024  # a 131072-token prompt is well under this


def _error_response(err: WicoreError) -> web.Response:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after + 0.499)))
    return web.json_response(err.to_dict(), status=err.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every failure leaves as the API's error shape; no stack trace ever reaches a client."""
    try:
        return await handler(request)
    except WicoreError as err:
        if err.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, err.status, err.message)
        return _error_response(err)
    except web.HTTPNotFound:
        return _error_response(NotFound(f"no route for {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return _error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.path}"))
    except web.HTTPRequestEntityTooLarge:
        err = InvalidRequest(f"the request body is larger than {MAX_BODY_BYTES} bytes")
        err.status = 413
        return _error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = WicoreError(exc.reason)
        err.status = exc.status
        return _error_response(err)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error_response(WicoreError("internal server error"))


def create_app(
    config: Config,
    models: dict[str, GGUFSummary],
    on_fatal: Callable[[str], None] | None = None,
) -> web.Application:
    """Build the application for `models` (model id -> checked GGUF file)."""
    scheduler = Scheduler(
        config, {mid: (m.path, m.context_length) for mid, m in models.items()}, on_fatal
    )
    tokenizers = {mid: PromptTokenizer(m.path, config.log_level) for mid, m in models.items()}
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = AppState(
        config=config,
        scheduler=scheduler,
        chat=ChatService(config, scheduler, tokenizers),
        rate_limiter=RateLimiter(config.rate_limit_per_minute),
        model_created={mid: int(m.path.stat().st_mtime) for mid, m in models.items()},
    )
    app.add_routes(routes)
    app.cleanup_ctx.append(_engine_lifetime)
    app.on_shutdown.append(_begin_drain)
    return app


async def _engine_lifetime(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.scheduler.start()
    # Load the vocabularies in the background: the server listens (and /health says
    # "loading") while the workers and tokenizers load.
    warmups = [asyncio.create_task(t.start()) for t in state.chat.tokenizers.values()]
    yield
    for task in warmups:
        task.cancel()
    await state.scheduler.stop()
    await asyncio.gather(*(asyncio.to_thread(t.close) for t in state.chat.tokenizers.values()))


async def _begin_drain(app: web.Application) -> None:
    # Runs after the listening socket closed and before aiohttp waits (up to
    # shutdown_grace_s) for in-flight handlers: streams already running finish.
    app[STATE].scheduler.begin_drain()
