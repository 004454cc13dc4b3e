"""The wire format: request parsing/validation and response/chunk encoding (pure)."""

from __future__ import annotations

import orjson
import pytest

from wicore_cpp.engine.messages import SamplingParams
from wicore_cpp.errors import InvalidRequest
from wicore_cpp.http.chat_protocol import chat_choice, chat_completion, parse_chat_request
from wicore_cpp.http.protocol import ChunkEncoder, usage

USER = {"role": "user", "content": "Hello"}
MISSING = object()  # a field left out of the body


def body(**fields) -> bytes:
    fields.setdefault("messages", [USER])
    return orjson.dumps(fields)


def parse_error(raw: bytes) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(raw)
    return info.value


# -- valid requests --------------------------------------------------------------------------


def test_minimal_body_and_defaults():
    req = parse_chat_request(b'{"messages":[{"role":"user","content":"Hi"}]}')
    assert req.model is None
    assert [m.role for m in req.messages] == ["user"]
    assert req.messages[0].text() == "Hi"
    assert req.temperature == 0.7
    assert req.top_p == 1.0
    assert req.frequency_penalty == 0.0
    assert req.presence_penalty == 0.0
    assert req.stream is False
    assert req.n == 1
    assert req.stop is None
    assert req.stop_sequences == ()
    assert req.include_usage is False
    assert req.return_token_ids is False


def test_full_body_from_api_document():
    req = parse_chat_request(body(
        model="gemma-3-27b-it", messages=[{"role": "user", "content": "解释量子计算的基本原理"}],
        max_tokens=512, temperature=0.7, stream=False, top_p=1.0, frequency_penalty=0.0,
        presence_penalty=0.0))
    assert req.model == "gemma-3-27b-it"
    assert req.messages[0].text() == "解释量子计算的基本原理"
    assert req.max_tokens == 512


def test_unknown_fields_ignored():
    req = parse_chat_request(body(foo="bar", guided_json={"type": "object"}))
    assert req.messages[0].text() == "Hello"


def test_integers_accepted_for_floats():
    req = parse_chat_request(body(temperature=0, top_p=1, frequency_penalty=-2, presence_penalty=2))
    values = (req.temperature, req.top_p, req.frequency_penalty, req.presence_penalty)
    assert values == (0, 1, -2, 2)


def test_content_as_text_parts_joined_with_newline():
    req = parse_chat_request(body(messages=[{"role": "user", "content": [
        {"type": "text", "text": "first"}, {"type": "text", "text": "second"}]}]))
    assert req.messages[0].text() == "first\nsecond"
    assert req.engine_messages() == [{"role": "user", "content": "first\nsecond"}]


def test_template_messages_map_developer_to_system():
    req = parse_chat_request(body(messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]))
    assert req.engine_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Sys."},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]


def test_stream_options_include_usage():
    with_usage = parse_chat_request(body(stream=True, stream_options={"include_usage": True}))
    assert with_usage.include_usage
    assert not parse_chat_request(body(stream=True, stream_options={})).include_usage


# -- invalid requests ------------------------------------------------------------------------


def test_invalid_json():
    err = parse_error(b'{"messages": [')
    assert err.param is None
    assert err.status == 400
    assert "not valid JSON" in err.message


