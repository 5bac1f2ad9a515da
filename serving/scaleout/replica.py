"""One engine replica: a Ray Serve deployment holding an ``AsyncEngine`` on its own device.

Adapters are Ray Serve multiplexed models. A request names its adapter's version
(``AdapterRef.model_id``); the replica loads it from the shared registry on first use
(``@serve.multiplexed``, which also tells Ray Serve's router that this replica holds it), keeps
at most ``max_adapters`` of them (least recently used go) and frees those that were unloaded
through the API (it checks the registry every ``adapter_sync_s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from ray import serve

from ..adapters import AdapterNotFoundError
from ..async_engine import AsyncEngine
from ..config import EngineConfig
from ..engine import EngineDescription, LLMEngine
from ..request import RequestOutput
from ..server.registry import AdapterRegistry
from ..types import AdapterInfo
from .messages import (
    Accepted,
    AdapterRef,
    ReplicaJob,
    check_registry,
    registered_version,
    step_only,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplicaSettings:
    engine: EngineConfig
    registry: str
    """The adapter registry: a directory every replica reads (shared storage on a cluster)."""
    registry_token: str
    """What the front end wrote into the registry, to prove that this node sees the same."""
    max_waiting: int | None
    """Requests that may wait for this replica's engine (more: RESOURCE_EXHAUSTED)."""
    max_waiting_per_tenant: int | None
    max_adapters: int
    """Adapters kept loaded (Ray Serve's ``max_num_models_per_replica``)."""
    adapter_sync_s: float
    """Seconds between checks of the registry for unloaded adapters."""


class LoadedAdapter:
    """One adapter version loaded into this replica's engine.

    Ray Serve's multiplexing calls ``__del__`` when it drops the adapter (least recently used),
    then assigns an instance attribute ``__del__``: hence a plain class (no ``__slots__``).
    """

    def __init__(self, ref: AdapterRef, engine_name: str, release: Callable[[str], None]) -> None:
        self.ref = ref
        self.engine_name = engine_name
        """Unique per load, so that a version dropped while requests still use it (it goes when
        they end) never blocks loading it again."""
        self._release = release
        self.released = False

    def release(self) -> None:
        """Unload it from the engine (once; safe from any thread)."""
        if not self.released:
            self.released = True
            self._release(self.engine_name)

    def __del__(self) -> None:
        self.release()


