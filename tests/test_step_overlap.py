"""The worker's step loop (engine/worker.serve_steps) on real llama.cpp (demo model): the order
of decodes and sends with and without overlap.

On this CPU-only machine llama_decode is synchronous, so overlap cannot make anything faster
here; what is tested is the order a GPU needs (step N's results leave after step N+1's decode
was launched and before step N+2's), that nothing is lost or delayed past the last step, and
that both orders produce the same tokens.
"""

from __future__ import annotations

from multiprocessing import Pipe

import pytest

from wicore_cpp.engine.backend import BatchContext, Model
from wicore_cpp.engine.batcher import ContinuousBatcher
from wicore_cpp.engine.messages import GenerateRequest, SamplingParams, Shutdown
from wicore_cpp.engine.queue import Priority
from wicore_cpp.engine.worker import serve_steps


@pytest.fixture(scope="module")
def model(demo_model_path):
    m = Model(demo_model_path)
    yield m
    m.close()


def serve(model, overlap: bool) -> tuple[list[str], dict[str, list[int]]]:
    """Two greedy requests through serve_steps, Shutdown once both have ended; the events in
    order ("decode", "send") and each request's tokens."""
    ctx = BatchContext(model, n_ctx=2048, n_batch=64, n_seq_max=2, threads=2, flash_attn="off",
                       backend_sampling=True)
    batcher = ContinuousBatcher(model, ctx)
    events: list[str] = []
    decode = ctx.decode

    def traced_decode() -> int:
        events.append("decode")
        return decode()

    ctx.decode = traced_decode
    tokens: dict[str, list[int]] = {}
    ended: set[str] = set()
    ours, theirs = Pipe()

    def send(updates, cache_report) -> None:
        events.append("send")
        for rid, _, _, ids, finish, _, _ in updates:
            tokens.setdefault(rid, []).extend(ids)
            if finish is not None:
                ended.add(rid)
        if ended == {"a", "b"}:
            theirs.send(Shutdown())

    for rid, text in (("a", "Tell me about the sea."), ("b", "What is a hash table?")):
        prompt = model.tokenize(f"<start_of_turn>user\n{text}<end_of_turn>\n"
                                "<start_of_turn>model\n", add_special=True)
        theirs.send(GenerateRequest(rid, prompt, SamplingParams(max_tokens=12, temperature=0),
                                    int(Priority.NORMAL)))
    try:
        serve_steps(batcher, ours, send, overlap=overlap)
    finally:
        ctx.close()
    return events, tokens


def test_without_overlap_each_step_is_sent_before_the_next_decode(model):
    events, tokens = serve(model, overlap=False)
    assert events[:2] == ["decode", "send"]
    assert all(events[i] == "decode" for i in range(0, len(events), 2))
    assert all(events[i] == "send" for i in range(1, len(events), 2))
    assert sorted(tokens) == ["a", "b"] and len(tokens["a"]) == 12


def test_with_overlap_a_step_is_sent_while_the_next_one_decodes(model):
    events, tokens = serve(model, overlap=True)
    # decode 1, decode 2, send 1, decode 3, send 2, ..., decode K, send K-1, send K
    assert events[:3] == ["decode", "decode", "send"]
    assert events[-2:] == ["send", "send"]  # the last step's results go at once
    middle = events[1:-1]
    assert middle == ["decode", "send"] * (len(middle) // 2)
    assert events.count("send") == events.count("decode")
    _, in_order = serve(model, overlap=False)
    assert tokens == in_order
