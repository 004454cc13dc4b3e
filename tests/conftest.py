"""Shared fixtures, in layers: the demo model -> a config -> a served app (in-process, or a
real `wicore serve` process). Every serving test runs real llama.cpp on the demo GGUF."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from wicore_cpp.config import Config, load_config
from wicore_cpp.http.app import create_app
from wicore_cpp.http.connections import ConnectionLimits, GuardedAppRunner
from wicore_cpp.server import check_models

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "gemma-3-demo.gguf"
MODEL_ID = "demo"


def load_make_model():
    """tools/make_model.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("make_model", ROOT / "tools" / "make_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_tool(name: str):
    """tools/<name>.py as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def gemma_27b_files(tmp_path_factory) -> dict[str, Path]:
    """Gemma-3-27B's exact shape as the Q4_K_M, Q8_0 and QAT Q4_0 files, written sparse (a few
    MB of disk each, seconds to write): what the memory plan and the READMEs' tables use."""
    return load_tool("memory_tables").write_models(tmp_path_factory.mktemp("gemma-3-27b"))


@pytest.fixture(scope="session")
def demo_model_path(tmp_path_factory) -> Path:
    """The demo model in F32, loaded exactly as Gemma-3-27B is.

    F32 weights (with flash attention off, see make_config) make a sequence's logits
    independent of what else shares its batch, to about 1e-5: the tests can then demand
    identical tokens from lone and concurrent requests. With F16 weights and flash attention
    llama.cpp's CPU kernels round differently for different batch sizes (about 0.1 in the
    logits), which flips a near-tied greedy choice now and then.
    """
    return load_make_model().write_model(tmp_path_factory.mktemp("model") / "demo-f32.gguf",
                                         "demo", dtype="f32")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Tests assert outcomes and order, never how fast a shared CI machine is: no request may run into
# the 30 s default deadline because the machine is busy. Tests of the deadline set a short one.
TEST_REQUEST_TIMEOUT_S = 3600


def make_config(model_path: Path, **overrides) -> Config:
    flags = {"model": str(model_path), "model_id": MODEL_ID, "rate_limit_per_minute": 0,
             "threads": 2, "ctx_size": 16384, "log_level": "WARNING",
             "flash_attn": "off", "request_timeout_s": TEST_REQUEST_TIMEOUT_S}
    flags.update(overrides)
    return load_config(environ={}, flags=flags)


@dataclass
class Served:
    """A running server and an HTTP session pointed at it."""

    url: str
    session: aiohttp.ClientSession
    app: object | None = None

    async def chat(self, messages=None, **body) -> tuple[int, dict, dict]:
        body["messages"] = [{"role": "user", "content": "Hello"}] if messages is None else messages
        async with self.session.post(f"{self.url}/v1/chat/completions", json=body) as r:
            return r.status, await r.json(), r.headers.copy()

    async def stream(self, messages=None, **body) -> tuple[int, list, dict]:
        """All SSE `data:` payloads of one streamed completion ('[DONE]' kept as a string)."""
        import orjson

        body["messages"] = [{"role": "user", "content": "Hello"}] if messages is None else messages
        body["stream"] = True
        events: list = []
        async with self.session.post(f"{self.url}/v1/chat/completions", json=body) as r:
            if r.status != 200:
                return r.status, [await r.json()], r.headers.copy()
            async for line in r.content:
                line = line.strip()
                if line.startswith(b"data: "):
                    data = line[6:]
                    events.append("[DONE]" if data == b"[DONE]" else orjson.loads(data))
            return r.status, events, r.headers.copy()

    async def get(self, path: str) -> tuple[int, dict]:
        async with self.session.get(self.url + path) as r:
            return r.status, await r.json()


async def wait_healthy(session: aiohttp.ClientSession, url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/health") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not become healthy in {timeout}s")


@contextlib.asynccontextmanager
async def serve_in_process(config: Config) -> AsyncIterator[Served]:
    """The app served as `wicore serve` serves it (same runner and connection handling)."""
    app = create_app(config, check_models(config))
    runner = GuardedAppRunner(app, ConnectionLimits.from_config(config),
                              handler_cancellation=True)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        async with aiohttp.ClientSession() as session:
            await wait_healthy(session, url)
            yield Served(url, session, app)
    finally:
        await runner.cleanup()


@pytest.fixture(scope="session")
async def api(demo_model_path) -> AsyncIterator[Served]:
    """One in-process app for the API tests (real workers, real llama.cpp)."""
    async with serve_in_process(make_config(demo_model_path)) as served:
        yield served


@pytest.fixture(scope="session")
async def api_without_cache(demo_model_path) -> AsyncIterator[Served]:
    """Like `api`, with the prompt cache off: the same request then sits in the same KV cells
    every time it runs alone, so sampled output repeats to the last bit (with the cache, the
    cells of cached prefixes move it, and near-ties can flip; see README, Reproducibility)."""
    async with serve_in_process(make_config(demo_model_path, prompt_cache_share=0)) as served:
        yield served


@dataclass
class ServerProcess:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def worker_pids(self) -> list[int]:
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]

    def stop(self, sig=signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


@pytest.fixture
def start_server(demo_model_path, tmp_path) -> Iterator:
    """Factory: start a real `python -m wicore_cpp serve` and wait for /health."""
    started: list[ServerProcess] = []

    def start(*extra: str, model: Path | None = None, wait: bool = True,
              env: dict | None = None) -> ServerProcess:
        port = free_port()
        log_path = tmp_path / f"server-{port}.log"
        cmd = [sys.executable, "-m", "wicore_cpp", "serve", "--model", str(model or demo_model_path),
               "--model-id", MODEL_ID, "--port", str(port), "--threads", "2",
               "--ctx-size", "16384", "--rate-limit-per-minute", "0", "--flash-attn", "off",
               "--request-timeout-s", str(TEST_REQUEST_TIMEOUT_S), *extra]
        proc = subprocess.Popen(cmd, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                                cwd=ROOT, env={**os.environ, **(env or {})})
        server = ServerProcess(f"http://127.0.0.1:{port}", proc, log_path)
        started.append(server)
        if wait:
            asyncio.run(_wait_process_healthy(server))
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL if server.proc.poll() is None else signal.SIGTERM)


async def _wait_process_healthy(server: ServerProcess, timeout: float = 120) -> None:
    async with aiohttp.ClientSession() as session:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"server exited ({server.proc.returncode}):\n{server.log()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(server.url + "/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise TimeoutError(f"server not healthy:\n{server.log()}")