class EngineReplica:
    """The Ray Serve deployment class of the engine replicas (see ``deploy``)."""

    def __init__(self, settings: ReplicaSettings) -> None:
        check_registry(settings.registry, settings.registry_token)  # before loading the model
        self.name = serve.get_replica_context().replica_tag
        self.engine = AsyncEngine(
            LLMEngine(settings.engine),
            max_waiting=settings.max_waiting,
            max_waiting_per_tenant=settings.max_waiting_per_tenant,
        )
        self.settings = settings
        self._loop = asyncio.get_running_loop()  # Ray Serve builds replicas on their event loop
        self._refs: dict[str, AdapterRef] = {}
        """Where each model id this replica was asked for lives (Ray Serve's loader gets only
        the id); a few hundred bytes per adapter version, kept for good."""
        self._loaded: dict[str, LoadedAdapter] = {}
        self._loads = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch: asyncio.Task[None] | None = None

        # A closure, not a bound method: Ray Serve keeps its cache as an attribute of the loader.
        async def load(model_id: str) -> LoadedAdapter:
            return await self._materialize(self._refs[model_id])

        self._adapter = serve.multiplexed(max_num_models_per_replica=settings.max_adapters)(load)
        logger.info("replica %s serves %s", self.name, self.engine.description.model_path)

    # -- called through the deployment handle ---------------------------------------------------

    async def generate(self, job: ReplicaJob) -> AsyncIterator[Accepted | RequestOutput]:
        """:class:`Accepted`, then the engine's outputs (:func:`step_only`). Stopping the
        stream (the caller cancels) aborts the request and frees its blocks."""
        self._start_watch()
        adapter = await self._acquire(job.adapter) if job.adapter is not None else None
        name = adapter.engine_name if adapter is not None else None
        yield Accepted(self.name, self.engine.stats())
        outputs = self.engine.generate(
            job.prompt,
            job.params,
            job.request_id,
            adapter=name,
            origin=job.origin,
        )
        # Closed with this stream, so that a cancelled stream aborts the request at once.
        async with contextlib.aclosing(
            cast(AsyncGenerator[RequestOutput, None], outputs)
        ) as stream:
            async for out in stream:
                yield step_only(out)

    async def check_adapter(
        self, name: str, path: str | None = None, text: str | None = None
    ) -> AdapterInfo:
        """Read and validate an adapter as this engine would load it, and what it would hold,
        without keeping it. Raises ``AdapterError`` naming the problem."""
        return await self.engine.check_adapter(name, path=path, text=text)

    async def describe(self) -> EngineDescription:
        return self.engine.description

    async def check_health(self) -> None:
        """Ray Serve's health check: a replica whose engine loop stopped is replaced."""
        if not self.engine.is_running:
            raise RuntimeError(f"replica {self.name}: the engine loop has stopped")

    # -- adapters -------------------------------------------------------------------------------

    async def _acquire(self, ref: AdapterRef) -> LoadedAdapter:
        self._refs[ref.model_id] = ref
        loaded: LoadedAdapter = await self._adapter(ref.model_id)
        return loaded

    async def _materialize(self, ref: AdapterRef) -> LoadedAdapter:
        """Load ``ref`` from the shared registry (Ray Serve calls this once per version)."""
        engine_name = f"{ref.model_id}#{next(self._loads)}"
        try:
            source = await asyncio.to_thread(AdapterRegistry.adapter_source, Path(ref.path))
            await self.engine.load_adapter(
                engine_name, path=source.get("path"), text=source.get("text")
            )
        except (OSError, ValueError) as e:
            logger.warning("replica %s: cannot load %s: %s", self.name, ref.model_id, e)
            raise AdapterNotFoundError(
                f"adapter {ref.display!r} cannot be read from the adapter registry (it was "
                "probably unloaded just now)"
            ) from None
        loaded = LoadedAdapter(ref, engine_name, self._release_threadsafe)
        self._loaded[engine_name] = loaded
        return loaded

    def _release_threadsafe(self, engine_name: str) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: the replica is gone
            self._loop.call_soon_threadsafe(lambda: self._spawn(self._unload(engine_name)))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unload(self, engine_name: str) -> None:
        self._loaded.pop(engine_name, None)
        try:
            await self.engine.unload_adapter(engine_name, missing_ok=True)
        except Exception as e:  # the engine is shutting down
            logger.info("replica %s: %s not unloaded: %r", self.name, engine_name, e)

    def _start_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_registry())

    async def _watch_registry(self) -> None:
        """Free adapters whose registry folder no longer holds their version (unloaded, or
        unloaded and loaded again under the same name)."""
        while True:
            await asyncio.sleep(self.settings.adapter_sync_s)
            watched = [a for a in self._loaded.values() if a.ref.in_registry and not a.released]
            for loaded in await asyncio.to_thread(_unloaded, watched) if watched else []:
                logger.info("replica %s: %s was unloaded", self.name, loaded.ref.model_id)
                loaded.release()


def _unloaded(adapters: list[LoadedAdapter]) -> list[LoadedAdapter]:
    """Those of ``adapters`` whose version the registry no longer holds (an unreadable record
    proves nothing: those stay)."""
    gone = []
    for adapter in adapters:
        try:
            if registered_version(Path(adapter.ref.path)) != adapter.ref.version:
                gone.append(adapter)
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("cannot read the registry record of %s: %r", adapter.ref.model_id, e)
    return gone
