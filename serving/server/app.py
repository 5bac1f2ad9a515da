"""The server's life: listen (health NOT_SERVING), load the model and adapters (SERVING), serve,
shut down gracefully (NOT_SERVING, refuse new calls, let in-flight ones finish within a grace
period, abort the rest, stop the engine)."""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from transformers import AutoTokenizer

from .._proto import prefixserve_pb2 as pb
from .._proto import prefixserve_pb2_grpc as pb_grpc
from ..async_engine import AsyncEngine
from ..config import EngineConfig
from ..engine import LLMEngine
from ..extras import require
from .adapter_service import AdapterService, restore_adapters
from .config import ServerConfig
from .errors import ErrorInterceptor, request_limits
from .metrics import ServerMetrics
from .registry import AdapterRegistry
from .service import GenerationService, ServingState, model_info

logger = logging.getLogger(__name__)

SERVICE_NAMES = tuple(
    pb.DESCRIPTOR.services_by_name[n].full_name for n in ("GenerationService", "AdapterService")
)
EngineFactory = Callable[[EngineConfig], LLMEngine]


class PrefixServer:
    """One gRPC server over one engine. ``await start()``, ``await load()``, ``await stop()``."""

    generation_service: type[GenerationService] = GenerationService
    """The GenerationService implementation (a subclass may add to its responses)."""

    def __init__(self, config: ServerConfig, engine_factory: EngineFactory = LLMEngine) -> None:
        self.config = config
        self._engine_factory = engine_factory
        self.state = ServingState(
            keys=config.api_keys,
            registry=AdapterRegistry(config.registry_dir),
            metrics=ServerMetrics(
                lambda: self.state.engine.stats() if self.state.engine else None,
                lambda: self.state.registry.usage_by_tenant(),
            ),
            max_upload_bytes=config.max_upload_bytes,
            quota=config.quota,
            share_public_prefix_cache=config.share_public_prefix_cache,
        )
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port: int | None = None
        self.http_port: int | None = None
        """The HTTP API's port once listening (None: not served)."""
        self._http: Any = None
        self._http_task: asyncio.Task[None] | None = None
        # gRPC's own limit must let uploads through; every other RPC has its own, smaller limit
        # that the interceptor checks before parsing (and that names the limit).
        limits = request_limits(config.max_upload_bytes, config.max_request_bytes)
        options = [("grpc.max_receive_message_length", max(limits.values()))]
        self._grpc = aio.server(interceptors=[ErrorInterceptor(limits)], options=options)
        generation = self.generation_service(self.state)
        pb_grpc.add_GenerationServiceServicer_to_server(generation, self._grpc)
        self.adapters = AdapterService(self.state)
        pb_grpc.add_AdapterServiceServicer_to_server(self.adapters, self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        names = (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self._grpc)

    @property
    def address(self) -> str:
        host = "127.0.0.1" if self.config.host in ("0.0.0.0", "[::]", "") else self.config.host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        """Listen; health says NOT_SERVING until :meth:`load` finishes."""
        if self.config.http_port is not None:  # before anything listens
            require("http", "the HTTP API (--http-port)")
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        target = f"{self.config.host}:{self.config.port}"
        if self.config.tls_cert is not None and self.config.tls_key is not None:
            pair = (Path(self.config.tls_key).read_bytes(), Path(self.config.tls_cert).read_bytes())
            self.port = self._grpc.add_secure_port(target, grpc.ssl_server_credentials([pair]))
        else:
            self.port = self._grpc.add_insecure_port(target)
        await self._grpc.start()
        if self.config.http_port is not None:
            await self._start_http(self.config.http_port)
        if self.config.metrics_port is not None:
            self.metrics_port = self.state.metrics.serve(
                self.config.metrics_port,
                self.config.metrics_bind_host,
                self.config.api_keys,
                public=self.config.public_metrics,
            )
        logger.info("listening on %s (model loading)", self.address)

    async def _start_http(self, port: int) -> None:
        """Serve the OpenAI-compatible API with uvicorn in this event loop."""
        import uvicorn

        from .http_api import create_app

        app = create_app(self.state, self.adapters, self.config.max_request_bytes)
        config = uvicorn.Config(
            app,
            host=self.config.host,
            port=port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=int(self.config.shutdown_grace),
        )
        self._http = uvicorn.Server(config)
        self._http.install_signal_handlers = lambda: None  # the server's own handlers stop it
        self._http_task = asyncio.create_task(_serve_http(self._http, port))
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()  # a port in use, say: raise it here
                raise RuntimeError("the HTTP API stopped as it started")
            await asyncio.sleep(0.01)
        self.http_port = int(self._http.servers[0].sockets[0].getsockname()[1])
        logger.info("OpenAI-compatible HTTP API on %s:%d", self.config.host, self.http_port)

    async def load(self) -> None:
        """Load the model (in a worker thread) and the adapters, then report SERVING."""
        engine = await asyncio.to_thread(self._engine_factory, self.config.engine)
        self.state.tokenizer = await asyncio.to_thread(
            AutoTokenizer.from_pretrained, engine.model_path
        )
        self.state.engine = AsyncEngine(
            engine,
            max_waiting=self.config.max_waiting,
            # an open server has one tenant: its share is the whole queue
            max_waiting_per_tenant=None
            if self.config.api_keys.open
            else self.config.quota.max_waiting,
        )
        self.state.model_info = model_info(self.state.engine)
        await restore_adapters(self.state, self.config.adapters)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving %s on %s", engine.model_path, self.address)

    async def stop(self, grace: float | None = None) -> None:
        """Stop gracefully: NOT_SERVING, refuse new calls, give in-flight calls ``grace``
        seconds (default ``config.shutdown_grace``), then abort what is left."""
        grace = self.config.shutdown_grace if grace is None else grace
        await self.health.enter_graceful_shutdown()
        stopping = [self._grpc.stop(grace)]
        if self._http is not None and self._http_task is not None:
            self._http.config.timeout_graceful_shutdown = max(1, round(grace))
            self._http.should_exit = True
            stopping.append(self._http_task)
        for result in await asyncio.gather(*stopping, return_exceptions=True):
            if isinstance(result, BaseException):
                logger.warning("while stopping: %r", result)
        await self.adapters.drain()  # loads and unloads finish (or undo) before the engine stops
        if self.state.engine is not None:
            await self.state.engine.shutdown(timeout=0)
        self.state.metrics.close()
        self.state.registry.close()
        logger.info("server stopped")

    async def wait_for_termination(self) -> None:
        await self._grpc.wait_for_termination()


async def _serve_http(server: Any, port: int) -> None:
    """uvicorn's ``serve``, whose ``sys.exit`` on a failed start (a port in use) becomes an
    error of this task instead of ending the process."""
    try:
        await server.serve()
    except SystemExit:
        raise OSError(f"the HTTP API could not listen on port {port} (in use?)") from None


async def serve(
    config: ServerConfig,
    on_ready: Callable[[PrefixServer], None] | None = None,
    server_factory: Callable[[ServerConfig], PrefixServer] = PrefixServer,
) -> None:
    """Run a server until SIGINT or SIGTERM, then shut it down gracefully."""
    server = server_factory(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        loading = asyncio.create_task(server.load())
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()  # a failed load (bad model, bad adapter) ends the server here
            if on_ready is not None:
                on_ready(server)
            await stopping
        else:
            loading.cancel()
        logger.info("shutting down (grace %.0f s)", config.shutdown_grace)
    finally:
        await server.stop()


class BackgroundServer:
    """A :class:`PrefixServer` on its own event loop thread, for tests, the demo and benchmarks.

    ``with BackgroundServer(config) as server: Client(server.address)...``
    """

    def __init__(self, config: ServerConfig, engine_factory: EngineFactory = LLMEngine) -> None:
        self.config = config
        self._factory = engine_factory
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="prefixserve-server"
        )
        self.server: PrefixServer | None = None
        self.loading: Future[None] | None = None

    def _run(self, coro: object) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]

    def start(self, wait_ready: bool = True, timeout: float = 300) -> BackgroundServer:
        """Start listening and loading; with ``wait_ready`` return once it serves."""
        self._thread.start()

        async def create() -> PrefixServer:
            server = self._new_server()
            await server.start()
            return server

        self.server = self._run(create()).result(timeout)
        self.loading = self._run(self.server.load())
        if wait_ready:
            self.loading.result(timeout)
        return self

    def _new_server(self) -> PrefixServer:
        return PrefixServer(self.config, self._factory)

    @property
    def address(self) -> str:
        assert self.server is not None, "start() the server first"
        return self.server.address

    @property
    def engine(self) -> LLMEngine:
        """The engine of a single-process server (for tests)."""
        assert self.server is not None
        engine = self.server.state.engine
        assert isinstance(engine, AsyncEngine), "a fleet's engines live in its replicas"
        return engine.engine

    def stop(self, grace: float | None = None, timeout: float = 120) -> None:
        if self.server is not None:
            if self.loading is not None and not self.loading.done():
                self.loading.cancel()
            self._run(self.server.stop(grace)).result(timeout)
            self.server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> BackgroundServer:
        return self.start() if self.server is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
