"""The prompt cache inside a worker, on real llama.cpp: reused KV must change nothing but the
time to first token.

Every test compares greedy tokens with the cache against the same requests without it (F32
demo model, flash attention off: see conftest), and checks how many prompt tokens the cache
gave. The sliding-window tests use a copy of the demo model whose window is 32 tokens, so that
prompts of a few hundred tokens move the window far past the positions a reuse needs.
"""

from __future__ import annotations

import pytest

from tests.conftest import load_make_model
from wicore_cpp.engine.backend import BatchContext, Model
from wicore_cpp.engine.batcher import ContinuousBatcher
from wicore_cpp.engine.messages import (
    FINISH_CANCELLED,
    FINISH_ERROR,
    GenerateRequest,
    SamplingParams,
)
from wicore_cpp.engine.prompt_cache import common_prefix

WORDS = ("the quick brown fox jumps over the lazy dog while a small cat sleeps near the river "
         "and people walk to the city to buy bread water and good books about science").split()


def text(seed: int, n_words: int) -> str:
    """Deterministic filler text; different seeds differ from their first word."""
    return " ".join(WORDS[(seed * 7 + i * (seed + 3)) % len(WORDS)] for i in range(n_words))


@pytest.fixture(scope="module")
def model(demo_model_path):
    m = Model(demo_model_path)
    yield m
    m.close()


@pytest.fixture(scope="module")
def swa_model(tmp_path_factory):
    path = load_make_model().write_model(tmp_path_factory.mktemp("swa") / "swa32-f32.gguf",
                                         "demo-swa32", dtype="f32")
    m = Model(path)
    assert m.n_swa == 32
    yield m
    m.close()


class Harness:
    """A batcher on its own context; runs requests to the end and keeps what they produced."""

    def __init__(self, model: Model, *, cache: bool = True, n_ctx: int = 4096, n_batch: int = 64,
                 max_running: int = 4, cache_seqs: int = 4, host_bytes: int = 0):
        self.model = model
        self.ctx = BatchContext(model, n_ctx=n_ctx, n_batch=n_batch,
                                n_seq_max=max_running + (cache_seqs if cache else 0),
                                threads=2, flash_attn="off")
        self.batcher = ContinuousBatcher(model, self.ctx, max_running=max_running,
                                         cache_cells=n_ctx if cache else 0,
                                         cache_host_bytes=host_bytes)
        self.cached: dict[str, int] = {}
        self.tokens: dict[str, list[int]] = {}
        self.finish: dict[str, tuple[str, str | None]] = {}
        self._n = 0

    @property
    def cache(self):
        return self.batcher.cache

    def submit(self, prompt: list[int], max_tokens: int = 24, cache_prompt: bool = True,
               rid: str | None = None) -> str:
        self._n += 1
        rid = rid or f"r{self._n}"
        params = SamplingParams(max_tokens=max_tokens, temperature=0, cache_prompt=cache_prompt)
        self.batcher.submit(GenerateRequest(rid, prompt, params))
        self.tokens[rid] = []
        return rid

    def step(self) -> None:
        for rid, _choice, _, ids, finish, error, _logprobs in self.batcher.step():
            self.tokens[rid].extend(ids)
            if finish is not None:
                self.finish[rid] = (finish, error)
        report = self.cache.take_report()
        if report is not None:
            self.cached.update(report.cached_tokens)

    def run(self, prompt: list[int], max_tokens: int = 24, **kw) -> list[int]:
        rid = self.submit(prompt, max_tokens, **kw)
        self.drain()
        return self.tokens[rid]

    def drain(self) -> None:
        while not self.batcher.is_idle:
            self.step()

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def harness():
    made: list[Harness] = []

    def make(model, **kw) -> Harness:
        h = Harness(model, **kw)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def user_turn(model: Model, history: list[int], user: str) -> list[int]:
    """`history` (tokens of the conversation so far, ending with a model turn or empty) plus a
    user turn and the start of the model's, tokenized the way the chat template renders it."""
    return history + model.tokenize(
        f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n",
        add_special=not history)


def reply_tokens(model: Model, generated: list[int]) -> list[int]:
    """What the next turn's prompt holds for a reply: its text re-tokenized, then the end of
    the turn (as a client resends it: tokens it generated need not come back the same)."""
    reply = b"".join(model.piece(t) for t in generated).decode("utf-8", errors="replace")
    return model.tokenize(f"{reply}<end_of_turn>\n", add_special=False)


