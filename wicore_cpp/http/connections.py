"""Client connections: deadlines, a cap on how many, and HTTP-level errors in the error shape.

aiohttp keeps a connection open as long as its client likes (its keep-alive timeout is an
hour), has no deadline for a request's headers or body and no cap on connections, and answers
a request it cannot parse (an unknown method, a 64 KB header, a TLS handshake) with a
`text/plain` 400 and an ERROR traceback in the log. All of that belongs to its per-connection
protocol object (`web.RequestHandler`), which has no settings for it. So this module
subclasses it, with the `web.Server` that makes one per connection and counts them, and an
`AppRunner` that serves the application through that server.

A connection is always in one phase, and each phase has one deadline:

- idle: no request under way (just opened, or between kept-alive requests):
  `idle_timeout_s`, then the connection is closed without a word;
- headers: a request's first byte arrived, its headers are not complete: `header_timeout_s`
  from that first byte, then 408 in the error shape and the connection closes;
- body: the headers are complete and the body is still arriving: `body_timeout_s` from the
  end of the headers; the handler reading the body then gets `ClientTooSlow` (408), and the
  connection closes after that answer;
- busy: the request is whole and its handler runs; the request's own deadline
  (`request_timeout_s`) bounds it.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.streams import StreamReader

from wicore_cpp.config import Config
from wicore_cpp.errors import (
    ClientTooSlow,
    InvalidRequest,
    ServiceUnavailable,
    WicoreError,
    excerpt,
)
from wicore_cpp.http.middlewares import error_response

log = logging.getLogger("wicore.http")

Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
RequestFactory = Callable[..., web.BaseRequest]

# Refused connections are logged at most this often (with a count), so a flood of them
# cannot flood the log too.
REFUSAL_LOG_INTERVAL_S = 10.0
DETAIL_CHARS = 200


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The connection settings of `Config`, as the HTTP layer uses them."""

    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float
    max_connections: int

    @classmethod
    def from_config(cls, config: Config) -> ConnectionLimits:
        return cls(config.header_timeout_s, config.body_timeout_s, config.idle_timeout_s,
                   config.max_connections)


class Phase(enum.Enum):
    IDLE = "idle"
    HEADERS = "headers"
    BODY = "body"
    BUSY = "busy"


