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
    ({"type": "string", "pattern": "^a+$"}, "'pattern'"),
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
