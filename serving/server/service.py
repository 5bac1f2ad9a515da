"""The generation service: authenticated, adapter-aware streams over the async engine.

Every handler authenticates the caller, resolves the adapter name as that tenant sees it, and
streams engine outputs. Errors are raised, never turned into statuses here (see ``errors``).
A client that goes away or whose deadline passes cancels the handler, which leaves the engine's
stream and so aborts the request and frees its blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from grpc import aio
from transformers import PreTrainedTokenizerBase

from .. import __version__
from .._proto import prefixserve_pb2 as pb
from .._proto import prefixserve_pb2_grpc as pb_grpc
from ..engine import Prompt
from ..engine_client import EngineClient
from ..quota import TenantQuota
from ..request import RequestOutput
from ..sampling_params import MAX_LOGPROBS, SamplingParams
from ..types import Origin
from . import protocol
from .errors import NotReadyError, outcome_of
from .metrics import ServerMetrics
from .registry import AdapterRegistry
from .tenants import ApiKeys, Tenant


@dataclass(slots=True)
class ServingState:
    """What the services share. ``engine`` is None until the model is loaded."""

    keys: ApiKeys
    registry: AdapterRegistry
    metrics: ServerMetrics
    max_upload_bytes: int
    engine: EngineClient | None = None
    tokenizer: PreTrainedTokenizerBase | None = None
    """The server's own tokenizer (the engine's belongs to the engine thread)."""
    quota: TenantQuota = field(default_factory=TenantQuota)
    model_info: pb.ModelInfo = field(default_factory=pb.ModelInfo)
    adapter_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serializes adapter loads and unloads."""
    share_public_prefix_cache: bool = False
    """Whether requests of public adapters share cached blocks across tenants."""

    def ready(self) -> EngineClient:
        if self.engine is None:
            raise NotReadyError("the model is still loading; retry when health says SERVING")
        if not self.engine.is_running:
            raise NotReadyError("the server is shutting down")
        return self.engine

    def authenticate(self, context: aio.ServicerContext) -> Tenant:
        return self.keys.authenticate(context.invocation_metadata())


@dataclass(frozen=True, slots=True)
class GenerationCall:
    """One generation request as a front end (gRPC or HTTP) received it."""

    tenant: Tenant
    adapter: str
    """The adapter as the tenant names it; '' = the base model."""
    prompt: Callable[[], Prompt]
    """Its token ids (tokenizing in a worker thread: it may take a while)."""
    params: Callable[[], SamplingParams]
    """Its sampling parameters (validated after the adapter is found)."""
    request_id: str
    """Unique on this front end (the engine's id prefixes the tenant)."""
    priority: int = 0
    cache_salt: str | None = None


async def generation(
    state: ServingState, call: GenerationCall, ended_early: Callable[[], str]
) -> AsyncGenerator[RequestOutput, None]:
    """The engine's outputs for ``call``, timed and counted. The one path of every front end:
    the adapter resolved as the tenant sees it, the origin (tenant, weight, priority, cache
    scope) set, the request counted in the metrics by how it ended: its finish reason,
    ``ended_early()`` when its client went away first, an error by who caused it
    (:func:`~prefixserve.server.errors.outcome_of`; 'error' only for the server's faults).
    """
    tenant = call.tenant
    engine = state.ready()
    adapter = state.registry.resolve(tenant, call.adapter) if call.adapter else None
    params = call.params()
    prompt = await asyncio.to_thread(call.prompt)  # tokenizing can take a while
    name = adapter.engine_name if adapter is not None else None
    tracker = state.metrics.track(name, tenant.name)
    outcome = "error"
    try:
        origin = Origin(
            tenant=tenant.name,
            weight=tenant.weight,
            priority=call.priority,
            cache_salt=call.cache_salt,
            share_cache=state.share_public_prefix_cache
            and adapter is not None
            and adapter.owner is None,
        )
        request_id = f"{tenant.name}:{call.request_id}"
        outputs = engine.generate(prompt, params, request_id, adapter=name, origin=origin)
        async with contextlib.aclosing(outputs) as stream:  # closed here: aborted at once
            async for out in stream:
                tracker.on_output(out)
                if out.finished:
                    outcome = out.finish_reason or "abort"
                yield out
    except (asyncio.CancelledError, GeneratorExit):
        if outcome == "error":  # gone before the end (not after its last output)
            outcome = ended_early()
        raise
    except Exception as error:
        outcome = outcome_of(error)
        raise
    finally:
        tracker.finish(outcome)


