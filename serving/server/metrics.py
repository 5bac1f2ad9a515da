"""Prometheus metrics: engine state read at scrape time, request latencies observed as they go.

Engine gauges and counters come from :class:`EngineCollector`, which reads the engine's latest
:class:`~prefixserve.engine.EngineStats` snapshot when Prometheus scrapes (published by the
engine's thread after each step; no lock), so the step loop never waits for metrics. Latency
histograms are observed by the server per request as outputs reach it.

``/metrics`` names tenants (in ``tenant`` labels), so where the server has API keys it asks for
an admin's key, sent as a bearer token (Prometheus: ``authorization: {credentials: KEY}`` in the
scrape config); ``--public-metrics`` serves it to anyone instead, with every tenant label summed
away. An open server (no keys) has one tenant and serves it to anyone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from ..engine import EngineStats
from ..request import RequestOutput
from .errors import UnauthenticatedError
from .tenants import ApiKeys

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
        yield from _tenant_metrics(stats)


def _tenant_metrics(stats: EngineStats) -> Iterator[Metric]:
    """Each tenant's share of the engine: service, queue, preemptions, weight."""
    families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
        "served_tokens": CounterMetricFamily(
            "prefixserve_tenant_served_tokens",
            "Prefill and decode tokens computed for the tenant",
            labels=["tenant"],
        ),
        "service": GaugeMetricFamily(
            "prefixserve_tenant_service",
            "The tenant's fair-share counter: weighted tokens served over its weight (the "
            "scheduler admits from the lowest)",
            labels=["tenant"],
        ),
        "weight": GaugeMetricFamily(
            "prefixserve_tenant_weight", "The tenant's weight (API keys file)", labels=["tenant"]
        ),
        "waiting": GaugeMetricFamily(
            "prefixserve_tenant_waiting_requests",
            "The tenant's requests waiting",
            labels=["tenant"],
        ),
        "running": GaugeMetricFamily(
            "prefixserve_tenant_running_requests",
            "The tenant's requests running",
            labels=["tenant"],
        ),
        "preemptions": CounterMetricFamily(
            "prefixserve_tenant_preemptions",
            "The tenant's requests preempted (recomputed later)",
            labels=["tenant"],
        ),
    }
    for t in stats.tenants:
        label = [t.tenant]
        families["served_tokens"].add_metric(label, t.tokens)
        families["service"].add_metric(label, t.service)
        families["weight"].add_metric(label, t.weight)
        families["waiting"].add_metric(label, t.waiting)
        families["running"].add_metric(label, t.running)
        families["preemptions"].add_metric(label, t.preemptions)
    yield from families.values()


class QuotaCollector(Collector):
    """What each tenant holds against its adapter quotas (read from the registry)."""

    def __init__(self, usage: Callable[[], dict[str, tuple[int, int]]]) -> None:
        self._usage = usage

    def collect(self) -> Iterator[Metric]:
        adapters = GaugeMetricFamily(
            "prefixserve_tenant_adapters", "The tenant's private adapters", labels=["tenant"]
        )
        held = GaugeMetricFamily(
            "prefixserve_tenant_adapter_bytes",
            "Bytes the tenant's adapters hold (host tensors and prefix KV; its quota counts them)",
            labels=["tenant"],
        )
        for tenant, (count, size) in self._usage().items():
            adapters.add_metric([tenant], count)
            held.add_metric([tenant], size)
        yield adapters
        yield held


