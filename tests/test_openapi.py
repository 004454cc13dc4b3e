"""`GET /openapi.json`: generated from the routes and the pydantic models, covering every
route, and true of what the server answers."""

from __future__ import annotations

from wicore_cpp.http.openapi import REF_TEMPLATE, build_document, operation_of
from wicore_cpp.http.chat_protocol import ChatCompletionRequest
from wicore_cpp.http.responses import ChatCompletion, ErrorResponse, ModelList, Status


async def test_the_document_is_served_and_lists_every_route(api):
    status, doc = await api.get("/openapi.json")
    assert status == 200
    assert doc["openapi"].startswith("3.1")
    routes = {(r.resource.canonical, r.method.lower()) for r in api.app.router.routes()
              if r.method not in ("HEAD", "*")}
    listed = {(path, method) for path, ops in doc["paths"].items() for method in ops}
    assert listed == routes
    assert ("/v1/chat/completions", "post") in listed and ("/openapi.json", "get") in listed
    # The key schemes are described; with keys off no operation asks for one.
    assert set(doc["components"]["securitySchemes"]) == {"bearerAuth", "apiKeyHeader"}
    assert not any("security" in op for ops in doc["paths"].values() for op in ops.values())


async def test_every_route_is_documented(api):
    """A new endpoint must say what it takes and answers (`@documented`)."""
    missing = [f"{r.method} {r.resource.canonical}" for r in api.app.router.routes()
               if r.method not in ("HEAD", "*") and operation_of(r) is None]
    assert not missing, f"routes without @documented: {missing}"


async def test_schemas_are_the_models_own(api):
    _, doc = await api.get("/openapi.json")
    schemas = doc["components"]["schemas"]
    expected = ChatCompletionRequest.model_json_schema(ref_template=REF_TEMPLATE)
    expected.pop("$defs", None)
    assert schemas["ChatCompletionRequest"] == expected
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    assert set(chat["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    for op in (op for ops in doc["paths"].values() for op in ops.values()):
        default = op["responses"]["default"]["content"]["application/json"]["schema"]
        assert default == {"$ref": "#/components/schemas/ErrorResponse"}


async def test_answers_match_their_models(api):
    """The handlers build JSON directly; the models must describe it (schemathesis checks
    this for generated requests too)."""
    status, body, _ = await api.chat([{"role": "user", "content": "Hi"}], max_tokens=2,
                                     return_token_ids=True)
    assert status == 200
    ChatCompletion.model_validate(body)
    status, body, _ = await api.chat([{"role": "user", "content": "Hi"}], temperature=9)
    ErrorResponse.model_validate(body)
    ModelList.model_validate((await api.get("/v1/models"))[1])
    Status.model_validate((await api.get("/status"))[1])


def test_an_undocumented_route_is_still_listed():
    from aiohttp import web

    async def handler(request):
        return web.Response()

    app = web.Application()
    app.router.add_get("/plain/{thing}", handler)
    doc = build_document(app)
    op = doc["paths"]["/plain/{thing}"]["get"]
    assert op["summary"] == "(not documented)"
    assert op["parameters"][0]["name"] == "thing"
