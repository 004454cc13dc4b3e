"""The lazy tool-call grammar of `tool_choice: "auto"`: free text until the answer starts as a
call, then the call is held to its schema. llama.cpp replays the text that triggered it into
the grammar and aborts the process if the grammar refuses it, so the trigger patterns must only
ever match text the grammar accepts. Driven with real tokens, however they split the call,
in a child process (an abort would otherwise take pytest down)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import ROOT
from wicore_cpp.engine.tool_calls import ToolFunction, ToolSpec

SPEC = ToolSpec((ToolFunction("get_time", None, {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}),
    ToolFunction("get_weather", None, None)), "auto", None, True)
CALL = '{"name": "get_time", "parameters": {"zone": "UTC"}}'


def drive(model_path: str) -> None:
    """Child: feed calls split every way into the lazy grammar; print what it allowed."""
    import llama_cpp as lc

    from wicore_cpp.engine.backend import Model, init_grammar
    from wicore_cpp.engine.client import _constraint
    from wicore_cpp.engine.schema_grammar import schema_to_grammar

    model = Model(__import__("pathlib").Path(model_path), vocab_only=True)
    spec = _constraint(SPEC, None)
    grammar = schema_to_grammar(spec["schema"])

    # One token per character (later ids win: normal pieces over <0xXX> byte tokens).
    by_piece = {model.piece(i): i for i in range(model.info.n_vocab)}

    def char_tokens(text: str) -> list[int]:
        return [by_piece[ch.encode()] for ch in text]

    cases = {
        "tokenizer": model.tokenize(CALL, add_special=False),
        "chars": char_tokens(CALL),
        "newline first": char_tokens("\n  " + CALL),
        "list": char_tokens("[" + CALL + "]"),
        "prose": char_tokens("It is noon."),
        # Two spaces: not how the grammar writes a call, so neither trigger nor mirror fire.
        "loose": char_tokens('{  "name": "get_time"'),
    }
    report = {}
    triggers = [re.compile(p) for p in spec["grammar_triggers"]]
    (stray,) = char_tokens("Q")
    for name, tokens in cases.items():
        sampler = init_grammar(model, grammar, spec["grammar_triggers"])
        one = (lc.llama_token_data * 1)()

        def allows(token: int) -> bool:
            one[0].id, one[0].logit, one[0].p = token, 0.0, 0.0
            lc.llama_sampler_apply(sampler, lc.llama_token_data_array(one, 1, -1, False))
            return one[0].logit != float("-inf")

        allowed = []
        # The front end's mirror of the trigger (ToolCallParser streams calls once it fired):
        # whenever it has fired, the grammar must hold the text (a stray letter is refused).
        text, fired, mirror_sound = "", False, True
        for t in tokens:
            ok = allows(t)
            allowed.append(ok)
            if not ok:
                break
            lc.llama_sampler_accept(sampler, t)
            text += model.piece(t).decode("utf-8", "replace")
            fired = fired or any(p.fullmatch(text) for p in triggers)
            if fired and allows(stray):
                mirror_sound = False
        # Once triggered, the grammar constrains: a stray letter is refused.
        report[name] = {"all_allowed": all(allowed), "stray_allowed": allows(stray),
                        "mirror_fired": fired, "mirror_sound": mirror_sound}
        lc.llama_sampler_free(sampler)
    print(json.dumps(report))  # noqa: T201 - the report goes to the parent test on stdout


def test_triggers_only_ever_replay_text_the_grammar_accepts(demo_model_path):
    out = subprocess.run(
        [sys.executable, "-c", f"from tests.test_lazy_tool_grammar import drive; "
                               f"drive({str(demo_model_path)!r})"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]  # an abort would be -6
    report = json.loads(out.stdout.strip().splitlines()[-1])
    for case in ("tokenizer", "chars", "newline first", "list"):
        assert report[case]["all_allowed"], case
        # After a complete call only the end of generation is allowed.
        assert not report[case]["stray_allowed"], case
    # Prose never triggers: the grammar stays out of the way.
    for case in ("prose", "loose"):
        assert report[case] == {"all_allowed": True, "stray_allowed": True,
                                "mirror_fired": False, "mirror_sound": True}, case
    # The front end's mirror of the trigger fired for every call, and only ever where the
    # grammar had taken over: streaming a call from there on is safe.
    for case in ("tokenizer", "chars", "newline first", "list"):
        assert report[case]["mirror_fired"] and report[case]["mirror_sound"], case
