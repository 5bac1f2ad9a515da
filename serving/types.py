"""The data types of the engine's public interface (what callers receive about adapters)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """What ``list_adapters`` reports about one adapter."""

    name: str
    kind: str
    num_tokens: int
    """P, the prefix length in tokens."""
    host_bytes: int
    """Size of the host copy kept for re-materialization."""
    kv_bytes: int
    """Size of the prefix's K/V blocks in the pool (when resident)."""
    resident: bool
    requests: int
    """Unfinished requests using it."""
    unloading: bool


@dataclass(frozen=True, slots=True)
class Origin:
    """Who sent a request, and how it shares the engine with other requests (the server fills
    it from the caller's key and the request; ``LLMEngine.add_request`` takes its fields)."""

    tenant: str = ""
    weight: float = 1.0
    """The tenant's share relative to other tenants' (fair scheduling)."""
    priority: int = 0
    """Within the tenant, lower runs sooner and is preempted later."""
    cache_salt: str | None = None
    """Reuse cached KV blocks only between requests with the same salt."""
    share_cache: bool = False
    """Share cached KV blocks with every tenant (public adapters, where the server allows)."""

    def engine_kwargs(self) -> dict[str, object]:
        """These fields as ``LLMEngine.add_request`` keywords."""
        return {
            "tenant": self.tenant,
            "tenant_weight": self.weight,
            "priority": self.priority,
            "cache_salt": self.cache_salt,
            "share_cache": self.share_cache,
        }


LOCAL = Origin()
"""The origin of a request sent without one: no tenant, weight 1, shared within no tenant."""