# -- reuse gives the same tokens -----------------------------------------------------------------


@pytest.mark.parametrize("cache_seqs", [4, 0])
def test_repeated_prompt_reuses_all_but_its_last_token(model, harness, cache_seqs):
    """Also with no sequence ids of the cache's own (what the memory fit gives up first): the
    finished sequence stays in its idle decode slot."""
    plain, cached = harness(model, cache=False), harness(model, cache_seqs=cache_seqs)
    prompt = user_turn(model, [], text(1, 80))
    first = cached.run(prompt)
    assert cached.cached["r1"] == 0
    second = cached.run(prompt)
    assert cached.cached["r2"] == len(prompt) - 1
    assert first == second == plain.run(prompt)
    stats = cached.cache.stats()
    assert stats.hits == 1 and stats.tokens_reused == len(prompt) - 1


def test_next_turn_of_a_conversation_starts_after_the_previous_one(model, harness):
    plain, cached = harness(model, cache=False), harness(model)
    history: list[int] = []
    previous: list[int] = []
    for turn in range(3):
        prompt = user_turn(model, history, text(10 + turn, 30))
        got = cached.run(prompt)
        want = plain.run(prompt)
        assert got == want, f"turn {turn}"
        rid = f"r{turn + 1}"
        if turn:
            # At least the previous turn's prompt; more when the reply re-tokenized the same.
            assert len(previous) - 1 <= cached.cached[rid] < len(prompt)
        previous = prompt
        history = prompt + reply_tokens(model, got)


def test_conversations_sharing_a_system_prompt(model, harness):
    plain, cached = harness(model, cache=False), harness(model)
    system = text(3, 120)
    prompts = [user_turn(model, [], f"{system}\n\n{text(20 + i, 12)}") for i in range(3)]
    shared = common_prefix(prompts[0], prompts[1], len(prompts[0]))
    assert shared > 100
    for i, prompt in enumerate(prompts):
        assert cached.run(prompt) == plain.run(prompt)
        if i:
            assert cached.cached[f"r{i + 1}"] == max(
                common_prefix(p, prompt, len(prompt) - 1) for p in prompts[:i])
    # The second request pinned the point where the prompts part: the third reuses it.
    assert any(e.is_pin and len(e.tokens) == shared for e in cached.cache._entries.values())


def test_requests_arriving_together_compute_their_shared_prefix_once(model, harness):
    """Requests with one system prompt submitted at once: the first computes it, the others
    wait for it (an unrelated request behind them does not) and start from its pin."""
    plain = harness(model, cache=False)
    cached = harness(model, n_batch=64)
    system = text(16, 150)
    prompts = [user_turn(model, [], f"{system}\n\n{text(90 + i, 10)}") for i in range(3)]
    other = user_turn(model, [], text(95, 40))
    rids = [cached.submit(p) for p in [*prompts, other]]
    cached.step()
    assert cached.batcher.num_active == 2  # the first and the unrelated one
    cached.drain()
    shared = common_prefix(prompts[0], prompts[1], len(prompts[0]))
    assert shared > 140
    assert [cached.cached[r] for r in rids] == [0, shared, shared, 0]
    for rid, p in zip(rids, [*prompts, other], strict=True):
        assert cached.tokens[rid] == plain.run(p)


def test_concurrent_requests_with_the_cache_get_the_tokens_they_get_alone(model, harness):
    plain, cached = harness(model, cache=False), harness(model)
    system = text(4, 90)
    prompts = [user_turn(model, [], f"{system}\n\n{text(30 + i, 10)}") for i in range(6)]
    cached.run(prompts[0])  # warm: the others share its beginning
    rids = [cached.submit(p) for p in prompts]
    cached.drain()
    for rid, prompt in zip(rids, prompts, strict=True):
        assert cached.tokens[rid] == plain.run(prompt)
    assert cached.cache.stats().hits >= 5


