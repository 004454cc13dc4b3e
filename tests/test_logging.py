"""What a real `wicore serve` process logs: the API document's config file (its `logging`
section) starts the server and produces one line per request, performance lines while busy,
4xx reasons at INFO, no llama.cpp loading noise at DEBUG, start-up lines a user needs, and a
JSON format whose every line is an object."""

from __future__ import annotations

import asyncio
import json
import re
import time

import aiohttp
import pytest

from tests.conftest import MODEL_ID

pytestmark = pytest.mark.e2e

# The API document's debug configuration, exactly as it shows it.
DOCUMENT_CONFIG = {"logging": {"level": "DEBUG", "enable_request_logging": True,
                               "enable_performance_logging": True}}
HELLO = [{"role": "user", "content": "Hello"}]
REQUEST_LINE = re.compile(
    r"INFO wicore\.requests: request (?P<id>req_\w+) key=- model=(?P<model>\S+) "
    r"priority=normal finish=(?P<finish>\w+) prompt_tokens=(?P<prompt>\d+) "
    r"completion_tokens=(?P<completion>\d+) queue_ms=\d+ ttft_ms=\d+ total_ms=\d+ "
    r"tokens_per_s=[\d.]+$")


async def _traffic(url: str) -> list[dict]:
    """A JSON completion, a stream, and a bad request; the two good ones' ids and usage."""
    out = []
    async with aiohttp.ClientSession() as s:
        async with s.post(url + "/v1/chat/completions",
                          json={"messages": HELLO, "max_tokens": 4}) as r:
            body = await r.json()
            out.append({"id": body["id"], **body["usage"]})
        async with s.post(url + "/v1/chat/completions",
                          json={"messages": HELLO, "max_tokens": 6, "stream": True,
                                "stream_options": {"include_usage": True}}) as r:
            events = [json.loads(line[6:]) for line in (await r.text()).splitlines()
                      if line.startswith("data: {")]
            out.append({"id": r.headers["X-Request-Id"], **events[-1]["usage"]})
        async with s.post(url + "/v1/chat/completions",
                          json={"messages": HELLO, "temperature": 5}) as r:
            assert r.status == 400
    return out


async def _until_logged(server, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in server.log():
        assert time.monotonic() < deadline, f"{text!r} never logged:\n{server.log()[-3000:]}"
        await asyncio.sleep(0.1)


async def _busy_until_performance_line(server) -> None:
    """Keep one long stream in flight until a performance line shows up."""
    async with aiohttp.ClientSession() as s:
        async with s.post(server.url + "/v1/chat/completions",
                          json={"messages": HELLO, "max_tokens": 4000, "stream": True}) as r:
            await r.content.readline()
            await _until_logged(server, "wicore.performance: performance:")


def test_document_config_file_starts_the_server_and_logs_each_request(start_server, tmp_path):
    config = tmp_path / "wicore.json"
    config.write_text(json.dumps(DOCUMENT_CONFIG))
    server = start_server("--config", str(config), "--performance-log-interval-s", "0.2")
    sent = asyncio.run(_traffic(server.url))
    asyncio.run(_busy_until_performance_line(server))
    assert server.stop() == 0
    log = server.log()
    lines = log.splitlines()

    # One request line per request, when it ends, with the engine's figures.
    for req in sent:
        mine = [m for line in lines if (m := REQUEST_LINE.search(line)) and m["id"] == req["id"]]
        assert len(mine) == 1, (req, log[-3000:])
        m = mine[0]
        assert m["model"] == MODEL_ID and m["finish"] in ("stop", "length")
        assert int(m["prompt"]) == req["prompt_tokens"]
        assert int(m["completion"]) == req["completion_tokens"]
    perf = [line for line in lines if "wicore.performance: performance:" in line]
    assert perf and re.search(r"[\d.]+ tokens/s, \d+ running, \d+ queued, KV \d+/\d+ cells",
                              perf[0])
    # DEBUG is WiCore's debug; llama.cpp's loader output keeps its own (WARNING) level.
    assert " DEBUG wicore" in log or " DEBUG worker-0 wicore" in log
    assert "llama_model_loader" not in log and "print_info" not in log
    # A 4xx is logged at INFO with its reason; the access log follows the level.
    assert re.search(r" INFO wicore\.http: POST /v1/chat/completions -> 400 .*temperature", log)
    assert "aiohttp.access" in log and '"POST /v1/chat/completions HTTP/1.1" 200' in log


def test_startup_lines_say_what_a_user_needs(start_server):
    server = start_server("--log-level", "INFO")
    asyncio.run(_until_logged(server, " ready in "))
    log = server.log()
    port = server.url.rsplit(":", 1)[1]
    assert f"listening on http://127.0.0.1:{port}" in log
    assert re.search(rf"model {MODEL_ID}: up to \d+ tokens per request", log)
    ready = next(line for line in log.splitlines() if " ready in " in line)
    # Either the layers on the GPU, or clearly the CPU and why.
    assert ("offloaded to the GPU" in ready
            or "running on the CPU: this llama.cpp build has no GPU backend" in ready
            or "running on the CPU: n_gpu_layers is 0" in ready), ready
    assert "API keys: off" in log
    # INFO hides llama.cpp's loader too; access lines appear at INFO.
    assert "llama_model_loader" not in log


def test_json_log_format_is_one_object_a_line(start_server):
    server = start_server("--log-format", "json", "--log-requests", "true",
                          "--log-level", "INFO")
    sent = asyncio.run(_traffic(server.url))
    asyncio.run(_until_logged(server, sent[-1]["id"]))
    assert server.stop() == 0
    records = []
    for line in server.log().splitlines():
        if line.strip():
            records.append(json.loads(line))  # every line, from every process
    processes = {r["process"] for r in records}
    assert {"server", "worker-0"} <= processes <= {"server", "worker-0", "tokenizer"}
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    by_id = {r.get("request_id"): r for r in records if r["logger"] == "wicore.requests"}
    for req in sent:
        r = by_id[req["id"]]
        assert r["level"] == "INFO" and r["model"] == MODEL_ID and r["key_name"] is None
        assert r["prompt_tokens"] == req["prompt_tokens"]
        assert r["completion_tokens"] == req["completion_tokens"]
        assert r["ttft_ms"] >= 0 and r["total_ms"] >= r["ttft_ms"]
