"""`GET /metrics`: the Prometheus text format, produced by `prometheus_client`.

Two kinds of series. Counters and histograms are fed as things happen: every request that
ends (`RequestRecord`) and every decode step's inter-token gaps reach `Metrics` as an engine
observer, and requests refused before they were queued are counted by the middlewares.
Gauges (queue, running sequences, KV cells, workers) are read from `EngineClient.stats()` when
Prometheus scrapes. Everything the workers measure reaches this process through the
scheduler, so there is no multiprocess directory. Each app has its own registry.

Names follow Prometheus' conventions: `wicore_` prefix, base units, `_seconds`, and `_total`
for counters (prometheus_client appends it). The `key` label is an API key's name (empty
with keys off); keys themselves are never labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from wicore_cpp.engine.client import EngineStats, RequestRecord
from wicore_cpp.http.openapi import documented
from wicore_cpp.http.state import STATE

routes = web.RouteTableDef()

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
                    120.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The app's Prometheus registry; an engine observer."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "wicore_requests", "Requests that reached the queue, by how they ended "
            "(stop, length, timeout, error, cancelled).",
            ["model", "priority", "key", "outcome"], registry=r)
        self.rejected = Counter(
            "wicore_rejected_requests", "Generating requests refused before they were queued, "
            "by error code (invalid_api_key, rate_limit_exceeded, insufficient_quota, ...).",
            ["key", "code"], registry=r)
        self.prompt_tokens = Counter(
            "wicore_prompt_tokens", "Prompt tokens of requests a worker took on.",
            ["model", "key"], registry=r)
        self.completion_tokens = Counter(
            "wicore_completion_tokens", "Tokens generated.", ["model", "key"], registry=r)
        self.ttft = Histogram(
            "wicore_time_to_first_token_seconds",
            "From the request reaching the engine to its first token.",
            ["model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(
            "wicore_inter_token_latency_seconds", "Between successive outputs of a request.",
            ["model"], buckets=_ITL_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "wicore_queue_wait_seconds", "From queueing to a worker taking the request.",
            ["model", "priority"], buckets=_LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(
            "wicore_request_duration_seconds", "End to end: from reaching the engine to the end.",
            ["model"], buckets=_DURATION_BUCKETS, registry=r)
        # The front-end process' own CPU, memory and file descriptors (process_*).
        ProcessCollector(registry=r)
        self._stats: Callable[[], EngineStats] | None = None

    def watch(self, stats: Callable[[], EngineStats]) -> None:
        """Read the gauges from `stats` at each scrape."""
        if self._stats is None:
            self.registry.register(_EngineGauges(stats))
        self._stats = stats

    # -- EngineObserver ---------------------------------------------------------------------

    def on_request_ended(self, record: RequestRecord) -> None:
        key = record.tenant or ""
        self.requests.labels(record.model_id, record.priority, key, record.outcome).inc()
        if record.was_started:
            self.prompt_tokens.labels(record.model_id, key).inc(record.num_prompt_tokens)
            self.queue_wait.labels(record.model_id, record.priority).observe(record.queue_s)
        if record.num_completion_tokens:
            self.completion_tokens.labels(record.model_id, key).inc(record.num_completion_tokens)
        if record.ttft_s is not None:
            self.ttft.labels(record.model_id).observe(record.ttft_s)
        self.duration.labels(record.model_id).observe(record.total_s)

    def on_token_gaps(self, model_id: str, gaps_s: list[float]) -> None:
        histogram = self.itl.labels(model_id)
        for gap in gaps_s:
            histogram.observe(gap)

    # -- the edge's own ---------------------------------------------------------------------

    def count_rejected(self, key_name: str | None, code: str) -> None:
        self.rejected.labels(key_name or "", code).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineGauges:
    """Series read from the engine's stats at scrape time."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        queued = GaugeMetricFamily("wicore_queue_length", "Requests waiting for a worker, "
                                   "by requested priority.", labels=["priority"])
        for level, n in s.queued_by_priority.items():
            queued.add_metric([level], n)
        yield queued
        yield GaugeMetricFamily("wicore_running_sequences", "Sequences holding a decode slot.",
                                value=s.num_running_sequences)
        yield GaugeMetricFamily("wicore_requests_in_flight", "Requests accepted and not ended "
                                "(queued or running).", value=s.num_in_flight)
        used = GaugeMetricFamily("wicore_kv_cache_used_cells", "KV cells held by a worker's "
                                 "running sequences (prompt + generated tokens).",
                                 labels=["model", "worker"])
        size = GaugeMetricFamily("wicore_kv_cache_size_cells", "A worker's KV pool.",
                                 labels=["model", "worker"])
        ready = GaugeMetricFamily("wicore_workers_ready", "Worker processes serving.",
                                  labels=["model"])
        num_ready: dict[str, int] = {}
        for w in s.workers:
            used.add_metric([w.model_id, str(w.worker_id)], w.kv_cells_used)
            size.add_metric([w.model_id, str(w.worker_id)], w.kv_cells)
            num_ready[w.model_id] = num_ready.get(w.model_id, 0) + int(w.is_ready)
        for model_id, n in num_ready.items():
            ready.add_metric([model_id], n)
        yield used
        yield size
        yield ready
        restarts = CounterMetricFamily("wicore_worker_restarts", "Worker processes started "
                                       "again after one died.", labels=["model"])
        for model_id, n in s.worker_restarts.items():
            restarts.add_metric([model_id], n)
        yield restarts
        yield CounterMetricFamily("wicore_prompt_cache_hits", "Requests that started from "
                                  "cached KV instead of prefilling their whole prompt.",
                                  value=s.counters.cache_hits)
        yield CounterMetricFamily("wicore_prompt_cache_tokens", "Prompt tokens taken from the "
                                  "prompt cache rather than prefilled.",
                                  value=s.counters.cached_tokens)
        labels = ["model", "worker"]
        cache_cells = GaugeMetricFamily("wicore_prompt_cache_cells", "KV cells a worker's "
                                        "prompt cache holds (a shared prefix counts once).",
                                        labels=labels)
        cache_entries = GaugeMetricFamily("wicore_prompt_cache_entries", "Cached sequences "
                                          "in a worker's KV pool.", labels=labels)
        host_bytes = GaugeMetricFamily("wicore_prompt_cache_host_bytes", "Host memory a "
                                       "worker's prompt cache holds for evicted prefixes.",
                                       labels=labels)
        evictions = CounterMetricFamily("wicore_prompt_cache_evictions", "Cached sequences a "
                                        "worker dropped from its KV pool (since it started).",
                                        labels=labels)
        window_misses = CounterMetricFamily(
            "wicore_prompt_cache_window_misses", "Cached prefixes recomputed because their "
            "sliding-window cells were gone (since the worker started).", labels=labels)
        for w in s.workers:
            key = [w.model_id, str(w.worker_id)]
            cache_cells.add_metric(key, w.prompt_cache.cells)
            cache_entries.add_metric(key, w.prompt_cache.entries)
            host_bytes.add_metric(key, w.prompt_cache.host_bytes)
            evictions.add_metric(key, w.prompt_cache.evictions)
            window_misses.add_metric(key, w.prompt_cache.window_misses)
        yield from (cache_cells, cache_entries, host_bytes, evictions, window_misses)


@routes.get("/metrics")
@documented("Prometheus metrics (text exposition format)", text_response="text/plain",
            errors=(401, 403))
async def metrics(request: web.Request) -> web.Response:
    """The Prometheus text exposition format."""
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
