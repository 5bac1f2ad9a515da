"""The front end's record of the fleet's adapters.

The gRPC adapter service changes an engine's adapters with ``load_adapter`` and
``unload_adapter`` (:class:`~prefixserve.engine_client.EngineClient`). In a fleet those calls
land here: an adapter that a replica has validated is added to the catalog (and the registry),
and from then on any replica loads it on its first request; unloading removes it, new requests
are refused at once and every replica frees its copy (see ``EngineReplica``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..adapters import AdapterNameTakenError, AdapterNotFoundError
from ..text import shorten
from ..types import AdapterInfo


@dataclass(frozen=True, slots=True)
class CheckedAdapter:
    """An adapter a replica has read and validated against the model (what
    ``ReplicaFleet.load_adapter`` records, in place of the engine's host copy)."""

    name: str
    """The engine name: ``NAME`` (public) or ``TENANT/NAME``."""
    info: AdapterInfo
    path: str | None
    """The directory it was read from (None for text); replicas read adapters given on the
    command line there, registry adapters in their registry folder."""


class AdapterCatalog:
    """The fleet's adapters with the engine's ``add_adapter`` / ``unload_adapter`` interface,
    and how many of the front end's requests use each one."""

    def __init__(self, on_unload: Callable[[str], None] | None = None) -> None:
        """``on_unload(name)``: called for each adapter removed."""
        self._adapters: dict[str, CheckedAdapter] = {}
        self._requests: Counter[str] = Counter()
        self._on_unload = on_unload

    def add_adapter(self, adapter: CheckedAdapter) -> AdapterInfo:
        if adapter.name in self._adapters:
            raise AdapterNameTakenError(
                f"adapter {shorten(adapter.name)} is already loaded; unload it first"
            )
        self._adapters[adapter.name] = adapter
        return adapter.info

    def unload_adapter(self, name: str, missing_ok: bool = False) -> bool:
        """Forget ``name``; True if no request is using it (else those finish first).
        ``missing_ok``: an unknown name counts as unloaded (else ``AdapterNotFoundError``)."""
        if self._adapters.pop(name, None) is None:
            if not missing_ok:
                raise AdapterNotFoundError(f"adapter {shorten(name)} is not loaded")
        elif self._on_unload is not None:
            self._on_unload(name)
        return self._requests[name] == 0

    def get(self, name: str) -> CheckedAdapter | None:
        return self._adapters.get(name)

    def requests(self, name: str) -> int:
        """The front end's unfinished requests naming ``name``."""
        return self._requests[name]

    @contextmanager
    def using(self, name: str | None) -> Iterator[None]:
        """Count one request of adapter ``name`` (None: no adapter) while it runs."""
        if name is None:
            yield
            return
        self._requests[name] += 1
        try:
            yield
        finally:
            self._requests[name] -= 1
            if not self._requests[name]:
                del self._requests[name]
