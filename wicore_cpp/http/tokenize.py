"""`POST /tokenize` and `POST /detokenize`, in llama-server's shape (plus an optional
`model`)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from wicore_cpp.http.openapi import documented
from wicore_cpp.http.protocol import json_response, parse_body
from wicore_cpp.http.responses import Detokenized, Tokens
from wicore_cpp.http.state import STATE

routes = web.RouteTableDef()


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    content: str
    # `null` means the default, as everywhere (parse_body drops it), so the document says so.
    add_special: bool | None = False
    parse_special: bool | None = True
    with_pieces: bool | None = False
    model: str | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    tokens: list[int]
    model: str | None = None


@routes.post("/tokenize")
@documented("Tokenize text with the model's vocabulary (llama-server's shape)",
            request=TokenizeRequest, responses={200: Tokens},
            errors=(400, 404, 408, 413, 429, 503))
async def tokenize(request: web.Request) -> web.Response:
    """`{"content"}` -> `{"tokens": [ids]}`, or with `with_pieces` `[{"id", "piece"}]` (the
    piece as text when it is valid UTF-8, else its bytes)."""
    req = parse_body(await request.read(), TokenizeRequest, {})
    found = await request.app[STATE].engine.tokenize(
        req.model, req.content, add_special=req.add_special, parse_special=req.parse_special,
        with_pieces=req.with_pieces)
    if not req.with_pieces:
        return json_response({"tokens": found})
    return json_response({"tokens": [{"id": t, "piece": _piece(p)} for t, p in found]})


@routes.post("/detokenize")
@documented("Token ids back to text (llama-server's shape)",
            request=DetokenizeRequest, responses={200: Detokenized},
            errors=(400, 404, 408, 413, 429, 503))
async def detokenize(request: web.Request) -> web.Response:
    """`{"tokens": [ids]}` -> `{"content"}`."""
    req = parse_body(await request.read(), DetokenizeRequest, {})
    content = await request.app[STATE].engine.detokenize(req.model, req.tokens)
    return json_response({"content": content})


def _piece(piece: bytes) -> str | list[int]:
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return list(piece)
