"""Workers as Ray actors (`ray_address`): the same scheduling and lifecycle, on a local Ray
instance with 2 CPUs and no GPU, two actor workers on the demo model.

Skipped, with the reason, only where the `ray` extra is not installed; `make test` installs it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import psutil
import pytest

from tests.conftest import Served, make_config, serve_in_process
from tests.test_lifecycle import frozen, metric_is, metrics, open_stream, rest_of_stream, until
from wicore_cpp.http.state import STATE

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed")

MSG = [{"role": "user", "content": "Tell me a long story about the sea."}]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for these tests: 2 CPUs, no GPU, a small object store."""
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, namespace="wicore",
             object_store_memory=200 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


def ray_config(model_path, **overrides):
    # A long deadline: these tests assert outcomes and order, never how fast a shared machine is.
    settings = {"ray_address": "local", "workers": 2, "request_timeout_s": 600, **overrides}
    return make_config(model_path, **settings)


def workers(served: Served) -> list:
    return served.app[STATE].engine.stats().workers


async def all_ready(served: Served, n: int) -> bool:
    ws = (await metrics(served))["workers"]
    return len(ws) == n and all(w["ready"] and w["pid"] for w in ws)


async def test_two_actor_workers_share_concurrent_streams(local_ray, demo_model_path):
    async with serve_in_process(ray_config(demo_model_path, max_batch_size=2)) as served:
        await until(lambda: all_ready(served, 2), timeout=300, what="two actors ready")
        ws = (await metrics(served))["workers"]
        # /status says where each worker runs, and the pids are Ray actor processes.
        assert all(w["node"] for w in ws)
        for w in ws:
            assert "ray::WorkerActor" in " ".join(psutil.Process(w["pid"]).cmdline())
        # Greedy and long enough not to end before the check, which runs with both actors
        # stopped (SIGSTOP), so how fast they are cannot matter.
        streams = [await open_stream(served, seed=i, max_tokens=300, temperature=0)
                   for i in range(4)]
        with frozen(ws[0]["pid"]), frozen(ws[1]["pid"]):
            m = await metrics(served)
        assert sorted(w["running"] for w in m["workers"]) == [2, 2]
        ends = await asyncio.gather(*(rest_of_stream(lines) for _, lines in streams))
        for resp, _ in streams:
            resp.release()
        for events in ends:
            assert events[-1] == "[DONE]"
            assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_greedy_output_equals_a_local_workers(local_ray, demo_model_path):
    """The actor runs the same loop: greedy tokens are those of a local worker process."""
    body = {"max_tokens": 24, "temperature": 0, "return_token_ids": True}
    async with serve_in_process(make_config(demo_model_path)) as local:
        _, expected, _ = await local.chat(MSG, **body)
    async with serve_in_process(ray_config(demo_model_path, workers=1)) as served:
        status, got, _ = await served.chat(MSG, **body)
    assert status == 200
    assert got["choices"][0]["token_ids"] == expected["choices"][0]["token_ids"]


async def test_priorities_are_kept_with_actor_workers(local_ray, demo_model_path):
    config = ray_config(demo_model_path, workers=1, max_batch_size=1, urgent_slots=0)
    async with serve_in_process(config) as served:
        await until(lambda: all_ready(served, 1), timeout=300, what="actor ready")
        (pid,) = [w.pid for w in workers(served)]
        order: list[str] = []

        async def ask(level: str) -> None:
            status, _, _ = await served.chat(MSG, max_tokens=3, priority=level)
            assert status == 200
            order.append(level)

        with frozen(pid):  # the actor's process: SIGSTOP holds everything in place
            blocker = asyncio.create_task(ask("normal"))
            await until(lambda: metric_is(served, "active", 1), what="blocker running")
            tasks = []
            for n, level in enumerate(("low", "normal", "high", "urgent"), start=1):
                tasks.append(asyncio.create_task(ask(level)))
                await until(lambda n=n: metric_is(served, "queue_length", n),
                            what=f"{level} queued")
        await asyncio.gather(blocker, *tasks)
        assert order == ["normal", "urgent", "high", "normal", "low"]


async def test_killed_actor_is_replaced_and_requests_accounted_for(local_ray, demo_model_path):
    config = ray_config(demo_model_path, workers=1, max_batch_size=2)
    async with serve_in_process(config) as served:
        await until(lambda: all_ready(served, 1), timeout=300, what="actor ready")
        (old,) = workers(served)
        resp, lines = await open_stream(served)
        with frozen(old.pid):
            # Assigned to the frozen actor but no token produced yet.
            waiting = asyncio.create_task(served.chat(MSG, max_tokens=4))
            await until(lambda: metric_is(served, "active", 2), what="second request assigned")
            ray.kill(ray.get_actor(f"wicore-worker-{old.worker_id}", namespace="wicore"))
            await until(lambda: _health_is(served, 503), timeout=300, what="/health 503")
        events = await rest_of_stream(lines)
        resp.release()
        assert events[-1] == "[DONE]"
        assert "error" in events[-2] and "died" in events[-2]["error"]["message"]
        status, body, _ = await waiting  # back in the queue, served by the new actor
        assert status == 200 and body["usage"]["completion_tokens"] > 0
        await until(lambda: _health_is(served, 200), timeout=300, what="healthy again")
        (new,) = workers(served)
        assert new.worker_id != old.worker_id and new.pid != old.pid
        m = await metrics(served)
        assert m["failed"] == 1 and m["completed"] >= 1


async def _health_is(served: Served, status: int) -> bool:
    async with served.session.get(served.url + "/health") as r:
        return r.status == status


def test_sigterm_drains_and_leaves_no_actor_behind(start_server):
    """A server that started its own local Ray: streams finish, then every actor and Ray
    itself are gone."""
    # Long deadlines: the streams must end by finishing, however busy the machine is.
    server = start_server("--ray-address", "local", "--workers", "2", "--shutdown-grace-s", "600",
                          "--request-timeout-s", "600")

    async def scenario():
        async with aiohttp.ClientSession() as session:
            served = Served(server.url, session)
            await until(lambda: all_ready(served, 2), timeout=300, what="two actors ready")
            actor_pids = [w["pid"] for w in (await metrics(served))["workers"]]
            streams = [await open_stream(served, seed=i, max_tokens=48) for i in range(3)]
            server.proc.send_signal(signal.SIGTERM)
            results = await asyncio.gather(*(rest_of_stream(lines) for _, lines in streams))
            for resp, _ in streams:
                resp.release()
            return actor_pids, results

    actor_pids, results = asyncio.run(scenario())
    for events in results:
        assert events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length"), events[-2]
    assert server.proc.wait(600) == 0
    deadline = time.monotonic() + 30
    while (alive := [p for p in actor_pids if psutil.pid_exists(p)
                     and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive, f"actor processes left behind: {alive}"
    assert "all workers stopped" in server.log()


def test_ray_address_without_ray_installed_is_a_clear_error(tmp_path, demo_model_path):
    """Simulated by hiding the package: the server names the extra and exits 2."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\nclass _NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "        return None\n"
        "sys.meta_path.insert(0, _NoRay())\n")
    out = subprocess.run(
        [sys.executable, "-m", "wicore_cpp", "serve", "--model", str(demo_model_path),
         "--ray-address", "local", "--port", "0"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(hide)},
    )
    assert out.returncode == 2, out.stderr
    assert "pip install 'wicore-cpp[ray]'" in out.stderr
    assert "Traceback" not in out.stderr
