"""`GET /openapi.json`: the OpenAPI 3.1 document of WiCore's API, generated, never written.

Each route handler says what it takes and answers with `@documented(...)`, naming pydantic
models (the request models of `protocol.py`, the response models of `responses.py`); the
document is built from the application's routes and those models' JSON Schemas. A route
without `@documented` is still listed (a test insists that none is left so).

Every operation also documents `default`: any other status is an error in the error shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from wicore_cpp import ENGINE_NAME, __version__
from wicore_cpp.http.keys import MONITORING_PATHS, needs_key
from wicore_cpp.http.protocol import json_response
from wicore_cpp.http.responses import ErrorResponse, OpenAPIDocument
from wicore_cpp.http.state import STATE

OPENAPI_VERSION = "3.1.0"
REF_TEMPLATE = "#/components/schemas/{model}"

F = TypeVar("F", bound=Callable[..., Any])

# One server-sent event (OpenAPI 3.1 has a `text/event-stream` schema describe each event).
SSE_EVENT = {
    "type": "object",
    "properties": {
        "data": {"type": "string",
                 "description": "a chunk object as JSON, an error in the error shape, or "
                                "`[DONE]` at the end"},
        "event": {"type": "string"},
        "id": {"type": "string"},
        "retry": {"type": "integer"},
    },
    "required": ["data"],
}

# The two ways a client presents an API key (see keys.py); either one will do.
SECURITY_SCHEMES = {
    "bearerAuth": {"type": "http", "scheme": "bearer",
                   "description": "`Authorization: Bearer <API key>` (what the openai clients "
                                  "send)"},
    "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key",
                     "description": "`x-api-key: <API key>`"},
}
EITHER_KEY = [{"bearerAuth": []}, {"apiKeyHeader": []}]

ERROR_WHEN = {
    400: "a parameter is missing, of the wrong type or out of range (`param` names it), or "
         "the prompt does not fit the context (`context_length_exceeded`)",
    401: "no API key, or an unknown one (`invalid_api_key`)",
    403: "the API key is not an admin key (`permission_denied`)",
    404: "unknown model (`model_not_found`)",
    408: "the request's headers or body came too slowly",
    413: "the request body is too large",
    429: "over the rate limit, or the engine is full; see `Retry-After`",
    500: "a worker died during generation",
    503: "the model is loading, no worker is alive, or the server is draining; see "
         "`Retry-After`",
    504: "the request did not finish within the server's deadline",
}


@dataclass(frozen=True, slots=True)
class Header:
    """A request header an operation reads."""

    name: str
    description: str
    schema: dict = field(default_factory=lambda: {"type": "string"})


@dataclass(frozen=True, slots=True)
class Operation:
    """What one route takes and answers, for the document."""

    summary: str
    request: type[BaseModel] | None = None
    responses: Mapping[int, type[BaseModel]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()  # statuses answered in the error shape, beyond `default`
    event_stream: bool = False  # 200 may also be `text/event-stream`
    headers: tuple[Header, ...] = ()
    response_headers: tuple[str, ...] = ()
    text_response: str | None = None  # 200 is text of this media type (e.g. Prometheus')


def documented(summary: str, **details: Any) -> Callable[[F], F]:
    """Attach an `Operation` to a route handler (see `Operation` for the arguments)."""

    def mark(handler: F) -> F:
        handler.openapi = Operation(summary, **details)  # type: ignore[attr-defined]
        return handler

    return mark


def operation_of(route: web.AbstractRoute) -> Operation | None:
    return getattr(route.handler, "openapi", None)


def _routes(app: web.Application) -> list[tuple[str, str, web.AbstractRoute]]:
    """(path, method, route) for every route a client can call (aiohttp adds HEAD for
    each GET by itself: not listed)."""
    out = []
    for route in app.router.routes():
        if route.method in ("HEAD", "*") or route.resource is None:
            continue
        out.append((route.resource.canonical, route.method.lower(), route))
    return out


def build_document(app: web.Application) -> dict:
    """The OpenAPI document of `app`'s routes. With API keys on, each operation that needs a
    key says so (`security`, and its 401/403); the key schemes are described either way."""
    routes = _routes(app)
    state = app.get(STATE)
    keys_on = state is not None and state.keys is not None
    admin_only = state is not None and state.config.admin_only_monitoring
    ops = {(path, method): operation_of(route) for path, method, route in routes}
    models: set[tuple[type[BaseModel], str]] = {(ErrorResponse, "serialization")}
    for op in ops.values():
        if op is None:
            continue
        if op.request is not None:
            models.add((op.request, "validation"))
        models.update((m, "serialization") for m in op.responses.values())
    refs, top = models_json_schema(sorted(models, key=lambda m: (m[0].__name__, m[1])),
                                   ref_template=REF_TEMPLATE)

    def ref(model: type[BaseModel], mode: str) -> dict:
        return refs[(model, mode)]

    error_content = {"application/json": {"schema": ref(ErrorResponse, "serialization")}}
    paths: dict[str, dict] = {}
    for (path, method), op in ops.items():
        entry: dict[str, Any] = {"responses": {
            "default": {"description": "an error, in the error shape", "content": error_content},
        }}
        params = [{"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in _path_params(path)]
        if op is None:
            entry["summary"] = "(not documented)"
        else:
            entry["summary"] = op.summary
            params += [{"name": h.name, "in": "header", "required": False,
                        "description": h.description, "schema": h.schema} for h in op.headers]
            if op.request is not None:
                entry["requestBody"] = {"required": True, "content": {
                    "application/json": {"schema": ref(op.request, "validation")}}}
            for status, model in op.responses.items():
                content = {"application/json": {"schema": ref(model, "serialization")}}
                if status == 200 and op.event_stream:
                    content["text/event-stream"] = {"schema": SSE_EVENT}
                response: dict[str, Any] = {"description": HTTPStatus(status).phrase,
                                            "content": content}
                if op.response_headers:
                    response["headers"] = {name: {"schema": {"type": "string"}}
                                           for name in op.response_headers}
                entry["responses"][str(status)] = response
            if op.text_response is not None:
                entry["responses"]["200"] = {"description": "OK", "content": {
                    op.text_response: {"schema": {"type": "string"}}}}
            for status in op.errors:
                entry["responses"].setdefault(str(status), {
                    "description": ERROR_WHEN.get(status, HTTPStatus(status).phrase),
                    "content": error_content,
                })
        if keys_on:
            _add_security(entry, path, admin_only, error_content)
        if params:
            entry["parameters"] = params
        paths.setdefault(path, {})[method] = entry
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": f"{ENGINE_NAME} API",
            "version": __version__,
            "description": "OpenAI-compatible chat completions served by WiCore. Every error "
                           "is {\"error\": {\"message\", \"type\", \"param\", \"code\"}}.",
        },
        "paths": dict(sorted(paths.items())),
        "components": {"schemas": top.get("$defs", {}), "securitySchemes": SECURITY_SCHEMES},
    }


def _add_security(entry: dict, path: str, admin_only: bool, error_content: dict) -> None:
    if not needs_key(path, admin_only):
        entry["security"] = []  # open: no key asked for
        return
    entry["security"] = EITHER_KEY
    statuses = (401, 403) if path in MONITORING_PATHS else (401,)
    for status in statuses:
        entry["responses"].setdefault(str(status), {
            "description": ERROR_WHEN[status], "content": error_content})


def _path_params(path: str) -> list[str]:
    return [part[1:-1].split(":")[0] for part in path.split("/")
            if part.startswith("{") and part.endswith("}")]


routes = web.RouteTableDef()


@routes.get("/openapi.json")
@documented("This document", responses={200: OpenAPIDocument})
async def openapi_json(request: web.Request) -> web.Response:
    """The OpenAPI document, built from the routes (cheap; not cached)."""
    return json_response(build_document(request.app))
