"""Tool calls for a model without tool tokens (Gemma 3): the prompt format, the shape a forced
call must have, and the parser that finds calls in the output.

Gemma 3's chat template knows only user and model turns, so tools are prompt engineering,
following Google's function-calling guidance for Gemma 3 (the JSON variant):

- The function list and the instructions go first in the system text (which Gemma's template
  folds into the first user turn)::

      You have access to functions. If you decide to invoke any of the function(s), you MUST
      put it in the format of
      {"name": function name, "parameters": dictionary of argument name and its value}
      [parallel]  To invoke several functions at once, put the calls in a JSON list: [...]
      [required]  You MUST invoke at least one of the functions. / [named] ... the function X.
      You SHOULD NOT include any other text in the response if you call a function
      [{"name": ..., "description": ..., "parameters": {...JSON schema...}}, ...]

- A call is the whole answer: `{"name": "f", "parameters": {...}}`, or a JSON list of such
  objects for several calls (also accepted inside a ```json / ```tool_code fence).
- An assistant turn that made calls is rendered the same way; tool results go back in the
  next user turn, one block each, as Google's Gemma guides wrap tool output::

      ```tool_output
      {"name": "f", "content": <the result: JSON when it parses, else a string>}
      ```

Pure Python: the front end renders and parses with it; the grammar for forced calls is built
from `call_schema` by the tokenizer helper.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from wicore_cpp.errors import InvalidRequest

log = logging.getLogger("wicore.tools")

CHOICES = ("none", "auto", "required", "function")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
_FENCES = ("```json", "```tool_code", "```tool_call", "```")


@dataclass(slots=True, frozen=True)
class ToolFunction:
    name: str
    description: str | None
    parameters: dict[str, Any] | None  # JSON schema of the arguments object


@dataclass(slots=True, frozen=True)
class ToolSpec:
    """The tools of a request and how it wants them used."""

    functions: tuple[ToolFunction, ...]
    choice: str = "auto"  # one of CHOICES; "function" means `named`
    named: str | None = None
    parallel: bool = True

    @property
    def is_forced(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def is_active(self) -> bool:
        return self.choice != "none" and bool(self.functions)


@dataclass(slots=True, frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text of the arguments object


# The lazy tool-call grammar (tool_choice "auto") takes over when the whole answer so far is
# the start of a call, exactly as the grammar would write it (so what llama.cpp replays into
# the grammar always fits it): `{"name": "` or `[{"name": "`, with the optional single
# spaces the grammar allows. The list form only where the grammar allows several calls: a
# replayed text the grammar refuses would abort the worker. llama.cpp matches them against
# the whole output after every token.
CALL_TRIGGER = r'^\s*(\{ ?"name" ?: ?"?)$'
CALLS_TRIGGER = r'^\s*(\[ ?\{ ?"name" ?: ?"?)$'


def call_triggers(spec: ToolSpec) -> tuple[str, ...]:
    """The trigger patterns of the lazy call grammar for `spec` (tool_choice "auto")."""
    return (CALL_TRIGGER, CALLS_TRIGGER) if spec.parallel else (CALL_TRIGGER,)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- prompt --------------------------------------------------------------------------------------


def instructions(spec: ToolSpec) -> str:
    """The tool block that goes first in the system text."""
    lines = [
        "You have access to functions. If you decide to invoke any of the function(s), you "
        "MUST put it in the format of",
        '{"name": function name, "parameters": dictionary of argument name and its value}',
    ]
    if spec.parallel and spec.choice != "function":
        lines.append('To invoke several functions at once, put the calls in a JSON list: '
                     '[{"name": ..., "parameters": ...}, ...]')
    if spec.choice == "required":
        lines.append("You MUST invoke at least one of the functions.")
    elif spec.choice == "function":
        lines.append(f"You MUST invoke the function {spec.named}.")
    lines.append("You SHOULD NOT include any other text in the response if you call a function")
    defs = [{"name": f.name, **({"description": f.description} if f.description else {}),
             "parameters": f.parameters or EMPTY_PARAMETERS} for f in spec.functions]
    lines.append(json.dumps(defs, ensure_ascii=False, indent=2))
    return "\n".join(lines)


def render_conversation(messages: list[dict[str, Any]],
                        spec: ToolSpec | None) -> list[dict[str, str]]:
    """OpenAI messages (assistant `tool_calls`, `role: "tool"` results) as the plain
    system/user/assistant turns a chat template renders, with the tool block when tools are in
    use. Raises InvalidRequest for a tool result that answers no call."""
    turns: list[list] = []  # [role, content, holds tool output]
    call_names: dict[str, str] = {}
    for i, m in enumerate(messages):
        role = m["role"]
        content = m.get("content") or ""
        # Tool results are a user turn; consecutive results, and a user message right after
        # them, share it, since Gemma's template wants user and model turns to alternate.
        after_results = bool(turns) and turns[-1][0] == "user" and turns[-1][2]
        if role == "tool":
            name = call_names.get(m.get("tool_call_id") or "")
            if name is None:
                raise InvalidRequest(
                    f"messages[{i}]: tool_call_id {m.get('tool_call_id')!r} answers no tool "
                    f"call of an earlier assistant message", param=f"messages[{i}].tool_call_id")
            if after_results:
                turns[-1][1] += "\n\n" + _tool_output(name, content)
            else:
                turns.append(["user", _tool_output(name, content), True])
        elif role == "user" and after_results:
            turns[-1][1] = _joined(turns[-1][1], content)
            turns[-1][2] = False
        elif role == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                call_names[call["id"]] = call["name"]
            text = _calls_text(m["tool_calls"])
            turns.append(["assistant", f"{content}\n{text}" if content else text, False])
        else:
            turns.append([role, content, False])
    if spec is not None and spec.is_active:
        block = instructions(spec)
        if turns and turns[0][0] == "system":
            turns[0][1] = f"{block}\n\n{turns[0][1]}"
        else:
            turns.insert(0, ["system", block, False])
    return [{"role": role, "content": content} for role, content, _ in turns]


def _joined(first: str | list, second: str | list) -> str | list:
    """Two turns' contents as one, a blank line between; a list of parts (a message with
    images) where either is one."""
    if isinstance(first, str) and isinstance(second, str):
        return f"{first}\n\n{second}"
    parts = ([{"type": "text", "text": first}] if isinstance(first, str) else list(first))
    rest = [{"type": "text", "text": second}] if isinstance(second, str) else list(second)
    if parts and rest and parts[-1]["type"] == rest[0]["type"] == "text":
        parts[-1] = {"type": "text", "text": f"{parts[-1]['text']}\n\n{rest[0]['text']}"}
        rest = rest[1:]
    return parts + rest


def _tool_output(name: str, content: str) -> str:
    try:
        value: Any = json.loads(content)
    except ValueError:
        value = content
    body = json.dumps({"name": name, "content": value}, ensure_ascii=False)
    return f"```tool_output\n{body}\n```"


def _calls_text(calls: list[dict[str, Any]]) -> str:
    objs = []
    for call in calls:
        try:
            args: Any = json.loads(call["arguments"] or "{}")
        except ValueError:
            args = call["arguments"]
        objs.append({"name": call["name"], "parameters": args})
    return json.dumps(objs[0] if len(objs) == 1 else objs, ensure_ascii=False)


# -- forced calls --------------------------------------------------------------------------------


def call_schema(spec: ToolSpec) -> dict[str, Any]:
    """The JSON schema a forced answer must follow (`required`: one call of any function, or a
    list of calls when parallel; a named function: one call of it). Its grammar is built by
    the tokenizer helper."""
    functions = [f for f in spec.functions if spec.choice != "function" or f.name == spec.named]
    one_of_each = [{
        "type": "object",
        "properties": {"name": {"const": f.name},
                       "parameters": f.parameters or EMPTY_PARAMETERS},
        "required": ["name", "parameters"],
    } for f in functions]
    one = one_of_each[0] if len(one_of_each) == 1 else {"anyOf": one_of_each}
    if spec.choice == "required" and spec.parallel:
        return {"anyOf": [one, {"type": "array", "items": one, "minItems": 1}]}
    return one


# -- parsing -------------------------------------------------------------------------------------


def parse_calls(text: str, spec: ToolSpec) -> list[ToolCall] | None:
    """The calls in an answer that is nothing but calls, or None if it is not one."""
    body = text.strip()
    for fence in _FENCES:
        if body.startswith(fence) and body.endswith("```") and len(body) > 2 * len(fence):
            body = body[len(fence):-3].strip()
            break
    try:
        value = json.loads(body)
    except ValueError:
        return None
    items = value if isinstance(value, list) else [value]
    if not items or (len(items) > 1 and not spec.parallel):
        return None
    names = {f.name for f in spec.functions}
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        args = item.get("parameters", item.get("arguments", {}))
        if not isinstance(args, dict) or set(item) - {"name", "parameters", "arguments"}:
            return None
        calls.append(ToolCall(new_call_id(), item["name"], json.dumps(args, ensure_ascii=False)))
    return calls


@dataclass(slots=True, frozen=True)
class CallDelta:
    """A piece of a streamed tool call: its head (`id` and `name` set, the call's first
    chunk) or a piece of its arguments' JSON text. `index` numbers the calls of a choice."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"parameters"\s*:\s*')