def model_name(model_path: str) -> str:
    """The served model's name for clients: the last part of its directory (or hub id), so
    that the server's filesystem layout is not shown to them."""
    return PurePosixPath(str(model_path).replace("\\", "/").rstrip("/")).name or "model"


def model_info(engine: EngineClient) -> pb.ModelInfo:
    d = engine.description
    return pb.ModelInfo(
        model=model_name(d.model_path),
        dtype=d.dtype,
        device=d.device,
        max_model_len=d.max_model_len,
        vocab_size=d.vocab_size,
        eos_token_ids=d.eos_token_ids,
        block_size=d.block_size,
        num_kv_blocks=d.num_kv_blocks,
        attention_backend=d.attention_backend,
        max_logprobs=MAX_LOGPROBS,
        has_chat_template=d.has_chat_template,
        server_version=__version__,
    )


class GenerationService(pb_grpc.GenerationServiceServicer):
    def __init__(self, state: ServingState) -> None:
        self.state = state
        self._ids = itertools.count()

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> pb.GenerateResponse:
        last = None
        async for item in self._outputs(request, context):
            last = item
        assert last is not None, "the engine stream ended without a finished output"
        return protocol.full_response(last, request.request_id)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async with contextlib.aclosing(self._outputs(request, context)) as outputs:
            async for out in outputs:
                yield protocol.stream_chunk(out, request.request_id)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: aio.ServicerContext
    ) -> pb.TokenizeResponse:
        self.state.authenticate(context)
        self.state.ready()
        tokenizer = self.state.tokenizer
        assert tokenizer is not None
        which = request.WhichOneof("prompt")
        if which == "text":
            text = request.text
            ids = await asyncio.to_thread(tokenizer.encode, text, add_special_tokens=False)
        elif which == "chat":
            messages = request.chat.messages
            ids = await asyncio.to_thread(protocol.chat_token_ids, tokenizer, messages)
        else:
            raise ValueError("the request has no prompt: set text or chat")
        return pb.TokenizeResponse(token_ids=list(ids))

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: aio.ServicerContext
    ) -> pb.ModelInfo:
        self.state.authenticate(context)
        self.state.ready()
        return self.state.model_info

    # -- one request ----------------------------------------------------------------------------

    async def _outputs(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncGenerator[RequestOutput, None]:
        """The engine's outputs for ``request`` (:func:`generation`); a client that goes
        away ends it as 'cancelled', one whose deadline passed as 'deadline' (grpc cancels the
        handler, CancelledError, or, while a stream waits to send, closes this generator,
        GeneratorExit at its ``yield``)."""

        def ended_early() -> str:
            # grpc ends a call at its deadline, give or take a few milliseconds
            remaining = context.time_remaining()
            return "deadline" if remaining is not None and remaining < 0.1 else "cancelled"

        call = GenerationCall(
            tenant=self.state.authenticate(context),
            adapter=request.adapter,
            prompt=lambda: self._prompt(request),
            params=lambda: protocol.sampling_params(request),
            request_id=f"{request.request_id or 'req'}:{next(self._ids)}",
            priority=request.priority,
            cache_salt=request.cache_salt if request.HasField("cache_salt") else None,
        )
        async with contextlib.aclosing(generation(self.state, call, ended_early)) as outputs:
            async for out in outputs:
                yield out

    def _prompt(self, request: pb.GenerateRequest) -> Prompt:
        """The prompt's token ids, tokenized here (in a worker thread) rather than on the event
        loop or the engine's thread, which serve everyone."""
        which = request.WhichOneof("prompt")
        if which == "text":
            assert self.state.tokenizer is not None
            return list(self.state.tokenizer.encode(request.text, add_special_tokens=False))
        if which == "token_ids":
            return list(request.token_ids.ids)
        if which == "chat":
            assert self.state.tokenizer is not None
            return protocol.chat_token_ids(self.state.tokenizer, request.chat.messages)
        raise ValueError("the request has no prompt: set text, token_ids or chat")
