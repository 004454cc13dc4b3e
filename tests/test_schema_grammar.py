"""JSON schema -> GBNF: what is refused (and named), integer ranges, and grammars llama.cpp
compiles (pure, plus llama.cpp's grammar parser on the demo vocabulary)."""

from __future__ import annotations

import re

import pytest

from wicore_cpp.engine.schema_grammar import (
    MAX_DEPTH,
    MAX_REPEAT,
    check_schema,
    integer_range_rule,
    schema_to_grammar,
)
from wicore_cpp.errors import UnsupportedValue

RICH = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "kind": {"enum": ["cat", "dog", 3, None]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "weight": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "owner": {"$ref": "#/$defs/person"},
        "born": {"type": "string", "format": "date"},
        "note": {"type": ["string", "null"], "maxLength": 4},
        "mood": {"anyOf": [{"type": "boolean"}, {"const": "meh"}]},
        "wrapped": {"allOf": [{"$ref": "#/$defs/person"}], "description": "pydantic style"},
    },
    "required": ["name", "kind", "age"],
    "additionalProperties": False,
    "$defs": {"person": {"type": "object", "properties": {"first": {"type": "string"}},
                         "required": ["first"], "title": "Person"}},
}


def test_supported_schema_passes_the_check_and_compiles(vocab_model):
    check_schema(RICH, "p")
    grammar = schema_to_grammar(RICH)
    assert "root ::=" in grammar
    # Strings never admit raw control characters (they would not be JSON).
    assert r"\x00-\x1F" in grammar
    import llama_cpp as lc

    from wicore_cpp.engine.backend import init_grammar
    lc.llama_sampler_free(init_grammar(vocab_model, grammar))


@pytest.mark.parametrize("schema, named", [
    ({"type": "string", "pattern": "^(?=a)b$"}, "lookahead"),
    ({"type": "string", "pattern": "^(a)\\1$"}, "back-references"),
    ({"type": "string", "pattern": "(?i)abc"}, "inline flags"),
    ({"type": "string", "pattern": "a\\bc"}, "\\b is supported only"),
    ({"type": "string", "pattern": "^a{2000}$"}, "repetition count above 1000"),
    ({"type": "string", "pattern": "^[^\\d]$"}, "negated class"),
    ({"type": "string", "pattern": "^(a$"}, "not a valid regular expression"),
    ({"type": "string", "pattern": "^a+$", "maxLength": 3}, "pattern and minLength together"),
    ({"type": "string", "format": "date", "maxLength": 3}, "format and minLength together"),
    ({"oneOf": [{"type": "number"}, {"type": "integer"}]}, "branches 0 and 1 may both match"),
    ({"oneOf": [{"type": "string"}, {"type": "object"}, {}]}, "branches 0 and 2 may both"),
    ({"oneOf": [{"const": 1}, {"const": 1.0}]}, "may both match"),
    ({"oneOf": [{"properties": {"k": {"const": "a"}}, "required": ["k"]},
                {"properties": {"k": {"const": "b"}}, "required": ["k"]}]},
     "may both match"),  # without "type": "object", any string matches both
    ({"oneOf": [{"type": "object", "properties": {"k": {"const": "a"}}},
                {"type": "object", "properties": {"k": {"const": "b"}}}]},
     "may both match"),  # k not required: {} matches both
    ({"type": "number", "minimum": 0}, "integers only"),
    ({"minimum": 1}, "integers only"),
    ({"type": "string", "format": "email"}, "format 'email'"),
    ({"type": "object", "properties": {"a": {"not": {}}}}, "'not' (at #/properties/a/not)"),
    ({"type": "object", "patternProperties": {}}, "'patternProperties'"),
    ({"type": "array", "uniqueItems": True}, "'uniqueItems'"),
    ({"type": "object", "minProperties": 1}, "'minProperties'"),
    ({"if": {}, "then": {}}, "'if'"),
    ({"type": "object", "properties": {}, "required": ["x"]}, "required property 'x'"),
    ({"$ref": "https://example.com/s.json"}, "local references"),
    ({"type": "strnig"}, "unknown type"),
    ({"type": "string", "maxLength": MAX_REPEAT + 1}, "maxLength above"),
    ({"type": "array", "minItems": 5000}, "minItems above"),
    ({"allOf": [{"type": "object"}, {"type": "object"}]}, "allOf"),
    ({"enum": []}, "enum"),
    (False, "must be an object"),
])
def test_what_the_grammar_cannot_enforce_is_refused_by_name(schema, named):
    with pytest.raises(UnsupportedValue) as info:
        check_schema(schema, "response_format.json_schema.schema")
    err = info.value
    assert named in err.message
    assert err.param == "response_format.json_schema.schema"
    assert err.to_dict()["error"]["code"] == "unsupported_value"