_MAX_HEAD = 400  # a head longer than this without matching is not one the grammar wrote


@dataclass(slots=True)
class _CallScanner:
    """Reads calls as the call grammar writes them, `{"name": "f", "parameters": {...}}` or a
    JSON list of them, as the text streams in: each call's head once its name is complete,
    then its arguments as they come. Only used where a grammar holds the text to that shape,
    so a deviation means the text was cut (or is not a call after all: `failed`)."""

    functions: frozenset[str]
    list_allowed: bool
    text: str = ""
    pos: int = 0
    state: str = "start"  # start, head, args, close, next, done, failed
    is_list: bool = False
    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    calls: list[ToolCall] = field(default_factory=list)  # complete calls
    args: list[str] = field(default_factory=list)  # the arguments of the call being read
    head: tuple[str, str] | None = None  # (id, name) of the call being read

    @property
    def num_started(self) -> int:
        return len(self.calls) + (self.head is not None)

    def feed(self, text: str) -> list[CallDelta]:
        self.text += text
        out: list[CallDelta] = []
        while self.state not in ("done", "failed"):
            if not self._step(out):
                break
        return out

    def _skip_space(self) -> bool:
        """Skip white space; False when the text ends first."""
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1
        return self.pos < len(self.text)

    def _step(self, out: list[CallDelta]) -> bool:
        """Advance one state; False when more text is needed."""
        if self.state == "start":
            if not self._skip_space():
                return False
            if self.text[self.pos] == "[" and self.list_allowed:
                self.is_list = True
                self.pos += 1
            self.state = "head"
        elif self.state == "head":
            match = _HEAD.match(self.text, self.pos)
            if match is None:
                if len(self.text) - self.pos > _MAX_HEAD:
                    self.state = "failed"
                return False
            name = json.loads(match.group(1))
            if name not in self.functions:
                self.state = "failed"
                return False
            self.head = (new_call_id(), name)
            self.args = []
            out.append(CallDelta(len(self.calls), self.head[0], name))
            self.pos = match.end()
            self.state, self.depth = "args", 0
        elif self.state == "args":
            if self.depth == 0 and not self.args and not self._skip_space():
                return False
            start = self.pos
            end = self._scan_value()
            piece = self.text[start:self.pos]
            if piece:
                self.args.append(piece)
                out.append(CallDelta(len(self.calls), arguments=piece))
            if not end:
                return False
            self.state = "close"
        elif self.state == "close":
            if not self._skip_space():
                return False
            if self.text[self.pos] != "}":
                self.state = "failed"
                return False
            self.pos += 1
            assert self.head is not None
            self.calls.append(ToolCall(self.head[0], self.head[1], "".join(self.args)))
            self.head = None
            self.state = "next" if self.is_list else "done"
        elif self.state == "next":
            if not self._skip_space():
                return False
            c = self.text[self.pos]
            self.pos += 1
            if c == ",":
                self.state = "head"
            elif c == "]":
                self.state = "done"
            else:
                self.state = "failed"
        return True

    def _scan_value(self) -> bool:
        """Move over the arguments object; True once it is closed."""
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            self.pos += 1
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return True
            elif self.depth == 0 and c not in " \t\r\n":
                self.state = "failed"  # the arguments must be an object
                return False
        return False


