"""Load benchmark for OpenAI-compatible streaming chat servers (WiCore, llama.cpp's
llama-server, llama-cpp-python).

Subcommands:

  run       N concurrent streaming clients, R requests in all, against any server; reports
            aggregate tokens/s, time to first token (TTFT) and inter-token latency (ITL)
            percentiles, and errors.
  priority  time to first token of an `urgent` request, and of a `normal` one, sent while
            16 normal streams run and 32 more wait (WiCore only: it needs priorities and
            `--max-concurrent-requests` of 64).
  hol       head-of-line blocking: while a few hostile requests (a conversation of very
            many messages) are being prepared, a short request goes out every so often;
            reports how long the short ones took and how the hostile ones ended.
  fairness  time to first token of a key sending one request a second, alone and while
            another key floods the queue with 40 requests at once (WiCore with API keys:
            `--api-keys` with the two keys given to this command).
  images    inter-token latency of running text streams while image requests arrive
            (WiCore with a vision projector): the streams' gaps before the images, and while
            they are encoded and prefilled, and the image requests' TTFT.
  compare   runs llama.cpp's own `llama-bench` and `llama-batched-bench` (the ceiling), then
            starts WiCore, llama.cpp's `llama-server` and llama-cpp-python's server on the
            same GGUF with the same threads (one at a time, never two), runs concurrency 1
            and 16 on each and the priority test on WiCore, prints a Markdown table, the
            ratios and the targets, and writes bench-results/latest.json.

Tokens are counted as streamed content chunks, the same way for every server (a chunk
that carries several tokens, e.g. a held-back partial UTF-8 character, counts once, so the
count is a lower bound). When a server also reports `usage` in the stream, its
`completion_tokens` are recorded alongside.

Only the standard library and aiohttp (plus psutil for the thread default).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import logging
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

log = logging.getLogger("wicore.bench")

PROMPTS: tuple[str, ...] = (
    "Explain how a hash table handles collisions.",
    "Write a short poem about the sea at night.",
    "What are the main causes of inflation?",
    "Describe the water cycle in simple terms.",
    "Give three tips for writing readable Python code.",
    "Summarize the plot of a heist movie you invent.",
    "How does public-key cryptography work?",
    "List some differences between TCP and UDP.",
)
BASE_SEED = 1234
WARMUP_MAX_TOKENS = 4

# Targets: WiCore / a peer server's aggregate tokens/s at each concurrency. llama.cpp's own
# llama-server is the primary peer (issue 12); llama-cpp-python's server the second (issue 2).
TARGETS: dict[str, dict[int, float]] = {
    "llama-server": {1: 1.0, 16: 1.2},
    "llama-cpp-python": {1: 1.0, 16: 4.0},
}
# WiCore against raw llama.cpp on the same model and threads (issue 12): one stream's tokens/s
# against `llama-bench`'s tg, 16 streams' decode-phase rate against `llama-batched-bench`'s
# decode rate at B=16.
CEILING_TARGETS: dict[int, float] = {1: 0.90, 16: 0.85}


def emit(line: str = "") -> None:
    """Print one line of results to stdout (diagnostics go to logging, on stderr)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks; None if empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, not {q}")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (rank - low))


# --------------------------------------------------------------------------- SSE parsing


@dataclass(frozen=True)
class SSEEvent:
    """One server-sent event: its `event:` type ("message" unless set) and joined `data:`."""

    data: str
    event: str = "message"


class SSEParser:
    """Incremental server-sent-events parser: feed bytes as they arrive, get whole events.

    Follows the WHATWG rules that matter here: lines end in LF, CRLF or CR; a blank line
    ends an event; `data:` lines of one event are joined with LF; one space after the colon
    is dropped; lines starting with `:` are comments (keep-alive pings); an event with no
    data is not dispatched. A multi-byte character split across reads is handled because
    decoding happens per complete line.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []
        self._event = ""

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        self._buf += chunk
        events: list[SSEEvent] = []
        while True:
            cut = _line_end(self._buf)
            if cut is None:
                break
            end, nxt = cut
            line = self._buf[:end].decode("utf-8", errors="replace")
            self._buf = self._buf[nxt:]
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: a final event not followed by a blank line is still delivered."""
        # A lone CR left at the end is a line end; completing it as CRLF lets feed() see it.
        events = self.feed(b"\n") if self._buf.endswith(b"\r") else []
        if self._buf:
            event = self._line(self._buf.decode("utf-8", errors="replace"))
            self._buf = b""
            if event is not None:
                events.append(event)
        event = self._line("")
        if event is not None:
            events.append(event)
        return events

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            event = SSEEvent(data="\n".join(self._data), event=self._event or "message")
            self._data = []
            self._event = ""
            return event
        if line.startswith(":"):
            return None
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        return None


def _line_end(buf: bytes) -> tuple[int, int] | None:
    """(end of the first line, start of the next) or None when no full line is buffered.

    A CR at the very end of the buffer may be the first half of CRLF, so it waits for more.
    """
    lf = buf.find(b"\n")
    cr = buf.find(b"\r")
    if cr == -1 and lf == -1:
        return None
    if cr == -1 or (lf != -1 and lf < cr):
        return lf, lf + 1
    if cr + 1 < len(buf):
        return cr, cr + 2 if buf[cr + 1 : cr + 2] == b"\n" else cr + 1
    return None


# --------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    """What one streaming request did, in seconds relative to the client's clock."""

    index: int
    start: float
    end: float = 0.0
    status: int | None = None
    ttft: float | None = None
    gaps: list[float] = field(default_factory=list)
    num_chunks: int = 0
    usage_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, if sent
    finish_reason: str | None = None
    error: str | None = None
    text: list[str] = field(default_factory=list)  # the content chunks, in order

    @property
    def ok(self) -> bool:
        return self.error is None


class StreamTracker:
    """Turns the SSE events of one chat-completion stream into a RequestResult."""

    def __init__(
        self, result: RequestResult, on_first_token: Callable[[], None] | None = None
    ) -> None:
        self.result = result
        self.done = False
        self._last: float | None = None
        self._on_first_token = on_first_token

    def on_event(self, event: SSEEvent, now: float) -> None:
        res = self.result
        if event.data.strip() == "[DONE]":
            self.done = True
            return
        try:
            payload = json.loads(event.data)
        except ValueError:
            res.error = res.error or f"bad JSON in stream: {event.data[:120]!r}"
            return
        if event.event == "error" or (isinstance(payload, dict) and "error" in payload):
            detail = payload.get("error", payload) if isinstance(payload, dict) else payload
            res.error = res.error or f"error event: {str(detail)[:200]}"
            return
        if not isinstance(payload, dict):
            return
        usage = payload.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            res.usage_tokens = usage["completion_tokens"]
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
                res.cached_tokens = details["cached_tokens"]
        for choice in payload.get("choices") or ():
            if choice.get("finish_reason"):
                res.finish_reason = choice["finish_reason"]
            content = (choice.get("delta") or {}).get("content")
            if not content:
                continue
            res.num_chunks += 1
            res.text.append(content)
            if self._last is None:
                res.ttft = now - res.start
                if self._on_first_token is not None:
                    self._on_first_token()
            else:
                res.gaps.append(now - self._last)
            self._last = now


def chat_body(
    model: str, index: int, max_tokens: int, prompt: str | None, priority: str | None,
    include_usage: bool,
) -> dict[str, Any]:
    """Request `index` of a run: the same prompt and seed for every server."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt or PROMPTS[index % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": BASE_SEED + index,
        "stream": True,
    }
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    if priority:
        body["priority"] = priority
    return body


async def stream_request(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], index: int,
    timeout_s: float, t0: float, on_first_token: Callable[[], None] | None = None,
    api_key: str | None = None,
) -> RequestResult:
    """Send one streaming chat completion and time its content chunks; never raises."""
    headers = {"Accept": "text/event-stream"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    if body.get("priority"):
        headers["X-Priority"] = str(body["priority"])
    res = RequestResult(index=index, start=time.perf_counter() - t0)
    tracker = StreamTracker(res, on_first_token)
    parser = SSEParser()
    timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=10)
    try:
        async with session.post(
            url.rstrip("/") + "/v1/chat/completions", json=body, headers=headers, timeout=timeout
        ) as resp:
            res.status = resp.status
            if resp.status != 200:
                text = (await resp.text(errors="replace"))[:200]
                res.error = f"HTTP {resp.status}: {text}"
                return res
            async for chunk in resp.content.iter_any():
                now = time.perf_counter() - t0
                for event in parser.feed(chunk):
                    tracker.on_event(event, now)
                if tracker.done:
                    break
            if not tracker.done:
                for event in parser.close():
                    tracker.on_event(event, time.perf_counter() - t0)
            if not tracker.done and res.error is None:
                res.error = "stream ended without [DONE]"
    except TimeoutError:
        res.error = f"timed out after {timeout_s:g} s"
    except (aiohttp.ClientError, OSError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        res.end = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- a load run


@dataclass
class RunConfig:
    url: str
    model: str
    concurrency: int
    requests: int
    max_tokens: int
    prompt: str | None = None
    priority: str | None = None
    timeout_s: float = 300.0
    deadline_s: float = 1800.0
    include_usage: bool = True
    warmup: bool = True
    keep_alive: bool = True  # False: a connection per request (see _session)


def summarize(results: Sequence[RequestResult], cfg: RunConfig, wall_s: float) -> dict[str, Any]:
    """Aggregate per-request results into the report (times in seconds)."""
    ok = [r for r in results if r.ok]
    total_chunks = sum(r.num_chunks for r in results)
    usage = [r.usage_tokens for r in ok]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    errors = [r.error for r in results if r.error]
    return {
        "url": cfg.url,
        "model": cfg.model,
        "concurrency": cfg.concurrency,
        "requests": len(results),
        "max_tokens": cfg.max_tokens,
        "priority": cfg.priority,
        "wall_s": wall_s,
        "tokens": total_chunks,
        "tok_s": total_chunks / wall_s if wall_s > 0 else 0.0,
        "usage_tokens": sum(u for u in usage if u is not None) if usage and None not in usage
        else None,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p95": percentile(ttfts, 95),
        "itl_p50": percentile(gaps, 50),
        "itl_p95": percentile(gaps, 95),
        "decode_tok_s": decode_rate(gaps, cfg.concurrency),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:5],
        "finish_reasons": _count(r.finish_reason for r in ok),
        "per_request": [
            {
                "index": r.index, "start": round(r.start, 4), "duration": round(r.end - r.start, 4),
                "ttft": None if r.ttft is None else round(r.ttft, 4), "chunks": r.num_chunks,
                "max_gap": round(max(r.gaps), 4) if r.gaps else None, "error": r.error,
            }
            for r in results
        ],
    }


def decode_rate(gaps: Sequence[float], concurrency: int) -> float | None:
    """Tokens/s of the decode phase: `concurrency` streams, each getting a token every mean
    inter-token gap. First tokens (prefill, queueing) are left out, as `llama-batched-bench`'s
    decode rate leaves out its prompt phase; steps that also prefill a newcomer's prompt are in,
    as they are in any server's stream."""
    if not gaps:
        return None
    mean = sum(gaps) / len(gaps)
    return concurrency / mean if mean > 0 else None


