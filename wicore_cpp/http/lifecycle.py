"""The request lifecycle every generating endpoint shares.

Priority from the body or the `X-Priority` header, submission to the engine, the
`X-Request-Id` header, an SSE response, and the one rule that matters most: whatever way the
handler leaves (done, client gone, cancelled), an unfinished request gives back its queue
place or decode slot.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from wicore_cpp.engine.client import EngineClient, Event, Generation, Priority, RequestEnded
from wicore_cpp.errors import InvalidRequest
from wicore_cpp.http.keys import Caller
from wicore_cpp.http.openapi import Header
from wicore_cpp.http.protocol import PRIORITY_PATTERN
from wicore_cpp.http.state import CALLER, GENERATION, PRIORITY_CEILING, STATE

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Submits one request to the engine at the priority resolved here, for the tenant (the API
# key's name, None with keys off) whose fair share it takes.
Submit = Callable[[EngineClient, Priority, str | None], Awaitable[Generation]]

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


PRIORITY_HEADER = Header(
    "X-Priority", "low, normal, high or urgent (any letter case); the body's `priority` wins "
    "when both are sent (both must be valid)",
    {"type": "string", "pattern": PRIORITY_PATTERN},
)


def generating(handler: Handler) -> Handler:
    """Mark a route handler as one that generates (per-caller limits and quotas apply)."""
    handler.is_generating = True  # type: ignore[attr-defined]
    return handler


def is_generating(request: web.Request) -> bool:
    return getattr(request.match_info.handler, "is_generating", False)


def resolve_priority(body_value: str | None, header_value: str | None,
                     default: Priority | None = Priority.NORMAL) -> Priority | None:
    """Body field `priority` wins over header `X-Priority`; `default` when neither is sent.
    Each one sent must be valid, also the one that does not win (nothing sent is ignored
    unchecked)."""
    parsed: dict[str, Priority] = {}
    for param, value in (("priority", body_value), ("X-Priority", header_value)):
        if value is None:
            continue
        try:
            parsed[param] = Priority.parse(value)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param=param) from None
    return parsed.get("priority", parsed.get("X-Priority", default))


@contextlib.asynccontextmanager
async def generation(
    request: web.Request,
    body_priority: str | None,
    submit: Submit,
) -> AsyncIterator[Generation]:
    """Submit to the engine at the priority the caller's key grants, in the key's fair share;
    on leaving, abort the request if it has not ended and charge the caller for the tokens
    it cost."""
    async with generations(request, body_priority, [submit]) as gens:
        yield gens[0]


@contextlib.asynccontextmanager
async def generations(
    request: web.Request,
    body_priority: str | None,
    submits: list[Submit],
) -> AsyncIterator[list[Generation]]:
    """`generation` for a request that is several engine requests (a list of prompts): all
    at the same priority, each admitted by the engine like a request of its own; if one is
    refused, those already queued are aborted and the refusal is the answer."""
    state = request.app[STATE]
    engine = state.engine
    caller: Caller = request.get(CALLER) or Caller(None, request.remote or "unknown")
    asked = resolve_priority(body_priority, request.headers.get("X-Priority"), default=None)
    priority, capped = caller.grant(asked)
    if capped:
        request[PRIORITY_CEILING] = priority.name.lower()
    gens: list[Generation] = []
    try:
        for submit in submits:
            gens.append(await submit(engine, priority, caller.tenant))
            if len(gens) == 1:
                request[GENERATION] = gens[0]
        yield gens
    finally:
        for gen in gens:
            state.engine.abort(gen.request_id)
        state.limits.charge(caller, sum(gen.num_tokens_used for gen in gens))


def merged_events(gens: list[Generation]) -> AsyncIterator[tuple[int, Event]]:
    """(which generation, event) from several generations as the events come; each
    generation's `RequestEnded` is passed on, and the iteration ends after the last. A
    consumer may stop early: the generations' own abort (see `generations`) ends them."""
    if len(gens) == 1:
        return _single(gens[0])
    return _MergedEvents(gens)


async def _single(gen: Generation) -> AsyncIterator[tuple[int, Event]]:
    async for event in gen:
        yield 0, event


class _MergedEvents:
    """Events of several generations through one queue, a task per generation feeding it."""

    def __init__(self, gens: list[Generation]):
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._left = len(gens)
        self._tasks = [asyncio.create_task(self._pump(i, g)) for i, g in enumerate(gens)]

    async def _pump(self, i: int, gen: Generation) -> None:
        async for event in gen:
            self._queue.put_nowait((i, event))

    def __aiter__(self) -> _MergedEvents:
        return self

    async def __anext__(self) -> tuple[int, Event]:
        if self._left == 0:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item[1], RequestEnded):
            self._left -= 1
        return item

    def __del__(self) -> None:
        for task in self._tasks:
            task.cancel()


def request_id_header(gen: Generation) -> dict[str, str]:
    return {"X-Request-Id": gen.request_id}


def event_stream(gen: Generation) -> web.StreamResponse:
    """An SSE response for `gen`, to `prepare` and write to."""
    return web.StreamResponse(headers={**SSE_HEADERS, **request_id_header(gen)})
