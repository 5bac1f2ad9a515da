"""The gRPC edge of prefixserve: generation and adapter services over the async engine, with
tenants, a persistent adapter registry, health, reflection and Prometheus metrics.

Start one with ``prefixserve serve`` or, from Python, ``await serve(ServerConfig(...))`` /
``BackgroundServer(ServerConfig(...)).start()``; talk to it with :mod:`prefixserve.client`.
"""

from __future__ import annotations

from .adapter_service import AdapterSpec
from .app import BackgroundServer, PrefixServer, ServerConfig, serve
from .tenants import ApiKeys, Tenant

__all__ = [
    "AdapterSpec",
    "ApiKeys",
    "BackgroundServer",
    "PrefixServer",
    "ServerConfig",
    "Tenant",
    "serve",
]
