"""JSON-schema `pattern` (a regular expression) to a GBNF rule for the JSON text of a string
that matches it.

llama-cpp-python's converter takes patterns only anchored at both ends, writes their
characters into the grammar unescaped (a `.` or `[^a]` may then produce a raw `"`, a
backslash or a control character: broken JSON, or a string whose value is not the one that
was matched) and mistranslates what it does not know. So the pattern is parsed here with
Python's own regular-expression parser and translated node by node, every character set
written as the JSON encodings of its members (`"` as `\\"`, a newline as `\\n`, ...); a
construct without an exact translation is refused, by name.

Semantics are those ECMA-262 (what JSON Schema names) and Python's `re` (what validators such
as `jsonschema` use) agree on; where they differ, the grammar allows only what both accept:
`\\d` is `[0-9]`, `\\w` is `[A-Za-z0-9_]`, `\\s` the white space both know, `\\D`, `\\W` and
`\\S` match ASCII characters only, and `.` is any character but a line terminator. A pattern
is a search, as JSON Schema says: without `^` (`$`) it may be preceded (followed) by anything.
"""

from __future__ import annotations

from re import _constants as C  # noqa: N812  (the regular-expression parser's node names)
from re import _parser

MAX_CODE = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)
ASCII = [(0, 0x7F)]
DIGIT = [(0x30, 0x39)]
WORD = [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)]
# White space that ECMA-262's \s and Python's \s both match.
SPACE = [(0x09, 0x0D), (0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
         (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000)]
LINE_TERMINATORS = [(0x0A, 0x0A), (0x0D, 0x0D), (0x2028, 0x2029)]
JSON_SHORT_ESCAPES = {0x08: "\\b", 0x09: "\\t", 0x0A: "\\n", 0x0C: "\\f", 0x0D: "\\r",
                      0x22: '\\"', 0x5C: "\\\\"}
MAX_PATTERN_REPEAT = 1000


class PatternError(ValueError):
    """The pattern cannot be enforced exactly; the message says what in it."""


def pattern_rule(pattern: str, any_char: str = "char") -> str:
    """A GBNF expression for the JSON-escaped content (quotes excluded) of a string that
    matches `pattern`; it may refer to the rule named `any_char` (any JSON string character,
    for what an unanchored pattern lets through before and after)."""
    try:
        parsed = _parser.parse(pattern, 0)
    except Exception as exc:  # re.error, and the parser's own limits
        raise PatternError(f"not a valid regular expression ({exc})") from None
    if parsed.state.flags & ~(C.SRE_FLAG_UNICODE):
        raise PatternError("inline flags such as (?i) are not supported")
    items = list(parsed)
    if len(items) == 1 and items[0][0] is C.BRANCH:
        branches = [list(b) for b in items[0][1][1]]
    else:
        branches = [items]
    return " | ".join(f"( {_top(b, any_char)} )" for b in branches)


def _top(items: list, any_char: str) -> str:
    start = bool(items) and items[0] == (C.AT, C.AT_BEGINNING)
    end = bool(items) and items[-1] == (C.AT, C.AT_END) and (len(items) > 1 or not start)
    body = items[int(start):len(items) - int(end)]
    parts = [] if start else [f"{any_char}*"]
    parts.append(_sequence(body))
    if not end:
        parts.append(f"{any_char}*")
    return " ".join(p for p in parts if p) or '""'


def _sequence(items) -> str:
    return " ".join(_node(op, av) for op, av in items) or '""'


def _node(op, av) -> str:
    if op is C.LITERAL:
        return _literal(av)
    if op is C.NOT_LITERAL:
        return _char_set(_complement([(av, av)]))
    if op is C.ANY:
        return _char_set(_complement(LINE_TERMINATORS))
    if op is C.IN:
        return _char_set(_in_set(av))
    if op is C.SUBPATTERN:
        group, add_flags, del_flags, sub = av
        if add_flags or del_flags:
            raise PatternError("inline flags such as (?i:...) are not supported")
        return f"( {_sequence(sub)} )"
    if op is C.BRANCH:
        return "( " + " | ".join(_sequence(b) for b in av[1]) + " )"
    if op in (C.MAX_REPEAT, C.MIN_REPEAT):  # lazy or greedy: the same strings match
        low, high, sub = av
        unbounded = high == C.MAXREPEAT
        if low > MAX_PATTERN_REPEAT or (not unbounded and high > MAX_PATTERN_REPEAT):
            raise PatternError(f"a repetition count above {MAX_PATTERN_REPEAT}")
        inner = f"( {_sequence(sub)} )"
        if (low, unbounded) == (0, True):
            return inner + "*"
        if (low, unbounded) == (1, True):
            return inner + "+"
        if (low, high) == (0, 1):
            return inner + "?"
        return inner + (f"{{{low},}}" if unbounded else f"{{{low},{high}}}")
    if op is C.AT:
        raise PatternError(f"the anchor or boundary {_describe_at(av)} is supported only as "
                           f"^ at the start and $ at the end")
    names = {C.GROUPREF: "back-references", C.ASSERT: "lookahead and lookbehind",
             C.ASSERT_NOT: "lookahead and lookbehind", C.GROUPREF_EXISTS: "conditionals",
             C.POSSESSIVE_REPEAT: "possessive quantifiers", C.ATOMIC_GROUP: "atomic groups"}
    raise PatternError(f"{names.get(op, str(op).lower())} are not supported")


def _describe_at(at) -> str:
    return {C.AT_BEGINNING: "^", C.AT_END: "$", C.AT_BOUNDARY: "\\b",
            C.AT_NON_BOUNDARY: "\\B", C.AT_BEGINNING_STRING: "\\A",
            C.AT_END_STRING: "\\Z"}.get(at, str(at))


def _in_set(items) -> list[tuple[int, int]]:
    negate = bool(items) and items[0][0] is C.NEGATE
    ranges: list[tuple[int, int]] = []
    for op, av in items[int(negate):]:
        if op is C.LITERAL:
            ranges.append((av, av))
        elif op is C.RANGE:
            ranges.append(av)
        elif op is C.CATEGORY:
            if negate:
                raise PatternError("\\d, \\w and \\s inside a negated class [^...] are not "
                                   "supported")
            ranges += _category(av)
        else:
            raise PatternError(f"{str(op).lower()} inside a character class is not supported")
    return _complement(ranges) if negate else _normalize(ranges)


def _category(cat) -> list[tuple[int, int]]:
    positive = {C.CATEGORY_DIGIT: DIGIT, C.CATEGORY_WORD: WORD, C.CATEGORY_SPACE: SPACE}
    negative = {C.CATEGORY_NOT_DIGIT: DIGIT, C.CATEGORY_NOT_WORD: WORD,
                C.CATEGORY_NOT_SPACE: SPACE}
    if cat in positive:
        return positive[cat]
    if cat in negative:
        return _intersect(_complement(negative[cat]), ASCII)
    raise PatternError(f"the class {cat} is not supported")


def _normalize(ranges) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


def _complement(ranges) -> list[tuple[int, int]]:
    out, at = [], 0
    for lo, hi in _normalize(ranges):
        if lo > at:
            out.append((at, lo - 1))
        at = max(at, hi + 1)
    if at <= MAX_CODE:
        out.append((at, MAX_CODE))
    return out


def _intersect(a, b) -> list[tuple[int, int]]:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return _normalize(out)


def _json_escape(code: int) -> str:
    """The JSON text of one character inside a string."""
    if code in JSON_SHORT_ESCAPES:
        return JSON_SHORT_ESCAPES[code]
    if code < 0x20:
        return f"\\u{code:04x}"
    return chr(code)


def _gbnf_literal(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if ch in '"\\':
            out.append("\\" + ch)
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _literal(code: int) -> str:
    if SURROGATES[0] <= code <= SURROGATES[1]:
        raise PatternError("surrogate code points are not supported")
    return _gbnf_literal(_json_escape(code))


def _class_char(code: int) -> str:
    if code < 0x20 or code in (0x5C, 0x5D, 0x5E, 0x2D, 0x22, 0x5B) or code == 0x7F:
        return f"\\x{code:02X}"
    if code > 0xFFFF:
        return f"\\U{code:08X}"
    if code > 0x7E:
        return f"\\u{code:04X}"
    return chr(code)


def _char_set(ranges) -> str:
    """A GBNF expression for one character of `ranges`, written as JSON string text: the
    characters JSON lets through raw in one class, `"`, backslash and control characters as
    their escapes."""
    # Raw in a JSON string: all but '"', '\\', U+0000..U+001F (and no surrogates).
    raw = _intersect(ranges, [(0x20, 0x21), (0x23, 0x5B), (0x5D, SURROGATES[0] - 1),
                              (SURROGATES[1] + 1, MAX_CODE)])
    alternatives = []
    if raw:
        alternatives.append("[" + "".join(
            _class_char(lo) if lo == hi else f"{_class_char(lo)}-{_class_char(hi)}"
            for lo, hi in raw) + "]")
    for code in [c for lo, hi in _intersect(ranges, [(0, 0x1F)]) for c in range(lo, hi + 1)] \
            + [c for c in (0x22, 0x5C) if _intersect(ranges, [(c, c)])]:
        alternatives.append(_gbnf_literal(_json_escape(code)))
    if not alternatives:
        raise PatternError("a character class that matches no character")
    return alternatives[0] if len(alternatives) == 1 else "( " + " | ".join(alternatives) + " )"
