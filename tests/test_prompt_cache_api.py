"""The prompt cache through the API, with real worker processes: cached_tokens in usage,
`cache_prompt`, /status, a timed-out request, a killed worker, and routing between workers.
Prefix routing's own bookkeeping is tested without a server at the end."""

from __future__ import annotations

import os
import signal

from tests.conftest import Served, make_config, serve_in_process
from tests.test_lifecycle import frozen, metrics, open_stream, rest_of_stream, until, worker_pids
from wicore_cpp.engine.prefix_routing import BLOCK_TOKENS, CachedPrefixes, block_hashes, pick_worker

SYSTEM = ("You answer questions about the river city and its old houses, its trees and its "
          "people. Be brief and use simple words. ") * 6


def conversation(user: str, *history: str, system: str = SYSTEM) -> list[dict]:
    messages = [{"role": "system", "content": system}]
    for i, text in enumerate((*history, user)):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


async def greedy(served: Served, messages, max_tokens: int = 12, **extra) -> dict:
    status, body, _ = await served.chat(messages, max_tokens=max_tokens, temperature=0,
                                        return_token_ids=True, **extra)
    assert status == 200, body
    return body


async def test_cached_tokens_in_json_and_streamed_usage(api):
    messages = conversation("Which trees grow by the river? Tell me about the oldest one.")
    first = await greedy(api, messages)
    prompt_tokens = first["usage"]["prompt_tokens"]
    assert cached(first) == 0
    status, events, _ = await api.stream(messages, max_tokens=12, temperature=0,
                                         return_token_ids=True,
                                         stream_options={"include_usage": True})
    assert status == 200 and events[-1] == "[DONE]"
    usage = events[-2]["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["prompt_tokens_details"]["cached_tokens"] == prompt_tokens - 1
    streamed = [t for e in events[:-2] for c in e["choices"] for t in c.get("token_ids", [])]
    assert streamed == first["choices"][0]["token_ids"]
    # Opting out: nothing reused, the same tokens.
    plain = await greedy(api, messages, cache_prompt=False)
    assert cached(plain) == 0
    assert plain["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
    m = (await api.get("/status"))[1]["metrics"]
    cache = m["prompt_cache"]
    assert cache["hits"] >= 1 and cache["cached_tokens"] >= prompt_tokens - 1
    assert cache["entries"] >= 1 and cache["cells"] >= prompt_tokens
    assert {"evictions", "window_misses", "host_entries", "host_bytes"} <= set(cache)
    assert m["workers"][0]["prompt_cache"]["hits"] >= 1


async def test_cache_prompt_must_be_a_boolean(api):
    status, body, _ = await api.chat(cache_prompt="no")
    assert status == 400 and body["error"]["param"] == "cache_prompt"


async def test_timed_out_and_cancelled_requests_leave_a_correct_cache(demo_model_path):
    # A timeout reaches the worker as the same cancel as a client that goes away; the short
    # deadline is met by stopping the worker (SIGSTOP), the short requests after it have
    # seconds to spare.
    config = make_config(demo_model_path, request_timeout_s=8)
    async with serve_in_process(config) as served:
        (pid,) = worker_pids(served)
        messages = conversation("Tell me a very long story about the old houses.")
        resp, lines = await open_stream(served, messages=messages, max_tokens=4000)
        with frozen(pid):  # the deadline passes while the worker is stopped
            await until(lambda: _timed_out(served), timeout=10, what="timeout")
        events = await rest_of_stream(lines)
        resp.release()
        assert events[-2]["choices"][0]["finish_reason"] == "timeout"
        await until(lambda: _no_running(served), what="slot freed")
        again = await greedy(served, messages, max_tokens=4)
        assert cached(again) > 0
        fresh = await greedy(served, messages, max_tokens=4, cache_prompt=False)
        assert again["choices"][0]["token_ids"] == fresh["choices"][0]["token_ids"]

        # A client that goes away mid-stream.
        other = conversation("Describe the people of the river city.")
        resp, _ = await open_stream(served, messages=other, max_tokens=4000)
        resp.close()
        await until(lambda: _no_running(served), what="slot freed")
        again = await greedy(served, other, max_tokens=4)
        assert cached(again) > 0
        fresh = await greedy(served, other, max_tokens=4, cache_prompt=False)
        assert again["choices"][0]["token_ids"] == fresh["choices"][0]["token_ids"]


async def _timed_out(served: Served) -> bool:
    return (await metrics(served))["timed_out"] == 1


async def _no_running(served: Served) -> bool:
    return (await metrics(served))["running_sequences"] == 0


async def test_killed_workers_cache_is_gone(demo_model_path):
    async with serve_in_process(make_config(demo_model_path)) as served:
        messages = conversation("What is the oldest house in the city?")
        first = await greedy(served, messages)
        assert cached(await greedy(served, messages)) > 0
        (pid,) = worker_pids(served)
        os.kill(pid, signal.SIGKILL)
        await until(lambda: _new_worker_ready(served, pid), timeout=60, what="a new worker")
        again = await greedy(served, messages)
        assert cached(again) == 0
        assert again["choices"][0]["token_ids"] == first["choices"][0]["token_ids"]
        assert (await metrics(served))["prompt_cache"]["entries"] >= 1  # the new worker's


async def _new_worker_ready(served: Served, old_pid: int) -> bool:
    workers = (await metrics(served))["workers"]
    return len(workers) == 1 and workers[0]["pid"] != old_pid and workers[0]["ready"]


async def test_next_turn_goes_to_the_worker_that_holds_the_conversation(demo_model_path):
    config = make_config(demo_model_path, workers=2, max_batch_size=2)
    async with serve_in_process(config) as served:
        await until(lambda: _num_ready(served, 2), timeout=60, what="two workers")
        a = conversation("Tell me about the houses by the water, one by one.")
        other_system = "You are a gardener who knows every tree in the city. " * 12
        b = conversation("Which trees in the city are the oldest ones?", system=other_system)
        # A holds a slot on the first worker while B's first turn runs: B goes to the other
        # (the two share no prefix a worker could hold).
        resp, lines = await open_stream(served, messages=a, max_tokens=4000)
        b1 = await greedy(served, b)
        resp.close()
        await until(lambda: _no_running(served), what="A ended")
        workers = sorted((await metrics(served))["workers"], key=lambda w: w["id"])
        assert [w["prompt_cache"]["entries"] > 0 for w in workers] == [True, True]
        # Both workers are idle now; without routing the first one would take B's next turn.
        reply = b1["choices"][0]["message"]["content"]
        b2 = await greedy(served, conversation("And the youngest?", b[1]["content"], reply,
                                               system=other_system))
        assert cached(b2) > BLOCK_TOKENS
        after = sorted((await metrics(served))["workers"], key=lambda w: w["id"])
        hits = [w["prompt_cache"]["hits"] - v["prompt_cache"]["hits"]
                for w, v in zip(after, workers, strict=True)]
        assert hits == [0, 1]


async def _num_ready(served: Served, n: int) -> bool:
    workers = (await metrics(served))["workers"]
    return sum(w["ready"] for w in workers) == n


# -- prefix routing, without a server ------------------------------------------------------------


class FakeWorker:
    """Just what pick_worker reads: a cached-prefix set and a load."""

    def __init__(self, name: str, running: int = 0):
        self.name = name
        self.running = running
        self.cached_prefixes = CachedPrefixes()


def test_block_hashes_chain_whole_blocks():
    tokens = list(range(3 * BLOCK_TOKENS + 5))
    hashes = block_hashes(tokens)
    assert len(hashes) == 3
    assert block_hashes(tokens[:2 * BLOCK_TOKENS]) == hashes[:2]
    assert block_hashes(tokens, limit=BLOCK_TOKENS + 1) == hashes[:1]
    # A different first block changes every hash after it.
    other = block_hashes([7] + tokens[1:])
    assert not set(other) & set(hashes)


def test_pick_worker_prefers_the_longest_cached_prefix_then_the_least_loaded():
    prompt = list(range(4 * BLOCK_TOKENS))
    hashes = block_hashes(prompt)
    a, b, c = FakeWorker("a", running=3), FakeWorker("b", running=1), FakeWorker("c")
    load = lambda w: w.running  # noqa: E731
    assert pick_worker([a, b, c], prompt, load) is c  # nothing cached: least loaded
    a.cached_prefixes.apply(hashes[:3], [])
    b.cached_prefixes.apply(hashes[:1], [])
    assert pick_worker([a, b, c], prompt, load) is a
    assert pick_worker([b, c], prompt, load) is b  # a is not free
    a.cached_prefixes.apply([], hashes[1:3])
    assert pick_worker([a, b, c], prompt, load) is b  # tie on one block: less loaded
    assert pick_worker([a, b, c], prompt[:10], load) is c  # under a block: load only
