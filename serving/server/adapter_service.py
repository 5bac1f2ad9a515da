"""The adapter service: load (upload, server path or text), unload, list and get, per tenant.

A load stages the files in the registry, lets the engine validate and register them (on its own
thread, between steps), then moves them into the registry for good; a failed load leaves nothing
behind. On startup :func:`restore_adapters` loads the command-line adapters and the registry's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from grpc import aio

from .._proto import prefixserve_pb2 as pb
from .._proto import prefixserve_pb2_grpc as pb_grpc
from ..adapters import AdapterError, AdapterOverBudgetError
from ..engine_client import EngineClient
from ..text import shorten
from ..types import AdapterInfo
from . import protocol
from .config import AdapterSpec
from .errors import AlreadyExistsError, PermissionDeniedError, QuotaError, TooLargeError
from .registry import AdapterRecord, AdapterRegistry, not_found
from .service import ServingState
from .tenants import Tenant

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def _engine_load(
    engine: EngineClient, name: str, source: dict[str, str], max_bytes: int | None = None
) -> AdapterInfo:
    """Read and validate the adapter in a worker thread, then register it on the engine's
    thread (between steps), unless it would hold more than ``max_bytes``."""
    return await engine.load_adapter(
        name, path=source.get("path"), text=source.get("text"), max_bytes=max_bytes
    )


def _client_words(message: str, staged: Path, record: AdapterRecord) -> str:
    """The engine's message without server paths or the engine's name for the adapter."""
    message = message.replace(f"{staged}/", "uploaded ").replace(str(staged), "the upload")
    return message.replace(repr(record.engine_name), repr(record.name))


class AdapterService(pb_grpc.AdapterServiceServicer):
    """Adapter changes are transactions. Once a load or unload has begun it runs to its end on
    the server whatever its caller does (a cancelled call, an expired deadline, a closed
    connection); a load whose caller went away is then undone, so a load cut before it finished
    leaves nothing behind: no engine adapter, no registry record, no staged file. (A load that
    finished as its deadline passed is kept whole, as with any RPC whose answer was in flight: a
    client that saw DEADLINE_EXCEEDED asks GetAdapter before loading again.)"""

    def __init__(self, state: ServingState) -> None:
        self.state = state
        self._transactions: set[asyncio.Task[Any]] = set()

    def _detach(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run ``work`` as a task of its own that the caller's cancellation does not reach."""
        task = asyncio.get_running_loop().create_task(work)
        self._transactions.add(task)
        task.add_done_callback(self._transactions.discard)
        return task

    async def drain(self) -> None:
        """Wait until no adapter transaction is running (before the engine stops)."""
        while self._transactions:
            await asyncio.gather(*list(self._transactions), return_exceptions=True)

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: aio.ServicerContext
    ) -> pb.Adapter:
        return await self.load(self.state.authenticate(context), request)

    async def load(self, tenant: Tenant, request: pb.LoadAdapterRequest) -> pb.Adapter:
        """Load an adapter for ``tenant`` (the gRPC and HTTP APIs' one transaction)."""
        engine = self.state.ready()
        public = request.public or self.state.keys.open
        if public and not tenant.admin:
            raise PermissionDeniedError("only an admin key can load public adapters")
        record = AdapterRecord(request.name, None if public else tenant.name, source="")
        self.state.registry.check_free(record.owner, record.name)  # fail fast, before any upload
        load = self._detach(self._load(engine, request, tenant, record))
        try:
            info = await asyncio.shield(load)
        except asyncio.CancelledError:
            self._detach(self._undo_load(engine, load, record))
            raise
        logger.info("tenant %s loaded adapter %s (%s)", tenant.name, record.engine_name, info.kind)
        return protocol.adapter_message(record, info, admin=tenant.admin)

    async def _load(
        self,
        engine: EngineClient,
        request: pb.LoadAdapterRequest,
        tenant: Tenant,
        record: AdapterRecord,
    ) -> AdapterInfo:
        """Stage, check the quota, load into the engine, record: all of it or nothing."""
        registry = self.state.registry
        async with self.state.adapter_lock:
            registry.check_free(record.owner, record.name)
            staged = await self._stage(request, tenant, record)
            try:
                record.size_bytes = await asyncio.to_thread(registry.staged_bytes, staged)
                budget = self._check_quota(record)
                source = AdapterRegistry.adapter_source(staged)
                try:
                    info = await _engine_load(engine, record.engine_name, source, budget)
                except AdapterOverBudgetError as e:
                    raise self._over_quota(record, e) from None
            except AdapterError as e:
                await asyncio.to_thread(registry.discard, staged)
                raise type(e)(_client_words(str(e), staged, record)) from None
            except BaseException:
                await asyncio.to_thread(registry.discard, staged)
                raise
            record.kind = info.kind
            record.resident_bytes = info.host_bytes + info.kv_bytes
            try:
                await asyncio.to_thread(registry.add, record, staged)
            except BaseException:
                await asyncio.to_thread(registry.discard, staged)
                await engine.unload_adapter(record.engine_name)
                raise
        return info

    async def _undo_load(
        self, engine: EngineClient, load: asyncio.Task[AdapterInfo], record: AdapterRecord
    ) -> None:
        """The caller of ``load`` went away: once it ends, remove what it made."""
        try:
            await load
        except Exception:
            return  # it failed and left nothing
        async with self.state.adapter_lock:
            if self.state.registry.records.get(record.engine_name) is not record:
                return  # already unloaded by another call
            await engine.unload_adapter(record.engine_name)
            await asyncio.to_thread(self.state.registry.remove, record)
        logger.info("load of adapter %s undone: its caller went away", record.engine_name)

    def _check_quota(self, record: AdapterRecord) -> int | None:
        """Refuse the load if the tenant holds its most adapters; return the bytes it may still
        add (None: no limit), which the engine checks once it has read the adapter and before
        it registers it."""
        quota = self.state.quota
        if record.owner is None:
            return None  # public adapters are the operator's
        count, size = self.state.registry.usage(record.owner)
        if quota.max_adapters is not None and count + 1 > quota.max_adapters:
            raise QuotaError(
                f"tenant {record.owner!r} already has {count} adapters, the most a tenant may "
                f"hold (server option --max-adapters-per-tenant {quota.max_adapters}); "
                "unload one first"
            )
        limit = quota.max_adapter_bytes
        return None if limit is None else max(0, limit - size)

    def _over_quota(self, record: AdapterRecord, error: AdapterOverBudgetError) -> QuotaError:
        limit = self.state.quota.max_adapter_bytes
        assert limit is not None and record.owner is not None
        _, size = self.state.registry.usage(record.owner)
        return QuotaError(
            f"this adapter would hold {error.resident_bytes} bytes ({error.host_bytes} of host "
            f"tensors, {error.kv_bytes} of prefix KV) and tenant {record.owner!r}'s others hold "
            f"{size} bytes: more than the {limit / 2**20:.4g} MiB a tenant may hold (server "
            "option --max-adapter-mb-per-tenant); unload one first"
        )

    async def _stage(
        self, request: pb.LoadAdapterRequest, tenant: Tenant, record: AdapterRecord
    ) -> Path:
        registry = self.state.registry
        which = request.WhichOneof("source")
        if which == "files":
            self._check_size(
                len(request.files.adapter_config_json)
                + len(request.files.adapter_model_safetensors)
            )
            record.source = "upload"
            files = request.files
            return await asyncio.to_thread(
                registry.stage_files, files.adapter_config_json, files.adapter_model_safetensors
            )
        if which == "path":
            if not tenant.admin:
                raise PermissionDeniedError(
                    "loading from a server-side path needs an admin key; upload the files instead"
                )
            record.source = request.path
            return await asyncio.to_thread(registry.stage_directory, request.path)
        if which == "text":
            self._check_size(len(request.text.encode()))
            record.source = "text"
            return await asyncio.to_thread(registry.stage_text, request.text)
        raise ValueError("LoadAdapter needs a source: set files, path or text")

    def _check_size(self, size: int) -> None:
        limit = self.state.max_upload_bytes
        if size > limit:
            raise TooLargeError(
                f"the upload is {size} bytes but this server accepts at most {limit} bytes "
                f"({limit / 2**20:.4g} MiB, server option --max-upload-mb)"
            )

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        return await self.unload(self.state.authenticate(context), request)

    async def unload(
        self, tenant: Tenant, request: pb.UnloadAdapterRequest
    ) -> pb.UnloadAdapterResponse:
        """Unload an adapter ``tenant`` may unload (its own; any, for admins)."""
        engine = self.state.ready()
        record = self._resolve(tenant, request.name, request.owner)
        if record.owner is None and not tenant.admin:
            raise PermissionDeniedError(
                f"adapter {shorten(request.name)} is public; only an admin key can unload it"
            )
        now = await asyncio.shield(self._detach(self._unload(engine, record)))
        logger.info("tenant %s unloaded adapter %s", tenant.name, record.engine_name)
        return pb.UnloadAdapterResponse(unloaded_now=now)

    async def _unload(self, engine: EngineClient, record: AdapterRecord) -> bool:
        """Unload from the engine and the registry together (runs to its end once begun)."""
        async with self.state.adapter_lock:
            if self.state.registry.records.get(record.engine_name) is not record:
                raise not_found(record.name)  # another call unloaded it meanwhile

            now = await engine.unload_adapter(record.engine_name, missing_ok=True)
            await asyncio.to_thread(self.state.registry.remove, record)
        return now

    def _resolve(self, tenant: Tenant, name: str, owner: str) -> AdapterRecord:
        """The adapter a call names: ``owner``'s private one (admins, or the owner itself), else
        as ``tenant`` sees ``name``."""
        if not owner or (owner == tenant.name and not tenant.admin):
            return self.state.registry.resolve(tenant, name)
        if not tenant.admin:
            raise PermissionDeniedError("only an admin key can name another tenant's adapter")
        return self.state.registry.owned(owner, name)

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        tenant = self.state.authenticate(context)
        engine = self.state.ready()
        if request.all_tenants and not tenant.admin:
            raise PermissionDeniedError("only an admin key can list every tenant's adapters")
        records = self.state.registry.visible(tenant, request.all_tenants)
        infos = await engine.adapter_info([r.engine_name for r in records])
        return pb.ListAdaptersResponse(
            adapters=[
                protocol.adapter_message(r, i, admin=tenant.admin)
                for r, i in zip(records, infos)
                if i
            ]
        )

    async def GetAdapter(
        self, request: pb.GetAdapterRequest, context: aio.ServicerContext
    ) -> pb.Adapter:
        return await self.get(self.state.authenticate(context), request)

    async def get(self, tenant: Tenant, request: pb.GetAdapterRequest) -> pb.Adapter:
        """An adapter as ``tenant`` sees it."""
        engine = self.state.ready()
        record = self._resolve(tenant, request.name, request.owner)
        (info,) = await engine.adapter_info([record.engine_name])
        if info is None:
            raise AdapterError(f"adapter {request.name!r} was just unloaded")
        return protocol.adapter_message(record, info, admin=tenant.admin)


async def restore_adapters(state: ServingState, specs: list[AdapterSpec]) -> None:
    """Load the command-line adapters, then every adapter the registry recorded before."""
    engine, registry = state.ready(), state.registry
    for spec in specs:
        record = AdapterRecord(spec.name, spec.owner, "command line", persistent=False)
        registry.check_free(record.owner, record.name)
        if not (Path(spec.path) / "adapter_model.safetensors").is_file():
            raise ValueError(f"--adapter {spec.name}: {spec.path} has no adapter_model.safetensors")
        info = await _engine_load(engine, record.engine_name, {"path": spec.path})
        record.kind = info.kind
        record.resident_bytes = info.host_bytes + info.kv_bytes
        registry.add(record, None)
    for record, folder in await asyncio.to_thread(registry.saved):
        try:
            registry.check_free(record.owner, record.name)
            source = AdapterRegistry.adapter_source(folder)
            info = await _engine_load(engine, record.engine_name, source)
            record.resident_bytes = info.host_bytes + info.kv_bytes
        except (ValueError, AlreadyExistsError) as e:
            logger.warning("registry adapter %s not restored: %s", record.engine_name, e)
            continue
        registry.records[record.engine_name] = record
    logger.info("%d adapters loaded", len(registry.records))
