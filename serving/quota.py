"""What one tenant of a server may hold (a module of its own: the CLI reads its defaults without
importing the server)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import flag


@dataclass(frozen=True, slots=True)
class TenantQuota:
    """What one tenant may hold, so that no tenant crowds the others out (None = no limit).
    Public adapters (loaded by admins) do not count."""

    max_adapters: int | None = 64
    """Private adapters per tenant."""
    max_adapter_bytes: int | None = field(
        default=1 << 30, metadata=flag(name="max_adapter_mb", unit=2**20)
    )
    """Bytes one tenant's adapters may hold in the engine: host tensors and prefix KV (MiB on
    the command line); checked after an adapter is read, before it is registered."""
    max_waiting: int | None = 64
    """Requests of one tenant waiting for the engine at once (a server with keys only: an
    open server has one tenant, bounded by ``max_waiting`` of the server)."""

    def __post_init__(self) -> None:
        for name in ("max_adapters", "max_adapter_bytes", "max_waiting"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0 or None, got {value}")
