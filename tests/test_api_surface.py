"""In-process API tests of the OpenAI surface beyond plain chat: nulls, refusals, sampling
fields, tokenize/detokenize, the model card, completions edge cases, and schemas built to
hurt (real workers on the demo GGUF)."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import MODEL_ID

HELLO = [{"role": "user", "content": "Hello, who are you?"}]


async def post(api, path: str, body: dict) -> tuple[int, dict]:
    async with api.session.post(api.url + path, json=body) as r:
        return r.status, await r.json()


async def test_nulls_mean_the_default(api):
    body = {"model": None, "temperature": None, "top_p": None, "max_tokens": None,
            "stop": None, "seed": None, "n": None, "stream": None, "tools": None,
            "tool_choice": None, "response_format": None, "logprobs": None, "user": None,
            "presence_penalty": None, "frequency_penalty": None, "logit_bias": None}
    status, resp, _ = await api.chat(HELLO, **body, max_completion_tokens=3)
    assert status == 200, resp
    assert resp["choices"][0]["message"]["role"] == "assistant"


async def test_empty_content_array_is_a_400(api):
    status, resp, _ = await api.chat([{"role": "user", "content": []}])
    assert status == 400 and resp["error"]["param"] == "messages[0].content"


async def test_model_card_carries_context_and_capabilities(api):
    status, body = await api.get(f"/v1/models/{MODEL_ID}")
    assert status == 200
    assert body["context_length"] == 8192  # the demo model's trained context
    assert {"chat", "completions", "tools", "json_schema", "logprobs"} <= set(body["capabilities"])
    assert body["max_choices"] == 4


async def test_tokenize_and_detokenize(api):
    status, body = await post(api, "/tokenize", {"content": "Hello world"})
    assert status == 200 and body["tokens"] and all(isinstance(t, int) for t in body["tokens"])
    status, with_bos = await post(api, "/tokenize", {"content": "Hello world",
                                                     "add_special": True})
    assert with_bos["tokens"][1:] == body["tokens"] and with_bos["tokens"][0] == 2
    status, pieces = await post(api, "/tokenize", {"content": "Hello 量", "with_pieces": True})
    assert [p["id"] for p in pieces["tokens"]] == (
        await post(api, "/tokenize", {"content": "Hello 量"}))[1]["tokens"]
    assert "".join(p["piece"] for p in pieces["tokens"] if isinstance(p["piece"], str)).strip()
    status, text = await post(api, "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and text["content"].strip() == "Hello world"
    status, err = await post(api, "/detokenize", {"tokens": [10**7]})
    assert status == 400 and err["error"]["param"] == "tokens"
    status, err = await post(api, "/tokenize", {"text": "wrong field"})
    assert status == 400 and err["error"]["param"] == "content"


async def test_logit_bias_bans_and_forces_tokens(api):
    _, base, _ = await api.chat(HELLO, max_tokens=6, temperature=0, return_token_ids=True)
    first = base["choices"][0]["token_ids"][0]
    _, banned, _ = await api.chat(HELLO, max_tokens=6, temperature=0, return_token_ids=True,
                                  logit_bias={str(first): -100})
    assert first not in banned["choices"][0]["token_ids"]
    forced_id = (await post(api, "/tokenize", {"content": "量"}))[1]["tokens"][-1]
    _, forced, _ = await api.chat(HELLO, max_tokens=4, temperature=1.0, seed=1,
                                  return_token_ids=True, logit_bias={str(forced_id): 100})
    assert forced["choices"][0]["token_ids"] == [forced_id] * 4
    status, err, _ = await api.chat(HELLO, logit_bias={"9999999": 1})
    assert status == 400 and err["error"]["param"] == "logit_bias.9999999"


async def test_top_k_min_p_and_repetition_penalty_are_honoured(api):
    _, greedy, _ = await api.chat(HELLO, max_tokens=24, temperature=0, return_token_ids=True)
    ids = greedy["choices"][0]["token_ids"]
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        _, hot, _ = await api.chat(HELLO, max_tokens=24, temperature=1.8, seed=4,
                                   return_token_ids=True, **extra)
        assert hot["choices"][0]["token_ids"] == ids, extra
    _, free, _ = await api.chat(HELLO, max_tokens=24, temperature=1.8, seed=4,
                                return_token_ids=True)
    assert free["choices"][0]["token_ids"] != ids  # the sampling was otherwise not greedy
    assert len(set(ids)) < len(ids)  # the greedy output repeats itself...
    for name in ("repetition_penalty", "repeat_penalty"):
        _, rep, _ = await api.chat(HELLO, max_tokens=24, temperature=0, return_token_ids=True,
                                   **{name: 2.0})
        assert rep["choices"][0]["token_ids"] != ids  # ...which the penalty changes


async def test_tools_auto_serves_text_or_calls(api):
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}},
        "required": ["q"]}}}]
    for stream in (False, True):
        if stream:
            status, events, _ = await api.stream(HELLO, tools=tools, max_tokens=12,
                                                 temperature=0)
            assert status == 200 and events[-1] == "[DONE]"
            finish = [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"]]
            assert finish[-1] in ("stop", "length", "tool_calls")
        else:
            status, body, _ = await api.chat(HELLO, tools=tools, max_tokens=12, temperature=0)
            assert status == 200, body
            message = body["choices"][0]["message"]
            assert message["content"] or message.get("tool_calls")


async def test_response_format_cannot_shape_a_forced_call(api):
    tools = [{"type": "function", "function": {"name": "f"}}]
    status, body, _ = await api.chat(HELLO, tools=tools, tool_choice="required",
                                     response_format={"type": "json_object"})
    assert status == 400 and body["error"]["param"] == "response_format"


async def test_adversarial_schemas_never_hurt_the_worker(api):
    deep: dict = {"type": "integer"}
    for _ in range(60):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    huge = {"type": "string", "minLength": 100000}
    for schema in (deep, huge):
        status, body, _ = await api.chat(HELLO, response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        assert status == 400 and body["error"]["code"] == "unsupported_value", body
    # Legal but wide (a grammar of about 176,000 characters): 20 alternatives of 15 optional
    # properties of 30 values each. It runs beside a plain request; both finish, the worker
    # lives. One size up is refused.
    def wide(n):
        return {"anyOf": [{"type": "object", "properties": {
            f"k{i}_{j}": {"enum": [f"v{v}" for v in range(30)]} for j in range(15)}}
            for i in range(n)]}

    status, body, _ = await api.chat(HELLO, response_format={
        "type": "json_schema", "json_schema": {"name": "s", "schema": wide(40)}})
    assert status == 400 and "200000" in body["error"]["message"]
    plain = api.chat(HELLO, max_tokens=8, temperature=0)
    shaped = api.chat(HELLO, max_tokens=60, temperature=1.0, seed=2, response_format={
        "type": "json_schema", "json_schema": {"name": "wide", "schema": wide(20)}})
    (s1, b1, _), (s2, b2, _) = await asyncio.gather(plain, shaped)
    assert s1 == 200 and s2 == 200, (b1, b2)
    if b2["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(b2["choices"][0]["message"]["content"]), dict)
    assert (await api.get("/health"))[0] == 200


async def test_completions_edges(api):
    status, body = await post(api, "/v1/completions", {"prompt": "Hi there", "max_tokens": 0,
                                                       "echo": True})
    assert status == 200, body
    assert body["choices"][0]["text"] == "Hi there"
    assert body["usage"]["completion_tokens"] == 0
    status, body = await post(api, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2})
    assert status == 200 and [c["index"] for c in body["choices"]] == [0, 1]
    for bad in ([], [[]], [[1, 2], []], ["a", [1]], [1, "a"]):
        status, body = await post(api, "/v1/completions", {"prompt": bad})
        assert status == 400 and body["error"]["param"].startswith("prompt"), (bad, body)
    status, body = await post(api, "/v1/completions", {"prompt": ["x"] * 33})
    assert status == 400 and "at most 32 prompts" in body["error"]["message"]
    # A prompt of the list that cannot be served fails the whole request.
    status, body = await post(api, "/v1/completions", {"prompt": [[1, 2], [1, 10**8]]})
    assert status == 400 and body["error"]["param"] == "prompt", body
    status, body = await post(api, "/v1/completions", {"prompt": ["one prompt"],
                                                       "max_tokens": 2})
    assert status == 200 and body["object"] == "text_completion"
    status, body = await post(api, "/v1/completions", {"prompt": [1, 10**8]})
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = await post(api, "/v1/completions", {"prompt": "x", "best_of": 3})
    assert status == 400 and body["error"]["param"] == "best_of"


async def test_completions_count_against_the_same_limits(api):
    _, before = await api.get("/status")
    status, _ = await post(api, "/v1/completions", {"prompt": "x", "max_tokens": 2,
                                                    "priority": "urgent"})
    assert status == 200
    _, after = await api.get("/status")
    assert after["metrics"]["total_requests"] == before["metrics"]["total_requests"] + 1


async def test_echo_with_logprobs_scores_the_prompt(api):
    """The echoed prompt's tokens come with their log-probabilities (the first has none),
    the same the model gives a token when it generates it; then the completion's own."""
    ids = (await post(api, "/tokenize", {"content": "Once upon", "add_special": True}))[1][
        "tokens"]
    status, first = await post(api, "/v1/completions", {
        "prompt": ids, "max_tokens": 2, "temperature": 0, "logprobs": 3,
        "return_token_ids": True})
    assert status == 200, first
    nxt = first["choices"][0]["token_ids"][0]
    generated_lp = first["choices"][0]["logprobs"]["token_logprobs"][0]
    prompt = ids + [nxt]  # the generated token is now the prompt's last
    for n in (1, 2):
        status, body = await post(api, "/v1/completions", {
            "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True,
            "n": n})
        assert status == 200, body
        assert len(body["choices"]) == n
        for choice in body["choices"]:
            lp = choice["logprobs"]
            k = len(prompt)
            assert len(lp["tokens"]) == k + body["usage"]["completion_tokens"] // n
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            assert all(v <= 0 for v in lp["token_logprobs"][1:])
            assert all(len(top) <= 2 for top in lp["top_logprobs"][1:])
            assert abs(lp["token_logprobs"][k - 1] - generated_lp) < 1e-3
            # The greedy token was the most likely there: first among the alternatives.
            assert abs(max(lp["top_logprobs"][k - 1].values()) - generated_lp) < 1e-3
            assert lp["text_offset"] == sorted(lp["text_offset"])
            assert choice["text"].startswith("<bos>Once upon")  # the echo, then the rest
    # A string prompt: the echoed text is the prompt, its tokens' texts add up to it.
    status, body = await post(api, "/v1/completions", {
        "prompt": "Once upon a time", "max_tokens": 0, "echo": True, "logprobs": 0})
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    assert body["choices"][0]["text"] == "Once upon a time"
    assert "".join(lp["tokens"]) == "Once upon a time"
    assert len(lp["tokens"]) == body["usage"]["prompt_tokens"]
    # Streamed: the echo chunk carries the prompt's logprobs, the rest come after it.
    async with api.session.post(api.url + "/v1/completions", json={
            "prompt": prompt, "max_tokens": 3, "temperature": 0, "logprobs": 2, "echo": True,
            "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in (await r.text()).splitlines()
                  if line.startswith("data: {")]
    tokens = [t for c in chunks for ch in c["choices"] if ch["logprobs"]
              for t in ch["logprobs"]["token_logprobs"]]
    assert chunks[0]["choices"][0]["logprobs"]["token_logprobs"][0] is None
    assert len(chunks[0]["choices"][0]["logprobs"]["tokens"]) == len(prompt)
    assert abs(tokens[len(prompt) - 1] - generated_lp) < 1e-3


async def test_echo_with_logprobs_of_a_prompt_longer_than_the_logits_rows(api):
    """A worker's context has logits rows for one output per sequence (n_seq_max: 21 here), and
    a scored prompt asks for one per position: it is scored over several steps, never more
    rows in a step than llama.cpp reserved, beside another request being prefilled."""
    text = "Once upon a time there was a river city with old houses and tall trees. " * 12
    ids = (await post(api, "/tokenize", {"content": text, "add_special": True}))[1]["tokens"]
    assert len(ids) > 140
    plain = asyncio.create_task(post(api, "/v1/completions", {"prompt": text, "max_tokens": 4}))
    status, body = await post(api, "/v1/completions", {
        "prompt": ids, "max_tokens": 2, "temperature": 0, "logprobs": 1, "echo": True})
    assert status == 200, body
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(ids) + body["usage"]["completion_tokens"]
    assert lp["token_logprobs"][0] is None
    assert all(v is not None and v <= 0 for v in lp["token_logprobs"][1:])
    assert (await plain)[0] == 200
