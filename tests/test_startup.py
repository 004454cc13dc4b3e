"""Start-up and stop of a real `wicore serve` process: the port is checked before anything
loads, the model it names is the one it serves, and a second Ctrl-C ends it at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import psutil
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e


def test_a_taken_port_fails_before_any_worker_starts(demo_model_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "wicore_cpp", "serve", "--model", str(demo_model_path),
             "--port", str(port)],
            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "cannot listen" in errors[0] and str(port) in errors[0]
    assert "started worker" not in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_run_elsewhere_without_models_says_one_true_thing(tmp_path):
    """From a folder with no models/: no claim to serve the demo model, one error that says
    where it looked and what to do."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WICORE_")}
    out = subprocess.run([sys.executable, "-m", "wicore_cpp", "serve", "--port", "0"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert out.returncode == 1, out.stderr
    assert "serving" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert " ERROR " in lines[0]
    assert str(tmp_path / "models" / "gemma-3-demo.gguf") in lines[0]
    assert "--model" in lines[0]


def test_run_elsewhere_with_models_dir_serves_the_demo_model(tmp_path, demo_model_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "gemma-3-demo.gguf").symlink_to(demo_model_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WICORE_")}
    proc = subprocess.Popen([sys.executable, "-m", "wicore_cpp", "serve", "--port", "0"],
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env)
    try:
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "listening on" in line:
                break
        log = "".join(lines)
        assert "serving the demo model 'gemma-3-demo'" in log
        assert "not found: serving" in log and "gemma-3-27b-it" in log
        assert " ERROR " not in log
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def test_a_second_ctrl_c_ends_at_once(start_server):
    """The first Ctrl-C drains (here for up to an hour, behind a stream whose worker is
    frozen); the second kills the workers and exits."""
    server = start_server("--shutdown-grace-s", "3600", "--request-timeout-s", "3600")
    children = server.worker_pids()
    assert children

    async def open_stream_then_interrupt() -> None:
        async with aiohttp.ClientSession() as session:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4000,
                    "stream": True}
            async with session.post(server.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 200
                await r.content.readline()
                for pid in children:
                    os.kill(pid, signal.SIGSTOP)
                server.proc.send_signal(signal.SIGINT)
                await _log_says(server, "shutting down")
                time.sleep(0.5)
                assert server.proc.poll() is None  # still draining behind the frozen stream
                server.proc.send_signal(signal.SIGINT)
                assert await asyncio.to_thread(server.proc.wait, 60) == 128 + signal.SIGINT

    asyncio.run(open_stream_then_interrupt())
    assert "second SIGINT: exiting now" in server.log()
    procs = []
    for pid in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs.append(psutil.Process(pid))
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"children left behind: {alive}"


async def _log_says(server, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, server.log()
        await asyncio.sleep(0.05)