def _count(items: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        key = str(item)
        out[key] = out.get(key, 0) + 1
    return out


def _session(connections: int = 0, keep_alive: bool = True) -> aiohttp.ClientSession:
    """A client session. `keep_alive=False` opens a connection per request: llama-server's HTTP
    library closes idle kept-alive connections on its own schedule, and a request sent on one
    it has just closed fails ("Can not write request body")."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=not keep_alive))


async def run_load(cfg: RunConfig) -> dict[str, Any]:
    """`concurrency` workers share `requests` streaming requests; returns summarize()."""
    async with _session(keep_alive=cfg.keep_alive) as session:
        if cfg.warmup:
            body = chat_body(cfg.model, -1, WARMUP_MAX_TOKENS, cfg.prompt, cfg.priority, False)
            warm = await stream_request(session, cfg.url, body, -1, cfg.timeout_s, 0.0)
            if not warm.ok:
                log.warning("warm-up request failed: %s", warm.error)
        t0 = time.perf_counter()
        pending = iter(range(cfg.requests))
        results: list[RequestResult] = []

        async def worker() -> None:
            for index in pending:
                body = chat_body(
                    cfg.model, index, cfg.max_tokens, cfg.prompt, cfg.priority,
                    cfg.include_usage,
                )
                results.append(
                    await stream_request(session, cfg.url, body, index, cfg.timeout_s, t0)
                )

        workers = [asyncio.create_task(worker()) for _ in range(cfg.concurrency)]
        _, late = await asyncio.wait(workers, timeout=cfg.deadline_s)
        for task in late:
            task.cancel()
        if late:
            await asyncio.gather(*late, return_exceptions=True)
            done = {r.index for r in results}
            now = time.perf_counter() - t0
            for index in range(cfg.requests):
                if index not in done:
                    results.append(RequestResult(
                        index=index, start=now, end=now,
                        error=f"not finished within the {cfg.deadline_s:g} s deadline",
                    ))
    first = min((r.start for r in results), default=0.0)
    last = max((r.end for r in results), default=0.0)
    return summarize(sorted(results, key=lambda r: r.index), cfg, last - first)


# --------------------------------------------------------------------------- priority test


@dataclass
class PriorityConfig:
    url: str
    model: str
    running: int = 16
    waiting: int = 32
    background_max_tokens: int = 64
    probe_max_tokens: int = 16
    probes: int = 2
    settle_s: float = 1.0
    fill_timeout_s: float = 120.0
    timeout_s: float = 300.0
    include_usage: bool = True


async def server_queue(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    """Running sequences and queue length from WiCore's GET /status, or None if unavailable."""
    try:
        async with session.get(
            url.rstrip("/") + "/status", timeout=aiohttp.ClientTimeout(total=5)
        ) as resp:
            if resp.status != 200:
                return None
            metrics = (await resp.json(content_type=None)).get("metrics") or {}
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError, AttributeError):
        return None
    keys = ("running_sequences", "queue_length", "queued_by_priority")
    return {k: metrics[k] for k in keys if k in metrics} or None