class ToolCallParser:
    """Separates one choice's tool calls from its text as the text streams in.

    Text that cannot start a call streams through at once. Text that could (it begins with
    `{`, `[` or a code fence, after white space) is held until the choice ends and then
    becomes calls, or, if it is not a well-formed call, content after all. A forced call
    (`required`, a named function) is always held.

    With `stream_calls`, calls are given out as they are written (`CallDelta`s, as OpenAI
    streams them) wherever a grammar guarantees that the text is a call: from the first
    token for a forced call, and for `auto` once the answer so far matches the lazy
    grammar's trigger (`trigger_patterns`; checked, as llama.cpp does, at every delta, which
    must then end on a token boundary: no stop strings). Elsewhere they come at the end.
    """

    def __init__(self, spec: ToolSpec, *, stream_calls: bool = False,
                 trigger_patterns: tuple[str, ...] = ()):
        self.spec = spec
        self._held: list[str] = []
        self._passing = False
        self._triggers = tuple(re.compile(p) for p in trigger_patterns) if stream_calls else ()
        self._scanner: _CallScanner | None = None
        if stream_calls and spec.is_forced:
            self._scanner = self._new_scanner()

    def _new_scanner(self) -> _CallScanner:
        names = frozenset(f.name for f in self.spec.functions
                          if self.spec.choice != "function" or f.name == self.spec.named)
        return _CallScanner(names, self.spec.parallel and self.spec.choice != "function")

    @property
    def calls_complete(self) -> bool:
        """Whether the streamed calls were written to their end."""
        return self._scanner is not None and self._scanner.state == "done"

    @property
    def streams_calls(self) -> bool:
        """Whether calls are being given out as they are written."""
        return self._scanner is not None

    def feed(self, text: str) -> str:
        """Text to send now (possibly empty). Without `stream_calls`."""
        shown, _ = self.feed_stream(text)
        return shown

    def feed_stream(self, text: str) -> tuple[str, list[CallDelta]]:
        """Text to send now (possibly empty) and pieces of calls to send now."""
        if self._passing:
            return text, []
        self._held.append(text)
        if self._scanner is None and self._triggers:
            held = "".join(self._held)
            if any(t.fullmatch(held) for t in self._triggers):
                self._scanner = self._new_scanner()
                self._held = [held]
                return "", self._scanner.feed(held)
        if self._scanner is not None:
            deltas = self._scanner.feed(text)
            if self._scanner.state == "failed":
                self._scanner_failed()
            return "", deltas
        if self.spec.is_forced:
            return "", []
        start = "".join(self._held).lstrip()
        if not start or start[0] in "{[" or start.startswith("```") or "```".startswith(start):
            return "", []
        self._passing = True
        out, self._held = "".join(self._held), []
        return out, []

    def _scanner_failed(self) -> None:
        scanner = self._scanner
        assert scanner is not None
        if scanner.num_started == 0:
            self._scanner = None  # nothing was sent: hold it, and decide at the end
            self._triggers = ()
        else:
            log.warning("a streamed tool call did not go on as a call; the rest is dropped")

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the choice: (text not yet sent, calls). When calls were streamed,
        the calls are those complete (already sent) and no text is left."""
        held, self._held = "".join(self._held), []
        if self._scanner is not None:
            return "", list(self._scanner.calls)
        if self._passing:
            return held, []
        calls = parse_calls(held, self.spec)
        if calls:
            return "", calls
        return held, []
