"""JSON schemas to llama.cpp grammars (GBNF), for `response_format` and forced tool calls.

llama-cpp-python ships llama.cpp's JSON-schema-to-GBNF converter (`llama_cpp.llama_grammar`).
It quietly drops what it cannot express (a `minimum`, a `required` name missing from
`properties`, the keywords beside a list of types), fails with bare asserts, and lets raw
control characters into strings (invalid JSON). So a schema is first checked here against
what is enforced, and refused with the keyword and its place when it asks for more; the
converter is extended where it falls short (strings without control characters, integer
ranges, keywords beside a list of types, a one-element `allOf`); and the grammar it writes
is bounded in size. What is enforced is listed in the README ("Structured output").

Runs in the tokenizer helper process: importing the converter loads llama.cpp, which the
front end never does.
"""

from __future__ import annotations

import json
import math
from typing import Any

from wicore_cpp.errors import UnsupportedValue

# Keywords that describe but do not constrain: accepted and ignored by design.
ANNOTATIONS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
    "readOnly", "writeOnly", "discriminator", "$defs", "definitions",
})
KEYWORDS = frozenset({
    "type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref",
    "properties", "required", "additionalProperties",
    "items", "prefixItems", "minItems", "maxItems",
    "format", "minLength", "maxLength",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
STRING_FORMATS = frozenset({"date", "time", "date-time", "uuid"})

# Bounds that keep a grammar's size, its parse (recursive, in C) and its cost per step sane.
MAX_DEPTH = 32
MAX_NODES = 2000
MAX_REPEAT = 1000  # minLength, maxLength, minItems, maxItems
MAX_ENUM = 1000
MAX_GRAMMAR_CHARS = 200_000
# Integers without a bound on one side stop at 15 digits, as the converter's own rule does.
MAX_INT = 10**15 - 1

# A JSON string character: no raw control characters (RFC 8259), unlike the converter's rule.
JSON_CHAR_RULE = (
    r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] '
    r'[0-9a-fA-F])'
)


def check_schema(schema: Any, param: str) -> None:
    """Refuse (UnsupportedValue naming the keyword and where it is) anything the grammar
    could not enforce, and anything past the size bounds above."""
    _Checker(param).visit(schema, "#", 0)


class _Checker:
    def __init__(self, param: str):
        self.param = param
        self.num_nodes = 0

    def fail(self, message: str) -> None:
        raise UnsupportedValue(f"JSON schema: {message}", param=self.param)

    def visit(self, node: Any, path: str, depth: int) -> None:
        self.num_nodes += 1
        if self.num_nodes > MAX_NODES:
            self.fail(f"more than {MAX_NODES} subschemas")
        if depth > MAX_DEPTH:
            self.fail(f"nested deeper than {MAX_DEPTH} levels at {path}")
        if node is True:
            return
        if not isinstance(node, dict):
            self.fail(f"{path} must be an object (a schema), not {json.dumps(node)[:40]}")
        for key, value in node.items():
            where = f"{path}/{key}"
            if key in ("$defs", "definitions"):
                if not isinstance(value, dict):
                    self.fail(f"{where} must be an object")
                for name, sub in value.items():
                    self.visit(sub, f"{where}/{name}", depth + 1)
            elif key in ANNOTATIONS:
                continue
            elif key not in KEYWORDS:
                self.fail(f"'{key}' (at {where}) is not supported; see the README for the "
                          f"keywords that are enforced")
            else:
                self.check_keyword(node, key, value, where, depth)

    def check_keyword(self, node: dict, key: str, value: Any, where: str, depth: int) -> None:
        if key == "type":
            types = value if isinstance(value, list) else [value]
            if not types or any(t not in TYPES for t in types):
                self.fail(f"{where}: unknown type {json.dumps(value)}")
            if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & node.keys() \
                    and "number" in types:
                self.fail(f"{where}: minimum and maximum are enforced for integers only, "
                          f"not for numbers")
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                self.fail(f"{where} must be a non-empty array")
            if key == "allOf" and len(value) > 1:
                self.fail(f"{where}: allOf is supported with one subschema only")
            for i, sub in enumerate(value):
                self.visit(sub, f"{where}/{i}", depth + 1)
        elif key in ("items", "additionalProperties"):
            if isinstance(value, bool):
                if key == "items" and value is False:
                    self.fail(f"{where}: items: false is not supported")
                return
            self.visit(value, where, depth + 1)
        elif key == "properties":
            if not isinstance(value, dict):
                self.fail(f"{where} must be an object")
            for name, sub in value.items():
                self.visit(sub, f"{where}/{name}", depth + 1)
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                self.fail(f"{where} must be an array of property names")
            missing = [v for v in value if v not in node.get("properties", {})]
            if missing:
                self.fail(f"{where}: required property '{missing[0]}' is not in properties")
        elif key == "enum":
            if not isinstance(value, list) or not value or len(value) > MAX_ENUM:
                self.fail(f"{where} must be an array of 1 to {MAX_ENUM} values")
        elif key == "$ref":
            if not isinstance(value, str) or not value.startswith("#/"):
                self.fail(f"{where}: only local references ('#/...') are supported")
        elif key == "format":
            if value not in STRING_FORMATS:
                self.fail(f"{where}: format '{value}' is not supported "
                          f"(supported: {', '.join(sorted(STRING_FORMATS))})")
        elif key in ("minLength", "maxLength", "minItems", "maxItems"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                self.fail(f"{where} must be a non-negative integer")
            if value > MAX_REPEAT:
                self.fail(f"{where} above {MAX_REPEAT} is not supported")
        elif key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                self.fail(f"{where} must be a number")
            if node.get("type") != "integer" and not (
                    isinstance(node.get("type"), list) and "integer" in node["type"]):
                self.fail(f"{where}: minimum and maximum are enforced for integers only")


def schema_to_grammar(schema: Any) -> str:
    """GBNF for values of `schema` (checked with `check_schema` first). Raises
    UnsupportedValue when the converter cannot express it or the grammar is too large."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = _extended_converter(SchemaConverter)(
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(schema if schema is not True else {}, "input")
        converter.visit(resolved, "")
    except (AssertionError, ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise UnsupportedValue(f"JSON schema: cannot be turned into a grammar ({exc})") from None
    grammar = converter.format_grammar()
    if len(grammar) > MAX_GRAMMAR_CHARS:
        raise UnsupportedValue(f"JSON schema: its grammar would be {len(grammar)} characters, "
                               f"more than {MAX_GRAMMAR_CHARS}; simplify it")
    return grammar


def _extended_converter(base: type) -> type:
    """llama-cpp-python's converter, with what it lacks (see the module docstring)."""

    class Converter(base):
        def _add_primitive(self, name: str, rule):
            if name == "char":
                return self._add_rule("char", JSON_CHAR_RULE)
            return super()._add_primitive(name, rule)

        def visit(self, schema: dict, name: str) -> str:
            schema_type = schema.get("type")
            if isinstance(schema_type, list):
                # Each type keeps the other keywords (the converter drops them).
                rest = {k: v for k, v in schema.items() if k != "type"}
                return super().visit({"anyOf": [{**rest, "type": t} for t in schema_type]}, name)
            if "allOf" in schema and len(schema["allOf"]) == 1:
                merged = {k: v for k, v in schema.items() if k != "allOf"}
                return self.visit({**schema["allOf"][0], **merged}, name)
            if schema_type == "integer" and "enum" not in schema and "const" not in schema:
                low, high = _integer_bounds(schema)
                if low is not None or high is not None:
                    rule_name = name or "root"
                    return self._add_rule(rule_name, f"({integer_range_rule(low, high)}) space")
            return super().visit(schema, name)

    return Converter


def _integer_bounds(schema: dict) -> tuple[int | None, int | None]:
    low = high = None
    if "minimum" in schema:
        low = math.ceil(schema["minimum"])
    if "exclusiveMinimum" in schema:
        value = schema["exclusiveMinimum"]
        bound = math.floor(value) + 1
        low = bound if low is None else max(low, bound)
    if "maximum" in schema:
        high = math.floor(schema["maximum"])
    if "exclusiveMaximum" in schema:
        value = schema["exclusiveMaximum"]
        bound = math.ceil(value) - 1
        high = bound if high is None else min(high, bound)
    return low, high


def integer_range_rule(low: int | None, high: int | None) -> str:
    """A GBNF alternation matching exactly the JSON integers in [low, high] (no leading
    zeros, no "-0"). A missing bound stops at 15 digits. Raises UnsupportedValue for an empty
    range."""
    low = -MAX_INT if low is None else max(low, -MAX_INT)
    high = MAX_INT if high is None else min(high, MAX_INT)
    if low > high:
        raise UnsupportedValue("JSON schema: an integer range that no value satisfies")
    alternatives: list[str] = []
    if low < 0:
        # Negative part [low, min(high, -1)]: "-" and the magnitudes.
        for alt in _naturals(max(1, -min(high, -1)), -low):
            alternatives.append(f'"-" {alt}')
    if high >= 0:
        alternatives += _naturals(max(low, 0), high)
    return " | ".join(alternatives)


def _naturals(low: int, high: int) -> list[str]:
    """GBNF sequences matching the decimal numbers in [low, high], 0 <= low <= high."""
    out: list[str] = []
    while low <= high:
        width = len(str(low))
        top = min(high, 10**width - 1)  # the rest of this digit count
        out += _same_width(str(low), str(top))
        low = top + 1
    return out


def _same_width(low: str, high: str) -> list[str]:
    if low == high:
        return [f'"{low}"']
    if len(low) == 1:
        return [f"[{low}-{high}]"]
    rest = len(low) - 1
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        first = low[0] if low[0] == high[0] else f"[{low[0]}-{high[0]}]"
        first = f'"{first}"' if low[0] == high[0] else first
        return [" ".join([first] + ["[0-9]"] * rest)]
    if low[0] == high[0]:
        return [f'"{low[0]}" {alt}' for alt in _same_width(low[1:], high[1:])]
    out = [f'"{low[0]}" {alt}' for alt in _same_width(low[1:], "9" * rest)]
    a, b = int(low[0]) + 1, int(high[0]) - 1
    if a <= b:
        digit = f'"{a}"' if a == b else f"[{a}-{b}]"
        out.append(" ".join([digit] + ["[0-9]"] * rest))
    out += [f'"{high[0]}" {alt}' for alt in _same_width("0" * rest, high[1:])]
    return out