def raw_error_response(err: WicoreError) -> bytes:
    """A whole HTTP/1.1 response in the error shape, for answering before (or without) any
    request object: an over-limit connection, headers that never completed."""
    body = orjson.dumps(err.to_dict())
    lines = [
        f"HTTP/1.1 {err.status} {HTTPStatus(err.status).phrase}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if err.retry_after is not None:
        lines.append(f"Retry-After: {max(1, math.ceil(err.retry_after))}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _first_line(text: str) -> str:
    """aiohttp's parser messages can run over several lines (a caret under the bad byte)."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= DETAIL_CHARS else line[:DETAIL_CHARS] + "..."


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's protocol for one connection, with the phases' deadlines, the connection cap,
    and its error answers in the API's error shape."""

    def __init__(self, manager: GuardedServer, **kwargs: Any):
        super().__init__(manager, **kwargs)
        # aiohttp clears its own reference to the server when the connection closes.
        self._guard = manager
        self._limits = manager.limits
        self.phase = Phase.IDLE
        self._deadline: asyncio.TimerHandle | None = None
        self._is_refused = False
        self._is_body_expired = False

    # -- connection ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._guard.num_open >= self._limits.max_connections:
            # Answered and closed before aiohttp sees it: it never counts as a connection.
            self._is_refused = True
            self._guard.note_refused()
            err = ServiceUnavailable(
                f"too many open connections (max_connections={self._limits.max_connections})",
                retry_after=1,
            )
            transport.write(raw_error_response(err))  # type: ignore[attr-defined]
            transport.close()
            return
        self._guard.num_open += 1
        super().connection_made(transport)
        self._enter(Phase.IDLE)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._is_refused:
            return
        self._guard.num_open -= 1
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._is_refused:
            return
        if data and self.phase is Phase.IDLE:
            self._enter(Phase.HEADERS)
        super().data_received(data)

    def request_started(self, payload: StreamReader) -> None:
        """A request's headers are complete and its handler is about to run."""
        if payload.is_eof():
            self._enter(Phase.BUSY)
        else:
            self._enter(Phase.BODY, payload)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        result = await super().finish_response(request, resp, start_time)
        if self._is_body_expired:
            # The rest of that body is never coming: close rather than read on.
            self.force_close()
        elif self.transport is not None:
            self._enter(Phase.IDLE)
        return result

    # -- deadlines -----------------------------------------------------------------------------

    def _enter(self, phase: Phase, payload: StreamReader | None = None) -> None:
        self._cancel_deadline()
        self.phase = phase
        loop = asyncio.get_running_loop()
        if phase is Phase.IDLE:
            self._deadline = loop.call_later(self._limits.idle_timeout_s, self._on_idle)
        elif phase is Phase.HEADERS:
            self._deadline = loop.call_later(self._limits.header_timeout_s, self._on_headers_late)
        elif phase is Phase.BODY:
            self._deadline = loop.call_later(self._limits.body_timeout_s, self._on_body_late,
                                             payload)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "a client"

    def _on_idle(self) -> None:
        self._deadline = None
        if self.phase is Phase.IDLE:
            log.debug("closing idle connection from %s after %gs", self._peer(),
                      self._limits.idle_timeout_s)
            self.force_close()

    def _on_headers_late(self) -> None:
        self._deadline = None
        if self.phase is not Phase.HEADERS or self.transport is None:
            return
        log.info("%s did not complete a request's headers within %gs: 408, closing",
                 self._peer(), self._limits.header_timeout_s)
        err = ClientTooSlow(f"the request's headers did not arrive within "
                            f"{self._limits.header_timeout_s:g}s")
        self.transport.write(raw_error_response(err))
        self.force_close()

    def _on_body_late(self, payload: StreamReader) -> None:
        self._deadline = None
        if self.phase is not Phase.BODY or payload.is_eof():
            return
        log.info("%s did not send a request's body within %gs: 408", self._peer(),
                 self._limits.body_timeout_s)
        self._is_body_expired = True
        # The handler reading the body gets this error, which it answers like any other.
        payload.set_exception(ClientTooSlow(
            f"the request's body did not arrive within {self._limits.body_timeout_s:g}s"))

    # -- errors before the application ---------------------------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse (400) or a handler that failed
        outside the application's error middleware: the error shape, not text/plain."""
        if request.writer.output_size > 0:
            # Part of a response went out already; another cannot follow (aiohttp's rule).
            raise ConnectionError("a response was already under way")
        if status >= 500:
            log.error("internal error answering %s", request.remote, exc_info=exc)
            err = WicoreError("internal server error")
            err.status = status
        else:
            # The client's fault, and common on an open port (scanners, TLS, HTTP/2): one
            # INFO line, no traceback.
            detail = _first_line(message or (str(exc) if exc else "") or "bad request")
            log.info("malformed request from %s: %s", request.remote, detail)
            err = InvalidRequest(f"malformed HTTP request: {detail}")
            err.status = status
        resp = error_response(err)
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    """aiohttp's low-level server, making `GuardedRequestHandler`s and counting them."""

    def __init__(
        self,
        handler: Handler,
        *,
        request_factory: RequestFactory,
        handler_cancellation: bool,
        limits: ConnectionLimits,
        **protocol_kwargs: Any,
    ):
        super().__init__(_shaped(handler), request_factory=_tracked(request_factory),
                         handler_cancellation=handler_cancellation, **protocol_kwargs)
        self.limits = limits
        self.num_open = 0
        self.num_refused = 0
        self._protocol_kwargs = protocol_kwargs
        self._event_loop = asyncio.get_running_loop()
        self._last_refusal_log = -math.inf
        self._refused_since_log = 0

    def __call__(self) -> GuardedRequestHandler:
        return GuardedRequestHandler(self, loop=self._event_loop, **self._protocol_kwargs)

    def note_refused(self) -> None:
        self.num_refused += 1
        self._refused_since_log += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL_S:
            log.warning("refused %d connection(s): %d open (max_connections=%d)",
                        self._refused_since_log, self.num_open, self.limits.max_connections)
            self._last_refusal_log = now
            self._refused_since_log = 0


def _tracked(factory: RequestFactory) -> RequestFactory:
    """aiohttp makes the request object when a request's headers are complete; that is when
    the connection leaves its headers phase."""

    def make_request(message: Any, payload: StreamReader, protocol: web.RequestHandler,
                     writer: Any, task: Any) -> web.BaseRequest:
        if isinstance(protocol, GuardedRequestHandler):
            protocol.request_started(payload)
        return factory(message, payload, protocol, writer, task)

    return make_request


def _shaped(handler: Handler) -> Handler:
    """The application's handler, with the few HTTP errors aiohttp raises before the
    application's middlewares run (417 for an unknown `Expect`) in the error shape."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            log.info("%s %s from %s: %d %s", request.method, excerpt(request.path),
                     request.remote, exc.status, exc.reason)
            err = InvalidRequest(_first_line(exc.text or exc.reason))
            err.status = exc.status
            response = error_response(err)
            # The request was refused before its body was read: what follows on the
            # connection is unknown, so end it.
            response.force_close()
            return response

    return handle


class GuardedAppRunner(web.AppRunner):
    """`web.AppRunner` serving the application through a `GuardedServer`."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any):
        # aiohttp's own keep-alive close stays as a backstop, after ours.
        kwargs.setdefault("keepalive_timeout", limits.idle_timeout_s + limits.header_timeout_s)
        super().__init__(app, **kwargs)
        self.limits = limits
        # What aiohttp's Server passes on to each connection's protocol object.
        self._protocol_kwargs = {
            k: v for k, v in kwargs.items()
            if k not in ("handle_signals", "shutdown_timeout", "handler_cancellation")
        }
        self._handler_cancellation = bool(kwargs.get("handler_cancellation", False))

    async def _make_server(self) -> web.Server:
        # The base runs the application's start-up and builds aiohttp's server; ours takes
        # over its handler and request factory.
        app_server = await super()._make_server()
        return GuardedServer(
            app_server.request_handler,
            request_factory=app_server.request_factory,
            handler_cancellation=self._handler_cancellation,
            limits=self.limits,
            **self._protocol_kwargs,
        )
