"""Property-based tests (hypothesis) of the request models and the SSE chunk encoder.

The request model must turn any body at all into a request or a 400 naming a parameter,
never anything else; a valid request keeps what the client sent. The encoder must give one
well-framed SSE event per chunk, for any text, whose JSON is exactly the chunk's.
"""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from wicore_cpp.engine.client import Priority
from wicore_cpp.errors import MAX_MESSAGE_CHARS, InvalidRequest
from wicore_cpp.http.chat_protocol import ChatCompletionRequest, parse_chat_request
from wicore_cpp.http.protocol import ChunkEncoder

SETTINGS = settings(max_examples=100, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Text as a server can have it: any Unicode but lone surrogates (UTF-8 decoding never makes
# them, and JSON cannot carry them).
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
JSON_SCALAR = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT
JSON = st.recursive(JSON_SCALAR, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)
FIELDS = list(ChatCompletionRequest.model_fields)


def _parse(body: bytes) -> ChatCompletionRequest | InvalidRequest:
    try:
        return parse_chat_request(body)
    except InvalidRequest as exc:
        return exc


def _assert_clean_400(err: InvalidRequest) -> None:
    assert err.status == 400 and err.type == "invalid_request_error"
    assert 0 < len(err.message) <= MAX_MESSAGE_CHARS + 3
    doc = err.to_dict()
    assert set(doc["error"]) == {"message", "type", "param", "code"}
    orjson.dumps(doc)  # always serialisable


# -- request model ------------------------------------------------------------------------------


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_give_a_clean_400(body):
    result = _parse(body)
    if isinstance(result, InvalidRequest):
        _assert_clean_400(result)


@SETTINGS
@given(st.fixed_dictionaries({}, optional={name: JSON for name in FIELDS}) | JSON)
def test_any_json_parses_or_names_a_real_parameter(data):
    result = _parse(json.dumps(data).encode())
    if isinstance(result, InvalidRequest):
        _assert_clean_400(result)
        if result.param is not None:
            top = result.param.split("[")[0].split(".")[0]
            assert top in FIELDS, result.param
            assert f"'{result.param}'" in result.message


ROLE = st.sampled_from(["system", "developer", "user", "assistant"])
PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
CONTENT = TEXT | st.lists(PART, min_size=1, max_size=3)
MESSAGE = st.fixed_dictionaries({"role": ROLE, "content": CONTENT})
STOP = st.none() | TEXT.filter(bool) | st.lists(TEXT.filter(bool), max_size=4)
VALID = st.fixed_dictionaries(
    {"messages": st.lists(MESSAGE, min_size=1, max_size=5)},
    optional={
        "model": TEXT,
        "max_tokens": st.integers(1, 2**40),
        "max_completion_tokens": st.integers(1, 2**40),
        "temperature": st.floats(0, 2) | st.integers(0, 2),
        "top_p": st.floats(0, 1),
        "frequency_penalty": st.floats(-2, 2),
        "presence_penalty": st.floats(-2, 2),
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        "stop": STOP,
        "seed": st.integers(-(2**63), 2**64 - 1),
        "priority": st.sampled_from([p.name for p in Priority]).map(str.lower),
        "return_token_ids": st.booleans(),
        "x_unknown_field": JSON,  # fields OpenAI does not define are ignored
    },
)


@SETTINGS
@given(VALID)
def test_valid_requests_keep_what_the_client_sent(data):
    req = parse_chat_request(json.dumps(data).encode())
    sent = [m["content"] if isinstance(m["content"], str)
            else "\n".join(p["text"] for p in m["content"]) for m in data["messages"]]
    assert [m["content"] for m in req.engine_messages()] == sent
    assert [m["role"] for m in req.engine_messages()] == [
        "system" if m["role"] == "developer" else m["role"] for m in data["messages"]]
    params = req.to_sampling_params(req.requested_max_tokens(512))
    stop = data.get("stop")
    assert params.stop == (() if stop is None else (stop,) if isinstance(stop, str)
                           else tuple(stop))
    for name in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "seed"):
        if name in data:
            assert getattr(params, name) == data[name]
    assert params.max_tokens == (data.get("max_completion_tokens") or data.get("max_tokens")
                                 or 512)


RANGES = {"temperature": (0, 2), "top_p": (0, 1), "frequency_penalty": (-2, 2),
          "presence_penalty": (-2, 2)}


@SETTINGS
@given(st.sampled_from(sorted(RANGES)), st.floats(allow_nan=False, allow_infinity=False))
def test_numbers_out_of_range_name_their_parameter(name, value):
    low, high = RANGES[name]
    assume(not low <= value <= high)
    result = _parse(orjson.dumps({"messages": [{"role": "user", "content": "x"}], name: value}))
    assert isinstance(result, InvalidRequest) and result.param == name


@SETTINGS
@given(TEXT | st.sampled_from(["low", "Normal", "HIGH", "urgent", " low", "hıgh", "urgent\n"]))
def test_priority_is_one_of_four_names_in_any_ascii_case(text):
    names = {p.name.lower(): p for p in Priority}
    expected = names.get(text.lower()) if text.isascii() else None
    try:
        assert Priority.parse(text) is expected
    except ValueError as exc:
        assert expected is None
        assert len(str(exc)) < 200


@SETTINGS
@given(TEXT | st.sampled_from(["low", "Normal", "HIGH", "uRGENT", " low", "hıgh"]))
def test_the_documented_priority_pattern_is_what_parse_accepts(text):
    import re

    from wicore_cpp.http.protocol import PRIORITY_PATTERN

    try:
        Priority.parse(text)
        accepted = True
    except ValueError:
        accepted = False
    assert bool(re.fullmatch(PRIORITY_PATTERN, text)) == accepted


# -- SSE encoder ---------------------------------------------------------------------------------


def split_events(stream: bytes) -> list[dict | str]:
    """An SSE reader as the spec has it: events end with a blank line, lines with LF, CR or
    CRLF; every line here must be `data: ...`."""
    events = []
    for block in stream.split(b"\n\n"):
        if not block:
            continue
        lines = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        assert len(lines) == 1 and lines[0].startswith(b"data: "), block[:100]
        data = lines[0][len(b"data: "):]
        events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return events


IDS = st.lists(st.integers(0, 2**31 - 1), max_size=8)


@SETTINGS
@given(TEXT, TEXT, st.integers(0, 2**40), st.lists(st.tuples(TEXT, st.none() | IDS), max_size=6),
       st.sampled_from(["stop", "length", "timeout"]), st.integers(0, 10**6), st.integers(0, 10**6))
def test_a_stream_reads_back_as_exactly_its_chunks(request_id, model, created, deltas, reason,
                                                   prompt_tokens, completion_tokens):
    enc = ChunkEncoder(request_id, created, model)
    stream = enc.role() + b"".join(enc.content(t, ids) for t, ids in deltas)
    stream += enc.finish(reason) + enc.usage(prompt_tokens, completion_tokens) + enc.DONE
    events = split_events(stream)
    assert len(events) == len(deltas) + 4 and events[-1] == "[DONE]"
    chunks = events[:-1]
    head = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": model}
    assert all({k: c[k] for k in head} == head for c in chunks)
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]
    for chunk, (text, ids) in zip(chunks[1:-2], deltas, strict=True):
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        if ids is not None:
            choice["token_ids"] = ids
        assert chunk == {**head, "choices": [choice]}
    assert chunks[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": reason}]
    assert chunks[-1]["usage"] == {"prompt_tokens": prompt_tokens,
                                   "completion_tokens": completion_tokens,
                                   "total_tokens": prompt_tokens + completion_tokens,
                                   "prompt_tokens_details": {"cached_tokens": 0}}


@SETTINGS
@given(TEXT)
def test_the_content_fast_path_equals_encoding_the_dict(text):
    enc = ChunkEncoder("req_1", 1, "m")
    generic = b"data: " + orjson.dumps({
        "id": "req_1", "object": "chat.completion.chunk", "created": 1, "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}) + b"\n\n"
    assert enc.content(text) == generic


@pytest.mark.parametrize("text", ["a\rb", "a\r\nb", "\u2028\u2029", "\x00"])
def test_line_breaks_in_text_never_break_the_event(text):
    (event,) = split_events(ChunkEncoder("r", 1, "m").content(text))
    assert event["choices"][0]["delta"]["content"] == text
