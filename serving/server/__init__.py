"""The gRPC edge of prefixserve: generation and adapter services over the async engine, with
tenants, a persistent adapter registry, health, reflection and Prometheus metrics.

Start one with ``prefixserve serve`` or, from Python, ``await serve(ServerConfig(...))`` /
``BackgroundServer(ServerConfig(...)).start()``; talk to it with :mod:`prefixserve.client`.
Names are imported on first use, so that the command line reads :mod:`.config` (its flags)
without loading grpc or the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import BackgroundServer, PrefixServer, serve
    from .config import AdapterSpec, ServerConfig
    from .tenants import ApiKeys, Tenant

_HOMES = {
    "AdapterSpec": ".config",
    "ServerConfig": ".config",
    "ApiKeys": ".tenants",
    "Tenant": ".tenants",
    "BackgroundServer": ".app",
    "PrefixServer": ".app",
    "serve": ".app",
}

__all__ = [
    "AdapterSpec",
    "ApiKeys",
    "BackgroundServer",
    "PrefixServer",
    "ServerConfig",
    "Tenant",
    "serve",
]


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
