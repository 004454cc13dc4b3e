"""The log lines an operator reads: one per request when it ends, and a performance line at
intervals while the server is busy.

Request lines (`log_requests`) come from the engine's record of each request, so they hold
what the engine measured: queue wait, time to first token, total time and decode speed. A
request refused before it was queued has no such line; the HTTP layer logs it at INFO with
its reason instead. Fields go into the message for text logs and, as `extra`, into the
JSON object for `log_format: json`. Prompts and keys are never logged; the key's name is.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from wicore_cpp.engine.client import EngineStats, RequestRecord

request_log = logging.getLogger("wicore.requests")
performance_log = logging.getLogger("wicore.performance")


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else round(seconds * 1000)


class RequestLog:
    """Engine observer: one INFO line per ended request."""

    def on_request_ended(self, r: RequestRecord) -> None:
        decode_s = r.total_s - r.ttft_s if r.ttft_s is not None else 0.0
        # Decode speed: the tokens after the first over the time they took.
        tokens_per_s = ((r.num_completion_tokens - 1) / decode_s
                        if r.num_completion_tokens > 1 and decode_s > 0 else None)
        fields = {
            "request_id": r.request_id,
            "key_name": r.tenant,
            "model": r.model_id,
            "priority": r.priority,
            "finish_reason": r.outcome,
            "prompt_tokens": r.num_prompt_tokens,
            "completion_tokens": r.num_completion_tokens,
            "queue_ms": _ms(r.queue_s),
            "ttft_ms": _ms(r.ttft_s),
            "total_ms": _ms(r.total_s),
            "tokens_per_s": None if tokens_per_s is None else round(tokens_per_s, 1),
        }
        request_log.info(
            "request %s key=%s model=%s priority=%s finish=%s prompt_tokens=%d "
            "completion_tokens=%d queue_ms=%s ttft_ms=%s total_ms=%s tokens_per_s=%s",
            r.request_id, r.tenant or "-", r.model_id, r.priority, r.outcome,
            r.num_prompt_tokens, r.num_completion_tokens, _dash(fields["queue_ms"]),
            _dash(fields["ttft_ms"]), fields["total_ms"], _dash(fields["tokens_per_s"]),
            extra=fields,
        )

    def on_token_gaps(self, model_id: str, gaps_s: list[float]) -> None:
        pass


def _dash(value: object) -> object:
    return "-" if value is None else value


async def log_performance(stats: Callable[[], EngineStats], interval_s: float) -> None:
    """Every `interval_s` while anything is queued, running or was generated: tokens/s,
    running, queued and KV cells in use. Runs until cancelled."""
    last = stats().counters.tokens_generated
    last_at = time.monotonic()
    while True:
        await asyncio.sleep(interval_s)
        s = stats()
        now = time.monotonic()
        tokens = s.counters.tokens_generated
        if tokens == last and s.num_in_flight == 0:
            last_at = now
            continue  # idle: no line
        rate = (tokens - last) / (now - last_at) if now > last_at else 0.0
        last, last_at = tokens, now
        kv_used = sum(w.kv_cells_used for w in s.workers)
        kv_size = sum(w.kv_cells for w in s.workers)
        fields = {
            "tokens_per_s": round(rate, 1),
            "running": s.num_running_sequences,
            "queued": s.queue_length,
            "kv_cells_used": kv_used,
            "kv_cells": kv_size,
        }
        performance_log.info(
            "performance: %.1f tokens/s, %d running, %d queued, KV %d/%d cells (%.0f%%)",
            rate, s.num_running_sequences, s.queue_length, kv_used, kv_size,
            100 * kv_used / kv_size if kv_size else 0.0, extra=fields,
        )
