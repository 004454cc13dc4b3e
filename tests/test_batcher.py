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
    return {rid: len(ids) for rid, _, ids, _, _ in updates if ids}


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
    while "u" in {s for s in b._active}:
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
    assert ("b", "", [], FINISH_CANCELLED, None) in updates
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
    assert failed[3] == "error" and "KV cache" in failed[4]
    assert b.num_active == 1
    ctx.close()
