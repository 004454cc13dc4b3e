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

from wicore_cpp.engine.schema_pattern import PatternError, pattern_rule
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
    "format", "pattern", "minLength", "maxLength",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
})
TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
STRING_FORMATS = frozenset({"date", "time", "date-time", "uuid"})
# One way of constraining a string per schema: the converter would keep one and drop the rest.
STRING_CONSTRAINTS = (("pattern",), ("format",), ("minLength", "maxLength"))

# Calendar dates, exactly: no 0000 (not a date for Python), no February 30, February 29 only
# in leap years (the converter's rule lets any day 01-31 through).
DATE_RULES = {  # in dependency order; {name} is the rule of that name
    "date-year": '[1-9] [0-9] [0-9] [0-9] | "0" [1-9] [0-9] [0-9] | "00" [1-9] [0-9] '
                 '| "000" [1-9]',
    # A nonzero multiple of 4 in two digits; a leap year ends in one, or is one followed by 00.
    "date-yy4": '[02468] [48] | [13579] [26] | [2468] "0"',
    "date-leap-year": '[0-9] [0-9] {date-yy4} | {date-yy4} "00"',
    "date-day28": '"0" [1-9] | "1" [0-9] | "2" [0-8]',
    "date": '{date-year} "-" ( ("01" | "03" | "05" | "07" | "08" | "10" | "12") "-" '
            '( {date-day28} | "29" | "30" | "31" ) | ("04" | "06" | "09" | "11") "-" '
            '( {date-day28} | "29" | "30" ) | "02-" {date-day28} ) '
            '| {date-leap-year} "-02-29"',
    "time": '([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9] [0-9] '
            '[0-9] )? ( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )',
}
FORMAT_RULES = {"date": "{date}", "time": "{time}", "date-time": '{date} "T" {time}'}

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
    _Checker(param, schema).visit(schema, "#", 0)


class _Checker:
    def __init__(self, param: str, root: Any):
        self.param = param
        self.root = root
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
        used = [group[0] for group in STRING_CONSTRAINTS if any(k in node for k in group)]
        if len(used) > 1:
            self.fail(f"{path}: {' and '.join(used)} together are not supported (one of "
                      f"pattern, format, minLength/maxLength per string)")
        if "oneOf" in node and isinstance(node["oneOf"], list):
            self.check_exclusive(node["oneOf"], f"{path}/oneOf")

    def check_exclusive(self, branches: list, where: str) -> None:
        """oneOf wants exactly one branch to match: enforced as anyOf, that holds only when no
        value can match two branches, which is proved here or the schema is refused."""
        for i in range(len(branches)):
            for j in range(i + 1, len(branches)):
                if not _disjoint(self.resolve(branches[i]), self.resolve(branches[j]),
                                 self.resolve):
                    self.fail(f"{where}: branches {i} and {j} may both match a value, so "
                              f"'oneOf' (exactly one) cannot be enforced; make them "
                              f"disjoint (different types, or a required property with "
                              f"different const/enum values) or use anyOf")

    def resolve(self, node: Any, seen: int = 0) -> Any:
        """A subschema with its local `$ref` followed (None if it cannot be)."""
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and seen < 32:
            target: Any = self.root
            for part in node["$ref"].removeprefix("#").split("/")[1:]:
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    return None
                target = target[part]
            node, seen = target, seen + 1
        return node

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
        elif key == "pattern":
            if not isinstance(value, str):
                self.fail(f"{where} must be a string")
            try:
                pattern_rule(value)
            except PatternError as exc:
                self.fail(f"pattern {json.dumps(value)[:80]} (at {where}): {exc}")
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
            plain = not ({"enum", "const", "anyOf", "oneOf", "$ref"} & schema.keys())
            if plain and schema_type in (None, "string") and "pattern" in schema:
                char = self._add_rule("char", JSON_CHAR_RULE)
                try:
                    content = pattern_rule(schema["pattern"], char)
                except PatternError as exc:
                    raise ValueError(f"pattern: {exc}") from None
                return self._add_rule(name or "root", f'"\\"" ( {content} ) "\\"" space')
            if plain and schema_type in (None, "string") and schema.get("format") in FORMAT_RULES:
                # The rules' names are those the converter gives them (a property may have
                # taken "date" already).
                names: dict[str, str] = {}
                for rule, body in DATE_RULES.items():
                    names[rule] = self._add_rule(rule, _fill(body, names))
                body = _fill(FORMAT_RULES[schema["format"]], names)
                return self._add_rule(name or "root", f'"\\"" ( {body} ) "\\"" space')
            if schema_type == "integer" and "enum" not in schema and "const" not in schema:
                low, high = _integer_bounds(schema)
                if low is not None or high is not None:
                    rule_name = name or "root"
                    return self._add_rule(rule_name, f"({integer_range_rule(low, high)}) space")
            return super().visit(schema, name)

    return Converter


