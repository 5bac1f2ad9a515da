"""Scale-out: engine replicas on Ray Serve behind one gRPC front end (``prefixserve[ray]``).

``prefixserve serve --ray --replicas N [--ray-address ADDR]`` or, from Python,
``run_fleet(ServerConfig(...), FleetConfig(replicas=N))`` / ``BackgroundFleetServer``. The API
is the single server's; the adapter id is Ray Serve's multiplexed model id, so requests of one
adapter go to the replicas that hold its prefix. Ray is imported on first use of a name that
needs it, so that ``FleetConfig`` (and the command line) work without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import FleetConfig

if TYPE_CHECKING:
    from .fleet import ReplicaFleet
    from .server import BackgroundFleetServer, FleetServer, run_fleet

_NEED_RAY = {
    "BackgroundFleetServer": "server",
    "FleetServer": "server",
    "run_fleet": "server",
    "ReplicaFleet": "fleet",
}

__all__ = ["BackgroundFleetServer", "FleetConfig", "FleetServer", "ReplicaFleet", "run_fleet"]


def __getattr__(name: str) -> Any:
    module = _NEED_RAY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        return getattr(importlib.import_module(f".{module}", __name__), name)
    except ImportError as e:
        if e.name is None or not e.name.startswith("ray"):
            raise
        raise ImportError(
            f"prefixserve's scale-out runs on Ray Serve: pip install 'prefixserve[ray]' "
            f"(missing: {e.name})",
            name=e.name,
        ) from e
