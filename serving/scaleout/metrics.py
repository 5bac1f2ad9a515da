"""Per-replica metrics on the front end's ``/metrics``.

Each replica reports its engine's statistics with every request it accepts; the front end
exposes the latest report of every live replica with a ``replica`` label (engine gauges and
counters are per replica: each has its own queue, KV pool and prefixes), and counts the requests
it routed to each. Prefix materializations per adapter request measure affinity: the fewer,
the more often a request found its adapter's prefix where it was sent.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .fleet import ReplicaFleet

GAUGES = (
    ("queue_depth", "waiting", "Requests waiting to be scheduled"),
    ("running_requests", "running", "Requests in the running batch"),
    ("kv_blocks_used", "kv_blocks_used", "KV blocks in use (requests and adapter prefixes)"),
    ("kv_blocks_total", "kv_blocks_total", "KV blocks in the pool"),
    ("adapters_loaded", "adapters_loaded", "Adapters loaded in the engine"),
    ("prefix_cache_blocks", "cached_blocks", "KV blocks held in the prefix cache"),
)
COUNTERS = (
    ("generated_tokens", "generated_tokens", "Output tokens generated"),
    ("prefix_hits", "prefix_hits", "Requests that found their adapter prefix resident"),
    ("prefix_materializations", "prefix_materializations", "Adapter prefixes computed"),
    ("prefix_evictions", "prefix_evictions", "Adapter prefixes evicted from the pool"),
    ("prefix_cache_queries", "prefix_cache_queries", "Prompt tokens looked up in the cache"),
    ("prefix_cache_hits", "prefix_cache_hits", "Prompt tokens found in the prefix cache"),
)


class ReplicaCollector(Collector):
    """``prefixserve_replica_*{replica=...}``: each live replica as of its latest request."""

    def __init__(self, fleet: ReplicaFleet) -> None:
        self._fleet = fleet

    def collect(self) -> Iterator[Metric]:
        views = list(self._fleet.replicas.values())
        for name, field, doc in GAUGES:
            gauge = GaugeMetricFamily(
                f"prefixserve_replica_{name}", f"{doc} (per replica)", labels=["replica"]
            )
            for view in views:
                gauge.add_metric([view.name], getattr(view.stats, field))
            yield gauge
        for name, field, doc in COUNTERS:
            counter = CounterMetricFamily(
                f"prefixserve_replica_{name}", f"{doc} (per replica)", labels=["replica"]
            )
            for view in views:
                counter.add_metric([view.name], getattr(view.stats, field))
            yield counter
        routed = CounterMetricFamily(
            "prefixserve_replica_requests",
            "Requests routed to each replica, with an adapter or without",
            labels=["replica", "adapter"],
        )
        for view in views:
            routed.add_metric([view.name, "yes"], view.adapter_requests)
            routed.add_metric([view.name, "no"], view.requests - view.adapter_requests)
        yield routed