def _fill(body: str, names: dict[str, str]) -> str:
    for rule, actual in names.items():
        body = body.replace("{" + rule + "}", actual)
    return body


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


# -- oneOf: proving that no value matches two branches ------------------------------------------

# The kinds of JSON values; "integer" and "fraction" together are JSON Schema's "number".
_KINDS_OF_TYPE = {"object": {"object"}, "array": {"array"}, "string": {"string"},
                  "boolean": {"boolean"}, "null": {"null"}, "integer": {"integer"},
                  "number": {"integer", "fraction"}}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer"
    if isinstance(value, float):
        return "fraction"
    return {str: "string", list: "array", dict: "object"}[type(value)]


def _values(schema: Any) -> list | None:
    """The values a schema allows when it lists them (const, enum), else None."""
    if isinstance(schema, dict):
        if "const" in schema:
            return [schema["const"]]
        if isinstance(schema.get("enum"), list):
            return schema["enum"]
    return None


def _kinds(schema: Any, resolve) -> set[str] | None:
    """The kinds of values that may validate against `schema`; None when any may."""
    schema = resolve(schema)
    if not isinstance(schema, dict):
        return None
    kinds: set[str] | None = None
    values = _values(schema)
    if values is not None:
        kinds = {_kind(v) for v in values}
    t = schema.get("type")
    if isinstance(t, (str, list)):
        declared = set().union(*(_KINDS_OF_TYPE.get(x, set()) for x in
                                 (t if isinstance(t, list) else [t])))
        kinds = declared if kinds is None else kinds & declared
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            union: set[str] = set()
            for branch in schema[key]:
                sub = _kinds(branch, resolve)
                if sub is None:
                    break
                union |= sub
            else:
                kinds = union if kinds is None else kinds & union
    return kinds


def _value_key(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 1.0 and 1 are the same JSON Schema value
    return f"{_kind(value)}:{json.dumps(value, sort_keys=True)}"


def _disjoint(a: Any, b: Any, resolve, depth: int = 0) -> bool:
    """True only if no JSON value validates against both schemas (False: not proved)."""
    a, b = resolve(a), resolve(b)
    if depth > MAX_DEPTH or not isinstance(a, dict) or not isinstance(b, dict):
        return False
    for one, other in ((a, b), (b, a)):
        for key in ("anyOf", "oneOf"):
            if isinstance(one.get(key), list) and all(
                    _disjoint(branch, other, resolve, depth + 1) for branch in one[key]):
                return True
    kinds_a, kinds_b = _kinds(a, resolve), _kinds(b, resolve)
    if kinds_a is not None and kinds_b is not None and not kinds_a & kinds_b:
        return True
    values_a, values_b = _values(a), _values(b)
    if values_a is not None and values_b is not None and not (
            {_value_key(v) for v in values_a} & {_value_key(v) for v in values_b}):
        return True
    if kinds_a == {"object"} and kinds_b == {"object"}:
        # A discriminating property: required on both sides, never the same value.
        props_a, props_b = a.get("properties") or {}, b.get("properties") or {}
        shared = set(a.get("required") or []) & set(b.get("required") or [])
        for name in sorted(shared):
            if name in props_a and name in props_b and _disjoint(
                    props_a[name], props_b[name], resolve, depth + 1):
                return True
    return False
