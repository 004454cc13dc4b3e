"""The in-worker continuous batcher on real llama.cpp (demo model), one step at a time."""

from __future__ import annotations

import pytest

from wicore_cpp.engine.backend import BatchContext, Model
from wicore_cpp.engine.batcher import ContinuousBatcher
from wicore_cpp.engine.messages import FINISH_CANCELLED, GenerateRequest, SamplingParams
from wicore_cpp.engine.queue import Priority


@pytest.fixture(scope="module")
def model(demo_model_path):
    m = Model(demo_model_path)
    yield m
    m.close()


def make_ctx(model, n_seq_max=4, n_batch=64, n_ctx=4096):
    return BatchContext(model, n_ctx=n_ctx, n_batch=n_batch, n_seq_max=n_seq_max, threads=2,
                        flash_attn="off")


def request(model, rid, text="Tell me about the sea.", max_tokens=50, priority=Priority.NORMAL):
    prompt = model.tokenize(f"<start_of_turn>user\n{text}<end_of_turn>\n<start_of_turn>model\n",
                            add_special=True)
    return GenerateRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0),
                           int(priority))


def tokens_by_request(updates) -> dict[str, int]:
    return {rid: len(ids) for rid, _, _, ids, _, _, _ in updates if ids}


def test_urgent_sequence_pauses_the_newest_normal_one(model):
    ctx = make_ctx(model, n_seq_max=3)
    b = ContinuousBatcher(model, ctx, max_batch_size=2)
    b.submit(request(model, "n1"))
    b.submit(request(model, "n2"))
    b.step()  # both prefill and produce a first token
    b.submit(request(model, "u", priority=Priority.URGENT))
    for _ in range(3):
        produced = tokens_by_request(b.step())
        assert b.num_active == 3
        assert "n2" not in produced  # paused: never more than max_batch_size per step
    assert set(produced) == {"n1", "u"}
    while "u" in {rid for rid, _ in b._active}:
        b.step()
    assert "n2" in tokens_by_request(b.step())  # resumes once the urgent one is done
    ctx.close()


def test_long_prompt_is_chunked_while_running_streams_keep_decoding(model):
    ctx = make_ctx(model, n_batch=64)
    b = ContinuousBatcher(model, ctx)
    b.submit(request(model, "short", max_tokens=40))
    b.step()
    b.submit(request(model, "long", text="word " * 300, max_tokens=5))
    prefill_steps = 0
    while True:
        produced = tokens_by_request(b.step())
        assert produced.get("short") == 1  # a token every step, prefill or not
        assert ctx.batch_size <= 64
        if "long" in produced:
            break
        prefill_steps += 1
    assert prefill_steps >= 4  # ~310 prompt tokens through a 64-token batch
    ctx.close()


def test_finished_and_cancelled_sequences_free_slot_and_kv(model):
    ctx = make_ctx(model, n_seq_max=2)
    b = ContinuousBatcher(model, ctx)
    b.submit(request(model, "a", max_tokens=3))
    b.submit(request(model, "b", max_tokens=500))
    b.step()
    assert b.num_active == 2 and ctx.pos_max(0) > 0 and ctx.pos_max(1) > 0
    while b.num_active == 2:
        b.step()
    assert ctx.pos_max(0) == -1  # "a" finished: its cells are gone
    b.cancel("b")
    updates = b.step()
    assert ("b", 0, "", [], FINISH_CANCELLED, None, None) in updates
    assert b.is_idle and ctx.pos_max(1) == -1
    # Both slots are free again.
    b.submit(request(model, "c", max_tokens=2))
    b.submit(request(model, "d", max_tokens=2))
    b.step()
    assert b.num_active == 2
    ctx.close()


def test_request_that_cannot_fit_the_kv_pool_fails_alone(model):
    ctx = make_ctx(model, n_ctx=256)
    b = ContinuousBatcher(model, ctx)
    b.submit(request(model, "huge", max_tokens=1000))
    b.submit(request(model, "ok", max_tokens=3))
    updates = b.step()
    (failed,) = [u for u in updates if u[0] == "huge"]
    assert failed[4] == "error" and "KV cache" in failed[5]
    assert b.num_active == 1
    ctx.close()


# -- constrained sequences, n choices --------------------------------------------------------


def grammar_of(schema) -> str:
    from wicore_cpp.engine.schema_grammar import schema_to_grammar

    return schema_to_grammar(schema)


def run_all(model, requests, n_seq_max=8, **batcher_args) -> tuple[dict, dict]:
    """Run `requests` together in one batcher to the end: tokens and (finish reason, error)
    per (request, choice)."""
    ctx = make_ctx(model, n_seq_max=n_seq_max)
    b = ContinuousBatcher(model, ctx, **batcher_args)
    for req in requests:
        b.submit(req)
    out: dict[tuple[str, int], list[int]] = {}
    finished: dict[tuple[str, int], tuple] = {}
    for _ in range(2000):
        for rid, index, _, ids, finish, error, _ in b.step():
            out.setdefault((rid, index), []).extend(ids)
            if finish is not None:
                finished[(rid, index)] = (finish, error)
        if b.is_idle:
            break
    ctx.close()
    assert b.is_idle
    return out, finished


