"""The engine replicas as the gRPC services see one engine.

:class:`ReplicaFleet` implements :class:`~prefixserve.engine_client.EngineClient`, the
interface the generation and adapter services use, so they run unchanged in front of a fleet:
authentication, tenants, the registry, quotas and every status stay the same code. Requests go
to the replicas through a Ray Serve ``DeploymentHandle``, with the adapter's version as the
multiplexed model id.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from ..adapters import AdapterNotFoundError, AdapterOverBudgetError
from ..async_engine import EngineDeadError, QueueFullError
from ..engine import EngineDescription, EngineStats, Prompt
from ..sampling_params import SamplingParams
from ..server.registry import AdapterRegistry
from ..text import shorten
from ..types import LOCAL, AdapterInfo, Origin
from .catalog import AdapterCatalog, CheckedAdapter
from .config import FleetConfig
from .messages import Accepted, AdapterRef, OutputAssembler, ReplicaJob, ServedOutput
from .router import affinity_keys

logger = logging.getLogger(__name__)
T = TypeVar("T")

REPLICA_LOST = (RayActorError, WorkerCrashedError, NodeDiedError)
"""What a call raises when its replica's process or node went away."""


class ReplicaLostError(RuntimeError):
    """The replica serving a request stopped before the request ended."""

    def __init__(self, replica: str | None) -> None:
        super().__init__(
            f"the replica serving this request ({replica or 'not yet known'}) stopped before "
            "it finished"
        )
        self.replica = replica


def replica_error(error: BaseException) -> BaseException:
    """What a replica raised, without Ray's wrappers, as the services map it to a status."""
    while isinstance(error, RayTaskError) and error.cause is not None:
        error = error.cause
    if isinstance(error, BackPressureError):
        return QueueFullError("every engine replica is at its request limit; retry later")
    if isinstance(error, DeploymentUnavailableError):
        return EngineDeadError("the engine replicas are not running (the fleet is stopping)")
    return error


@dataclass(slots=True)
class ReplicaView:
    """What the front end knows of one replica, from the requests it accepted."""

    name: str
    stats: EngineStats
    """Its engine when it accepted its latest request."""
    requests: int = 0
    adapter_requests: int = 0
    """Requests with an adapter."""


