"""`GET /v1/models` and `GET /v1/models/{id}` (API document §2): the served models."""

from __future__ import annotations

from aiohttp import web

from wicore_cpp.engine.client import ServedModel
from wicore_cpp.http.openapi import documented
from wicore_cpp.http.protocol import json_response
from wicore_cpp.http.responses import ModelCard, ModelList
from wicore_cpp.http.state import STATE

routes = web.RouteTableDef()


@routes.get("/v1/models")
@documented("The served models", responses={200: ModelList})
async def list_models(request: web.Request) -> web.Response:
    """OpenAI's model list."""
    models = request.app[STATE].engine.models.values()
    return json_response({"object": "list", "data": [_model_card(m) for m in models]})


@routes.get("/v1/models/{model_id}")
@documented("One served model", responses={200: ModelCard}, errors=(404,))
async def get_model(request: web.Request) -> web.Response:
    """One model; 404 `model_not_found` for an unknown id."""
    model = request.app[STATE].engine.model(request.match_info["model_id"])
    return json_response(_model_card(model))


def _model_card(model: ServedModel) -> dict:
    """OpenAI's model object, plus what a client needs to plan requests: the longest
    sequence (prompt + completion), what the server supports (`vision`: it takes images), the
    largest `n`, and the prompt tokens one image takes (0: it takes no images)."""
    return {"id": model.model_id, "object": "model", "created": model.created,
            "owned_by": "wicore", "context_length": model.context_length,
            "capabilities": list(model.capabilities), "max_choices": model.max_choices,
            "image_tokens": model.image_tokens}
