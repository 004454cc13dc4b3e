"""The Gemma 3 tool-call format: rendering a conversation with calls and results, the shape of
a forced call, and finding calls in streamed output (pure)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from wicore_cpp.engine.tool_calls import (
    CallDelta,
    ToolCallParser,
    ToolFunction,
    ToolSpec,
    call_schema,
    call_triggers,
    parse_calls,
    render_conversation,
)
from wicore_cpp.errors import InvalidRequest

WEATHER = ToolFunction("get_weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
TIME = ToolFunction("get_time", None, None)
SPEC = ToolSpec((WEATHER, TIME), "auto", None, True)


def test_tool_block_goes_first_in_the_system_text():
    turns = render_conversation([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Weather in Paris?"}], SPEC)
    assert [t["role"] for t in turns] == ["system", "user"]
    system = turns[0]["content"]
    assert system.startswith("You have access to functions.")
    assert system.endswith("Be brief.")
    assert '{"name": function name, "parameters": dictionary of argument name and its value}' \
        in system
    assert "JSON list" in system  # parallel calls allowed
    defs = json.loads(system[system.index("\n["):system.rindex("]") + 1])
    assert [d["name"] for d in defs] == ["get_weather", "get_time"]
    assert defs[1]["parameters"] == {"type": "object", "properties": {}}


def test_no_tool_block_for_none_and_forced_wording():
    msgs = [{"role": "user", "content": "hi"}]
    assert render_conversation(msgs, ToolSpec((WEATHER,), "none")) == msgs
    required = render_conversation(msgs, ToolSpec((WEATHER,), "required", None, False))
    assert "MUST invoke at least one" in required[0]["content"]
    assert "JSON list" not in required[0]["content"]
    named = render_conversation(msgs, ToolSpec((WEATHER, TIME), "function", "get_time"))
    assert "MUST invoke the function get_time" in named[0]["content"]


def test_calls_and_results_render_as_alternating_turns():
    turns = render_conversation([
        {"role": "user", "content": "Weather in Paris and the time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
            {"id": "c2", "name": "get_time", "arguments": "{}"}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
        {"role": "user", "content": "Thanks. Anything else?"},
        {"role": "assistant", "content": "Sure.", "tool_calls": [
            {"id": "c3", "name": "get_time", "arguments": "{}"}]},
        {"role": "tool", "tool_call_id": "c3", "content": "1pm"},
    ], None)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert json.loads(turns[1]["content"]) == [
        {"name": "get_weather", "parameters": {"city": "Paris"}},
        {"name": "get_time", "parameters": {}}]
    results = turns[2]["content"]
    assert results.count("```tool_output") == 2
    assert '{"name": "get_weather", "content": {"temp": 21}}' in results
    assert '{"name": "get_time", "content": "noon"}' in results
    assert results.endswith("Thanks. Anything else?")
    assert turns[3]["content"] == 'Sure.\n{"name": "get_time", "parameters": {}}'


def test_a_result_for_no_call_is_refused():
    with pytest.raises(InvalidRequest) as info:
        render_conversation([{"role": "user", "content": "x"},
                             {"role": "tool", "tool_call_id": "nope", "content": "1"}], None)
    assert info.value.param == "messages[1].tool_call_id"


@pytest.mark.parametrize("text, names", [
    ('{"name": "get_weather", "parameters": {"city": "Rome"}}', ["get_weather"]),
    ('  [{"name": "get_time", "parameters": {}}, {"name": "get_weather", '
     '"parameters": {"city": "X"}}]\n', ["get_time", "get_weather"]),
    ('```json\n{"name": "get_time", "arguments": {}}\n```', ["get_time"]),
    ('```tool_code\n{"name": "get_time", "parameters": {}}\n```', ["get_time"]),
])
def test_calls_are_found(text, names):
    calls = parse_calls(text, SPEC)
    assert [c.name for c in calls] == names
    assert all(c.id.startswith("call_") and json.loads(c.arguments) is not None for c in calls)
    assert len({c.id for c in calls}) == len(calls)


@pytest.mark.parametrize("text", [
    "The weather is fine.",
    '{"name": "unknown_fn", "parameters": {}}',
    '{"name": "get_time", "parameters": {}, "extra": 1}',
    '{"name": "get_time", "parameters": "x"}',
    '{"name": "get_time", "parameters": {}',  # truncated
    "[]",
])
def test_non_calls_are_not_calls(text):
    assert parse_calls(text, SPEC) is None


def test_several_calls_need_parallel():
    two = '[{"name": "get_time", "parameters": {}}, {"name": "get_time", "parameters": {}}]'
    assert parse_calls(two, ToolSpec((TIME,), "auto", None, False)) is None
    assert len(parse_calls(two, ToolSpec((TIME,), "auto", None, True))) == 2


def test_parser_streams_prose_at_once_and_holds_what_could_be_a_call():
    prose = ToolCallParser(SPEC)
    assert prose.feed("  ") == ""  # undecided
    assert prose.feed("Hello") == "  Hello"
    assert prose.feed(" world") == " world"
    assert prose.finish() == ("", [])
    call = ToolCallParser(SPEC)
    for piece in ['{"name": "get_', 'time", "param', 'eters": {}}']:
        assert call.feed(piece) == ""
    text, calls = call.finish()
    assert text == "" and [c.name for c in calls] == ["get_time"]
    json_answer = ToolCallParser(SPEC)
    assert json_answer.feed('{"answer": 42}') == ""
    assert json_answer.finish() == ('{"answer": 42}', [])  # not a call: content after all


def test_forced_parser_holds_everything():
    parser = ToolCallParser(ToolSpec((TIME,), "required"))
    assert parser.feed("Sure") == ""
    assert parser.finish() == ("Sure", [])


def _stream(parser: ToolCallParser, pieces: list[str]) -> tuple[str, list[list[CallDelta]]]:
    """Feed the pieces; (text shown, call deltas given out after each piece)."""
    shown, deltas = "", []
    for piece in pieces:
        text, calls = parser.feed_stream(piece)
        shown += text
        deltas.append(calls)
    return shown, deltas


def _assemble(deltas: list[list[CallDelta]]) -> list[tuple[str, str, str]]:
    calls: dict[int, list[str]] = {}
    for d in (d for step in deltas for d in step):
        if d.id is not None:
            assert d.index not in calls and d.arguments == ""  # the head comes first, once
            calls[d.index] = [d.id, d.name, ""]
        else:
            calls[d.index][2] += d.arguments
    return [tuple(c) for _, c in sorted(calls.items())]


def test_a_forced_call_streams_as_it_is_written():
    spec = ToolSpec((WEATHER, TIME), "required", None, True)
    parser = ToolCallParser(spec, stream_calls=True)
    pieces = ['{"name": "get_', 'weather", "parameters": ', '{"city', '": "Pa', 'ris \\"}{"}',
              '}']
    shown, deltas = _stream(parser, pieces)
    assert shown == ""
    assert deltas[0] == []  # the name is not complete yet
    assert deltas[1][0].name == "get_weather" and deltas[1][0].id.startswith("call_")
    assert [d.arguments for d in deltas[2] + deltas[3]] == ['{"city', '": "Pa']  # at once
    assert deltas[5] == []  # the call's closing brace is not part of its arguments
    [(call_id, name, args)] = _assemble(deltas)
    assert json.loads(args) == {"city": "Paris \"}{"}
    text, calls = parser.finish()
    assert text == "" and parser.calls_complete
    assert [(c.id, c.name, c.arguments) for c in calls] == [(call_id, name, args)]


def test_a_list_of_calls_streams_call_by_call():
    spec = ToolSpec((WEATHER, TIME), "required", None, True)
    parser = ToolCallParser(spec, stream_calls=True)
    text = ('[{"name": "get_time", "parameters": {}},\n {"name": "get_weather", '
            '"parameters": {"city": "Lima", "x": [1, {"y": "]"}]}}]')
    shown, deltas = _stream(parser, [text[i:i + 3] for i in range(0, len(text), 3)])
    calls = _assemble(deltas)
    assert [(n, json.loads(a)) for _, n, a in calls] == [
        ("get_time", {}), ("get_weather", {"city": "Lima", "x": [1, {"y": "]"}]})]
    assert len({i for i, _, _ in calls}) == 2 and parser.calls_complete


def test_auto_streams_a_call_only_once_the_grammar_trigger_matched():
    parser = ToolCallParser(SPEC, stream_calls=True, trigger_patterns=call_triggers(SPEC))
    shown, deltas = _stream(parser, ["{", '"name":', ' "get_time", "parameters": {', "}}"])
    assert shown == "" and _assemble(deltas)[0][1:] == ("get_time", "{}")
    assert parser.streams_calls
    # Prose streams as before; a call the trigger never saw (in a fence) comes at the end.
    prose = ToolCallParser(SPEC, stream_calls=True, trigger_patterns=call_triggers(SPEC))
    assert _stream(prose, ["It is", " noon."]) == ("It is noon.", [[], []])
    fenced = ToolCallParser(SPEC, stream_calls=True, trigger_patterns=call_triggers(SPEC))
    shown, deltas = _stream(fenced, ["```json\n", '{"name": "get_time", "parameters": {}}',
                                     "\n```"])
    assert shown == "" and deltas == [[], [], []] and not fenced.streams_calls
    assert [c.name for c in fenced.finish()[1]] == ["get_time"]
    # A JSON answer that is not a call is never streamed as one, and ends as content.
    answer = ToolCallParser(SPEC, stream_calls=True, trigger_patterns=call_triggers(SPEC))
    assert _stream(answer, ['{"na', 'me2": 1}']) == ("", [[], []])
    assert answer.finish() == ('{"name2": 1}', [])


def test_a_call_cut_short_is_not_complete():
    parser = ToolCallParser(ToolSpec((WEATHER,), "function", "get_weather"), stream_calls=True)
    _, deltas = _stream(parser, ['{"name": "get_weather", "parameters": {"city": "Li'])
    assert _assemble(deltas)[0][2] == '{"city": "Li'
    assert not parser.calls_complete
    assert parser.finish() == ("", [])  # no complete call


@pytest.mark.parametrize("spec, valid, invalid", [
    (ToolSpec((WEATHER, TIME), "required", None, True),
     [{"name": "get_time", "parameters": {}},
      [{"name": "get_weather", "parameters": {"city": "A"}}, {"name": "get_time",
                                                            "parameters": {}}]],
     [{"name": "get_weather", "parameters": {}}, [], {"name": "x", "parameters": {}}]),
    (ToolSpec((WEATHER, TIME), "required", None, False),
     [{"name": "get_time", "parameters": {}}],
     [[{"name": "get_time", "parameters": {}}]]),
    (ToolSpec((WEATHER, TIME), "function", "get_weather", True),
     [{"name": "get_weather", "parameters": {"city": "B"}}],
     [{"name": "get_time", "parameters": {}}]),
])
def test_call_schema_admits_exactly_the_wanted_calls(spec, valid, invalid):
    schema = call_schema(spec)
    for value in valid:
        jsonschema.validate(value, schema)
    for value in invalid:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(value, schema)
