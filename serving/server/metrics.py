"""Prometheus metrics: engine state read at scrape time, request latencies observed as they go.

Engine gauges and counters come from :class:`EngineCollector`, which reads the engine's latest
:class:`~prefixserve.engine.EngineStats` snapshot when Prometheus scrapes (published by the
engine's thread after each step; no lock), so the step loop never waits for metrics. Latency
histograms are observed by the server per request as outputs reach it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..engine import EngineStats
from ..request import RequestOutput

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PRIVATE_ADAPTER = "(private)"
"""The ``adapter`` label of every tenant's own adapter: their names are the tenants' business."""


def adapter_label(engine_name: str | None) -> str:
    """The ``adapter`` label for an engine adapter name: '' for none, a public adapter's name,
    or :data:`PRIVATE_ADAPTER` for a tenant's (engine names ``TENANT/NAME``)."""
    if engine_name is None:
        return ""
    return PRIVATE_ADAPTER if "/" in engine_name else engine_name


class EngineCollector(Collector):
    """Queue depth, running requests, KV blocks, prefix cache and token counts of the engine."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self._stats = stats
        self._last: tuple[float, int] | None = None
        self._rate = 0.0

    def _tokens_per_second(self, tokens: int) -> float:
        now = time.monotonic()
        if self._last is None or now - self._last[0] >= 1.0:  # at most one new window per second
            if self._last is not None:
                self._rate = (tokens - self._last[1]) / (now - self._last[0])
            self._last = (now, tokens)
        return self._rate

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        gauges: list[tuple[str, str, float]] = [
            ("queue_depth", "Requests waiting to be scheduled", stats.waiting),
            ("running_requests", "Requests in the running batch", stats.running),
            (
                "kv_blocks_used",
                "KV blocks in use (requests, adapter prefixes and the prefix cache)",
                stats.kv_blocks_used,
            ),
            (
                "prefix_cache_blocks",
                "KV blocks of requests' tokens held in the prefix cache (in use or idle)",
                stats.cached_blocks,
            ),
            (
                "prefix_cache_blocks_idle",
                "Cached KV blocks no running request reads (evicted first for room)",
                stats.cached_blocks_idle,
            ),
            (
                "prefix_cache_hit_rate",
                "Share of looked-up prompt tokens found in the prefix cache since start",
                stats.prefix_cache_hits / stats.prefix_cache_queries
                if stats.prefix_cache_queries
                else 0.0,
            ),
            ("kv_blocks_total", "KV blocks in the pool", stats.kv_blocks_total),
            ("prefix_blocks_resident", "KV blocks holding adapter prefixes", stats.prefix_blocks),
            ("adapters_loaded", "Adapters loaded in the engine", stats.adapters_loaded),
            (
                "generation_tokens_per_second",
                "Output tokens per second over the last scrape "
                "interval (rate(prefixserve_generated_tokens_total) in PromQL is the same)",
                self._tokens_per_second(stats.generated_tokens),
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"prefixserve_{name}", doc, value=value)
        counters: list[tuple[str, str, float]] = [
            ("generated_tokens", "Output tokens generated", stats.generated_tokens),
            ("prefix_hits", "Requests that found their adapter prefix resident", stats.prefix_hits),
            (
                "prefix_materializations",
                "Adapter prefixes computed into the pool",
                stats.prefix_materializations,
            ),
            ("prefix_evictions", "Adapter prefixes evicted from the pool", stats.prefix_evictions),
            ("preemptions", "Requests preempted for KV blocks", stats.preemptions),
            (
                "prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache",
                stats.prefix_cache_queries,
            ),
            (
                "prefix_cache_hits",
                "Prompt tokens found in the prefix cache (not computed)",
                stats.prefix_cache_hits,
            ),
            (
                "prefix_cache_evictions",
                "Cached KV blocks evicted for room",
                stats.prefix_cache_evictions,
            ),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(f"prefixserve_{name}", doc, value=value)


@dataclass(slots=True)
class RequestTracker:
    """Times one request: first token, gaps between tokens, the end."""

    metrics: ServerMetrics
    adapter: str
    tenant: str
    start: float = field(default_factory=time.perf_counter)
    last_token: float | None = None
    done: bool = False

    def on_output(self, out: RequestOutput) -> None:
        if not out.delta_token_ids:
            return
        now = time.perf_counter()
        if self.last_token is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.per_token.observe((now - self.last_token) / len(out.delta_token_ids))
        self.last_token = now

    def finish(self, outcome: str) -> None:
        """Count the request once: ``outcome`` is its finish reason or how it ended early."""
        if self.done:
            return
        self.done = True
        self.metrics.requests.labels(self.adapter, self.tenant, outcome).inc()
        self.metrics.latency.observe(time.perf_counter() - self.start)


class ServerMetrics:
    """The server's metric registry (one per server, so tests can run several)."""

    def __init__(self, stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats))
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "From arrival to the first token"
        )
        self.per_token = self._histogram(
            "time_per_output_token_seconds", "Gap between consecutive output tokens of a request"
        )
        self.latency = self._histogram("request_latency_seconds", "From arrival to the last token")
        self.requests = Counter(
            "prefixserve_requests",
            "Finished generation requests by adapter ('' = none, tenants' own adapters "
            f"{PRIVATE_ADAPTER!r}), tenant and outcome (a finish reason: stop, length, abort; "
            "or cancelled, deadline, not_found, invalid, rejected; error = a server fault)",
            ["adapter", "tenant", "outcome"],
            registry=self.registry,
        )
        self._http: Any = None

    def _histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(
            f"prefixserve_{name}", doc, buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def track(self, adapter: str | None, tenant: str) -> RequestTracker:
        """Time one request on the engine adapter ``adapter`` (None = the base model)."""
        return RequestTracker(self, adapter_label(adapter), tenant)

    def serve(self, port: int, host: str) -> int:
        """Expose ``/metrics`` over HTTP on ``host:port`` (port 0 = a free one); returns the
        port. The endpoint has no authentication: bind it where the gRPC server listens."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_port)

    @property
    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` the ``/metrics`` endpoint is bound to; None when not served."""
        if self._http is None:
            return None
        host, port = self._http.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
