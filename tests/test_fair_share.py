"""Fair share between API keys within a priority level, with real workers: the issue's
measurement ("a key sending 40 requests at once and a key sending one every second") as a test
of order, not of time. The worker is frozen with SIGSTOP while the queue fills, so what is
waiting when it resumes is known exactly; with one decode slot, the order requests finish in
is the order the queue served them."""

from __future__ import annotations

import asyncio
import json

from tests.conftest import make_config, serve_in_process
from tests.test_lifecycle import frozen, metric_is, until, worker_pids
from wicore_cpp.http.state import STATE

MSG = [{"role": "user", "content": "Tell me a long story about the sea."}]
FLOOD, POLITE = "sk-flood-0123456789", "sk-polite-0123456789"


async def test_a_flooding_key_cannot_starve_another_key_at_the_same_level(
        demo_model_path, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "flood", "key": FLOOD},
                                         {"name": "polite", "key": POLITE}]}))
    config = make_config(demo_model_path, max_batch_size=1, urgent_slots=0,
                         api_keys=str(keys), data_dir=str(tmp_path / "data"))
    async with serve_in_process(config) as served:
        (pid,) = worker_pids(served)
        order: list[str] = []

        async def ask(key: str, name: str) -> None:
            async with served.session.post(
                    served.url + "/v1/chat/completions",
                    json={"messages": MSG, "max_tokens": 3, "temperature": 0},
                    headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200, await r.text()
            order.append(name)

        # The flood's first request holds the one decode slot...
        blocker = await served.session.post(
            served.url + "/v1/chat/completions",
            json={"messages": MSG, "max_tokens": 4000, "stream": True},
            headers={"Authorization": f"Bearer {FLOOD}"})
        async for line in blocker.content:
            if b'"content"' in line:
                break
        tasks = []
        with frozen(pid):
            # ...while it sends six more at once, and then the polite key sends one, and
            # (later, "a second after") another.
            for i in range(6):
                tasks.append(asyncio.create_task(ask(FLOOD, f"flood{i}")))
            await until(lambda: metric_is(served, "queue_length", 6), what="flood queued")
            for i in range(2):
                tasks.append(asyncio.create_task(ask(POLITE, f"polite{i}")))
                await until(lambda n=7 + i: metric_is(served, "queue_length", n),
                            what="polite queued")
            blocker.close()  # the slot frees as soon as the worker runs again
            await until(lambda: metric_is(served, "cancelled", 1), what="blocker cancelled")
        await asyncio.gather(*tasks)
    # First come, first served would put both polite requests last. With fair turns the
    # polite key, served less, goes first; then the two keys alternate while both wait (each
    # request costs the same tokens), and the flood has the rest.
    assert order == ["polite0", "flood0", "polite1", "flood1", "flood2", "flood3", "flood4",
                     "flood5"], order


async def test_a_key_with_nothing_running_starts_at_once_beside_a_flood(demo_model_path,
                                                                       tmp_path):
    """The TTFT half of the issue's measurement, as order: with every batch slot held by the
    flood and more of it queued, the polite key's request starts at once in the fair slot
    (while the worker is frozen, so nothing can have finished), and the worker pauses one of
    the flood's sequences for it: the polite request ends first, while both flood streams it
    ran beside are still under way, and only one flood stream (the one not paused) has
    produced a token by then."""
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"name": "flood", "key": FLOOD},
                                         {"name": "polite", "key": POLITE}]}))
    config = make_config(demo_model_path, max_batch_size=2, urgent_slots=0, fair_slots=1,
                         api_keys=str(keys), data_dir=str(tmp_path / "data"))
    async with serve_in_process(config) as served:
        (pid,) = worker_pids(served)
        engine = served.app[STATE].engine
        events: list[str] = []

        async def stream(key: str, name: str, max_tokens: int) -> None:
            async with served.session.post(
                    served.url + "/v1/chat/completions",
                    json={"messages": MSG, "max_tokens": max_tokens, "temperature": 0,
                          "stream": True},
                    headers={"Authorization": f"Bearer {key}"}) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if b'"finish_reason":"' in line.replace(b" ", b""):
                        events.append(f"{name} ended")
                    elif b'"content"' in line and f"{name} started" not in events:
                        events.append(f"{name} started")

        with frozen(pid):
            tasks = [asyncio.create_task(stream(FLOOD, f"flood{i}", 30)) for i in range(4)]
            await until(lambda: metric_is(served, "queue_length", 2), what="flood queued")
            assert engine.stats().num_running_sequences == 2
            tasks.append(asyncio.create_task(stream(POLITE, "polite", 3)))
            # Dispatched at once, beyond the batch, though no slot has freed.
            await until(lambda: _running(engine, 3), what="polite dispatched")
            assert engine.stats().queue_length == 2
        await asyncio.gather(*tasks)
    polite_ended = events.index("polite ended")
    assert polite_ended < min(events.index(f"flood{i} ended") for i in range(4)), events
    assert sum(events.index(f"flood{i} started") < polite_ended for i in range(4)) == 1, events


async def _running(engine, n: int) -> bool:
    return engine.stats().num_running_sequences == n
