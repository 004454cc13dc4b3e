"""The OpenAI surface apps rely on, end to end: the official `openai` client against a real
`wicore serve` process on the demo model. JSON output, tool calls, logprobs, `n`,
`/v1/completions` and the fields that are refused rather than ignored."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request

import jsonschema
import openai
import pytest

from tests.conftest import MODEL_ID, ROOT, ServerProcess, _wait_process_healthy, free_port

pytestmark = pytest.mark.e2e

# Enums, numbers, nested objects and arrays; every string and array bounded, so a random
# model's output always closes within max_tokens (the grammar guarantees the rest).
PET_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "species": {"type": "string", "enum": ["cat", "dog", "axolotl"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 40},
        "weight_kg": {"type": "number"},
        "vaccinated": {"type": "boolean"},
        "owner": {
            "type": "object",
            "properties": {"first": {"type": "string", "maxLength": 8},
                           "city": {"enum": ["Paris", "Lima", None]}},
            "required": ["first", "city"],
            "additionalProperties": False,
        },
        "toys": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    },
    "required": ["name", "species", "age", "weight_kg", "vaccinated", "owner", "toys"],
    "additionalProperties": False,
}
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "strict": True,
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit", "days"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
TOOL_SCHEMAS = {t["function"]["name"]: t["function"]["parameters"]
                for t in (WEATHER_TOOL, TIME_TOOL)}
ASK = [{"role": "user", "content": "Describe a pet as JSON."}]


@pytest.fixture(scope="module")
def server(demo_model_path, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("e2e-surface") / "server.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "wicore_cpp", "serve", "--model", str(demo_model_path),
         "--model-id", MODEL_ID, "--port", str(port), "--threads", "2", "--ctx-size", "8192",
         "--flash-attn", "off", "--rate-limit-per-minute", "0",
         # Correctness, not speed: a loaded CI machine must not turn these into timeouts.
         "--request-timeout-s", "600"],
        stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=ROOT, env=dict(os.environ),
    )
    srv = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
    asyncio.run(_wait_process_healthy(srv))
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _post(client, path: str, body: dict) -> dict:
    base = str(client.base_url).removesuffix("/").removesuffix("/v1")
    req = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _token_id(client, text: str) -> int:
    (token,) = _post(client, "/tokenize", {"content": text})["tokens"]
    return token


# -- structured output ---------------------------------------------------------------------------


@pytest.mark.parametrize("temperature, seed", [(0, None), (1.0, 5)])
def test_json_schema_output_parses_and_validates(client, temperature, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": PET_SCHEMA,
                                                  "strict": True}}
    resp = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=400,
                                          temperature=temperature, seed=seed,
                                          response_format=fmt)
    choice = resp.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), PET_SCHEMA)
    stream = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=400,
                                            temperature=temperature, seed=seed,
                                            response_format=fmt, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == choice.message.content


def test_json_object_output_parses(client):
    # The grammar guarantees JSON; the bias keeps the random model's strings short enough to
    # close within max_tokens.
    bias = {str(_token_id(client, t)): 10 for t in ('"', "}")}
    for seed in (1, 2):
        resp = client.chat.completions.create(
            model=MODEL_ID, messages=ASK, max_tokens=300, temperature=1.0, seed=seed,
            logit_bias=bias, response_format={"type": "json_object"})
        assert resp.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_unsupported_schema_is_a_400_naming_it(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_ID, messages=ASK, response_format={
                "type": "json_schema", "json_schema": {"name": "x", "schema": {
                    "type": "object", "properties": {"mail": {"type": "string",
                                                             "format": "email"}}}}})
    assert info.value.body["param"] == "response_format.json_schema.schema"
    assert "email" in info.value.body["message"]


# -- tool calls ----------------------------------------------------------------------------------


def _check_calls(calls, names):
    assert calls and all(c.type == "function" and c.id.startswith("call_") for c in calls)
    for call in calls:
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments),
                            TOOL_SCHEMAS[call.function.name])


@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
])
def test_forced_tool_calls_are_well_formed(client, tool_choice, names):
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Weather in Paris?"}],
                  tools=[WEATHER_TOOL, TIME_TOOL], tool_choice=tool_choice, max_tokens=300,
                  temperature=0.8, seed=11)
    resp = client.chat.completions.create(**kwargs)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    _check_calls(choice.message.tool_calls, names)
    if not isinstance(tool_choice, str):
        assert len(choice.message.tool_calls) == 1
    # Streamed as OpenAI does: per call a first chunk with its id, type and name (arguments
    # empty), then its arguments in pieces as they are written; accumulated by index.
    stream = client.chat.completions.create(**kwargs, stream=True)
    calls: dict[int, dict] = {}
    finishes = []
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for tc in delta.tool_calls or []:
            if tc.index not in calls:
                assert tc.id.startswith("call_") and tc.type == "function"
                assert tc.function.name in names and tc.function.arguments == ""
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": "",
                                   "pieces": 0}
                continue
            slot = calls[tc.index]
            assert tc.id is None and not tc.function.name
            slot["arguments"] += tc.function.arguments
            slot["pieces"] += 1
        if chunk.choices[0].finish_reason:
            finishes.append(chunk.choices[0].finish_reason)
    assert finishes == ["tool_calls"]
    assert sorted(calls) == list(range(len(calls)))
    assert len({c["id"] for c in calls.values()}) == len(calls)
    # The arguments came token by token, not in one piece at the end.
    assert all(c["pieces"] > 1 for c in calls.values() if len(c["arguments"]) > 8)
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (tc.function.name, json.loads(tc.function.arguments))
        for tc in choice.message.tool_calls]


def test_parallel_tool_calls_false_gives_one_call(client):
    resp = client.chat.completions.create(
        model=MODEL_ID, messages=[{"role": "user", "content": "Weather and time?"}],
        tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required", parallel_tool_calls=False,
        max_tokens=300, temperature=1.0, seed=3)
    assert len(resp.choices[0].message.tool_calls) == 1


def test_conversation_with_tool_results_renders_and_answers(client):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_abc", "type": "function",
            "function": {"name": "get_weather",
                         "arguments": '{"city": "Paris", "unit": "celsius", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 21}'},
    ]
    for tool_choice in ("auto", "none"):
        resp = client.chat.completions.create(model=MODEL_ID, messages=messages,
                                              tools=[WEATHER_TOOL], tool_choice=tool_choice,
                                              max_tokens=16, temperature=0)
        choice = resp.choices[0]
        assert choice.finish_reason in ("stop", "length", "tool_calls")
        assert choice.message.content or choice.message.tool_calls
        assert resp.usage.prompt_tokens > 60  # the tool block and the result are in the prompt


# -- logprobs and n ------------------------------------------------------------------------------


def test_logprobs_have_the_requested_count(client):
    resp = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 3
        assert all(t.logprob <= 0 for t in item.top_logprobs)
        # Greedy: the chosen token is the most likely one.
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-5)
        assert bytes(item.bytes) == item.token.encode() or "\ufffd" in item.token
    stream = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=8,
                                            temperature=0, logprobs=True, top_logprobs=2,
                                            stream=True)
    streamed = [lp for c in stream if c.choices and c.choices[0].logprobs
                for lp in c.choices[0].logprobs.content]
    assert [lp.token for lp in streamed] == [lp.token for lp in content]
    assert all(len(lp.top_logprobs) == 2 for lp in streamed)


def test_n_choices_share_a_prefill_and_differ_only_by_sampling(client):
    greedy = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=16,
                                            temperature=0, n=3)
    assert [c.index for c in greedy.choices] == [0, 1, 2]
    assert len({c.message.content for c in greedy.choices}) == 1
    lone = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=16,
                                          temperature=0)
    assert greedy.choices[0].message.content == lone.choices[0].message.content
    assert greedy.usage.prompt_tokens == lone.usage.prompt_tokens
    assert greedy.usage.completion_tokens == 3 * lone.usage.completion_tokens
    sampled = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=16,
                                             temperature=1.0, seed=9, n=3)
    assert len({c.message.content for c in sampled.choices}) > 1
    stream = client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=16,
                                            temperature=1.0, seed=9, n=3, stream=True)
    texts = ["", "", ""]
    finishes = [0, 0, 0]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            finishes[c.index] += c.finish_reason is not None
    assert texts == [c.message.content for c in sampled.choices]
    assert finishes == [1, 1, 1]


def test_n_above_the_maximum_is_refused(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, n=5)
    assert info.value.body["param"] == "n"


# -- /v1/completions -----------------------------------------------------------------------------


def test_completions_json_and_stream(client):
    kwargs = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=12, temperature=0)
    resp = client.completions.create(**kwargs)
    assert resp.object == "text_completion"
    text = resp.choices[0].text
    assert text and resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens <= 12
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True)
                       if c.choices)
    assert streamed == text
    echoed = client.completions.create(**kwargs, echo=True)
    assert echoed.choices[0].text == "Once upon a time" + text
    with_lp = client.completions.create(**kwargs, logprobs=2)
    lp = with_lp.choices[0].logprobs
    assert "".join(lp.tokens) == text or len(lp.tokens) == with_lp.usage.completion_tokens
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 for top in lp.top_logprobs)
    # echo with logprobs: the prompt's tokens first (the first one null), then the text's.
    scored = client.completions.create(**kwargs, echo=True, logprobs=1)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == "Once upon a time" + text
    assert len(lp.tokens) == scored.usage.prompt_tokens + scored.usage.completion_tokens
    assert "".join(lp.tokens[:scored.usage.prompt_tokens]) == "Once upon a time"
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[1:])
    own = lp.token_logprobs[scored.usage.prompt_tokens:]
    assert len(own) == len(with_lp.choices[0].logprobs.token_logprobs)
    for a, b in zip(own, with_lp.choices[0].logprobs.token_logprobs, strict=True):
        assert abs(a - b) < 1e-2  # the same tokens, scored the same with or without echo
    cut = text[3:5]
    if cut.strip():
        stopped = client.completions.create(**kwargs, stop=[cut])
        assert stopped.choices[0].text == text[:text.index(cut)]


def test_completions_from_token_ids(client):
    ids = _post(client, "/tokenize", {"content": "Once upon a time", "add_special": True})[
        "tokens"]
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=8, temperature=0)
    by_text = client.completions.create(model=MODEL_ID, prompt="Once upon a time", max_tokens=8,
                                        temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_completions_of_a_list_of_prompts(client):
    """Strings, token ids and lists of token ids; choices prompt-major with n; usage summed;
    each choice equals its prompt's lone run at temperature 0, JSON and streamed."""
    prompts = ["Once upon a time", "The capital of France", "Hello"]
    lone = [client.completions.create(model=MODEL_ID, prompt=p, max_tokens=6, temperature=0)
            for p in prompts]
    resp = client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=6,
                                     temperature=0, n=2)
    assert [c.index for c in resp.choices] == list(range(6))
    for c in resp.choices:
        assert c.text == lone[c.index // 2].choices[0].text, c.index
    assert resp.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in lone)
    assert resp.usage.completion_tokens == 2 * sum(r.usage.completion_tokens for r in lone)
    streamed: dict[int, str] = {}
    finished: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=6,
                                           temperature=0, n=2, stream=True,
                                           stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert streamed == {c.index: c.text for c in resp.choices}
    assert sorted(finished) == list(range(6))
    assert usage.prompt_tokens == resp.usage.prompt_tokens
    ids = [_post(client, "/tokenize", {"content": p, "add_special": True})["tokens"]
           for p in prompts[:2]]
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=6,
                                       temperature=0, echo=True)
    assert len(by_ids.choices) == 2
    for i, c in enumerate(by_ids.choices):  # echo gives each prompt back before its text
        assert prompts[i] in c.text and c.text.endswith(lone[i].choices[0].text)
    one_id_list = client.completions.create(model=MODEL_ID, prompt=[ids[0]], max_tokens=6,
                                            temperature=0)
    assert one_id_list.choices[0].text == lone[0].choices[0].text


# -- refused fields ------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, param", [
    ({"audio": {"voice": "alloy", "format": "wav"}, "modalities": ["text", "audio"]}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"store": True}, "store"),
])
def test_fields_not_honoured_are_each_a_400(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=ASK, max_tokens=4, **kwargs)
    assert info.value.body["param"] == param
    assert info.value.body["code"] == "unsupported_parameter"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_ID, prompt="x", suffix="y", max_tokens=2)
    assert info.value.body["param"] == "suffix"