def test_adversarial_sizes_are_refused_before_any_grammar_exists():
    deep: dict = {"type": "string"}
    for _ in range(MAX_DEPTH + 5):
        deep = {"type": "object", "properties": {"x": deep}}
    with pytest.raises(UnsupportedValue, match="nested deeper"):
        check_schema(deep, "p")
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    with pytest.raises(UnsupportedValue, match="more than 2000 subschemas"):
        check_schema(wide, "p")


@pytest.mark.parametrize("schema", [
    {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
    {"oneOf": [{"type": "integer"}, {"type": "boolean"}]},
    {"oneOf": [{"const": "a"}, {"enum": ["b", 1]}, {"type": "array"}]},
    {"$defs": {"cat": {"type": "object", "properties": {"kind": {"const": "cat"}},
                       "required": ["kind"]},
               "dog": {"type": "object", "properties": {"kind": {"enum": ["dog", "wolf"]},
                                                         "bark": {"type": "boolean"}},
                       "required": ["kind", "bark"]}},
     "oneOf": [{"$ref": "#/$defs/cat"}, {"$ref": "#/$defs/dog"}]},
    {"oneOf": [{"anyOf": [{"type": "string"}, {"type": "null"}]}, {"type": "number"}]},
])
def test_one_of_with_disjoint_branches_is_accepted(schema):
    check_schema(schema, "p")
    schema_to_grammar(schema)


def _as_regex(rule: str) -> re.Pattern:
    """Our integer rules use only literals, classes, sequences and `|`."""
    alternatives = []
    for alt in rule.split(" | "):
        parts = []
        for item in alt.split(" "):
            parts.append(re.escape(item[1:-1]) if item.startswith('"') else item)
        alternatives.append("".join(parts))
    return re.compile("(?:" + "|".join(alternatives) + ")")


@pytest.mark.parametrize("low, high", [
    (0, 0), (0, 9), (1, 10), (7, 123), (-5, 5), (-120, -7), (10, 99), (100, 1000),
    (-1000, -999), (199, 201), (0, 10**4), (35, 35),
])
def test_integer_ranges_match_exactly_the_range(low, high):
    pattern = _as_regex(integer_range_rule(low, high))
    for v in range(low - 150, high + 150):
        assert bool(pattern.fullmatch(str(v))) == (low <= v <= high), v
    for bad in ("01", "-0", "+1", "00"):
        assert not pattern.fullmatch(bad)


def test_integer_ranges_with_one_bound():
    at_least = _as_regex(integer_range_rule(18, None))
    assert at_least.fullmatch("18") and at_least.fullmatch("123456789")
    assert not at_least.fullmatch("17") and not at_least.fullmatch("-3")
    at_most = _as_regex(integer_range_rule(None, -2))
    assert at_most.fullmatch("-2") and at_most.fullmatch("-99999")
    assert not at_most.fullmatch("-1") and not at_most.fullmatch("0")
    with pytest.raises(UnsupportedValue):
        integer_range_rule(5, 4)


def test_exclusive_bounds_and_float_bounds_on_integers():
    grammar = schema_to_grammar({"type": "integer", "exclusiveMinimum": 1, "maximum": 3.5})
    rule = grammar.split("root ::= ")[1].split("\n")[0]
    pattern = _as_regex(rule.removeprefix("(").removesuffix(") space"))
    assert [v for v in range(-3, 8) if pattern.fullmatch(str(v))] == [2, 3]


@pytest.fixture(scope="module")
def vocab_model(demo_model_path):
    from wicore_cpp.engine.backend import Model

    model = Model(demo_model_path, vocab_only=True)
    yield model
    model.close()


# -- pattern and format: llama.cpp's own grammar engine, fed byte by byte ------------------------


def _byte_tokens(vocab_model) -> dict[int, int]:
    """Byte -> the vocabulary's byte-fallback token for it (`<0x41>`)."""
    import llama_cpp as lc

    out = {}
    for token in range(lc.llama_vocab_n_tokens(vocab_model.vocab)):
        text = vocab_model.token_text(token)
        if re.fullmatch(r"<0x[0-9A-F]{2}>", text):
            out[int(text[3:5], 16)] = token
    assert len(out) == 256
    return out


def _accepts(vocab_model, grammar: str, text: str) -> bool:
    """Whether llama.cpp's grammar sampler lets exactly `text` through and then lets the
    answer end (the demo vocabulary has a token for every byte)."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    from wicore_cpp.engine.backend import init_grammar

    byte_token = _byte_tokens(vocab_model)

    sampler = init_grammar(vocab_model, grammar)
    one = (lc.llama_token_data * 1)()

    def allowed(token: int) -> bool:
        one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
        lc.llama_sampler_apply(sampler, ctypes.byref(lc.llama_token_data_array(one, 1, -1,
                                                                               False)))
        return one[0].logit != -np.inf

    try:
        for byte in text.encode():
            if not allowed(byte_token[byte]):
                return False
            lc.llama_sampler_accept(sampler, byte_token[byte])
        return allowed(lc.llama_vocab_eos(vocab_model.vocab))
    finally:
        lc.llama_sampler_free(sampler)


PATTERN_CASES = [
    # (pattern, strings that match it, strings that do not)
    ("^[a-z]{2,4}$", ["ab", "abcd"], ["a", "abcde", "aB", ""]),
    ("^\\d{3}-\\d{4}$", ["555-1234"], ["5551234", "55-12345"]),
    ("^(foo|bar)?x$", ["x", "foox", "barx"], ["foobarx", "fox"]),
    ("ab", ["ab", "xaby", "a\nab\"\\"], ["a", "ba"]),  # unanchored: a search
    ("^ab", ["ab", "abzz"], ["zab"]),
    ("ab$", ["ab", "zzab"], ["abz"]),
    ("^a|b$", ["a", "azz", "zzb"], ["za", "bz"]),
    ('^[^"]+$', ["x", "\u00e9\\"], ["\"", "a\"b"]),
    ("^.$", ["x", "\"", "\\", "\t"], ["\n", "xy"]),
    ("^\\w+@\\w+\\.com$", ["me@ex.com", "a_1@b.com"], ["me@ex.org", "m e@ex.com"]),
    ("^\\S\\s\\D$", ["a b", "a\tx"], ["a bc", "1 23", "a 1"]),
    ("^$", [""], ["a"]),
    ("^a*?b+?$", ["b", "aab", "abbb"], ["a", ""]),
    ("^[\\[\\]\\-^]+$", ["[]-^"], ["a"]),
    ("^\u91cf{2}$", ["\u91cf\u91cf"], ["\u91cf"]),
]


@pytest.mark.parametrize("pattern, good, bad", PATTERN_CASES)
def test_patterns_are_enforced_exactly(vocab_model, pattern, good, bad):
    """What the grammar lets through is exactly what Python's `re.search` (jsonschema's
    check) accepts, among these strings; and every string comes out as valid JSON."""
    import json

    schema = {"type": "string", "pattern": pattern}
    check_schema(schema, "p")
    grammar = schema_to_grammar(schema)
    for value, expected in [(v, True) for v in good] + [(v, False) for v in bad]:
        text = json.dumps(value, ensure_ascii=False)
        assert bool(re.search(pattern, value)) == expected, (pattern, value)
        assert _accepts(vocab_model, grammar, text) == expected, (pattern, text)


def test_where_ecma_and_python_differ_only_what_both_accept_is_let_through(vocab_model):
    digits = schema_to_grammar({"type": "string", "pattern": "^\\d+$"})
    assert re.search("^\\d+$", "٣٣")  # Python's \d: any decimal digit; ECMA-262's: 0-9
    assert _accepts(vocab_model, digits, '"42"') and not _accepts(vocab_model, digits, '"٣٣"')
    not_word = schema_to_grammar({"type": "string", "pattern": "^\\W$"})
    assert _accepts(vocab_model, not_word, '"-"') and not _accepts(vocab_model, not_word, '"é"')
    dot = schema_to_grammar({"type": "string", "pattern": "^.$"})
    assert re.search("^.$", "\r")  # Python's . takes a carriage return, ECMA-262's does not
    assert not _accepts(vocab_model, dot, '"\\r"') and _accepts(vocab_model, dot, '"\\t"')


def test_pattern_strings_are_valid_json_even_where_the_pattern_allows_quotes(vocab_model):
    grammar = schema_to_grammar({"type": "string", "pattern": "^.+$"})
    assert not _accepts(vocab_model, grammar, '"a"b"')  # a raw quote would end the string
    assert not _accepts(vocab_model, grammar, '"a\\qb"')  # not a JSON escape
    assert not _accepts(vocab_model, grammar, '"a\x01"')  # raw control character
    assert _accepts(vocab_model, grammar, '"a\\"b\\u0001"')


@pytest.mark.parametrize("fmt, good, bad", [
    ("date", ["2024-02-29", "2000-02-29", "1999-12-31", "0001-01-01", "2023-04-30"],
     ["2023-02-29", "1900-02-29", "2023-02-30", "2023-04-31", "0000-01-01", "2023-13-01",
      "2023-1-01"]),
    ("time", ["23:59:59Z", "00:00:00.123+05:30"], ["24:00:00Z", "12:00:00", "12:60:00Z"]),
    ("date-time", ["2024-02-29T12:00:00Z", "1999-01-31T00:00:00-01:00"],
     ["2023-02-29T12:00:00Z", "2024-02-29 12:00:00Z"]),
    ("uuid", ["123e4567-e89b-12d3-a456-426614174000"], ["123e4567e89b12d3a456426614174000"]),
])
def test_formats_are_enforced_exactly(vocab_model, fmt, good, bad):
    import datetime
    import uuid

    grammar = schema_to_grammar({"type": "string", "format": fmt})
    for value in good:
        if fmt == "date":
            datetime.date.fromisoformat(value)  # what jsonschema's format check does
        elif fmt == "uuid":
            uuid.UUID(value)
        assert _accepts(vocab_model, grammar, f'"{value}"'), value
    for value in bad:
        assert not _accepts(vocab_model, grammar, f'"{value}"'), value


def test_a_property_named_like_a_format_rule_does_not_break_it(vocab_model):
    schema = {"type": "object", "properties": {
        "date": {"type": "string", "format": "date"},
        "char": {"type": "string", "pattern": "^x+$"},
        "time": {"type": "integer"}}, "required": ["date", "char", "time"],
        "additionalProperties": False}
    grammar = schema_to_grammar(schema)
    assert _accepts(vocab_model, grammar, '{"date": "2024-02-29", "char": "xx", "time": 3}')
    assert not _accepts(vocab_model, grammar, '{"date": "2023-02-29", "char": "xx", "time": 3}')


@pytest.mark.parametrize("pattern, text, expected", [
    ("^(a|a)*b$", "a" * 40 + "b", True),  # ambiguous alternation: llama.cpp merges the stacks
    ("^(a?){30}a{30}$", "a" * 45, True),  # the classic exponential backtracking case
    ("^(x+x+)+y$", "x" * 40 + "y", True),
    ("^(x+x+)+y$", "x" * 40, False),
])
def test_patterns_built_to_hurt_stay_cheap(vocab_model, pattern, text, expected):
    """Backtracking regex engines blow up on these; the grammar keeps one stack per distinct
    state, so they run in a blink (a hang here would hang the test)."""
    grammar = schema_to_grammar({"type": "string", "pattern": pattern})
    assert _accepts(vocab_model, grammar, f'"{text}"') == expected


def test_nested_stars_neither_loop_nor_fail(vocab_model):
    """`(a*)*` can match the empty string in infinitely many ways: llama.cpp's stack
    expansion keeps a seen-set, so it compiles, matches, and ends."""
    grammar = schema_to_grammar({"type": "string", "pattern": "^(a*)*$"})
    assert _accepts(vocab_model, grammar, '"aaa"') and _accepts(vocab_model, grammar, '""')
    assert not _accepts(vocab_model, grammar, '"ab"')