def constrained(model, rid, schema=None, max_tokens=120, **params):
    req = request(model, rid, max_tokens=max_tokens)
    grammar = grammar_of(schema) if schema is not None else None
    return GenerateRequest(rid, req.prompt_tokens,
                           SamplingParams(max_tokens=max_tokens, temperature=0, grammar=grammar,
                                          **params), req.priority)


SCHEMAS = {
    "enum": {"type": "object", "properties": {"a": {"enum": ["x", "yy", "zzz"]},
                                              "b": {"type": "integer", "minimum": 3,
                                                    "maximum": 999}},
             "required": ["a", "b"]},
    "array": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    "nested": {"type": "object", "properties": {"o": {"type": "object", "properties": {
        "s": {"type": "string", "maxLength": 5}}, "required": ["s"]}}, "required": ["o"]},
}


def test_grammar_and_plain_sequences_share_a_batch_without_cross_talk(model):
    import json

    requests = [constrained(model, name, schema) for name, schema in SCHEMAS.items()]
    requests += [constrained(model, "plain1", max_tokens=40),
                 constrained(model, "plain2", max_tokens=40)]
    together, finished = run_all(model, requests)
    for req in requests:
        alone, _ = run_all(model, [req])
        assert together[(req.request_id, 0)] == alone[(req.request_id, 0)], req.request_id
    for name, schema in SCHEMAS.items():
        assert finished[(name, 0)] == ("stop", None)
        text = b"".join(model.piece(t) for t in together[(name, 0)]).decode()
        value = json.loads(text)
        import jsonschema

        jsonschema.validate(value, schema)
    # The plain ones are not JSON-shaped by a neighbour's grammar.
    assert together[("plain1", 0)] == together[("plain2", 0)]


def test_n_choices_prefill_once_and_share_the_prompt_cells(model):
    ctx = make_ctx(model, n_seq_max=4)
    b = ContinuousBatcher(model, ctx)
    base = request(model, "r", max_tokens=6)
    b.submit(GenerateRequest("r", base.prompt_tokens,
                             SamplingParams(max_tokens=6, temperature=0, n=3), 1))
    updates = b.step()
    assert b.num_active == 3 and sorted(k[1] for k in b._active) == [0, 1, 2]
    assert {u[1] for u in updates} == {0, 1, 2}  # all three sampled from the one prefill
    n_prompt = len(base.prompt_tokens)
    assert [ctx.pos_max(s) for s in range(3)] == [n_prompt - 1] * 3
    tokens = {i: [] for i in range(3)}
    for u in updates:
        tokens[u[1]] += u[3]
    while not b.is_idle:
        for u in b.step():
            tokens[u[1]] += u[3]
    ctx.close()
    alone, _ = run_all(model, [constrained(model, "r", max_tokens=6)])
    assert tokens[0] == tokens[1] == tokens[2] == alone[("r", 0)]
    assert b._reserved == 0 and len(b._free_slots) == 4


def test_n_choices_cancelled_during_prefill_all_end(model):
    ctx = make_ctx(model, n_seq_max=4, n_batch=16)
    b = ContinuousBatcher(model, ctx)
    req = request(model, "r", text="word " * 100, max_tokens=5)
    b.submit(GenerateRequest("r", req.prompt_tokens,
                             SamplingParams(max_tokens=5, temperature=0, n=3), 1))
    b.step()  # prefilling: only choice 0 exists
    assert b.num_active == 1
    b.cancel("r")
    ends = [(u[1], u[4]) for u in b.step()]
    assert sorted(ends) == [(0, "cancelled"), (1, "cancelled"), (2, "cancelled")]
    assert b.is_idle and len(b._free_slots) == 4 and b._reserved == 0
    ctx.close()


def test_grammar_step_budget_bounds_the_search(model):
    """A grammar whose only allowed token is among the least likely: found by the chunked
    search within the budget; with no budget the request fails alone, the worker goes on."""
    (rare,) = model.tokenize("量", add_special=False)
    byte_tokens = [6 + b for b in "量".encode()]  # <0xXX> pieces spell it too
    bias = tuple((t, -100.0) for t in [rare, *byte_tokens])
    req = GenerateRequest("rare", request(model, "rare").prompt_tokens, SamplingParams(
        max_tokens=4, temperature=0, logit_bias=bias, grammar='root ::= "量"'), 1)
    out, finished = run_all(model, [req, constrained(model, "plain", max_tokens=5)])
    assert b"".join(model.piece(t) for t in out[("rare", 0)]).decode() == "量"
    assert finished[("rare", 0)] == ("stop", None)
    out, finished = run_all(model, [req, constrained(model, "plain", max_tokens=5)],
                            grammar_budget_s=0.0)
    reason, error = finished[("rare", 0)]
    assert reason == "error" and "too complex" in error
    assert finished[("plain", 0)][1] is None and out[("plain", 0)]


def test_a_grammar_llama_cpp_refuses_fails_its_request_only(model):
    bad = GenerateRequest("bad", request(model, "bad").prompt_tokens,
                          SamplingParams(max_tokens=3, temperature=0, grammar="root ::= ("), 1)
    out, finished = run_all(model, [bad, constrained(model, "ok", max_tokens=3)])
    assert finished[("bad", 0)][0] == "error" and "grammar" in finished[("bad", 0)][1]
    assert len(out[("ok", 0)]) == 3
