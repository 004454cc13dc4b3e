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
import uuid
from dataclasses import dataclass
from typing import Any

from wicore_cpp.errors import InvalidRequest

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


class ToolCallParser:
    """Separates one choice's tool calls from its text as the text streams in.

    Text that cannot start a call streams through at once. Text that could (it begins with
    `{`, `[` or a code fence, after white space) is held until the choice ends and then
    becomes calls, or, if it is not a well-formed call, content after all. A forced call
    (`required`, a named function) is always held.
    """

    def __init__(self, spec: ToolSpec):
        self.spec = spec
        self._held: list[str] = []
        self._passing = False

    def feed(self, text: str) -> str:
        """Text to send now (possibly empty)."""
        if self._passing:
            return text
        self._held.append(text)
        if self.spec.is_forced:
            return ""
        start = "".join(self._held).lstrip()
        if not start or start[0] in "{[" or start.startswith("```") or "```".startswith(start):
            return ""
        self._passing = True
        out, self._held = "".join(self._held), []
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """At the end of the choice: (text not yet sent, calls)."""
        held, self._held = "".join(self._held), []
        if self._passing:
            return held, []
        calls = parse_calls(held, self.spec)
        if calls:
            return "", calls
        return held, []
