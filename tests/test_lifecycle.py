"""Scheduling and lifecycle with real worker processes: priorities, limits, timeouts, worker
death, disconnects, several workers, SIGTERM drain.

To hold requests in a known state the tests freeze a worker with SIGSTOP (a real signal to a
real process, not a fake): its requests stay assigned, nothing new is decoded, and SIGCONT or
SIGKILL decides what happens next.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time

import aiohttp
import orjson
import psutil
from aiohttp.test_utils import TestServer

from tests.conftest import Served, make_config, serve_in_process
from wicore_cpp.http.app import create_app
from wicore_cpp.http.state import STATE
from wicore_cpp.server import check_models

MSG = [{"role": "user", "content": "Tell me a long story about the sea."}]


def worker_pids(served: Served) -> list[int]:
    return [w.pid for w in served.app[STATE].engine.stats().workers]


@contextlib.contextmanager
def frozen(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


async def until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def metrics(served: Served) -> dict:
    _, body = await served.get("/status")
    return body["metrics"]


async def metric_is(served: Served, key: str, value) -> bool:
    return (await metrics(served))[key] == value


async def open_stream(served: Served, **body):
    """Start a stream and return (response, iterator) after its first content chunk."""
    body = {"messages": MSG, "max_tokens": 4000, "temperature": 0.8, "seed": 1, "stream": True,
            **body}
    resp = await served.session.post(f"{served.url}/v1/chat/completions", json=body)
    assert resp.status == 200
    lines = resp.content.__aiter__()
    async for line in lines:
        if b'"content"' in line:
            break
    return resp, lines


async def rest_of_stream(lines) -> list:
    events = []
    async for line in lines:
        line = line.strip()
        if line.startswith(b"data: "):
            data = line[6:]
            events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
    return events


# -- priorities and limits -----------------------------------------------------------------------


async def test_priority_levels_are_served_in_order(demo_model_path):
    # No urgent slot: this is the queue's order alone.
    config = make_config(demo_model_path, max_batch_size=1, urgent_slots=0)
    async with serve_in_process(config) as served:
        (pid,) = worker_pids(served)
        order: list[str] = []

        async def ask(level: str) -> None:
            status, _, _ = await served.chat(MSG, max_tokens=3, priority=level)
            assert status == 200
            order.append(level)

        with frozen(pid):
            blocker = asyncio.create_task(ask("normal"))
            await until(lambda: metric_is(served, "active", 1), what="blocker running")
            tasks = []
            for level in ("low", "normal", "high", "urgent"):
                tasks.append(asyncio.create_task(ask(level)))
                await until(lambda n=len(tasks): metric_is(served, "queue_length", n), what=f"{level} queued")
            m = await metrics(served)
            assert m["queued_by_priority"] == {"low": 1, "normal": 1, "high": 1, "urgent": 1}
        await asyncio.gather(blocker, *tasks)
        assert order == ["normal", "urgent", "high", "normal", "low"]


async def test_urgent_request_takes_the_urgent_slot_and_pauses_a_normal_stream(demo_model_path):
    config = make_config(demo_model_path, max_batch_size=1, urgent_slots=1)
    async with serve_in_process(config) as served:
        resp, lines = await open_stream(served)  # normal, fills the one batch slot
        normal = asyncio.create_task(served.chat(MSG, max_tokens=2))
        await until(lambda: metric_is(served, "queue_length", 1), what="normal request queued")
        status, body, _ = await served.chat(MSG, max_tokens=24, priority="urgent")
        assert status == 200 and body["usage"]["completion_tokens"] > 0
        m = await metrics(served)
        assert m["queue_length"] == 1  # the normal request may not use the urgent slot
        assert m["active"] == 1  # the paused stream is still running...
        more = 0
        async for line in lines:  # ...and resumes once the urgent request is done
            more += b'"content"' in line
            if more >= 3:
                break
        assert more >= 3
        resp.close()
        status, _, _ = await normal
        assert status == 200




async def test_full_queue_and_concurrency_limit_give_429_with_retry_after(demo_model_path):
    config = make_config(demo_model_path, max_batch_size=1, max_queue_size=2,
                         max_concurrent_requests=10)
    async with serve_in_process(config) as served:
        (pid,) = worker_pids(served)
        with frozen(pid):
            accepted = [asyncio.create_task(served.chat(MSG, max_tokens=2)) for _ in range(3)]
            await until(lambda: metric_is(served, "queue_length", 2), what="queue full")
            status, body, headers = await served.chat(MSG, max_tokens=2)
            assert status == 429
            assert body["error"]["type"] == "rate_limit_exceeded"
            assert "queue is full" in body["error"]["message"]
            assert int(headers["Retry-After"]) >= 1
        # Nothing accepted was dropped.
        results = await asyncio.gather(*accepted)
        assert [r[0] for r in results] == [200, 200, 200]

    config = make_config(demo_model_path, max_batch_size=1, max_concurrent_requests=2)
    async with serve_in_process(config) as served:
        (pid,) = worker_pids(served)
        with frozen(pid):
            accepted = [asyncio.create_task(served.chat(MSG, max_tokens=2)) for _ in range(2)]
            await until(lambda: metric_is(served, "in_flight", 2), what="two in flight")
            status, body, headers = await served.chat(MSG, max_tokens=2)
            assert status == 429 and "already active" in body["error"]["message"]
            assert "Retry-After" in headers
        assert [r[0] for r in await asyncio.gather(*accepted)] == [200, 200]
        assert (await metrics(served))["rejected"] == 1



async def test_rate_limit_per_client(demo_model_path):
    async with serve_in_process(make_config(demo_model_path, rate_limit_per_minute=3)) as served:
        for _ in range(3):
            assert (await served.chat(MSG, max_tokens=1))[0] == 200
        status, body, headers = await served.chat(MSG, max_tokens=1)
        assert status == 429 and body["error"]["type"] == "rate_limit_exceeded"
        assert 1 <= int(headers["Retry-After"]) <= 60
        # Monitoring is never rate limited.
        assert (await served.get("/health"))[0] == 200


# -- timeouts ------------------------------------------------------------------------------------


async def test_timeout_of_running_stream_and_queued_request(demo_model_path):
    config = make_config(demo_model_path, max_batch_size=1, request_timeout_s=1.5)
    async with serve_in_process(config) as served:
        (pid,) = worker_pids(served)
        body = {"messages": MSG, "max_tokens": 4000, "temperature": 0.8, "seed": 1,
                "stream": True}
        resp = await served.session.post(f"{served.url}/v1/chat/completions", json=body)
        assert resp.status == 200
        # Freeze the worker as soon as the stream holds its slot: token or no token yet, only
        # the deadline can end it now, however slow the machine is.
        await until(lambda: metric_is(served, "active", 1), what="stream running")
        with frozen(pid):
            queued = asyncio.create_task(served.chat(MSG, max_tokens=2))
            # Both end while the worker is still frozen: the deadline never waits for it.
            events = await rest_of_stream(resp.content)
            assert events[-1] == "[DONE]"
            assert events[-2]["choices"][0]["finish_reason"] == "timeout"
            status, body, _ = await queued
            assert status == 504
            assert body["error"]["type"] == "timeout_error" and body["error"]["code"] == "timeout"
            m = await metrics(served)
            assert m["timed_out"] == 2 and m["queue_length"] == 0
        resp.release()
        # Once the worker runs again it frees the timed-out sequence's slot.
        await until(lambda: metric_is(served, "running_sequences", 0), what="slot freed")
        assert (await served.chat(MSG, max_tokens=2))[0] == 200


# -- worker death --------------------------------------------------------------------------------


async def test_killed_worker_is_replaced_and_requests_accounted_for(demo_model_path):
    config = make_config(demo_model_path, max_batch_size=2)
    async with serve_in_process(config) as served:
        (pid,) = worker_pids(served)
        resp, lines = await open_stream(served)
        with frozen(pid):
            # Assigned to the frozen worker but no token produced yet.
            waiting = asyncio.create_task(served.chat(MSG, max_tokens=4))
            await until(lambda: metric_is(served, "active", 2), what="second request assigned")
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            # /health says so while the replacement loads.
            await until(lambda: _health_is(served, 503), timeout=1.0, what="/health 503")
            assert time.monotonic() - killed_at < 1.0
        events = await rest_of_stream(lines)
        resp.release()
        assert events[-1] == "[DONE]"
        assert "error" in events[-2] and "died" in events[-2]["error"]["message"]
        status, body, _ = await waiting  # put back in the queue and served by the new worker
        assert status == 200 and body["usage"]["completion_tokens"] > 0
        await until(lambda: _health_is(served, 200), what="healthy again")
        (new_pid,) = worker_pids(served)
        assert new_pid != pid and not psutil.pid_exists(pid)
        m = await metrics(served)
        assert m["failed"] == 1 and m["completed"] >= 1


async def _health_is(served: Served, status: int) -> bool:
    async with served.session.get(served.url + "/health") as r:
        if r.status != status:
            return False
        body = await r.json()
        return status == 200 or body["error"]["type"] == "server_error"


# -- disconnects ---------------------------------------------------------------------------------


async def test_disconnected_clients_free_their_slots(demo_model_path):
    async with serve_in_process(make_config(demo_model_path, max_batch_size=4)) as served:
        streams = [await open_stream(served, seed=i) for i in range(4)]
        assert (await metrics(served))["running_sequences"] == 4
        for resp, _ in streams:
            resp.close()  # drop the connection mid-stream
        await until(lambda: metric_is(served, "running_sequences", 0), timeout=3, what="slots freed")
        m = await metrics(served)
        assert m["cancelled"] == 4 and m["in_flight"] == 0

        # A request cancelled while queued leaves the queue at once.
        (pid,) = worker_pids(served)
        running = [await open_stream(served, seed=9 + i) for i in range(4)]
        with frozen(pid):
            client = aiohttp.ClientSession()
            queued = asyncio.create_task(client.post(f"{served.url}/v1/chat/completions",
                                                     json={"messages": MSG, "max_tokens": 2}))
            await until(lambda: metric_is(served, "queue_length", 1), what="queued")
            await client.close()
            queued.cancel()
            await until(lambda: metric_is(served, "queue_length", 0), timeout=3, what="queue emptied")
            for resp, _ in running:
                resp.close()
        await until(lambda: metric_is(served, "running_sequences", 0), timeout=3, what="slots freed")


# -- several workers, loading --------------------------------------------------------------------


async def test_several_workers_share_the_load(demo_model_path):
    config = make_config(demo_model_path, workers=2, max_batch_size=2)
    async with serve_in_process(config) as served:
        assert len(set(worker_pids(served))) == 2
        streams = [await open_stream(served, seed=i) for i in range(4)]
        m = await metrics(served)
        assert sorted(w["running"] for w in m["workers"]) == [2, 2]
        for resp, _ in streams:
            resp.close()


async def test_gpu_ids_pin_one_device_per_worker(demo_model_path):
    """Each worker process sees only its GPU (round-robin over gpu_ids). On this CPU build
    nothing is offloaded, but the pinning is what a multi-GPU workstation relies on."""
    config = make_config(demo_model_path, workers=3, gpu_ids="[1, 0]")
    async with serve_in_process(config) as served:
        await until(lambda: _all_ready(served, 3), what="three workers ready")
        workers = sorted((await metrics(served))["workers"], key=lambda w: w["id"])
        assert [w["gpu_id"] for w in workers] == [1, 0, 1]
        assert [w["cuda_visible_devices"] for w in workers] == ["1", "0", "1"]


async def _all_ready(served: Served, n: int) -> bool:
    workers = (await metrics(served))["workers"]
    return len(workers) == n and all(w["ready"] for w in workers)


async def test_health_is_503_while_loading(demo_model_path):
    app = create_app(make_config(demo_model_path), check_models(make_config(demo_model_path)))
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            url = str(server.make_url("/health"))
            async with session.get(url) as r:
                body = await r.json()
                assert r.status == 503 and body["status"] == "loading"
                assert body["error"]["type"] == "server_error"
            async with session.post(str(server.make_url("/v1/chat/completions")),
                                    json={"messages": MSG}) as r:
                assert r.status == 503 and "Retry-After" in r.headers
            served = Served(str(server.make_url("")).rstrip("/"), session, app)
            await until(lambda: _health_is(served, 200), what="loaded")
    finally:
        await server.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# -- SIGTERM -------------------------------------------------------------------------------------


def test_sigterm_drains_streams_and_leaves_no_orphans(start_server):
    # Long deadlines: the streams must end by finishing, however busy the machine is.
    server = start_server("--shutdown-grace-s", "600", "--request-timeout-s", "600")
    workers = server.worker_pids()
    assert workers

    async def scenario() -> list[list]:
        async with aiohttp.ClientSession() as session:
            served = Served(server.url, session)
            streams = [await open_stream(served, seed=i, max_tokens=64) for i in range(3)]
            server.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*(rest_of_stream(lines) for _, lines in streams))
            for resp, _ in streams:
                resp.release()
            return results

    results = asyncio.run(scenario())
    for events in results:
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length"), events[-2]
    assert server.proc.wait(600) == 0
    # Workers, the tokenizer and multiprocessing's resource tracker all go with the server
    # (the tracker notices a moment after its parent exits).
    deadline = time.monotonic() + 10
    while (alive := [pid for pid in workers if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive
    log = server.log()
    assert "draining" in log and "all workers stopped" in log
