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
