"""Middlewares: the one error middleware, the API-key check, and the per-caller limits in
front of generation; plus the headers every response carries about those limits.

Limits sit here rather than in a handler so that every generating endpoint gets them the same
way. Order (outermost first): errors, API key (who is asking), limits (may they ask now).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from wicore_cpp.errors import (
    InvalidApiKey,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PermissionDenied,
    WicoreError,
    excerpt,
)
from wicore_cpp.http.keys import MONITORING_PATHS, Caller, needs_key, presented_key
from wicore_cpp.http.lifecycle import is_generating
from wicore_cpp.http.protocol import json_response
from wicore_cpp.http.state import CALLER, GENERATION, PRIORITY_CEILING, STATE

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
        else:
            log.info("%s %s -> %d %s: %s", request.method, request.path, err.status,
                     err.code or err.type, err.message)
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


# Open with API keys on: liveness probes and the banner; monitoring too unless it is
# admin-only. Everything else needs a key.


@web.middleware
async def api_key_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who is asking: with API keys on, the key presented (401 `invalid_api_key` without a
    valid one; 403 for monitoring when it is admin-only and the key is not admin); with keys
    off, the client address. CORS preflights (OPTIONS) carry no key and need none."""
    state = request.app[STATE]
    address = request.remote or "unknown"
    if state.keys is None:
        request[CALLER] = Caller(None, address)
        return await handler(request)
    admin_only = state.config.admin_only_monitoring
    if request.method == "OPTIONS" or not needs_key(request.path, admin_only):
        return await handler(request)
    try:
        presented = presented_key(request)
        if presented is None:
            raise InvalidApiKey("no API key: send it as 'Authorization: Bearer <key>' or "
                                "'x-api-key: <key>'")
        key = state.keys.find(presented)
        if key is None:
            raise InvalidApiKey("invalid API key")
    except InvalidApiKey:
        if is_generating(request):
            state.metrics.count_rejected(None, InvalidApiKey.code)
        raise
    if request.path in MONITORING_PATHS and not key.is_admin:
        raise PermissionDenied(f"{request.path} is for admin keys only")
    request[CALLER] = Caller(key, address)
    return await handler(request)


@web.middleware
async def rate_limit_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Per-caller limits (requests and tokens a minute, the key's token quota), for generating
    endpoints only (never monitoring). A refusal before the engine queued the request is
    counted in the metrics by its error code."""
    if not is_generating(request):
        return await handler(request)
    state = request.app[STATE]
    caller: Caller = request[CALLER]
    try:
        state.limits.admit(caller)
        return await handler(request)
    except WicoreError as err:
        if GENERATION not in request:
            state.metrics.count_rejected(caller.tenant, err.code or str(err.status))
        raise


async def add_limit_headers(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """`on_response_prepare`: OpenAI's `x-ratelimit-*` headers on every response to a known
    caller, and `X-Priority-Ceiling` when the request asked above its key's ceiling."""
    caller = request.get(CALLER)
    if caller is not None:
        response.headers.update(request.app[STATE].limits.headers(caller))
    ceiling = request.get(PRIORITY_CEILING)
    if ceiling is not None:
        response.headers["X-Priority-Ceiling"] = ceiling