@pytest.mark.parametrize("raw", [b"[]", b'"text"', b"42", b"null"])
def test_non_object_body(raw):
    err = parse_error(raw)
    assert err.param is None
    assert "JSON object" in err.message


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"messages": MISSING}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "Hello"}, "messages"),
        ({"messages": None}, "messages"),
        ({"messages": [{"role": "bot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [USER, {"role": "tool", "content": "x"}]}, "messages[1]"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0].content"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "messages[0].content[0]"),
        ({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,", "detail": "low"}}]}]},
         "messages[0].content[0].image_url.detail"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.1}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": True}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.01}, "top_p"),
        ({"frequency_penalty": 3}, "frequency_penalty"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 1.5}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"stop": ""}, "stop"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop": 7}, "stop"),
        ({"n": 0}, "n"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "body"),
        ({"tool_choice": "required"}, "body"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
         "tools[0].function.name"),
        ({"tools": [{"type": "code_interpreter"}]}, "tools[0].type"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"model": 3}, "model"),
        ({"seed": 1.5}, "seed"),
        ({"stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ],
)
def test_invalid_parameter_names_param(fields, param):
    merged = {"messages": [USER], **fields}
    err = parse_error(orjson.dumps({k: v for k, v in merged.items() if v is not MISSING}))
    assert err.param == param
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert f"'{param}'" in err.message
    assert err.to_dict()["error"]["param"] == param


@pytest.mark.parametrize("field, value", [
    ("audio", {"voice": "alloy", "format": "mp3"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("web_search_options", {}),
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    ("reasoning_effort", "low"),
    ("store", True),
    ("service_tier", "flex"),
])
def test_fields_openai_defines_but_not_honoured_are_refused(field, value):
    err = parse_error(body(**{field: value}))
    assert err.param == field and err.status == 400
    assert err.to_dict()["error"]["code"] == "unsupported_parameter"
    assert f"'{field}'" in err.message


@pytest.mark.parametrize("field, value", [
    ("audio", None), ("modalities", ["text"]), ("store", False), ("service_tier", "auto"),
    ("web_search_options", None), ("prediction", None),
])
def test_refused_fields_with_harmless_values_are_accepted(field, value):
    assert parse_chat_request(body(**{field: value})).messages


def test_null_means_the_default():
    nulls = {name: None for name in (
        "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
        "min_p", "frequency_penalty", "presence_penalty", "logit_bias", "stream",
        "stream_options", "stop", "seed", "n", "logprobs", "top_logprobs", "tools",
        "tool_choice", "parallel_tool_calls", "response_format", "user", "metadata")}
    req = parse_chat_request(body(**nulls))
    assert req.to_sampling_params(5) == parse_chat_request(body()).to_sampling_params(5)
    assert req.tool_spec() is None and req.output_format() is None


def test_tool_conversation_messages():
    req = parse_chat_request(body(messages=[
        USER,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "f", "arguments": '{"x": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]))
    assert req.engine_messages()[1:] == [
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "call_1", "name": "f", "arguments": '{"x": 1}'}]},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]


def test_tool_spec_and_output_format():
    fn = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    req = parse_chat_request(body(tools=[fn], tool_choice={"type": "function",
                                                           "function": {"name": "f"}},
                                  parallel_tool_calls=False))
    spec = req.tool_spec()
    assert (spec.choice, spec.named, spec.parallel) == ("function", "f", False)
    assert parse_chat_request(body(tools=[fn])).tool_spec().choice == "auto"
    err = parse_error(body(tools=[fn], tool_choice={"type": "function",
                                                    "function": {"name": "g"}}))
    assert "'g'" in err.message
    fmt = parse_chat_request(body(response_format={
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string"}}}))
    assert fmt.output_format().schema == {"type": "string"}
    assert parse_chat_request(body(response_format={"type": "text"})).output_format() is None


def test_extended_sampling_fields_reach_the_engine():
    params = parse_chat_request(body(
        top_k=40, min_p=0.05, repeat_penalty=1.1, logit_bias={"17": -100, "3": 2.5},
        logprobs=True, top_logprobs=3, n=2)).to_sampling_params(9)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (40, 0.05, 1.1)
    assert params.logit_bias == ((17, -100.0), (3, 2.5))
    assert (params.logprobs, params.n) == (3, 2)
    assert parse_chat_request(body(logprobs=True)).to_sampling_params(1).logprobs == 0
    assert parse_chat_request(body(top_k=-1)).to_sampling_params(1).top_k == 0
    err = parse_error(body(repetition_penalty=1.2, repeat_penalty=1.3))
    assert err.param == "repeat_penalty"


def test_four_stop_sequences_are_allowed():
    req = parse_chat_request(body(stop=["a", "b", "c", "d"]))
    assert req.stop_sequences == ("a", "b", "c", "d")


# -- max tokens and sampling params ----------------------------------------------------------


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, 512),
        ({"max_tokens": 40}, 40),
        ({"max_completion_tokens": 30}, 30),
        ({"max_tokens": 40, "max_completion_tokens": 30}, 30),
        ({"max_tokens": 10, "max_completion_tokens": 99}, 99),
    ],
)
def test_requested_max_tokens_precedence(fields, expected):
    assert parse_chat_request(body(**fields)).requested_max_tokens(512) == expected


def test_to_sampling_params_fields():
    req = parse_chat_request(body(
        temperature=0.2, top_p=0.9, frequency_penalty=0.5, presence_penalty=-0.5, seed=42,
        stop=["###", "\n\n"]))
    params = req.to_sampling_params(77)
    assert params == SamplingParams(
        max_tokens=77, temperature=0.2, top_p=0.9, frequency_penalty=0.5,
        presence_penalty=-0.5, seed=42, stop=("###", "\n\n"))


def test_to_sampling_params_defaults():
    params = parse_chat_request(body()).to_sampling_params(5)
    assert params == SamplingParams(max_tokens=5, temperature=0.7, top_p=1.0,
                                    frequency_penalty=0.0, presence_penalty=0.0, seed=None, stop=())


def test_stop_as_string_and_list():
    assert parse_chat_request(body(stop="END")).stop_sequences == ("END",)
    assert parse_chat_request(body(stop=["a", "bb"])).stop_sequences == ("a", "bb")
    assert parse_chat_request(body(stop=None)).stop_sequences == ()
    assert parse_chat_request(body(stop="END")).to_sampling_params(1).stop == ("END",)


# -- responses -------------------------------------------------------------------------------


def test_usage_totals():
    assert usage(15, 128) == {"prompt_tokens": 15, "completion_tokens": 128, "total_tokens": 143,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    assert usage(15, 1, 14)["prompt_tokens_details"] == {"cached_tokens": 14}


def test_chat_completion_shape_matches_api_document():
    choice = chat_choice(0, "量子计算...", [], "stop", None, list(range(128)))
    resp = chat_completion("req_1704067200123", 1704067200, "gemma-3-27b-it", [choice], 15, 128)
    # Round-trip through JSON as the server does.
    resp = orjson.loads(orjson.dumps(resp))
    assert resp["id"] == "req_1704067200123"
    assert resp["object"] == "chat.completion"
    assert isinstance(resp["created"], int) and resp["created"] == 1704067200
    assert resp["model"] == "gemma-3-27b-it"
    assert len(resp["choices"]) == 1
    choice = resp["choices"][0]
    assert choice["index"] == 0
    assert choice["message"] == {"role": "assistant", "content": "量子计算..."}
    assert choice["finish_reason"] == "stop"
    assert choice["token_ids"] == list(range(128))
    assert resp["usage"] == {"prompt_tokens": 15, "completion_tokens": 128, "total_tokens": 143,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_chat_completion_without_token_ids():
    resp = chat_completion("req_1", 1, "m", [chat_choice(0, "", [], "length", None, None)],
                           7, 0)
    assert "token_ids" not in resp["choices"][0]
    assert resp["choices"][0]["finish_reason"] == "length"
    assert resp["usage"]["total_tokens"] == 7


# -- stream chunks ---------------------------------------------------------------------------


@pytest.fixture
def enc() -> ChunkEncoder:
    return ChunkEncoder("req_42abc", 1704067200, "gemma-3-27b-it")


def event_json(event: bytes) -> dict:
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    payload = event[len(b"data: "):-2]
    assert b"\n" not in payload  # one SSE event, one line
    chunk = orjson.loads(payload)
    assert chunk["id"] == "req_42abc"
    assert chunk["object"] == "chat.completion.chunk"
    assert chunk["created"] == 1704067200
    assert chunk["model"] == "gemma-3-27b-it"
    return chunk


def test_role_chunk(enc):
    chunk = event_json(enc.role())
    assert chunk["choices"] == [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]


@pytest.mark.parametrize(
    "text",
    [
        "量子",
        "plain",
        'say "hi"',
        "line1\nline2\r\n\ttab",
        "back\\slash \\n not a newline",
        "emoji 😀👍🏽 and 🇨🇳",
        "中文，日本語、한국어",
        "</script>\u2028\u2029",
        "\x00\x1f control",
        "",
    ],
)
def test_content_chunk_round_trips(enc, text):
    chunk = event_json(enc.content(text))
    assert chunk["choices"] == [{"index": 0, "delta": {"content": text}, "finish_reason": None}]


def test_content_chunk_with_token_ids(enc):
    chunk = event_json(enc.content("ab", token_ids=[5, 6]))
    assert chunk["choices"] == [
        {"index": 0, "delta": {"content": "ab"}, "finish_reason": None, "token_ids": [5, 6]}]
    # Empty text still carries the ids (a step that produced only a partial character).
    chunk = event_json(enc.content("", token_ids=[9]))
    assert chunk["choices"][0]["token_ids"] == [9]
    assert chunk["choices"][0]["delta"] == {"content": ""}


def test_content_fast_path_equals_generic_encoding(enc):
    """The pre-encoded fast path produces the same JSON as encoding the dict."""
    fast = orjson.loads(enc.content('x"y')[6:-2])
    expected = {"id": "req_42abc", "object": "chat.completion.chunk", "created": 1704067200,
                "model": "gemma-3-27b-it",
                "choices": [{"index": 0, "delta": {"content": 'x"y'}, "finish_reason": None}]}
    assert fast == expected


@pytest.mark.parametrize("reason", ["stop", "length"])
def test_finish_chunk(enc, reason):
    chunk = event_json(enc.finish(reason))
    assert chunk["choices"] == [{"index": 0, "delta": {}, "finish_reason": reason}]


def test_usage_chunk(enc):
    chunk = event_json(enc.usage(11, 5, 10))
    assert chunk["choices"] == []
    assert chunk["usage"] == {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16,
                              "prompt_tokens_details": {"cached_tokens": 10}}


def test_done_event():
    assert ChunkEncoder.DONE == b"data: [DONE]\n\n"


def test_error_event():
    payload = InvalidRequest("bad", param="x").to_dict()
    event = ChunkEncoder.error(payload)
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert orjson.loads(event[6:-2]) == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": "400"}}


def test_model_id_and_request_id_with_special_characters_are_escaped():
    enc = ChunkEncoder('req_"1"', 1, 'org/model "q4"\n')
    for event in (enc.role(), enc.content("x"), enc.finish("stop"), enc.usage(1, 1)):
        chunk = orjson.loads(event[6:-2])
        assert chunk["id"] == 'req_"1"'
        assert chunk["model"] == 'org/model "q4"\n'
