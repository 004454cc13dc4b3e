"""Hostile clients, each finding of issue 13 with a test: connections that never finish a
request or never send one, too many connections, requests aiohttp's parser refuses, huge
conversations that must not hold up small ones, and loose validation.

Nothing here depends on the machine's speed: deadlines are configured short against clients
that never send, order is forced by freezing a tokenizer helper with SIGSTOP, and every wait
is for an event (a closed socket, an answer), bounded only to fail rather than hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import orjson
import pytest

from tests.conftest import Served, make_config, serve_in_process
from wicore_cpp.http.state import STATE

HELLO = [{"role": "user", "content": "Hello"}]
WAIT_S = 60.0  # only ever the bound of a wait for an event; never expected to run out


# -- raw HTTP over a socket ----------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict:
        """The error object; asserts the response is in the API's error shape."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        doc = orjson.loads(self.body)
        assert set(doc) == {"error"}, doc
        assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
        assert doc["error"]["message"] and doc["error"]["type"], doc
        return doc["error"]


def parse_response(data: bytes) -> RawResponse:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", len(body)))
    return RawResponse(status, headers, body[:length])


def host_port(served: Served) -> tuple[str, int]:
    host, port = served.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def connect(served: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(*host_port(served))


async def read_until_closed(reader: asyncio.StreamReader, timeout: float = WAIT_S) -> bytes:
    """Everything the server sends until it closes the connection (fails if it never does)."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"the server did not close the connection; got {data[:200]!r}"
        try:
            chunk = await asyncio.wait_for(reader.read(65536), remaining)
        except ConnectionResetError:
            return data
        except TimeoutError:
            continue
        if not chunk:
            return data
        data += chunk


async def exchange(served: Served, raw: bytes) -> RawResponse:
    """Send `raw`, half-close, and read the answer until the server closes."""
    reader, writer = await connect(served)
    try:
        writer.write(raw)
        await writer.drain()
        return parse_response(await read_until_closed(reader))
    finally:
        writer.close()


# -- errors aiohttp's parser raises, in the error shape -----------------------------------------

CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
TLS_CLIENT_HELLO = bytes.fromhex(
    "160301006e0100006a0303" + "11" * 32 + "00" + "0004c02fc030" + "0100"
    + "003d000000100000000d6578616d706c652e636f6d")

MALFORMED = {
    "unknown method": b"FOO / HTTP/1.1\r\nHost: x\r\n\r\n",
    "lowercase method": b"get /health HTTP/1.1\r\nHost: x\r\n\r\n",
    "64 KB header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
    "64 KB URL": b"GET /" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "1,200 headers": b"GET /health HTTP/1.1\r\nHost: x\r\n"
                     + b"".join(b"X-H%d: v\r\n" % i for i in range(1200)) + b"\r\n",
    "Content-Length and Transfer-Encoding": CHAT + b"Content-Length: 5\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "non-numeric Content-Length": CHAT + b"Content-Length: abc\r\n\r\n{}",
    "negative Content-Length": CHAT + b"Content-Length: -5\r\n\r\n{}",
    "bad chunk size": CHAT + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "NUL in a header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
    "HTTP/9.9": b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "TLS ClientHello": TLS_CLIENT_HELLO,
    "Expect: 999-nope": CHAT + b"Expect: 999-nope\r\nContent-Length: 2\r\n\r\n{}",
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_requests_are_answered_in_the_error_shape(api, case, caplog):
    caplog.set_level(logging.DEBUG)
    response = await exchange(api, MALFORMED[case])
    assert 400 <= response.status < 500, response
    err = response.error()
    assert err["code"] == str(response.status)
    assert len(err["message"]) < 400  # the offending bytes are not echoed whole
    # One INFO line about it, never an ERROR or a traceback.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], \
        [(r.name, r.getMessage()) for r in caplog.records]


async def test_a_good_request_still_works_after_the_malformed_ones(api):
    response = await exchange(api, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert response.status == 200


# -- connection deadlines ------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def strict(demo_model_path) -> AsyncIterator[Served]:
    """A server with deadlines far shorter than any test's patience."""
    config = make_config(demo_model_path, header_timeout_s=0.5, body_timeout_s=0.5,
                         idle_timeout_s=0.5)
    async with serve_in_process(config) as served:
        yield served


async def test_a_connection_that_sends_nothing_is_closed(strict):
    reader, writer = await connect(strict)
    try:
        assert await read_until_closed(reader) == b""  # closed without a word
    finally:
        writer.close()


async def test_an_idle_kept_alive_connection_is_closed(strict):
    reader, writer = await connect(strict)
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        data = await read_until_closed(reader)
        assert parse_response(data).status == 200
        assert data.count(b"HTTP/1.1 ") == 1
    finally:
        writer.close()


def no_errors_logged(caplog) -> None:
    bad = [(r.name, r.getMessage()) for r in caplog.records
           if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, bad


async def test_blank_lines_forever_get_408(strict, caplog):
    reader, writer = await connect(strict)
    try:
        writer.write(b"\r\n\r\n\r\n\r\n")
        response = parse_response(await read_until_closed(reader))
        assert response.status == 408
        assert "headers" in response.error()["message"]
    finally:
        writer.close()
    no_errors_logged(caplog)


async def test_headers_sent_a_byte_at_a_time_get_408(strict):
    """A slow-headers client is cut off by the header deadline, however long it goes on."""
    reader, writer = await connect(strict)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 100_000
    received = asyncio.create_task(read_until_closed(reader))
    try:
        for byte in request:
            if received.done():
                break
            with contextlib.suppress(ConnectionError):
                writer.write(bytes([byte]))
                await writer.drain()
            await asyncio.sleep(0.05)
        response = parse_response(await received)
        assert response.status == 408
        response.error()
    finally:
        writer.close()


async def test_a_body_that_never_completes_gets_408(strict, caplog):
    reader, writer = await connect(strict)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
                     b'{"messages": [')
        response = parse_response(await read_until_closed(reader))
        assert response.status == 408
        assert "body" in response.error()["message"]
    finally:
        writer.close()
    no_errors_logged(caplog)


async def test_deadlines_do_not_touch_a_request_that_is_running(strict):
    """A stream that outlives every connection deadline is not cut: they bound reading a
    request, not answering it. Its worker is frozen from before the request until well past
    every deadline, so the stream cannot have finished early."""
    body = {"messages": HELLO, "max_tokens": 8, "stream": True}
    with frozen(*worker_pids(strict)):
        resp = await strict.session.post(f"{strict.url}/v1/chat/completions", json=body)
        assert resp.status == 200
        await asyncio.sleep(1.5)  # three times each deadline
    try:
        text = await asyncio.wait_for(resp.read(), WAIT_S)
    finally:
        resp.close()
    assert text.endswith(b"data: [DONE]\n\n")
    assert b'"finish_reason":"length"' in text


# -- the connection cap --------------------------------------------------------------------------


async def test_connections_over_the_cap_get_503_and_the_cap_frees_up(demo_model_path):
    config = make_config(demo_model_path, max_connections=3)
    async with serve_in_process(config) as served:
        await served.session.close()  # its kept-alive connection goes (once the server sees it)
        held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

        async def hold_one() -> bool:
            """Open a connection and keep it if it is admitted; True once three are held."""
            reader, writer = await connect(served)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            if b" 200 " in await reader.readuntil(b"\r\n"):
                held.append((reader, writer))
            else:
                writer.close()
            return len(held) == 3

        await until(hold_one, what="three connections admitted")
        response = await exchange(served, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert response.status == 503
        assert "max_connections=3" in response.error()["message"]
        assert response.headers["retry-after"] == "1"
        held.pop()[1].close()

        async def admitted() -> bool:
            reply = await exchange(served, b"GET /health HTTP/1.1\r\nHost: x\r\n"
                                           b"Connection: close\r\n\r\n")
            return reply.status == 200

        await until(admitted, what="a connection admitted once one closed")
        for _, writer in held:
            writer.close()


# -- head-of-line blocking -----------------------------------------------------------------------


def many_turns(n: int, text: str = "hi") -> list[dict]:
    return [{"role": ("user", "assistant")[i % 2], "content": text} for i in range(n)]


def tokenizer_pids(served: Served) -> dict[str, int]:
    (pids,) = served.app[STATE].engine.tokenizer_pids().values()
    return pids


async def test_a_short_request_is_not_held_up_by_a_long_one(api):
    """A long conversation is being tokenized (its helper frozen: it cannot finish); a short
    request sent after it is answered first. (The long one passes the cheap bounds but is too
    long once tokenized: answered with the real count, without a slow prefill.)"""
    pids = tokenizer_pids(api)
    order: list[str] = []

    async def ask(name: str, messages: list[dict]) -> tuple[int, dict]:
        status, body, _ = await api.chat(messages, max_tokens=2)
        order.append(name)
        return status, body

    with frozen(pids["long"]):
        long = asyncio.create_task(ask("long", many_turns(257, "hello world " * 17)))
        await asyncio.sleep(0.2)  # sent first (the order holds even if it were not)
        status, _ = await asyncio.wait_for(ask("short", HELLO), WAIT_S)
        assert status == 200
        assert not long.done()
    status, body = await asyncio.wait_for(long, WAIT_S)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert "resulted in" in body["error"]["message"]  # counted by the tokenizer, not bounded
    assert order == ["short", "long"]


@pytest.mark.parametrize("shape", ["50,001 messages", "5 MB of text"])
async def test_what_cannot_fit_is_refused_before_any_tokenizing(api, shape):
    """Both helpers frozen: only the cheap bounds can answer, and they do."""
    if shape == "50,001 messages":
        messages = many_turns(50_001, "ab")
    else:
        messages = [{"role": "user", "content": "x" * 5_000_000}]
    with frozen(*tokenizer_pids(api).values()):
        status, body, _ = await asyncio.wait_for(api.chat(messages), WAIT_S)
    assert status == 400, body
    assert body["error"]["code"] == "context_length_exceeded"
    assert body["error"]["param"] == "messages"
    assert "at least" in body["error"]["message"]


async def test_a_lane_full_of_waiting_prompts_answers_429(demo_model_path):
    from wicore_cpp.engine.tokenizer import PromptTokenizer
    from wicore_cpp.errors import RateLimited

    tokenizer = PromptTokenizer(demo_model_path, "WARNING", max_waiting=2)
    try:
        await tokenizer.start()
        with frozen(tokenizer.helper_pids()["long"]):
            waiting = [asyncio.create_task(tokenizer.encode_chat(many_turns(257)))
                       for _ in range(2)]
            await asyncio.sleep(0)
            with pytest.raises(RateLimited):
                await tokenizer.encode_chat(many_turns(257))
            # The short lane is not full.
            assert await asyncio.wait_for(tokenizer.encode_chat(HELLO), WAIT_S)
        assert all(await asyncio.gather(*waiting))
    finally:
        await asyncio.to_thread(tokenizer.close)


async def test_a_killed_tokenizer_helper_is_replaced(api):
    """A helper that dies costs the requests it was holding a 503; the next ones are served
    by a new helper, in both lanes."""
    # The long one is too long once tokenized: a quick 400, no long prefill.
    cases = (("short", HELLO, 200), ("long", many_turns(257, "hello world " * 17), 400))
    for lane, messages, status_after in cases:
        pid = tokenizer_pids(api)[lane]
        with frozen(pid):
            waiting = asyncio.create_task(api.chat(messages, max_tokens=1))
            await asyncio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
        status, body, headers = await asyncio.wait_for(waiting, WAIT_S)
        assert status == 503 and "Retry-After" in headers, body
        status, body, _ = await asyncio.wait_for(api.chat(messages, max_tokens=1), WAIT_S)
        assert status == status_after, body
        assert tokenizer_pids(api)[lane] not in (None, pid)


# -- validation ----------------------------------------------------------------------------------


async def test_empty_content_parts_are_400(api):
    status, body, _ = await api.chat([{"role": "user", "content": []}])
    assert status == 400
    assert body["error"]["param"] == "messages[0].content"


async def test_a_long_priority_header_is_not_echoed_whole(api):
    async with api.session.post(f"{api.url}/v1/chat/completions", json={"messages": HELLO},
                                headers={"X-Priority": "u" * 8000}) as r:
        body = await r.json()
    assert r.status == 400 and body["error"]["param"] == "X-Priority"
    assert len(body["error"]["message"]) < 300
    assert "8000 characters" in body["error"]["message"]


async def test_a_long_model_name_is_not_echoed_whole(api):
    status, body, _ = await api.chat(HELLO, model="m" * 100_000)
    assert status == 404 and len(body["error"]["message"]) < 300


@pytest.mark.parametrize("value, status", [("URGENT", 200), ("High", 200), (" low", 400),
                                           ("urgent ", 400), ("low\n", 400)])
async def test_priority_is_any_case_but_nothing_else(api, value, status):
    got, body, _ = await api.chat(HELLO, max_tokens=1, priority=value)
    assert got == status, body
    if status == 400:
        assert body["error"]["param"] == "priority"


# -- helpers -------------------------------------------------------------------------------------


def worker_pids(served: Served) -> list[int]:
    return [w.pid for w in served.app[STATE].engine.stats().workers]


async def until(predicate, timeout: float = WAIT_S, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@contextlib.contextmanager
def frozen(*pids: int):
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