def test_choices_of_a_request_start_from_a_cached_prefix_and_are_cached(model, harness):
    """A request with n choices reuses the cached prompt once, fans out from there, and each
    choice is cached when it ends (the same prompt again finds them)."""
    plain, cached = harness(model, cache=False), harness(model)
    prompt = user_turn(model, [], text(15, 80))
    cached.run(prompt)

    def choices(h: Harness) -> list[list[int]]:
        h._n += 1
        rid = f"n{h._n}"
        h.batcher.submit(GenerateRequest(
            rid, prompt, SamplingParams(max_tokens=12, temperature=0.8, seed=5, n=3)))
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}
        while not h.batcher.is_idle:
            for update in h.batcher.step():
                got[update[1]] += update[3]
            report = h.cache.take_report()
            if report is not None:
                h.cached.update(report.cached_tokens)
        return [got[i] for i in range(3)]

    assert choices(cached) == choices(plain)
    assert cached.cached["n2"] == len(prompt) - 1
    assert sum(1 for e in cached.cache._entries.values() if not e.is_pin) >= 3
    assert cached.batcher._reserved == 0


def test_cache_prompt_false_neither_reuses_nor_keeps(model, harness):
    cached = harness(model)
    prompt = user_turn(model, [], text(5, 80))
    cached.run(prompt, cache_prompt=False)
    assert cached.cache.num_entries == 0 and "r1" not in cached.cached
    cached.run(prompt)
    cached.run(prompt, cache_prompt=False)
    assert cached.cached["r2"] == 0 and "r3" not in cached.cached
    assert cached.tokens["r3"] == cached.tokens["r2"]


# -- the sliding window --------------------------------------------------------------------------


def test_reuse_behind_the_sliding_window_recomputes_then_pins(swa_model, harness):
    """A prefix whose window cells are gone is recomputed, never reused without them; the
    request that recomputed it pins it, so the next one can reuse it."""
    m = swa_model
    plain = harness(m, cache=False)
    # 12 seq ids: a 512-cell sliding-window cache, which A's 1,100 tokens overrun.
    cached = harness(m, max_running=4, cache_seqs=8)
    system = text(6, 150)
    a, b, c = (user_turn(m, [], f"{system}\n\n{text(40 + i, 900 if i == 0 else 10)}")
               for i in range(3))
    shared = common_prefix(a, b, len(a))
    assert 140 < shared < len(b) - 5
    assert cached.run(a) == plain.run(a)
    (entry,) = [e for e in cached.cache._entries.values() if not e.is_pin]
    pos_min = cached.ctx.pos_min(entry.seq_id)
    # A's window has moved far past the point where B parts from it.
    assert pos_min > shared - m.n_swa + 1
    assert cached.run(b) == plain.run(b)
    assert cached.cached["r2"] < shared and cached.cache.stats().window_misses == 1
    assert cached.run(c) == plain.run(c)
    assert cached.cached["r3"] == common_prefix(b, c, len(c)) >= shared


def test_window_boundary_is_exact(swa_model, harness):
    """Reusing n tokens needs the cells from n - window + 1 on: at that boundary the cache
    reuses, one token earlier it recomputes, and both give the tokens of no cache at all."""
    m = swa_model
    plain = harness(m, cache=False)
    base = user_turn(m, [], text(7, 400))
    tail = m.tokenize("量子计算 " + text(8, 30), add_special=False)
    assert tail[0] not in base
    layout = None
    for n, reused in ((None, None), ("boundary", True), ("before", False)):
        # Three seq ids: a 256-cell sliding-window cache, which the base prompt overruns.
        h = harness(m, max_running=1, cache_seqs=2)
        h.run(base, max_tokens=4)
        (entry,) = [e for e in h.cache._entries.values() if not e.is_pin]
        pos_min = h.ctx.pos_min(entry.seq_id)
        if layout is None:
            layout = pos_min
            boundary = pos_min + m.n_swa - 1
            assert 64 < boundary < len(base) - 40
            continue
        assert pos_min == layout  # the same operations give the same cells
        at = boundary if n == "boundary" else boundary - 1
        prompt = base[:at] + tail
        got = h.run(prompt)
        assert got == plain.run(prompt), n
        assert (h.cached["r2"] == at) is reused, (n, h.cached["r2"])
        if not reused:
            assert h.cached["r2"] == 0 and h.cache.stats().window_misses == 1


