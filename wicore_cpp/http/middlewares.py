"""Middlewares: the one error middleware, and the per-client rate limit in front of generation.

The rate limit sits here rather than in a handler so that every generating endpoint gets it
the same way, and so that an API-key check has an obvious place beside it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from wicore_cpp.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    WicoreError,
    excerpt,
)
from wicore_cpp.http.lifecycle import is_generating
from wicore_cpp.http.protocol import json_response
from wicore_cpp.http.state import STATE

log = logging.getLogger("wicore.http")

MAX_BODY_BYTES = 64 * 1024 * 1024  # a 131072-token prompt is well under this

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(err: WicoreError) -> web.Response:
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after + 0.499)))
    return json_response(err.to_dict(), status=err.status, headers=headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves as the API's error shape; no stack trace ever reaches a client."""
    try:
        return await handler(request)
    except WicoreError as err:
        if err.status >= 500:
            log.warning("%s %s -> %d: %s", request.method, request.path, err.status, err.message)
        return error_response(err)
    except web.HTTPNotFound:
        return error_response(
            NotFound(f"no route for {request.method} {excerpt(request.path)}"))
    except web.HTTPMethodNotAllowed:
        return error_response(
            MethodNotAllowed(f"{request.method} is not allowed on {excerpt(request.path)}"))
    except web.RequestPayloadError as exc:
        # A body that breaks HTTP's own framing (a bad chunk size, a short Content-Length).
        log.info("%s %s: unreadable body: %s", request.method, request.path, exc)
        response = error_response(InvalidRequest(f"the request body could not be read: {exc}"))
        response.force_close()
        return response
    except web.HTTPRequestEntityTooLarge:
        err = InvalidRequest(f"the request body is larger than {MAX_BODY_BYTES} bytes")
        err.status = 413
        return error_response(err)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err = WicoreError(exc.reason)
        err.status = exc.status
        return error_response(err)
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(WicoreError("internal server error"))


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Requests a minute per client address, for generating endpoints only (never monitoring)."""
    if is_generating(request):
        limiter = request.app[STATE].rate_limiter
        retry = limiter.check(request.remote or "unknown")
        if retry is not None:
            raise RateLimited(
                f"rate limit of {limiter.per_minute} requests a minute exceeded",
                retry_after=retry,
            )
    return await handler(request)
