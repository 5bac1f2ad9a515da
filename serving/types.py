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