def staggered(mean: int, index: int) -> int:
    """A max_tokens in [mean/2, 3*mean/2) that varies with `index`, deterministically.

    Identical lengths would make the background streams start and finish in lock-step
    waves, so a probe's wait would depend on where in a wave it lands, not on the queue.
    """
    low = max(1, mean // 2)
    return low + (index * 37) % max(1, mean)


async def run_priority(cfg: PriorityConfig) -> dict[str, Any]:
    """TTFT of urgent and normal probes under a steady load of running+waiting normal streams.

    The load is a closed loop: `running + waiting` clients, each sending its next normal
    request as soon as its last one ends, so the queue stays as deep for every probe.
    Background lengths vary around `background_max_tokens` (see staggered()).
    Probes alternate urgent, normal, urgent, normal... one at a time.
    """
    load = cfg.running + cfg.waiting
    stop = asyncio.Event()
    background: list[RequestResult] = []
    streaming = 0  # background requests between their first token and their end
    filled = asyncio.Event()
    counter = iter(range(10_000, 10**9))

    def on_first_token() -> None:
        nonlocal streaming
        streaming += 1
        if streaming >= cfg.running:
            filled.set()

    async with _session() as session:
        warm = chat_body(cfg.model, -1, WARMUP_MAX_TOKENS, None, "normal", False)
        warm_res = await stream_request(session, cfg.url, warm, -1, cfg.timeout_s, 0.0)
        if not warm_res.ok:
            log.warning("warm-up request failed: %s", warm_res.error)
        t0 = time.perf_counter()

        async def client() -> None:
            nonlocal streaming
            while not stop.is_set():
                index = next(counter)
                body = chat_body(
                    cfg.model, index, staggered(cfg.background_max_tokens, index), None,
                    "normal", cfg.include_usage,
                )
                res = await stream_request(
                    session, cfg.url, body, index, cfg.timeout_s, t0, on_first_token
                )
                if res.ttft is not None:
                    streaming -= 1
                background.append(res)
                if not res.ok and not stop.is_set():
                    log.warning("background request failed: %s", res.error)
                    await asyncio.sleep(0.5)

        clients = [asyncio.create_task(client()) for _ in range(load)]
        probes: list[dict[str, Any]] = []
        try:
            try:
                await asyncio.wait_for(filled.wait(), cfg.fill_timeout_s)
            except TimeoutError:
                log.warning("only %d of %d background streams running after %g s",
                            streaming, cfg.running, cfg.fill_timeout_s)
            await asyncio.sleep(cfg.settle_s)
            for n in range(cfg.probes * 2):
                priority = "urgent" if n % 2 == 0 else "normal"
                index = 1000 + n
                body = chat_body(
                    cfg.model, index, cfg.probe_max_tokens, None, priority, cfg.include_usage
                )
                streaming_then = streaming
                server_then = await server_queue(session, cfg.url)
                res = await stream_request(session, cfg.url, body, index, cfg.timeout_s, t0)
                probes.append({
                    "priority": priority, "ttft": res.ttft, "latency": res.end - res.start,
                    "streaming_at_send": streaming_then, "server_at_send": server_then,
                    "error": res.error,
                })
                log.info("probe %s: ttft %s s (client saw %d streams; server: %s), error %s",
                         priority, res.ttft, streaming_then, server_then, res.error)
        finally:
            stop.set()
            for task in clients:
                task.cancel()
            await asyncio.gather(*clients, return_exceptions=True)

    def ttfts(priority: str) -> list[float]:
        return [p["ttft"] for p in probes if p["priority"] == priority and p["ttft"] is not None]

    urgent = ttfts("urgent")
    normal = ttfts("normal")
    urgent_med = statistics.median(urgent) if urgent else None
    normal_med = statistics.median(normal) if normal else None
    bg_errors = [r.error for r in background if r.error]
    return {
        "url": cfg.url,
        "running": cfg.running,
        "waiting": cfg.waiting,
        "probes": probes,
        "urgent_ttft": urgent_med,
        "normal_ttft": normal_med,
        "normal_over_urgent": normal_med / urgent_med if urgent_med and normal_med else None,
        "errors": sum(1 for p in probes if p["error"]),
        "background_requests": len(background),
        "background_errors": len(bg_errors),
        "background_error_samples": sorted(set(bg_errors))[:5],
    }


# --------------------------------------------------------------------------- multi-turn chats


MULTITURN_TARGET_RATIO = 0.25  # later turns' TTFT p50 at most this times the first turn's

# Common English words (single tokens in most vocabularies, the bench model's included).
_FILLER = (
    "the", "of", "and", "to", "in", "is", "you", "that", "it", "was", "for", "on", "are",
    "with", "they", "be", "this", "have", "from", "one", "word", "but", "not", "what", "all",
    "when", "your", "can", "there", "use", "each", "which", "how", "their", "will", "other",
    "about", "many", "some", "would", "make", "like", "time", "look", "more", "write", "see",
    "number", "way", "could", "people", "first", "water", "long", "day", "come", "made",
    "answer", "question", "please", "help", "text", "data", "server", "request", "message",
    "city", "country", "computer", "science", "language", "learning", "small", "large", "good",
    "new", "old", "great", "house", "tree", "river", "quick", "brown", "fox", "lazy", "dog",
)


def filler_text(seed: int, words: int) -> str:
    """Deterministic prose-like filler: the same seed gives the same text on every server."""
    out, x = [], seed * 2654435761 % 2**32
    for i in range(words):
        x = (x * 1103515245 + 12345) % 2**31
        word = _FILLER[x % len(_FILLER)]
        out.append(word + ("." if i % 12 == 11 else ""))
    return " ".join(out)


@dataclass
class MultiTurnConfig:
    """Several conversations at once, each sending its turns one after another.

    Every conversation starts with the same long system prompt; each turn resends the whole
    history (system prompt, every earlier user message and the server's own replies) plus a
    new user message, as chat clients do.
    """

    url: str
    model: str
    conversations: int = 4
    turns: int = 4
    system_words: int = 1200
    user_words: int = 40
    max_tokens: int = 48
    timeout_s: float = 300.0
    seed: int = 11


async def run_multiturn(cfg: MultiTurnConfig) -> dict[str, Any]:
    """Runs the conversations; TTFT by turn, tokens/s of the whole run, cached tokens."""
    system = filler_text(cfg.seed, cfg.system_words)
    async with _session(keep_alive=False) as session:
        # Warm-up with another system prompt, so the first turns below start cold.
        warm = {"model": cfg.model, "max_tokens": WARMUP_MAX_TOKENS, "stream": True,
                "messages": [{"role": "user", "content": filler_text(cfg.seed + 1, 20)}]}
        warm_res = await stream_request(session, cfg.url, warm, -1, cfg.timeout_s, 0.0)
        if not warm_res.ok:
            log.warning("warm-up request failed: %s", warm_res.error)
        t0 = time.perf_counter()

        async def conversation(c: int) -> list[RequestResult]:
            messages: list[dict[str, str]] = [{"role": "system", "content": system}]
            results = []
            for t in range(cfg.turns):
                messages.append({"role": "user", "content": filler_text(
                    cfg.seed * 1000 + c * 100 + t, cfg.user_words)})
                body = {
                    "model": cfg.model, "messages": messages, "max_tokens": cfg.max_tokens,
                    "temperature": 0.7, "seed": BASE_SEED + c * 100 + t, "stream": True,
                    "stream_options": {"include_usage": True},
                }
                res = await stream_request(session, cfg.url, body, c * 100 + t, cfg.timeout_s,
                                           t0)
                results.append(res)
                if not res.ok:
                    break
                messages.append({"role": "assistant", "content": "".join(res.text)})
            return results

        per_conversation = await asyncio.gather(
            *(conversation(c) for c in range(cfg.conversations)))
    return summarize_multiturn(per_conversation, cfg)


def summarize_multiturn(per_conversation: Sequence[Sequence[RequestResult]],
                        cfg: MultiTurnConfig) -> dict[str, Any]:
    """TTFT percentiles by turn (over the conversations), and over all later turns."""
    results = [r for conv in per_conversation for r in conv]
    first = min((r.start for r in results), default=0.0)
    last = max((r.end for r in results), default=0.0)
    wall = last - first
    tokens = sum(r.num_chunks for r in results)
    by_turn = []
    for t in range(cfg.turns):
        turn = [conv[t] for conv in per_conversation if len(conv) > t and conv[t].ok]
        ttfts = [r.ttft for r in turn if r.ttft is not None]
        cached = [r.cached_tokens for r in turn if r.cached_tokens is not None]
        by_turn.append({
            "turn": t + 1, "ttft_p50": percentile(ttfts, 50), "ttft_p95": percentile(ttfts, 95),
            "ttfts": ttfts, "cached_tokens_mean": statistics.mean(cached) if cached else None,
        })
    later = [x for turn in by_turn[1:] for x in turn["ttfts"]]
    errors = [r.error for r in results if r.error]
    missing = cfg.conversations * cfg.turns - len(results)
    return {
        "url": cfg.url, "conversations": cfg.conversations, "turns": cfg.turns,
        "system_words": cfg.system_words, "user_words": cfg.user_words,
        "max_tokens": cfg.max_tokens, "wall_s": wall, "tokens": tokens,
        "tok_s": tokens / wall if wall > 0 else 0.0, "by_turn": by_turn,
        "first_ttft_p50": by_turn[0]["ttft_p50"] if by_turn else None,
        "later_ttft_p50": percentile(later, 50),
        "errors": len(errors) + missing, "error_samples": sorted(set(errors))[:5],
    }


def merge_multiturn_rounds(rounds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One server's rounds as one row: TTFTs pooled over the rounds, the median round's
    tokens/s, every round's errors."""
    turns = max(len(r["by_turn"]) for r in rounds)
    by_turn = []
    for t in range(turns):
        ttfts = [x for r in rounds if len(r["by_turn"]) > t for x in r["by_turn"][t]["ttfts"]]
        cached = [r["by_turn"][t]["cached_tokens_mean"] for r in rounds
                  if len(r["by_turn"]) > t and r["by_turn"][t]["cached_tokens_mean"] is not None]
        by_turn.append({"turn": t + 1, "ttft_p50": percentile(ttfts, 50),
                        "cached_tokens_mean": statistics.mean(cached) if cached else None})
    later = [x for r in rounds for turn in r["by_turn"][1:] for x in turn["ttfts"]]
    first = by_turn[0]["ttft_p50"] if by_turn else None
    later_p50 = percentile(later, 50)
    tok_s = sorted(r["tok_s"] for r in rounds)
    return {
        "by_turn": by_turn, "first_ttft_p50": first, "later_ttft_p50": later_p50,
        "later_over_first": later_p50 / first if first and later_p50 is not None else None,
        "tok_s": tok_s[(len(tok_s) - 1) // 2], "rounds_tok_s": [r["tok_s"] for r in rounds],
        "errors": sum(r["errors"] for r in rounds),
    }


def multiturn_table(rows: dict[str, dict[str, Any]]) -> list[str]:
    turns = max((len(r["by_turn"]) for r in rows.values()), default=0)
    head = "| server | " + " | ".join(f"turn {t + 1} TTFT p50 (ms)" for t in range(turns))
    lines = [
        head + " | later turns p50 (ms) | later / first | tok/s | cached tokens, later turns "
        "(mean) | errors |",
        "|---|" + "---:|" * (turns + 5),
    ]
    for name, r in rows.items():
        cached = [t["cached_tokens_mean"] for t in r["by_turn"][1:]
                  if t["cached_tokens_mean"] is not None]
        lines.append(
            f"| {name} | " + " | ".join(_fmt(t["ttft_p50"], 1000) for t in r["by_turn"])
            + f" | {_fmt(r['later_ttft_p50'], 1000)} | {_fmt(r['later_over_first'], digits=2)}"
            + f" | {_fmt(r['tok_s'], digits=1)}"
            + f" | {_fmt(statistics.mean(cached)) if cached else '-'} | {r['errors']} |"
        )
    return lines


def multiturn_verdicts(rows: dict[str, dict[str, Any]]) -> list[tuple[str, bool]]:
    """The issue's targets: WiCore's later turns at most 0.25x its first turn's TTFT p50, and
    at most llama-server's later turns' (each only when the rows are there)."""
    out = []
    ours = rows.get("wicore")
    if ours and ours["later_over_first"] is not None:
        out.append((f"WiCore later turns / first turn TTFT p50: {ours['later_over_first']:.2f}x "
                    f"(target <= {MULTITURN_TARGET_RATIO}x)",
                    ours["later_over_first"] <= MULTITURN_TARGET_RATIO and not ours["errors"]))
    theirs = rows.get("llama-server")
    if ours and theirs and ours["later_ttft_p50"] and theirs["later_ttft_p50"]:
        out.append((f"WiCore / llama-server later turns TTFT p50: "
                    f"{ours['later_ttft_p50'] / theirs['later_ttft_p50']:.2f}x (target <= 1x)",
                    ours["later_ttft_p50"] <= theirs["later_ttft_p50"]
                    and not ours["errors"] and not theirs["errors"]))
    return out


@dataclass
class FairnessConfig:
    url: str
    model: str
    flood_key: str
    polite_key: str
    flood_requests: int = 40
    probes: int = 6
    interval_s: float = 1.0
    max_tokens: int = 64
    probe_max_tokens: int = 16
    timeout_s: float = 300.0


async def run_fairness(cfg: FairnessConfig) -> dict[str, Any]:
    """The issue's measurement: a key sending one request a second keeps its TTFT near its
    idle value while another key sends `flood_requests` at once (same priority). Give both
    flags the same key for the baseline: one tenant, first come first served."""

    async def probes(session: aiohttp.ClientSession, t0: float, first: int) -> list[float | None]:
        out: list[float | None] = []
        for n in range(cfg.probes):
            body = chat_body(cfg.model, first + n, cfg.probe_max_tokens, None, None, False)
            res = await stream_request(session, cfg.url, body, first + n, cfg.timeout_s, t0,
                                       api_key=cfg.polite_key)
            if res.error:
                log.warning("probe failed: %s", res.error)
            out.append(res.ttft)
            await asyncio.sleep(max(0.0, cfg.interval_s - (res.ttft or 0.0)))
        return out

    async with _session() as session:
        warm = chat_body(cfg.model, -1, WARMUP_MAX_TOKENS, None, None, False)
        await stream_request(session, cfg.url, warm, -1, cfg.timeout_s, 0.0,
                             api_key=cfg.polite_key)
        t0 = time.perf_counter()
        idle = await probes(session, t0, 2000)
        # Lengths vary around max_tokens (see staggered()): slots free one by one, as in use.
        flood = [asyncio.create_task(stream_request(
            session, cfg.url,
            chat_body(cfg.model, 3000 + i, staggered(cfg.max_tokens, i), None, None, False),
            3000 + i, cfg.timeout_s, t0, api_key=cfg.flood_key))
            for i in range(cfg.flood_requests)]
        await asyncio.sleep(0.5)  # the flood is queued
        loaded = await probes(session, t0, 4000)
        flood_results = await asyncio.gather(*flood)

    def median(values: list[float | None]) -> float | None:
        ok = [v for v in values if v is not None]
        return statistics.median(ok) if ok else None

    flood_ttfts = [r.ttft for r in flood_results if r.ttft is not None]
    return {
        "url": cfg.url,
        "idle_ttft": median(idle),
        "flooded_ttft": median(loaded),
        "flood_ttft_p50": percentile(flood_ttfts, 50),
        "flood_ttft_max": max(flood_ttfts) if flood_ttfts else None,
        "idle_probes": idle,
        "flooded_probes": loaded,
        "errors": sum(v is None for v in idle + loaded)
        + sum(1 for r in flood_results if r.error),
    }


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def physical_cores() -> int:
    try:
        import psutil

        cores = psutil.cpu_count(logical=False)
    except ImportError:
        cores = None
    return cores or os.cpu_count() or 1


class ServerProcess:
    """A server subprocess in its own process group, output logged to a file."""

    def __init__(
        self, name: str, cmd: list[str], ready_path: str, port: int, log_path: Path
    ) -> None:
        self.name = name
        self.cmd = cmd
        self.url = f"http://127.0.0.1:{port}"
        self.ready_path = ready_path
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log.info("starting %s: %s (log: %s)", self.name, " ".join(self.cmd), self.log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    async def wait_ready(self, timeout_s: float) -> None:
        """Poll the ready URL until 200; raise if the process exits or time runs out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        url = self.url + self.ready_path
        async with _session() as session:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode} before it was ready; "
                        f"see {self.log_path}"
                    )
                try:
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                        if r.status == 200:
                            log.info("%s ready at %s", self.name, self.url)
                            return
                except (aiohttp.ClientError, OSError, TimeoutError):
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready within {timeout_s:g} s; see {self.log_path}")

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM, wait, then SIGKILL the process group (the server's own workers too)."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s; killing it", self.name, grace_s)
                proc.kill()
                proc.wait(10)
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # leftovers in the group we created
        except (ProcessLookupError, PermissionError):
            pass
        log.info("%s stopped (exit %s)", self.name, proc.returncode)


def wicore_server(
    model: str, threads: int, log_dir: Path, extra: Sequence[str], log_name: str = "wicore",
    name: str = "wicore",
) -> ServerProcess:
    port = free_port()
    cmd = [
        sys.executable, "-m", "wicore_cpp", "serve", "--model", model, "--model-id", "bench",
        "--port", str(port), "--threads", str(threads), "--rate-limit-per-minute", "0",
        "--max-concurrent-requests", "64", "--request-timeout-s", "600", *extra,
    ]
    return ServerProcess(name, cmd, "/health", port, log_dir / f"{log_name}.log")


def llama_cpp_server(
    model: str, threads: int, n_ctx: int, log_dir: Path, extra: Sequence[str],
    log_name: str = "llama-cpp-python",
) -> ServerProcess:
    """llama-cpp-python's server, configured as its users would for this load.

    `--interrupt_requests False`: by default a waiting request cuts the streaming one short,
    which would make it finish requests early rather than serve them. `--logits_all False`:
    the default keeps logits for every position (an n_ctx x vocab float array) that chat
    completions never read.
    """
    port = free_port()
    cmd = [
        sys.executable, "-m", "llama_cpp.server", "--model", model, "--model_alias", "bench",
        "--host", "127.0.0.1", "--port", str(port), "--n_threads", str(threads),
        "--n_threads_batch", str(threads), "--n_ctx", str(n_ctx),
        "--interrupt_requests", "False", "--logits_all", "False", *extra,
    ]
    return ServerProcess(
        "llama-cpp-python", cmd, "/v1/models", port, log_dir / f"{log_name}.log"
    )


# --------------------------------------------------------------------------- llama-server


LLAMA_CPP_PYTHON_PIN = "llama-cpp-python==0.3.36"
LLAMA_SERVER_CMAKE_ARGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
)


# What the benchmark builds from llama.cpp: the peer server and llama.cpp's own benchmarks,
# whose figures are the ceiling (`llama-bench`: one sequence; `llama-batched-bench`: B at once).
LLAMA_CPP_TARGETS = ("llama-server", "llama-bench", "llama-batched-bench")


class LlamaServerBuild:
    """llama.cpp's own `llama-server`, `llama-bench` and `llama-batched-bench`, built for the
    CPU from the `vendor/llama.cpp` tree of the pinned llama-cpp-python source distribution, so
    they run the very llama.cpp WiCore does. Built once under `root` (about 8 minutes on 2
    cores); later runs reuse the binaries while the pin, the build options and the targets are
    the same (a changed recipe rebuilds incrementally in the same tree). Nothing built here is
    committed.
    """

    def __init__(self, root: Path = Path("build/llama-server"), jobs: int = 0) -> None:
        self.root = root
        self.jobs = jobs or os.cpu_count() or 1
        self.binary = self.tool("llama-server")
        self._stamp = root / "built-from"

    def tool(self, name: str) -> Path:
        """Where the build puts one of LLAMA_CPP_TARGETS."""
        return self.root / "build" / "bin" / name

    @property
    def recipe(self) -> str:
        return " ".join((LLAMA_CPP_PYTHON_PIN, *LLAMA_SERVER_CMAKE_ARGS,
                         "--target", *LLAMA_CPP_TARGETS))

    def is_built(self) -> bool:
        return all(self.tool(t).is_file() for t in LLAMA_CPP_TARGETS) \
            and self._stamp.is_file() and self._stamp.read_text().strip() == self.recipe

    def ensure(self) -> Path:
        """The llama-server binary (its siblings beside it), built first if this recipe has
        not been built yet."""
        if self.is_built():
            return self.binary
        self.root.mkdir(parents=True, exist_ok=True)
        source = self._source()
        build = self.root / "build"
        log.info("building %s from %s (once; about 8 minutes on 2 cores)",
                 ", ".join(LLAMA_CPP_TARGETS), source)
        started = time.monotonic()
        self._run(["cmake", "-S", str(source), "-B", str(build), *LLAMA_SERVER_CMAKE_ARGS])
        self._run(["cmake", "--build", str(build), "-j", str(self.jobs), "--target",
                   *LLAMA_CPP_TARGETS])
        self._stamp.write_text(self.recipe + "\n")
        log.info("llama.cpp tools built in %.0f s: %s", time.monotonic() - started,
                 self.binary.parent)
        return self.binary

    def _source(self) -> Path:
        """vendor/llama.cpp of the pinned sdist (pip download uses pip's cache when it can)."""
        import tarfile

        name, version = LLAMA_CPP_PYTHON_PIN.split("==")
        unpacked = self.root / "src" / f"{name.replace('-', '_')}-{version}"
        vendor = unpacked / "vendor" / "llama.cpp"
        if vendor.is_dir():
            return vendor
        sdist_dir = self.root / "sdist"
        self._run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                   ":all:", LLAMA_CPP_PYTHON_PIN, "-d", str(sdist_dir)])
        (tarball,) = sdist_dir.glob(f"{name.replace('-', '_')}-{version}.tar.gz")
        with tarfile.open(tarball) as tar:
            tar.extractall(self.root / "src", filter="data")
        return vendor

    def _run(self, cmd: list[str]) -> None:
        log_path = self.root / "build.log"
        with open(log_path, "ab") as out:
            out.write(("$ " + " ".join(cmd) + "\n").encode())
            out.flush()
            rc = subprocess.call(cmd, stdout=out, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
        if rc != 0:
            raise RuntimeError(f"{cmd[0]} failed ({rc}); see {log_path}")


def llama_server(
    binary: Path, model: str, threads: int, n_ctx: int, parallel: int, log_dir: Path,
    extra: Sequence[str] = (), log_name: str = "llama-server",
) -> ServerProcess:
    """llama.cpp's server on one GGUF: `parallel` slots in one unified KV pool of `n_ctx`
    cells, as WiCore's worker has; its prompt cache (`cache_prompt`, `--cache-ram`, context
    checkpoints) is on, as by default. Served under the model id "bench"."""
    port = free_port()
    cmd = [
        str(binary), "--model", model, "--alias", "bench", "--host", "127.0.0.1",
        "--port", str(port), "--threads", str(threads), "--threads-batch", str(threads),
        "--ctx-size", str(n_ctx), "--parallel", str(parallel), "--kv-unified", *extra,
    ]
    return ServerProcess("llama-server", cmd, "/health", port, log_dir / f"{log_name}.log")


# --------------------------------------------------------------------------- raw llama.cpp


def _json_lines(text: str) -> list[dict[str, Any]]:
    """The JSON objects of a tool's output, one a line; log lines around them are skipped."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def parse_llama_bench(text: str) -> float | None:
    """Generation tokens/s (`tg`) from `llama-bench -o jsonl` output: the mean over its
    repetitions (`avg_ts`) of the test that generates without a prompt."""
    for row in _json_lines(text):
        if row.get("n_gen", 0) > 0 and row.get("n_prompt", 0) == 0 and "avg_ts" in row:
            return float(row["avg_ts"])
    return None


def parse_batched_bench(text: str) -> dict[int, dict[str, float]]:
    """Per batch size B (`pl`), from `llama-batched-bench --output-format jsonl`: the decode
    rate (`speed_tg`: B x tg tokens over the decode phase), the prompt rate and the whole."""
    out: dict[int, dict[str, float]] = {}
    for row in _json_lines(text):
        if "pl" in row and "speed_tg" in row:
            out[int(row["pl"])] = {
                "speed_tg": float(row["speed_tg"]), "speed_pp": float(row["speed_pp"]),
                "speed": float(row["speed"]), "t_tg": float(row["t_tg"]),
            }
    return out


def llama_bench_cmd(binary: Path, model: str, threads: int, n_gen: int,
                    repetitions: int = 3) -> list[str]:
    return [str(binary), "-m", model, "-t", str(threads), "-p", "0", "-n", str(n_gen),
            "-r", str(repetitions), "-o", "jsonl"]


def batched_bench_cmd(binary: Path, model: str, threads: int, n_gen: int, n_prompt: int,
                      batch_sizes: Sequence[int], n_ctx: int) -> list[str]:
    """B sequences of n_prompt + n_gen tokens in one unified KV pool, as the servers run."""
    return [str(binary), "-m", model, "-t", str(threads), "-tb", str(threads),
            "-c", str(n_ctx), "-npp", str(n_prompt), "-ntg", str(n_gen),
            "-npl", ",".join(str(b) for b in batch_sizes), "-kvu", "--output-format", "jsonl"]


def run_tool(cmd: list[str], log_path: Path, timeout_s: float) -> str:
    """Run one llama.cpp tool to completion; its output (also written to `log_path`)."""
    log.info("running %s", " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s,
                          stdin=subprocess.DEVNULL, check=False)
    text = proc.stdout + "\n" + proc.stderr
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.write_text(text)
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} failed ({proc.returncode}); see {log_path}")
    return text


def raw_ceilings(build: LlamaServerBuild, model: str, threads: int, n_gen: int,
                 n_ctx: int, log_dir: Path, timeout_s: float = 600.0) -> dict[str, Any]:
    """llama.cpp's own figures on this model and threads: `llama-bench` tg (one sequence) and
    `llama-batched-bench` at B = 1 and 16 (the decode rate of 16 sequences at once)."""
    tg = parse_llama_bench(run_tool(
        llama_bench_cmd(build.tool("llama-bench"), model, threads, n_gen),
        log_dir / "llama-bench.log", timeout_s))
    batched = parse_batched_bench(run_tool(
        batched_bench_cmd(build.tool("llama-batched-bench"), model, threads, n_gen, 32,
                          (1, 16), n_ctx),
        log_dir / "llama-batched-bench.log", timeout_s))
    return {"llama_bench_tg": tg, "batched": {str(b): v for b, v in batched.items()},
            "batched_tg_1": batched.get(1, {}).get("speed_tg"),
            "batched_tg_16": batched.get(16, {}).get("speed_tg")}


# --------------------------------------------------------------------------- compare


def _fmt(value: float | None, scale: float = 1.0, digits: int = 0) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _cancel_current_task() -> Callable[[], None]:
    task = asyncio.current_task()
    assert task is not None
    return lambda: task.cancel()


def _loadavg() -> float | None:
    """One-minute load average (None where the platform has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def markdown_table(runs: Sequence[dict[str, Any]]) -> list[str]:
    lines = [
        "| server | concurrency | tok/s | TTFT p50 (ms) | TTFT p95 (ms) "
        "| ITL p50 (ms) | ITL p95 (ms) | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run['server']} | {run['concurrency']} | {_fmt(run['tok_s'], digits=1)} "
            f"| {_fmt(run['ttft_p50'], 1000)} | {_fmt(run['ttft_p95'], 1000)} "
            f"| {_fmt(run['itl_p50'], 1000, 1)} | {_fmt(run['itl_p95'], 1000, 1)} "
            f"| {run['errors']} |"
        )
    return lines


def median_runs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (server, concurrency): the round with the median tokens/s (the lower of
    the two middle ones for an even count), its errors replaced by all rounds' errors, and
    every round's tokens/s in `rounds_tok_s`."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["server"], run["concurrency"]), []).append(run)
    rows = []
    for group in groups.values():
        ordered = sorted(group, key=lambda r: r["tok_s"])
        row = {k: v for k, v in ordered[(len(ordered) - 1) // 2].items() if k != "per_request"}
        row["errors"] = sum(r["errors"] for r in group)
        row["rounds_tok_s"] = [r["tok_s"] for r in group]
        rows.append(row)
    return rows


def ratios(runs: Sequence[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """WiCore / each peer's tokens/s per concurrency, with PASS/MISS against TARGETS:
    {peer: {concurrency: {ratio, target, verdict}}}; peers that did not run are left out."""
    by = {(r["server"], r["concurrency"]): r for r in runs}
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for peer, targets in TARGETS.items():
        for conc in sorted({r["concurrency"] for r in runs}):
            ours, theirs = by.get(("wicore", conc)), by.get((peer, conc))
            if not ours or not theirs or not theirs["tok_s"]:
                continue
            ratio = ours["tok_s"] / theirs["tok_s"]
            target = targets.get(conc)
            clean = ours["errors"] == 0 and theirs["errors"] == 0
            verdict = None if target is None else (
                "PASS" if ratio >= target and clean else "MISS")
            out.setdefault(peer, {})[conc] = {"ratio": ratio, "target": target,
                                              "verdict": verdict}
    return out


def ceiling_checks(runs: Sequence[dict[str, Any]],
                   ceilings: dict[str, Any] | None) -> list[dict[str, Any]]:
    """WiCore against raw llama.cpp (CEILING_TARGETS) and its 16-stream TTFT p50 against
    llama-server's: one {name, value, bound, verdict} per check that has both figures."""
    by = {(r["server"], r["concurrency"]): r for r in runs}
    checks: list[dict[str, Any]] = []
    one, sixteen = by.get(("wicore", 1)), by.get(("wicore", 16))
    if ceilings and one and ceilings.get("llama_bench_tg"):
        ratio = one["tok_s"] / ceilings["llama_bench_tg"]
        checks.append({"name": "1 stream tok/s / llama-bench tg", "value": ratio,
                       "bound": CEILING_TARGETS[1], "higher_is_better": True})
    if ceilings and sixteen and ceilings.get("batched_tg_16") and sixteen.get("decode_tok_s"):
        ratio = sixteen["decode_tok_s"] / ceilings["batched_tg_16"]
        checks.append({"name": "16 streams decode tok/s / llama-batched-bench B=16 decode",
                       "value": ratio, "bound": CEILING_TARGETS[16], "higher_is_better": True})
    peer = by.get(("llama-server", 16))
    if sixteen and peer and sixteen["ttft_p50"] is not None and peer["ttft_p50"]:
        checks.append({"name": "16 streams TTFT p50 / llama-server's",
                       "value": sixteen["ttft_p50"] / peer["ttft_p50"], "bound": 1.0,
                       "higher_is_better": False})
    for check in checks:
        good = (check["value"] >= check["bound"] if check["higher_is_better"]
                else check["value"] <= check["bound"])
        check["verdict"] = "PASS" if good else "MISS"
    return checks


def report_lines(results: dict[str, Any]) -> list[str]:
    load = results.get("loadavg_start")
    lines = [
        f"model {results['model']}, {results['threads']} threads, "
        f"max_tokens {results['max_tokens']}"
        + (f", load average {load:.1f} at start" if load is not None else ""),
        "",
        *markdown_table(results["table"]),
        "",
    ]
    if results.get("rounds", 1) > 1:
        lines.append("tokens/s in each round (the table shows the median round):")
        for row in results["table"]:
            each = ", ".join(f"{v:.1f}" for v in row["rounds_tok_s"])
            lines.append(f"  {row['server']} at concurrency {row['concurrency']}: {each}")
        lines.append("")
    ceilings = results.get("ceilings")
    if ceilings:
        lines.append(
            f"raw llama.cpp: llama-bench tg {_fmt(ceilings.get('llama_bench_tg'), digits=1)} "
            f"tok/s; llama-batched-bench decode at B=1 "
            f"{_fmt(ceilings.get('batched_tg_1'), digits=1)}, at B=16 "
            f"{_fmt(ceilings.get('batched_tg_16'), digits=1)} tok/s")
    for row in results["table"]:
        if row.get("decode_tok_s") and row["concurrency"] > 1:
            lines.append(f"{row['server']} at concurrency {row['concurrency']}: decode phase "
                         f"{row['decode_tok_s']:.1f} tok/s (concurrency / mean ITL)")
    for peer, per_conc in results["ratios"].items():
        for conc, r in sorted(per_conc.items()):
            target = f" (target >= {r['target']:g}x: {r['verdict']})" if r["target"] else ""
            lines.append(f"WiCore / {peer} at concurrency {conc}: {r['ratio']:.2f}x{target}")
    for check in results.get("checks", ()):
        sign = ">=" if check["higher_is_better"] else "<="
        lines.append(f"{check['name']}: {check['value']:.2f} (target {sign} "
                     f"{check['bound']:g}: {check['verdict']})")
    by = {(r["server"], r["concurrency"]): r for r in results["table"]}
    for conc in sorted({c for s, c in by if s == "wicore-ray"}):
        local, on_ray = by.get(("wicore", conc)), by[("wicore-ray", conc)]
        if local and local["tok_s"]:
            cost = 1 - on_ray["tok_s"] / local["tok_s"]
            lines.append(f"Ray transport at concurrency {conc}: {on_ray['tok_s']:.1f} vs "
                         f"{local['tok_s']:.1f} tok/s locally ({cost:+.1%} cost)")
    pri = results.get("priority")
    if pri:
        lines.append(
            f"Priority, {pri['running']} normal streams running and {pri['waiting']} waiting: "
            f"urgent TTFT {_fmt(pri['urgent_ttft'], 1000)} ms, normal TTFT "
            f"{_fmt(pri['normal_ttft'], 1000)} ms"
            + (f" ({pri['normal_over_urgent']:.1f}x)" if pri["normal_over_urgent"] else "")
            + f", errors {pri['errors']}"
        )
    for failure in results["failures"]:
        lines.append(f"FAILED: {failure}")
    return lines


async def compare(args: argparse.Namespace) -> int:
    model = str(Path(args.model).resolve())
    if not Path(model).is_file():
        log.error("model file %s not found", model)
        return 2
    threads = args.threads or physical_cores()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan = [(1, args.requests_1), (16, args.requests_16)]
    results: dict[str, Any] = {
        "model": model, "threads": threads, "max_tokens": args.max_tokens,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "runs": [], "priority": None,
        "rounds": args.rounds, "table": [], "ratios": {}, "checks": [], "failures": [],
        "ceilings": None,
    }
    results["loadavg_start"] = _loadavg()
    if results["loadavg_start"] is not None and results["loadavg_start"] > 0.5:
        log.warning("load average is %.1f before any server started: other work on this "
                    "machine will skew the numbers", results["loadavg_start"])
    # SIGTERM (e.g. a killed `make`) must still stop the server: cancel, and the finally
    # below runs. Ctrl-C already cancels through asyncio.run.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, _cancel_current_task())
    began = time.monotonic()
    factories: dict[str, Callable[[int], ServerProcess]] = {}
    if "wicore" in args.servers.split(","):
        factories["wicore"] = lambda n: wicore_server(
            model, threads, out_dir, ["--ctx-size", str(args.server_ctx), *args.wicore_arg],
            f"wicore-r{n}"
        )
    if "wicore-ray" in args.servers.split(","):
        # The same server with its worker as a Ray actor on a local Ray instance: what the
        # Ray transport costs against a local worker process.
        factories["wicore-ray"] = lambda n: wicore_server(
            model, threads, out_dir, [*args.wicore_arg, "--ray-address", "local"],
            f"wicore-ray-r{n}", name="wicore-ray",
        )
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    build = LlamaServerBuild(Path(args.build_dir))
    if "llama-server" in servers or not args.skip_ceilings:
        await asyncio.to_thread(build.ensure)
    if "llama-server" in servers:
        # As many slots as the busiest run's streams, one unified KV pool of the same size as
        # WiCore's (--ctx-size below), the same threads.
        factories["llama-server"] = lambda n: llama_server(
            build.binary, model, threads, args.server_ctx, 16, out_dir,
            args.llama_server_arg, f"llama-server-r{n}")
    if "llama" in servers:
        factories["llama-cpp-python"] = lambda n: llama_cpp_server(
            model, threads, args.n_ctx, out_dir, args.llama_arg, f"llama-cpp-python-r{n}"
        )
    if not args.skip_ceilings:
        try:
            results["ceilings"] = await asyncio.to_thread(
                raw_ceilings, build, model, threads, args.max_tokens, args.server_ctx, out_dir)
        except Exception as exc:  # noqa: BLE001 - the servers can still be compared
            log.exception("raw llama.cpp figures failed")
            results["failures"].append(f"raw llama.cpp: {exc}")
    # Rounds alternate the servers, so a burst of other load on the machine hits both
    # rather than one; the table reports each configuration's median round.
    for n in range(args.rounds):
        for name, factory in factories.items():
            if any(f.startswith(name + ":") for f in results["failures"]):
                continue
            server = factory(n + 1)
            try:
                server.start()
                await server.wait_ready(args.start_timeout)
                for conc, requests in plan:
                    log.info("round %d, %s: concurrency %d, %d requests", n + 1, name, conc,
                             requests)
                    run = await run_load(RunConfig(
                        url=server.url, model="bench", concurrency=conc, requests=requests,
                        max_tokens=args.max_tokens, timeout_s=args.timeout,
                        keep_alive=False,  # llama-server's own schedule; the same for all
                    ))
                    run["server"] = name
                    run["round"] = n + 1
                    results["runs"].append(run)
                    log.info("round %d, %s c=%d: %.1f tok/s, %d errors", n + 1, name, conc,
                             run["tok_s"], run["errors"])
                    # Kept as it goes: a run cut short (a quiet window's end) keeps its rounds.
                    (out_dir / "partial.json").write_text(json.dumps(results, indent=2) + "\n")
                if name == "wicore" and n == 0 and not args.skip_priority:
                    log.info("wicore: priority test")
                    results["priority"] = await run_priority(PriorityConfig(
                        url=server.url, model="bench", probes=args.probes,
                        timeout_s=args.timeout,
                    ))
            except Exception as exc:  # noqa: BLE001 - one failed server must not stop the other
                log.exception("%s failed", name)
                results["failures"].append(f"{name}: {exc}")
            finally:
                server.stop()
    results["table"] = median_runs(results["runs"])
    results["ratios"] = ratios(results["table"])
    results["checks"] = ceiling_checks(results["table"], results["ceilings"])
    results["elapsed_s"] = time.monotonic() - began
    results["loadavg_end"] = _loadavg()
    for line in report_lines(results):
        emit(line)
    emit(f"\ncompare took {results['elapsed_s']:.0f} s; logs and JSON in {out_dir}/")
    path = out_dir / "latest.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    errors = sum(r["errors"] for r in results["runs"])
    if results["priority"]:
        errors += results["priority"]["errors"]
    if results["failures"] or errors:
        return 1
    if args.strict and (
            any(r["verdict"] == "MISS" for per in results["ratios"].values()
                for r in per.values())
            or any(c["verdict"] == "MISS" for c in results["checks"])):
        return 1
    return 0


# --------------------------------------------------------------------------- multiturn


async def multiturn(args: argparse.Namespace) -> int:
    """The multi-turn workload on WiCore (with and without its prompt cache) and llama.cpp's
    own server, one server at a time, rounds alternating; a table of TTFT by turn."""
    model = str(Path(args.model).resolve())
    if not Path(model).is_file():
        log.error("model file %s not found", model)
        return 2
    threads = args.threads or physical_cores()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    factories: dict[str, Callable[[int], ServerProcess]] = {}
    common = ["--ctx-size", str(args.n_ctx)]
    if "wicore" in servers:
        factories["wicore"] = lambda n: wicore_server(
            model, threads, out_dir, [*common, *args.wicore_arg], f"multiturn-wicore-r{n}")
    if "wicore-nocache" in servers:
        factories["wicore-nocache"] = lambda n: wicore_server(
            model, threads, out_dir, [*common, "--prompt-cache-share", "0", *args.wicore_arg],
            f"multiturn-wicore-nocache-r{n}")
    if "llama-server" in servers:
        binary = await asyncio.to_thread(LlamaServerBuild(Path(args.build_dir)).ensure)
        factories["llama-server"] = lambda n: llama_server(
            binary, model, threads, args.n_ctx, args.parallel, out_dir, args.llama_arg,
            f"multiturn-llama-server-r{n}")
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, _cancel_current_task())
    results: dict[str, Any] = {
        "model": model, "threads": threads, "n_ctx": args.n_ctx, "rounds": args.rounds,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loadavg_start": _loadavg(),
        "runs": {name: [] for name in factories}, "failures": [],
    }
    began = time.monotonic()
    for n in range(args.rounds):
        for name, factory in factories.items():
            if any(f.startswith(name + ":") for f in results["failures"]):
                continue
            server = factory(n + 1)
            try:
                server.start()
                await server.wait_ready(args.start_timeout)
                run = await run_multiturn(MultiTurnConfig(
                    url=server.url, model="bench", conversations=args.conversations,
                    turns=args.turns, system_words=args.system_words,
                    user_words=args.user_words, max_tokens=args.max_tokens,
                    timeout_s=args.timeout,
                ))
                results["runs"][name].append(run)
                log.info("round %d, %s: first turn TTFT p50 %s s, later %s s, %.1f tok/s, "
                         "%d errors", n + 1, name, run["first_ttft_p50"], run["later_ttft_p50"],
                         run["tok_s"], run["errors"])
            except Exception as exc:  # noqa: BLE001 - one failed server must not stop the rest
                log.exception("%s failed", name)
                results["failures"].append(f"{name}: {exc}")
            finally:
                server.stop()
    rows = {name: merge_multiturn_rounds(runs) for name, runs in results["runs"].items() if runs}
    verdicts = multiturn_verdicts(rows)
    results.update(table=rows, verdicts=verdicts, elapsed_s=time.monotonic() - began,
                   loadavg_end=_loadavg())
    load = results["loadavg_start"]
    emit(f"model {model}, {threads} threads, {args.conversations} conversations x {args.turns} "
         f"turns, system prompt {args.system_words} words, {args.user_words} words a turn, "
         f"max_tokens {args.max_tokens}, {args.rounds} rounds"
         + (f", load average {load:.1f} at start" if load is not None else ""))
    emit()
    for line in multiturn_table(rows):
        emit(line)
    emit()
    for text, ok in verdicts:
        emit(f"{text}: {'PASS' if ok else 'MISS'}")
    for failure in results["failures"]:
        emit(f"FAILED: {failure}")
    emit(f"\nmultiturn took {results['elapsed_s']:.0f} s; logs and JSON in {out_dir}/")
    (out_dir / "multiturn.json").write_text(json.dumps(results, indent=2) + "\n")
    if results["failures"] or any(r["errors"] for r in rows.values()):
        return 1
    if args.strict and not all(ok for _, ok in verdicts):
        return 1
    return 0


# --------------------------------------------------------------------------- host tier


def measure_host_tier(model_path: str, threads: int, lengths: Sequence[int],
                      repeats: int = 3) -> list[dict[str, Any]]:
    """For each prompt length: the time to prefill it, to save its KV cells to host memory
    (`llama_state_seq_get_data`) and to put them back (`llama_state_seq_set_data`), on
    WiCore's own backend, in one context shaped like a worker's. Medians of `repeats`."""
    from wicore_cpp.engine.backend import BatchContext, Model

    model = Model(Path(model_path))
    n_batch = 512
    ctx = BatchContext(model, n_ctx=max(lengths) + n_batch, n_batch=n_batch, n_seq_max=1,
                       threads=threads, flash_attn="auto")
    rows = []
    try:
        words = filler_text(5, max(lengths))
        tokens = model.tokenize(words, add_special=True)
        for n in lengths:
            prompt = tokens[:n]
            assert len(prompt) == n, "filler text too short"
            prefill, save, restore = [], [], []
            for _ in range(repeats):
                ctx.drop_sequence(0)
                t = time.perf_counter()
                for start in range(0, n, n_batch):
                    ctx.clear_batch()
                    for pos in range(start, min(n, start + n_batch)):
                        ctx.add(prompt[pos], pos, 0, pos == n - 1)
                    if ctx.decode() != 0:
                        raise RuntimeError("decode failed")
                ctx.logits_ready(ctx.batch_size - 1)
                prefill.append(time.perf_counter() - t)
                t = time.perf_counter()
                state = ctx.save_sequence(0)
                save.append(time.perf_counter() - t)
                assert state is not None
                ctx.drop_sequence(0)  # evicted; then a request comes back for it
                t = time.perf_counter()
                ok = ctx.restore_sequence(0, state)
                restore.append(time.perf_counter() - t)
                assert ok and ctx.pos_max(0) == n - 1
            rows.append({"tokens": n, "bytes": len(state),
                         "prefill_s": statistics.median(prefill),
                         "save_s": statistics.median(save),
                         "restore_s": statistics.median(restore)})
    finally:
        ctx.close()
        model.close()
    return rows


# --------------------------------------------------------------------------- CLI


def profile_steps(model_path: str, threads: int, n_seqs: int, backend: bool,
                  steps: int = 24, max_tokens: int = 200) -> dict[str, float]:
    """Where a decode step's time goes with `n_seqs` sequences generating, the batcher driven
    directly (no HTTP): milliseconds per step in llama_decode, in sampling (reading the drawn
    token, with backend sampling), in the rest of the step (WiCore's Python), and what the
    step's message costs to pickle (the IPC encoding) and its SSE chunks to encode."""
    import pickle

    import orjson

    from wicore_cpp.engine.backend import BatchContext, Model
    from wicore_cpp.engine.batcher import ContinuousBatcher
    from wicore_cpp.engine.messages import GenerateRequest, SamplingParams

    model = Model(Path(model_path))
    ctx = BatchContext(model, n_ctx=4096, n_batch=512, n_seq_max=n_seqs, threads=threads,
                       backend_sampling=backend)
    batcher = ContinuousBatcher(model, ctx, sample_threads=threads)
    timing = {"decode": 0.0, "sample": 0.0}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a)
            finally:
                timing[name] += time.perf_counter() - t
        return wrapper

    ctx.decode = timed("decode", ctx.decode)  # type: ignore[method-assign]
    batcher._sample = timed("sample", batcher._sample)  # type: ignore[method-assign]
    for i in range(n_seqs):
        prompt = model.tokenize(PROMPTS[i % len(PROMPTS)], add_special=True)
        batcher.submit(GenerateRequest(f"r{i}", prompt, SamplingParams(
            max_tokens=max_tokens, temperature=0.7, seed=BASE_SEED + i), 1))
    while any(s.is_prefilling for s in batcher._active.values()) or not batcher._active:
        batcher.step()  # prefill, not measured
    timing.update(decode=0.0, sample=0.0)
    total = ipc = sse = 0.0
    for _ in range(steps):
        t = time.perf_counter()
        updates = batcher.step()
        total += time.perf_counter() - t
        t = time.perf_counter()
        pickle.dumps(updates)
        ipc += time.perf_counter() - t
        t = time.perf_counter()
        for update in updates:
            orjson.dumps({"choices": [{"index": 0, "delta": {"content": update[2]}}]})
        sse += time.perf_counter() - t
    batcher.cancel_all()
    while not batcher.is_idle:
        batcher.step()
    ctx.close()
    model.close()
    ms = 1000 / steps
    return {"sequences": n_seqs, "backend_sampling": backend, "step_ms": total * ms,
            "decode_ms": timing["decode"] * ms, "sample_ms": timing["sample"] * ms,
            "python_ms": (total - timing["decode"] - timing["sample"]) * ms,
            "ipc_pickle_ms": ipc * ms, "sse_encode_ms": sse * ms,
            "tok_s": n_seqs / total * steps}


def _print_run(report: dict[str, Any]) -> None:
    emit(f"{report['requests']} requests, concurrency {report['concurrency']}, "
         f"{report['tokens']} tokens in {report['wall_s']:.2f} s")
    emit(f"aggregate tokens/s: {report['tok_s']:.1f}"
         + (f" (usage: {report['usage_tokens']} tokens)" if report["usage_tokens"] else ""))
    emit(f"TTFT p50/p95: {_fmt(report['ttft_p50'], 1000)} / {_fmt(report['ttft_p95'], 1000)} ms")
    emit(f"ITL  p50/p95: {_fmt(report['itl_p50'], 1000, 1)} / "
         f"{_fmt(report['itl_p95'], 1000, 1)} ms")
    emit(f"errors: {report['errors']}")
    for sample in report["error_samples"]:
        emit(f"  {sample}")


@dataclass
class HolConfig:
    url: str
    model: str
    hostile: int  # hostile requests sent at once
    messages: int  # messages in each
    message_text: str
    probes: int  # short requests, one every `interval_s`
    interval_s: float
    timeout_s: float


async def run_hol(cfg: HolConfig) -> dict[str, Any]:
    """Short requests' latency while hostile ones (many messages) are being prepared."""
    turns = [{"role": ("user", "assistant")[i % 2], "content": cfg.message_text}
             for i in range(cfg.messages)]
    hostile_body = json.dumps({"model": cfg.model, "messages": turns, "max_tokens": 1}).encode()
    short_body = {"model": cfg.model, "max_tokens": 1,
                  "messages": [{"role": "user", "content": "Hi"}]}
    timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)

    async with _session(cfg.hostile + cfg.probes + 4) as session:
        async def one(body: Any, raw: bool) -> tuple[int, float]:
            start = time.perf_counter()
            kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if raw \
                else {"json": body}
            try:
                async with session.post(cfg.url + "/v1/chat/completions", timeout=timeout,
                                        **kwargs) as r:
                    await r.read()
                    return r.status, time.perf_counter() - start
            except (aiohttp.ClientError, TimeoutError):
                return 0, time.perf_counter() - start

        await one(short_body, False)  # warm-up
        hostile = [asyncio.create_task(one(hostile_body, True)) for _ in range(cfg.hostile)]
        await asyncio.sleep(cfg.interval_s)  # the hostile ones go first
        probes = []
        for _ in range(cfg.probes):
            probes.append(asyncio.create_task(one(short_body, False)))
            await asyncio.sleep(cfg.interval_s)
        hostile_results = await asyncio.gather(*hostile)
        probe_results = await asyncio.gather(*probes)
    latencies = [t for status, t in probe_results if status == 200]
    return {
        "hostile": {"count": cfg.hostile, "messages": cfg.messages,
                    "body_bytes": len(hostile_body),
                    "statuses": _count(str(s) for s, _ in hostile_results),
                    "seconds": [round(t, 3) for _, t in hostile_results]},
        "short": {"count": cfg.probes, "ok": len(latencies),
                  "p50_s": percentile(latencies, 50), "max_s": max(latencies, default=None)},
    }


@dataclass
class ImagesConfig:
    url: str
    model: str
    streams: int  # text streams running throughout
    images: int  # image requests, one every `interval_s` once the streams run
    interval_s: float
    image_size: tuple[int, int]
    max_tokens: int  # each text stream's
    timeout_s: float


def _noise_png(seed: int, size: tuple[int, int]) -> bytes:
    """A picture no other request sends (so no prompt cache hit), as PNG."""
    import io
    import random
    import zlib

    # Plain zlib PNG, so the bench needs no imaging library.
    rng = random.Random(seed)
    width, height = size
    raw = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return (len(data).to_bytes(4, "big") + body
                + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(4, "big"))

    out = io.BytesIO()
    out.write(b"\x89PNG\r\n\x1a\n")
    out.write(chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big")
                    + bytes([8, 2, 0, 0, 0])))
    out.write(chunk(b"IDAT", zlib.compress(raw, 1)))
    out.write(chunk(b"IEND", b""))
    return out.getvalue()


def _token_times(res: RequestResult) -> list[float]:
    """When each content chunk of a stream arrived (seconds from the run's start)."""
    if res.ttft is None:
        return []
    times = [res.start + res.ttft]
    for gap in res.gaps:
        times.append(times[-1] + gap)
    return times


async def run_images(cfg: ImagesConfig) -> dict[str, Any]:
    """Text streams' inter-token gaps before and while image requests are served."""
    import base64

    t0 = time.perf_counter()
    started = asyncio.Event()
    first_tokens = 0

    def on_first() -> None:
        nonlocal first_tokens
        first_tokens += 1
        if first_tokens == cfg.streams:
            started.set()

    async with _session(cfg.streams + cfg.images + 4, keep_alive=False) as session:
        texts = [asyncio.create_task(stream_request(
            session, cfg.url, chat_body(cfg.model, i, cfg.max_tokens, None, None, True), i,
            cfg.timeout_s, t0, on_first)) for i in range(cfg.streams)]
        await asyncio.wait_for(started.wait(), cfg.timeout_s)
        await asyncio.sleep(1.0)  # a second of steady decoding before the first image
        images_from = time.perf_counter() - t0
        image_tasks = []
        for k in range(cfg.images):
            url = "data:image/png;base64," + base64.b64encode(
                _noise_png(BASE_SEED + k, cfg.image_size)).decode()
            body = chat_body(cfg.model, k, 8, None, None, True)
            body["messages"] = [{"role": "user", "content": [
                {"type": "text", "text": "What is in this picture?"},
                {"type": "image_url", "image_url": {"url": url}}]}]
            image_tasks.append(asyncio.create_task(stream_request(
                session, cfg.url, body, 1000 + k, cfg.timeout_s, t0)))
            await asyncio.sleep(cfg.interval_s)
        image_results = await asyncio.gather(*image_tasks)
        images_until = max((r.start + r.ttft for r in image_results if r.ttft is not None),
                           default=time.perf_counter() - t0)
        text_results = await asyncio.gather(*texts)
    before: list[float] = []
    during: list[float] = []
    for res in text_results:
        times = _token_times(res)
        for prev, now in itertools.pairwise(times):
            if now <= images_from:
                before.append(now - prev)
            elif prev >= images_from and now <= images_until:
                during.append(now - prev)

    def stats(gaps: list[float]) -> dict[str, Any]:
        return {"gaps": len(gaps), "p50_ms": _ms(percentile(gaps, 50)),
                "p90_ms": _ms(percentile(gaps, 90)), "p99_ms": _ms(percentile(gaps, 99)),
                "max_ms": _ms(max(gaps, default=None))}

    ttfts = [r.ttft for r in image_results if r.ttft is not None]
    errors = [r.error for r in (*text_results, *image_results) if r.error]
    return {
        "streams": cfg.streams, "images": cfg.images, "interval_s": cfg.interval_s,
        "image_size": list(cfg.image_size),
        "images_window_s": round(images_until - images_from, 3),
        "itl_before_images": stats(before), "itl_while_images": stats(during),
        "image_ttft_ms": {"p50": _ms(percentile(ttfts, 50)), "max": _ms(max(ttfts,
                                                                            default=None))},
        "errors": errors,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def images(args: argparse.Namespace) -> int:
    """The `images` subcommand: start WiCore (unless --url), run, print, write JSON."""
    width, height = (int(x) for x in args.image_size.lower().split("x"))
    server = None
    url, model = args.url, args.model
    if url is None:
        threads = args.threads or physical_cores()
        server = wicore_server(args.model, threads, Path(args.out_dir), args.wicore_arg,
                               log_name="wicore-images")
        server.start()
        model = "bench"
    try:
        if server is not None:
            await server.wait_ready(args.start_timeout)
            url = server.url
        report = await run_images(ImagesConfig(
            url=url, model=model, streams=args.streams, images=args.images,
            interval_s=args.interval, image_size=(width, height), max_tokens=args.max_tokens,
            timeout_s=args.timeout))
    finally:
        if server is not None:
            server.stop()
    report["loadavg"] = _loadavg()
    b, d = report["itl_before_images"], report["itl_while_images"]
    emit(f"{report['streams']} text streams, {report['images']} images of "
         f"{width}x{height} every {report['interval_s']:g} s "
         f"(over {report['images_window_s']:g} s); load average {report['loadavg']}")
    emit("| text streams' inter-token latency | gaps | p50 (ms) | p90 (ms) | p99 (ms) | max (ms) |")
    emit("|---|---:|---:|---:|---:|---:|")
    for name, row in (("before the images", b), ("while images arrive", d)):
        emit(f"| {name} | {row['gaps']} | {row['p50_ms']} | {row['p90_ms']} | {row['p99_ms']} "
             f"| {row['max_ms']} |")
    emit(f"image requests' TTFT: p50 {report['image_ttft_ms']['p50']} ms, max "
         f"{report['image_ttft_ms']['max']} ms; errors {len(report['errors'])}")
    _write_json(args.json, report)
    return 1 if report["errors"] else 0


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="N concurrent streaming clients against one server")
    run.add_argument("--url", default="http://127.0.0.1:8000")
    run.add_argument("--model", required=True, help="model id sent in each request")
    run.add_argument("--concurrency", type=int, default=1)
    run.add_argument("--requests", type=int, default=8)
    run.add_argument("--max-tokens", type=int, default=64)
    run.add_argument("--prompt", help="one prompt for every request (default: a fixed set)")
    run.add_argument("--priority", help="priority field and X-Priority header to send")
    run.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    run.add_argument("--deadline", type=float, default=1800.0, help="whole run, seconds")
    run.add_argument("--no-usage", action="store_true", help="omit stream_options")
    run.add_argument("--json", metavar="OUT", help="also write the report as JSON")

    pri = sub.add_parser("priority", help="urgent vs normal TTFT under load (WiCore)")
    pri.add_argument("--url", default="http://127.0.0.1:8000")
    pri.add_argument("--model", required=True)
    pri.add_argument("--running", type=int, default=16)
    pri.add_argument("--waiting", type=int, default=32)
    pri.add_argument("--max-tokens", type=int, default=64, help="of the background requests")
    pri.add_argument("--probes", type=int, default=2, help="urgent and normal probes each")
    pri.add_argument("--timeout", type=float, default=300.0)
    pri.add_argument("--json", metavar="OUT")

    hol = sub.add_parser("hol", help="short requests while hostile ones are being prepared")
    hol.add_argument("--url", default="http://127.0.0.1:8000")
    hol.add_argument("--model", required=True)
    hol.add_argument("--hostile", type=int, default=1, help="hostile requests at once")
    hol.add_argument("--messages", type=int, default=50_001, help="messages in each")
    hol.add_argument("--message-text", default="hi there, how are you? " * 4)
    hol.add_argument("--probes", type=int, default=20, help="short requests")
    hol.add_argument("--interval", type=float, default=0.1, help="between short requests, s")
    hol.add_argument("--timeout", type=float, default=300.0)
    hol.add_argument("--json", metavar="OUT")

    fair = sub.add_parser("fairness", help="a polite key's TTFT while another key floods")
    fair.add_argument("--url", default="http://127.0.0.1:8000")
    fair.add_argument("--model", required=True)
    fair.add_argument("--flood-key", required=True, help="API key that sends the flood")
    fair.add_argument("--polite-key", required=True, help="API key sending one a second")
    fair.add_argument("--flood-requests", type=int, default=40)
    fair.add_argument("--probes", type=int, default=6)
    fair.add_argument("--max-tokens", type=int, default=64, help="of the flood's requests")
    fair.add_argument("--timeout", type=float, default=300.0)
    fair.add_argument("--json", metavar="OUT")

    cmp_ = sub.add_parser("compare", help="WiCore vs llama-server and llama-cpp-python's server")
    cmp_.add_argument("--model", required=True, help="GGUF file")
    cmp_.add_argument("--threads", type=int, default=0, help="default: physical cores")
    cmp_.add_argument("--max-tokens", type=int, default=64)
    cmp_.add_argument("--requests-1", type=int, default=6, help="requests at concurrency 1")
    cmp_.add_argument("--requests-16", type=int, default=48, help="requests at concurrency 16")
    cmp_.add_argument("--probes", type=int, default=2, help="urgent and normal probes each")
    cmp_.add_argument("--rounds", type=int, default=3,
                      help="rounds, alternating the servers; the table shows the median")
    cmp_.add_argument("--n-ctx", type=int, default=4096, help="llama-cpp-python's context")
    cmp_.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    cmp_.add_argument("--start-timeout", type=float, default=300.0)
    cmp_.add_argument("--servers", default="wicore,llama-server,llama",
                      help="comma list: wicore, llama-server (llama.cpp's own, built from the "
                      "pinned sdist), llama (llama-cpp-python's server), wicore-ray (WiCore "
                      "with its worker as a Ray actor; needs the `ray` extra)")
    cmp_.add_argument("--server-ctx", type=int, default=16384,
                      help="KV pool of WiCore and llama-server (and llama-batched-bench)")
    cmp_.add_argument("--build-dir", default="build/llama-server",
                      help="where llama.cpp's tools are built (once) and kept")
    cmp_.add_argument("--skip-ceilings", action="store_true",
                      help="do not run llama-bench and llama-batched-bench")
    cmp_.add_argument("--skip-priority", action="store_true")
    cmp_.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    cmp_.add_argument("--out-dir", default="bench-results")
    cmp_.add_argument("--wicore-arg", action="append", default=[], metavar="ARG",
                      help="extra argument for `wicore serve` (repeatable)")
    cmp_.add_argument("--llama-arg", action="append", default=[], metavar="ARG",
                      help="extra argument for llama_cpp.server (repeatable)")
    cmp_.add_argument("--llama-server-arg", action="append", default=[], metavar="ARG",
                      help="extra argument for llama-server (repeatable)")

    ht = sub.add_parser("host-tier", help="prefill vs save/restore of KV cells (no server)")
    ht.add_argument("--model", required=True, help="GGUF file")
    ht.add_argument("--threads", type=int, default=0, help="default: physical cores")
    ht.add_argument("--lengths", default="64,256,1024,4096", help="comma list of prompt tokens")
    ht.add_argument("--repeats", type=int, default=3)
    ht.add_argument("--json", metavar="OUT")

    im = sub.add_parser("images", help="text streams' ITL while image requests arrive (WiCore)")
    im.add_argument("--url", default=None, help="a running server; default: start WiCore")
    im.add_argument("--model", required=True,
                    help="GGUF file (with --url: the model id); its projector is found beside "
                    "it (tools/make_model.py --mmproj) or given with --wicore-arg")
    im.add_argument("--threads", type=int, default=0, help="default: physical cores")
    im.add_argument("--streams", type=int, default=8)
    im.add_argument("--images", type=int, default=4)
    im.add_argument("--interval", type=float, default=0.5, help="seconds between images")
    im.add_argument("--image-size", default="640x480", help="WIDTHxHEIGHT of each picture")
    im.add_argument("--max-tokens", type=int, default=160, help="each text stream's")
    im.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    im.add_argument("--start-timeout", type=float, default=300.0)
    im.add_argument("--out-dir", default="bench-results")
    im.add_argument("--wicore-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `wicore serve` (repeatable)")
    im.add_argument("--json", metavar="OUT")

    pr = sub.add_parser("profile", help="where a decode step's time goes (no server)")
    pr.add_argument("--model", required=True, help="GGUF file")
    pr.add_argument("--threads", type=int, default=0, help="default: physical cores")
    pr.add_argument("--sequences", default="1,16", help="comma list")
    pr.add_argument("--steps", type=int, default=24)
    pr.add_argument("--json", metavar="OUT")

    mt = sub.add_parser("multiturn", help="multi-turn chats: WiCore vs llama.cpp's llama-server")
    mt.add_argument("--model", required=True, help="GGUF file")
    mt.add_argument("--threads", type=int, default=0, help="default: physical cores")
    mt.add_argument("--conversations", type=int, default=4, help="conversations at once")
    mt.add_argument("--turns", type=int, default=4, help="turns per conversation")
    mt.add_argument("--system-words", type=int, default=1200, help="shared system prompt")
    mt.add_argument("--user-words", type=int, default=40, help="each user message")
    mt.add_argument("--max-tokens", type=int, default=48, help="each reply")
    mt.add_argument("--rounds", type=int, default=3,
                    help="rounds, alternating the servers; TTFTs are pooled over them")
    mt.add_argument("--n-ctx", type=int, default=32768, help="KV pool of each server")
    mt.add_argument("--parallel", type=int, default=16, help="llama-server's slots")
    mt.add_argument("--timeout", type=float, default=300.0, help="per request, seconds")
    mt.add_argument("--start-timeout", type=float, default=300.0)
    mt.add_argument("--servers", default="wicore,wicore-nocache,llama-server",
                    help="comma list: wicore,wicore-nocache,llama-server")
    mt.add_argument("--build-dir", default="build/llama-server",
                    help="where llama-server is built (once) and kept")
    mt.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    mt.add_argument("--out-dir", default="bench-results")
    mt.add_argument("--wicore-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for `wicore serve` (repeatable)")
    mt.add_argument("--llama-arg", action="append", default=[], metavar="ARG",
                    help="extra argument for llama-server (repeatable)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
    )
    try:
        return _dispatch(args)
    except (KeyboardInterrupt, asyncio.CancelledError):
        log.warning("interrupted")
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        report = asyncio.run(run_load(RunConfig(
            url=args.url, model=args.model, concurrency=args.concurrency,
            requests=args.requests, max_tokens=args.max_tokens, prompt=args.prompt,
            priority=args.priority, timeout_s=args.timeout, deadline_s=args.deadline,
            include_usage=not args.no_usage,
        )))
        _print_run(report)
        _write_json(args.json, report)
        return 1 if report["errors"] else 0
    if args.command == "priority":
        report = asyncio.run(run_priority(PriorityConfig(
            url=args.url, model=args.model, running=args.running, waiting=args.waiting,
            background_max_tokens=args.max_tokens, probes=args.probes, timeout_s=args.timeout,
        )))
        emit(f"urgent TTFT: {_fmt(report['urgent_ttft'], 1000)} ms; "
             f"normal TTFT: {_fmt(report['normal_ttft'], 1000)} ms; errors {report['errors']}")
        _write_json(args.json, report)
        return 1 if report["errors"] else 0
    if args.command == "hol":
        report = asyncio.run(run_hol(HolConfig(
            url=args.url, model=args.model, hostile=args.hostile, messages=args.messages,
            message_text=args.message_text, probes=args.probes, interval_s=args.interval,
            timeout_s=args.timeout,
        )))
        h, short = report["hostile"], report["short"]
        emit(f"hostile: {h['count']} x {h['messages']} messages ({h['body_bytes']} bytes): "
             f"statuses {h['statuses']}, seconds {h['seconds']}")
        emit(f"short: {short['ok']}/{short['count']} ok, p50 {_fmt(short['p50_s'], 1000)} ms, "
             f"max {_fmt(short['max_s'], 1000)} ms")
        _write_json(args.json, report)
        return 0 if short["ok"] == short["count"] else 1
    if args.command == "multiturn":
        return asyncio.run(multiturn(args))
    if args.command == "images":
        return asyncio.run(images(args))
    if args.command == "host-tier":
        rows = measure_host_tier(args.model, args.threads or physical_cores(),
                                 [int(x) for x in args.lengths.split(",")], args.repeats)
        emit("| prompt tokens | KV state (MiB) | prefill (ms) | save (ms) | restore (ms) "
             "| prefill / restore |")
        emit("|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            emit(f"| {r['tokens']} | {r['bytes'] / 2**20:.1f} | {r['prefill_s'] * 1000:.1f} "
                 f"| {r['save_s'] * 1000:.1f} | {r['restore_s'] * 1000:.1f} "
                 f"| {r['prefill_s'] / r['restore_s']:.0f}x |")
        _write_json(args.json, {"model": args.model, "rows": rows})
        return 0
    if args.command == "profile":
        rows = [profile_steps(args.model, args.threads or physical_cores(), int(n), backend,
                              args.steps)
                for n in args.sequences.split(",") for backend in (False, True)]
        emit("| sequences | sampling | step (ms) | llama_decode | sampling | Python "
             "| IPC pickle | SSE encode | tok/s |")
        emit("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            emit(f"| {r['sequences']} | {'backend' if r['backend_sampling'] else 'CPU'} "
                 f"| {r['step_ms']:.1f} | {r['decode_ms']:.1f} | {r['sample_ms']:.2f} "
                 f"| {r['python_ms']:.2f} | {r['ipc_pickle_ms']:.3f} | {r['sse_encode_ms']:.3f} "
                 f"| {r['tok_s']:.1f} |")
        _write_json(args.json, {"model": args.model, "rows": rows})
        return 0
    if args.command == "fairness":
        report = asyncio.run(run_fairness(FairnessConfig(
            url=args.url, model=args.model, flood_key=args.flood_key,
            polite_key=args.polite_key, flood_requests=args.flood_requests, probes=args.probes,
            max_tokens=args.max_tokens, timeout_s=args.timeout,
        )))
        emit(f"polite key TTFT: alone {_fmt(report['idle_ttft'], 1000)} ms, during the flood "
             f"{_fmt(report['flooded_ttft'], 1000)} ms; the flood's own TTFT p50 "
             f"{_fmt(report['flood_ttft_p50'], 1000)} ms, max "
             f"{_fmt(report['flood_ttft_max'], 1000)} ms; errors {report['errors']}")
        _write_json(args.json, report)
        return 1 if report["errors"] else 0
    return asyncio.run(compare(args))


if __name__ == "__main__":
    sys.exit(main())
