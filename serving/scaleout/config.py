"""Settings of a fleet of engine replicas on Ray Serve. No Ray import here: the command line
reads the defaults without Ray installed."""

from __future__ import annotations

from dataclasses import dataclass

ROUTINGS = ("adapter", "round_robin")
ROUTERS = {
    "adapter": "prefixserve.scaleout.router.AdapterAffinityRouter",
    "round_robin": "ray.serve.experimental.round_robin_router.RoundRobinRouter",
}
"""The Ray Serve request router of each routing mode."""


@dataclass(slots=True)
class FleetConfig:
    """How many engine replicas run where, and how requests reach them."""

    replicas: int = 2
    """Engine replicas; each holds the model and its own KV pool on its own device."""
    ray_address: str | None = None
    """Ray cluster to join ('auto', 'HOST:6379', 'ray://HOST:10001'); None = the instance started
    on this machine with ``ray start``, else a new local one."""
    replica_cpus: float = 1.0
    """CPUs Ray reserves for each replica (its torch threads)."""
    replica_gpus: float = 0.0
    """GPUs Ray reserves for each replica: 1 on GPU nodes (one device per engine)."""
    max_ongoing_requests: int = 1024
    """Requests Ray Serve lets one replica hold at once. The engine batches them itself and
    refuses more than the server's ``max_waiting`` queued ones, so this only has to be large."""
    max_adapters_per_replica: int = 64
    """Adapters one replica keeps loaded; Ray Serve's multiplexing drops the least recently used
    beyond it (and the replica frees its host copy and prefix blocks)."""
    routing: str = "adapter"
    """'adapter': the adapter is Ray Serve's multiplexed model id, and its requests go to the
    replicas that hold its prefix (``AdapterAffinityRouter``); 'round_robin': Ray Serve's
    round-robin router, blind to adapters (the baseline of the replica benchmark)."""
    app_name: str = "prefixserve"
    """The Ray Serve application (one per fleet on a cluster)."""
    adapter_sync_s: float = 1.0
    """How often each replica looks for adapters unloaded through the API in the registry and
    frees its copy."""
    max_attempts: int = 3
    """Tries of a request whose replica stops before the request produced any output."""

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {ROUTINGS}, got {self.routing!r}")
        for name in ("replica_cpus", "replica_gpus"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("max_ongoing_requests", "max_adapters_per_replica", "max_attempts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.adapter_sync_s <= 0:
            raise ValueError(f"adapter_sync_s must be > 0, got {self.adapter_sync_s}")
        if not self.app_name or "#" in self.app_name:
            raise ValueError(f"app_name must be non-empty without '#', got {self.app_name!r}")
