"""The front end of a fleet: the single server's gRPC services over the engine replicas.

:class:`FleetServer` is a :class:`~prefixserve.server.PrefixServer` whose engine is a
:class:`~.fleet.ReplicaFleet`: the same API, interceptor, per-RPC limits, tenants, registry,
health and metrics, with generation on the replicas. Every generation response names the
replica that served it in the trailing metadata ``prefixserve-replica``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Callable
from typing import cast

from grpc import aio
from grpc_health.v1 import health_pb2
from transformers import AutoTokenizer

from .._proto import prefixserve_pb2 as pb
from ..client import REPLICA_METADATA
from ..model_loader import resolve_model_path
from ..request import RequestOutput
from ..server.adapter_service import restore_adapters
from ..server.app import SERVICE_NAMES, BackgroundServer, PrefixServer, ServerConfig, serve
from ..server.service import GenerationService, model_info
from .config import FleetConfig
from .deploy import deploy, undeploy
from .fleet import ReplicaFleet
from .messages import ServedOutput
from .metrics import ReplicaCollector

logger = logging.getLogger(__name__)


class ReplicaGenerationService(GenerationService):
    """The generation service; its responses name the replica that served them."""

    async def _outputs(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncGenerator[RequestOutput, None]:
        named = False
        async with contextlib.aclosing(super()._outputs(request, context)) as outputs:
            async for out in outputs:
                if not named and isinstance(out, ServedOutput):
                    context.set_trailing_metadata(((REPLICA_METADATA, out.replica),))
                    named = True
                yield out


class FleetServer(PrefixServer):
    """One gRPC front end over ``fleet.replicas`` engine replicas on Ray Serve.

    ``load()`` deploys the replicas (Ray must be initialized), ``stop()`` removes them.
    """

    generation_service = ReplicaGenerationService

    def __init__(self, config: ServerConfig, fleet: FleetConfig) -> None:
        super().__init__(config)
        self.fleet_config = fleet
        self.fleet: ReplicaFleet | None = None
        self._deploying = False

    async def load(self) -> None:
        """Deploy the replicas and wait for them, load the adapters, then report SERVING."""
        self._deploying = True
        registry = self.state.registry.root
        handle = await asyncio.to_thread(deploy, self.config, self.fleet_config, registry)
        fleet = ReplicaFleet(handle, self.state.registry, self.fleet_config)
        await fleet.start()
        self.fleet = fleet
        path = resolve_model_path(self.config.engine.model.model)
        self.state.tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, path)
        self.state.engine = fleet
        self.state.model_info = model_info(self.state.engine)
        self.state.metrics.registry.register(ReplicaCollector(fleet))
        await restore_adapters(self.state, self.config.adapters)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving on %s with %d replicas", self.address, self.fleet_config.replicas)

    async def stop(self, grace: float | None = None) -> None:
        """Stop the front end gracefully (see ``PrefixServer.stop``), then the replicas."""
        await super().stop(grace)
        self.fleet = None
        if self._deploying:
            self._deploying = False
            try:
                await asyncio.to_thread(undeploy, self.fleet_config)
            except Exception as e:  # Ray is gone already: so are the replicas
                logger.warning("could not delete the replicas' Ray Serve app: %r", e)


class BackgroundFleetServer(BackgroundServer):
    """A :class:`FleetServer` on its own event loop thread (tests, benchmarks); Ray must be
    initialized. ``with BackgroundFleetServer(config, fleet) as server: ...``"""

    def __init__(self, config: ServerConfig, fleet: FleetConfig) -> None:
        super().__init__(config)
        self.fleet_config = fleet

    def _new_server(self) -> PrefixServer:
        return FleetServer(self.config, self.fleet_config)

    @property
    def fleet(self) -> ReplicaFleet:
        server = cast(FleetServer, self.server)
        assert server is not None and server.fleet is not None, "the fleet is not loaded yet"
        return server.fleet


def run_fleet(
    config: ServerConfig,
    fleet: FleetConfig,
    on_ready: Callable[[PrefixServer], None] | None = None,
) -> None:
    """Join (or start) Ray, serve until SIGINT or SIGTERM, then stop the replicas and leave."""
    import ray

    ray.init(address=fleet.ray_address, log_to_driver=False)
    try:
        asyncio.run(serve(config, on_ready, lambda c: FleetServer(c, fleet)))
    finally:
        ray.shutdown()
