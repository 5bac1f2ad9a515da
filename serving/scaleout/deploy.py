"""Deploying the engine replicas as a Ray Serve application, and removing them."""

from __future__ import annotations

import logging
from pathlib import Path

from ray import serve
from ray.serve.handle import DeploymentHandle

from ..server.app import ServerConfig
from .config import ROUTERS, FleetConfig
from .messages import mark_registry
from .replica import EngineReplica, ReplicaSettings

logger = logging.getLogger(__name__)

DEPLOYMENT = "EngineReplica"


def replica_settings(
    config: ServerConfig, fleet: FleetConfig, registry: Path, token: str
) -> ReplicaSettings:
    return ReplicaSettings(
        engine=config.engine,
        registry=str(registry),
        registry_token=token,
        max_waiting=config.max_waiting,
        # an open server has one tenant: its share is the whole queue
        max_waiting_per_tenant=None if config.api_keys.open else config.quota.max_waiting,
        max_adapters=fleet.max_adapters_per_replica,
        adapter_sync_s=fleet.adapter_sync_s,
    )


def deploy(config: ServerConfig, fleet: FleetConfig, registry: Path) -> DeploymentHandle:
    """Run ``fleet.replicas`` engine replicas on the connected Ray cluster and return a handle
    to them, once every replica has loaded the model (blocking; Ray must be initialized).
    ``registry``: the adapter registry directory, which every replica must see."""
    deployment = serve.deployment(
        name=DEPLOYMENT,
        num_replicas=fleet.replicas,
        max_ongoing_requests=fleet.max_ongoing_requests,
        ray_actor_options={"num_cpus": fleet.replica_cpus, "num_gpus": fleet.replica_gpus},
        graceful_shutdown_timeout_s=config.shutdown_grace,
        max_constructor_retry_count=2 * fleet.replicas,  # a bad model fails fast
        request_router_config={"request_router_class": ROUTERS[fleet.routing]},
    )(EngineReplica)
    # No HTTP or gRPC proxy of Ray Serve's: the front end is the only client of the replicas.
    serve.start(proxy_location="Disabled")
    if fleet.app_name in serve.status().applications:
        logger.warning(
            "replacing the Ray Serve app %r that already runs on this cluster (a front end that "
            "did not stop cleanly, or another one: give each fleet its own app name)",
            fleet.app_name,
        )
    app = deployment.bind(replica_settings(config, fleet, registry, mark_registry(registry)))
    logger.info("starting %d engine replicas (Ray Serve app %r)", fleet.replicas, fleet.app_name)
    return serve.run(app, name=fleet.app_name, route_prefix=None)


def undeploy(fleet: FleetConfig) -> None:
    """Stop the fleet's replicas (their in-flight requests get ``graceful_shutdown_timeout_s``)."""
    serve.delete(fleet.app_name)
    logger.info("engine replicas stopped (Ray Serve app %r deleted)", fleet.app_name)