class _WithoutTenants(Collector):
    """The metrics of ``registry`` with the ``tenant`` label summed away (what anyone may read
    of a server with tenants). Per-tenant gauges that make no sense summed (weights, counters of
    service) are left out."""

    DROPPED = ("prefixserve_tenant_service", "prefixserve_tenant_weight")

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            if family.name in self.DROPPED:
                continue
            if not any("tenant" in s.labels for s in family.samples):
                yield family
                continue
            summed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # creation times do not sum (and their sum counts the tenants)
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "tenant"))
                key = (sample.name, labels)
                summed[key] = summed.get(key, 0.0) + sample.value
            out = Metric(family.name, family.documentation, family.type, family.unit)
            for (name, labels), value in summed.items():
                out.add_sample(name, dict(labels), value)
            yield out


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
            if out.queue_seconds is not None:
                self.metrics.queue_wait.labels(self.tenant).observe(out.queue_seconds)
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

    def __init__(
        self,
        stats: Callable[[], EngineStats | None],
        quota_use: Callable[[], dict[str, tuple[int, int]]] | None = None,
    ) -> None:
        """``stats``: the engine's latest snapshot; ``quota_use``: per tenant, ``(adapters,
        bytes)`` it holds against its quota."""
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(stats))
        if quota_use is not None:
            self.registry.register(QuotaCollector(quota_use))
        self.ttft = self._histogram(
            "time_to_first_token_seconds", "From arrival to the first token"
        )
        self.per_token = self._histogram(
            "time_per_output_token_seconds", "Gap between consecutive output tokens of a request"
        )
        self.latency = self._histogram("request_latency_seconds", "From arrival to the last token")
        self.queue_wait = Histogram(
            "prefixserve_tenant_queue_wait_seconds",
            "From arrival in the engine to the first scheduled step, by tenant",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.requests = Counter(
            "prefixserve_requests",
            "Finished generation requests by adapter ('' = none, tenants' own adapters "
            f"{PRIVATE_ADAPTER!r}), tenant and outcome (a finish reason: stop, length, abort; "
            "or cancelled, deadline, not_found, invalid, rejected; error = a server fault)",
            ["adapter", "tenant", "outcome"],
            registry=self.registry,
        )
        self._http: ThreadingHTTPServer | None = None

    def _histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(
            f"prefixserve_{name}", doc, buckets=LATENCY_BUCKETS, registry=self.registry
        )

    def track(self, adapter: str | None, tenant: str) -> RequestTracker:
        """Time one request on the engine adapter ``adapter`` (None = the base model)."""
        return RequestTracker(self, adapter_label(adapter), tenant)

    def serve(self, port: int, host: str, keys: ApiKeys, public: bool = False) -> int:
        """Expose ``/metrics`` over HTTP on ``host:port`` (port 0 = a free one); returns the
        port. With API ``keys`` it asks for an admin's key, unless ``public``: then anyone reads
        it, without tenant labels."""
        registry = self.registry
        if public and not keys.open:
            registry = CollectorRegistry()
            registry.register(_WithoutTenants(self.registry))
        guard = None if public or keys.open else keys
        handler = type("MetricsHandler", (_MetricsHandler,), {"registry": registry, "keys": guard})
        self._http = ThreadingHTTPServer((host, port), handler)
        self._http.daemon_threads = True
        threading.Thread(target=self._http.serve_forever, name="metrics", daemon=True).start()
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


class _MetricsHandler(BaseHTTPRequestHandler):
    """``GET /metrics`` of :attr:`registry`, for an admin's bearer key when :attr:`keys` is
    set."""

    registry: CollectorRegistry
    keys: ApiKeys | None
    timeout = 10.0
    """Seconds a connection may stay silent (a client that sends nothing holds no thread)."""

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self._answer(404, b"only /metrics is served here\n")
            return
        if self.keys is not None:
            refusal = self._refusal(self.keys, self.headers.items())
            if refusal is not None:
                self._answer(*refusal)
                return
        self._answer(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)

    @staticmethod
    def _refusal(keys: ApiKeys, headers: Iterable[tuple[str, str]]) -> tuple[int, bytes] | None:
        metadata = [(name.lower(), value) for name, value in headers]
        try:
            tenant = keys.authenticate(metadata)
        except UnauthenticatedError as e:
            return 401, f"{e}\n".encode()
        if not tenant.admin:
            return 403, b"/metrics names every tenant: it needs an admin's API key\n"
        return None

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", 'Bearer realm="prefixserve metrics"')
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes are not worth a log line each