def test_conversation_on_a_short_window_model(swa_model, harness):
    """Turns longer than the window: each one continues the previous one from its end."""
    m = swa_model
    plain, cached = harness(m, cache=False), harness(m)
    history: list[int] = []
    previous: list[int] = []
    for turn in range(4):
        prompt = user_turn(m, history, text(50 + turn, 40))
        got = cached.run(prompt, max_tokens=40)
        assert got == plain.run(prompt, max_tokens=40), f"turn {turn}"
        if turn:
            assert cached.cached[f"r{turn + 1}"] >= len(previous) - 1
        previous = prompt
        history = prompt + reply_tokens(m, got)


# -- room, eviction, ends ------------------------------------------------------------------------


def test_eviction_under_pressure_fails_no_request(swa_model, harness):
    """A small pool full of cached prefixes: requests that need the room get it, every one
    finishes, and the tokens are still those of no cache."""
    m = swa_model
    plain = harness(m, cache=False, n_ctx=768)
    cached = harness(m, n_ctx=768, max_running=3, cache_seqs=4)
    prompts = [user_turn(m, [], f"{text(9, 60)}\n\n{text(60 + i, 30 + 5 * i)}")
               for i in range(6)]
    for p in prompts[:3]:
        cached.run(p, max_tokens=30)
    assert cached.cache.stats().cells > 300
    rids = [cached.submit(p, max_tokens=90) for p in prompts[3:]]  # 3 x ~210 cells
    cached.drain()
    for rid, p in zip(rids, prompts[3:], strict=True):
        assert cached.finish[rid][0] in ("stop", "length"), cached.finish[rid]
        assert cached.tokens[rid] == plain.run(p, max_tokens=90)
    assert cached.cache.stats().evictions > 0


def test_cancelled_sequences_leave_a_correct_cache(model, harness):
    plain, cached = harness(model, cache=False), harness(model, n_batch=32)
    prompt = user_turn(model, [], text(11, 150))
    rid = cached.submit(prompt, max_tokens=30)
    cached.step()
    cached.step()  # part of the prompt is in the KV cells
    cached.batcher.cancel(rid)
    cached.drain()
    assert cached.finish[rid][0] == FINISH_CANCELLED
    assert cached.run(prompt) == plain.run(prompt)
    assert 0 < cached.cached["r2"] < len(prompt) - 1  # what the cancelled one had computed

    rid = cached.submit(prompt, max_tokens=200)  # cancelled while generating
    for _ in range(8):
        cached.step()
    cached.batcher.cancel(rid)
    cached.drain()
    generated = cached.tokens[rid]
    assert 0 < len(generated) < 200
    longer = prompt + generated[:5] + model.tokenize(" " + text(12, 10), add_special=False)
    assert cached.run(longer) == plain.run(longer)


def test_failed_sequences_are_not_cached(model, harness, monkeypatch):
    """A decode that fails leaves KV cells nobody can vouch for: they are dropped. (The
    failure is injected: nothing real makes llama_decode fail on demand.)"""
    cached = harness(model)
    prompt = user_turn(model, [], text(13, 80))
    real_decode = cached.ctx.decode
    monkeypatch.setattr(cached.ctx, "decode", lambda: -3)
    rid = cached.submit(prompt)
    cached.step()
    assert cached.finish[rid][0] == FINISH_ERROR
    assert cached.cache.num_entries == 0
    monkeypatch.setattr(cached.ctx, "decode", real_decode)
    plain = harness(model, cache=False)
    assert cached.run(prompt) == plain.run(prompt)
    assert cached.cached["r2"] == 0


def test_host_tier_restores_an_evicted_prefix(model, harness):
    plain = harness(model, cache=False)
    cached = harness(model, max_running=2, cache_seqs=0, host_bytes=256 << 20)
    first = user_turn(model, [], text(14, 150))
    cached.run(first)
    others = [user_turn(model, [], text(70 + i, 100)) for i in range(3)]
    for p in others:  # two seq ids in all: the first prompt's cells are evicted
        cached.run(p)
    stats = cached.cache.stats()
    assert stats.evictions > 0 and stats.host_saves > 0
    assert not any(e.tokens[:len(first)] == first for e in cached.cache._entries.values())
    again = first[:-1] + model.tokenize(" sea", add_special=False)
    assert cached.run(again) == plain.run(again)
    assert cached.cache.stats().host_restores == 1
    assert cached.cached["r5"] == common_prefix(first, again, len(again))