class ReplicaFleet:
    """The replicas behind ``handle``; adapters known to ``registry`` (the shared directory)."""

    def __init__(
        self, handle: DeploymentHandle, registry: AdapterRegistry, config: FleetConfig
    ) -> None:
        self._handle = handle
        self.registry = registry
        self.config = config
        self.catalog = AdapterCatalog(on_unload=self._forget_adapter)
        self.replicas: dict[str, ReplicaView] = {}
        self._holders: dict[str, str] = {}
        """Model id -> the replica that accepted its latest request."""
        self._description: EngineDescription | None = None
        self._by_adapter = config.routing == "adapter"
        self._ids = itertools.count()
        self._running = False

    async def start(self) -> None:
        """Ask a replica what the engines serve."""
        self._description = await self._call("describe")
        self._running = True

    @property
    def description(self) -> EngineDescription:
        assert self._description is not None, "start() the fleet first"
        return self._description

    @property
    def is_running(self) -> bool:
        return self._running

    def stats(self) -> EngineStats | None:
        """None: engine statistics are per replica (:attr:`replicas`)."""
        return None

    async def shutdown(self, timeout: float | None = None) -> None:
        """Take no more requests (the replicas are stopped by whoever deployed them)."""
        self._running = False

    # -- adapters (the adapter service's calls) ------------------------------------------------

    async def load_adapter(
        self,
        name: str,
        path: str | None = None,
        text: str | None = None,
        max_bytes: int | None = None,
    ) -> AdapterInfo:
        """Have a replica read and validate the adapter (raises its ``AdapterError``), then make
        it usable on every replica: each loads it from the shared registry on first use.
        ``max_bytes``: what one replica's copy may hold (``AdapterOverBudgetError`` beyond)."""
        info: AdapterInfo = await self._call("check_adapter", name, path=path, text=text)
        if max_bytes is not None and info.host_bytes + info.kv_bytes > max_bytes:
            raise AdapterOverBudgetError(name, info.host_bytes, info.kv_bytes, max_bytes)
        return self.catalog.add_adapter(CheckedAdapter(name, info, path))

    async def unload_adapter(self, name: str, missing_ok: bool = False) -> bool:
        """Refuse the adapter from now on; every replica frees its copy within a second."""
        return self.catalog.unload_adapter(name, missing_ok=missing_ok)

    async def adapter_info(self, names: list[str]) -> list[AdapterInfo | None]:
        """Each adapter as the fleet holds it: ``resident`` if a replica holds its current
        version, ``requests`` the front end's unfinished ones."""
        return [self._info(name) for name in names]

    def _info(self, name: str) -> AdapterInfo | None:
        checked = self.catalog.get(name)
        if checked is None:
            return None
        try:
            model_id = self._ref(name).model_id
        except AdapterNotFoundError:
            return None
        return dataclasses.replace(
            checked.info,
            resident=model_id in self._holders,
            requests=self.catalog.requests(name),
        )

    def _ref(self, name: str) -> AdapterRef:
        """Where replicas find the current version of the engine adapter ``name``."""
        record, checked = self.registry.records.get(name), self.catalog.get(name)
        folder = None
        if record is not None and checked is not None:
            folder = self.registry.folder(record) if record.persistent else checked.path
        if record is None or folder is None:
            shown = shorten(name.rpartition("/")[2])
            raise AdapterNotFoundError(f"adapter {shown} was unloaded just now")
        return AdapterRef.of(record, folder)

    def _forget_adapter(self, name: str) -> None:
        for model_id in [m for m in self._holders if m.startswith(f"{name}@")]:
            del self._holders[model_id]

    # -- generation -----------------------------------------------------------------------------

    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
        origin: Origin = LOCAL,
    ) -> AsyncGenerator[ServedOutput, None]:
        """Like ``AsyncEngine.generate``, on a replica that holds ``adapter``. A request whose
        replica stops before it produced output is sent again (up to ``max_attempts``); one that
        had produced output fails with ``EngineDeadError`` (UNAVAILABLE: retry)."""
        job = ReplicaJob(
            prompt,
            params or SamplingParams(),
            request_id or f"fleet-{next(self._ids)}",
            origin,
            self._ref(adapter) if adapter is not None else None,
            affinity=_affinity(prompt, adapter, origin),
        )
        with self.catalog.using(adapter):
            for attempt in range(1, self.config.max_attempts + 1):
                delivered = False
                try:
                    async for out in self._attempt(job):
                        delivered = True
                        yield out
                    return
                except ReplicaLostError as e:
                    if delivered or attempt == self.config.max_attempts:
                        raise EngineDeadError(str(e)) from None
                    logger.warning("request %s: %s; sending it again", job.request_id, e)

    async def _attempt(self, job: ReplicaJob) -> AsyncIterator[ServedOutput]:
        model_id = job.adapter.model_id if job.adapter is not None else None
        handle = self._handle.options(stream=True)
        if model_id is not None and self._by_adapter:
            handle = handle.options(multiplexed_model_id=model_id)
        stream = cast(DeploymentResponseGenerator[Any], handle.generate.remote(job))
        assembler: OutputAssembler | None = None
        try:
            async for item in stream:
                if isinstance(item, Accepted):
                    assembler = OutputAssembler(item.replica)
                    self._accepted(item, model_id)
                    continue
                assert assembler is not None, "a replica sent output before accepting"
                yield assembler.add(item)
        except Exception as e:
            error = replica_error(e)
            if isinstance(error, REPLICA_LOST):
                replica = assembler.replica if assembler is not None else None
                logger.warning("replica %s lost: %s", replica, str(error).splitlines()[0])
                self._lost(replica)
                raise ReplicaLostError(replica) from None
            raise error from None
        except BaseException:  # the caller went away (cancelled, closed): abort on the replica
            stream.cancel()
            raise

    def _accepted(self, accepted: Accepted, model_id: str | None) -> None:
        view = self.replicas.get(accepted.replica)
        if view is None:
            view = self.replicas[accepted.replica] = ReplicaView(accepted.replica, accepted.stats)
        view.stats = accepted.stats
        view.requests += 1
        if model_id is not None:
            view.adapter_requests += 1
            self._holders[model_id] = accepted.replica

    def _lost(self, replica: str | None) -> None:
        if replica is not None:
            self.replicas.pop(replica, None)
            for model_id in [m for m, r in self._holders.items() if r == replica]:
                del self._holders[model_id]

    # -- calls ----------------------------------------------------------------------------------

    async def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method`` on any replica; again on another if its replica stops."""
        for attempt in range(1, self.config.max_attempts + 1):
            try:
                return await getattr(self._handle, method).remote(*args, **kwargs)
            except Exception as e:
                error = replica_error(e)
                if not isinstance(error, REPLICA_LOST):
                    raise error from None
                if attempt == self.config.max_attempts:
                    raise EngineDeadError(str(ReplicaLostError(None))) from None
                logger.warning("%s: its replica stopped; calling another", method)
        raise AssertionError("unreachable")


def _affinity(prompt: Prompt, adapter: str | None, origin: Origin) -> tuple[str, ...]:
    """The router's affinity keys of a prompt, scoped as the engine scopes cached blocks."""
    if isinstance(prompt, str):
        return ()  # the front end tokenizes every prompt; a string never reaches here
    tenant = "*shared*" if origin.share_cache else origin.tenant
    scope = "\x00".join((tenant, adapter or "", origin.cache_salt or ""))
    return affinity_keys(prompt, scope)
