"""Python clients for a prefixserve server (``prefixserve serve``).

    from prefixserve.client import Client
    client = Client("127.0.0.1:50051", api_key="...")        # api_key: or $PREFIXSERVE_API_KEY
    out = client.generate("The capital of France is", adapter="pirate", max_new_tokens=32)
    print(out.text, out.token_ids, out.finish_reason)
    for chunk in client.generate_stream([{"role": "user", "content": "Hi!"}]):
        print(chunk.text, end="", flush=True)

A prompt is a string, a list of token ids, or chat messages (``{"role", "content"}`` dicts,
rendered with the model's chat template on the server). Failures raise ``grpc.RpcError`` whose
``code()`` is the status (NOT_FOUND, INVALID_ARGUMENT, RESOURCE_EXHAUSTED, ...) and whose
``details()`` says what to change. :class:`AsyncClient` has the same methods as coroutines.
This module needs only grpcio and protobuf (no torch, no transformers).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ._proto import prefixserve_pb2 as pb
from ._proto import prefixserve_pb2_grpc as pb_grpc
from .config import env_api_key

Prompt = str | Sequence[int] | Sequence[Mapping[str, str]]
REPLICA_METADATA = "prefixserve-replica"
"""Trailing metadata of generation responses from a server with replicas (``prefixserve serve
--ray``): the replica that served the request."""
FINISH_REASONS = {
    pb.FINISH_REASON_STOP: "stop",
    pb.FINISH_REASON_LENGTH: "length",
    pb.FINISH_REASON_ABORT: "abort",
}
_SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed")
_STOPPING = (
    "max_new_tokens",
    "stop",
    "stop_token_ids",
    "include_stop_str_in_output",
    "ignore_eos",
    "skip_special_tokens",
)


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    adapter_tokens: int = 0
    """The adapter's prefix length (computed once, shared by its requests)."""
    cached_tokens: int = 0
    """Prompt tokens found in the server's prefix cache (not computed again)."""


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class GenerateResult:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    """'stop' (eos, stop token or stop string), 'length' (max_new_tokens) or 'abort'."""
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None
    replica: str | None = None
    """The replica that served it, on a server with replicas (else None)."""


@dataclass(slots=True)
class StreamChunk:
    """One streamed step: new text and token ids; the last chunk has ``finish_reason``."""

    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    usage: Usage | None = None
    logprobs: list[TokenLogprobs] | None = None
    replica: str | None = None
    """On the last chunk: the replica that served the stream, on a server with replicas."""


@dataclass(slots=True)
class Adapter:
    name: str
    owner: str
    """The owning tenant; '' for a public adapter."""
    public: bool
    kind: str
    num_tokens: int
    host_bytes: int
    kv_bytes: int
    resident: bool
    requests: int
    unloading: bool
    source: str

    @classmethod
    def from_proto(cls, m: pb.Adapter) -> Adapter:
        return cls(**{f: getattr(m, f) for f in cls.__dataclass_fields__})


def _logprobs(entries: Sequence[pb.TokenLogprobs]) -> list[TokenLogprobs]:
    return [
        TokenLogprobs(e.token_id, e.logprob, [(t.token_id, t.logprob) for t in e.top])
        for e in entries
    ]


def _usage(m: pb.Usage) -> Usage:
    return Usage(m.prompt_tokens, m.completion_tokens, m.adapter_tokens, m.cached_tokens)


def build_request(
    prompt: Prompt, adapter: str | None, options: dict[str, Any]
) -> pb.GenerateRequest:
    """A GenerateRequest; ``options`` are SamplingParams-style keywords (None = default)."""
    request = pb.GenerateRequest(
        adapter=adapter or "", request_id=options.pop("request_id", "") or ""
    )
    if isinstance(prompt, str):
        request.text = prompt
    elif prompt and all(isinstance(m, Mapping) for m in prompt):
        request.chat.messages.extend(
            pb.ChatMessage(role=m["role"], content=m["content"])  # type: ignore[index]
            for m in prompt
        )
    else:
        request.token_ids.ids.extend(prompt)
    logprobs = options.pop("logprobs", None)
    if logprobs is not None:
        request.logprobs = logprobs
    cache_salt = options.pop("cache_salt", None)
    if cache_salt is not None:
        request.cache_salt = cache_salt
    priority = options.pop("priority", None)
    if priority is not None:
        request.priority = priority
    schema = options.pop("json_schema", None)
    if schema is not None:
        request.json_schema = schema if isinstance(schema, str) else json.dumps(schema)
    if options.pop("json_object", False):
        request.json_object = True
    for name in ("regex", "grammar"):
        value = options.pop(name, None)
        if value is not None:
            setattr(request, name, value)
    choice = options.pop("choice", None)
    if choice is not None:
        request.choice.options.extend(choice)
    for name, value in options.items():
        if value is None:
            continue
        if name in _SAMPLING:
            setattr(request.sampling, name, value)
        elif name in ("stop", "stop_token_ids"):
            getattr(request.stopping, name).extend([value] if isinstance(value, str) else value)
        elif name in _STOPPING:
            setattr(request.stopping, name, value)
        else:
            raise TypeError(f"unknown generation option {name!r}")
    return request


def replica_of(trailing_metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The ``prefixserve-replica`` entry of a call's trailing metadata, if any."""
    for key, value in trailing_metadata or ():
        if key == REPLICA_METADATA:
            return value.decode() if isinstance(value, bytes) else value
    return None


def result_of(m: pb.GenerateResponse) -> GenerateResult:
    return GenerateResult(
        request_id=m.request_id,
        text=m.text,
        token_ids=list(m.token_ids),
        finish_reason=FINISH_REASONS.get(m.finish_reason, "abort"),
        usage=_usage(m.usage),
        logprobs=_logprobs(m.logprobs) if m.logprobs else None,
    )


def chunk_of(m: pb.GenerateStreamResponse) -> StreamChunk:
    last = m.finish_reason != pb.FINISH_REASON_UNSPECIFIED
    return StreamChunk(
        request_id=m.request_id,
        text=m.delta_text,
        token_ids=list(m.delta_token_ids),
        finish_reason=FINISH_REASONS.get(m.finish_reason) if last else None,
        usage=_usage(m.usage) if last else None,
        logprobs=_logprobs(m.logprobs) if m.logprobs else None,
    )


def tokenize_request(prompt: str | Sequence[Mapping[str, str]]) -> pb.TokenizeRequest:
    request = pb.TokenizeRequest()
    if isinstance(prompt, str):
        request.text = prompt
    else:
        request.chat.messages.extend(
            pb.ChatMessage(role=m["role"], content=m["content"]) for m in prompt
        )
    return request


def load_request(
    name: str, path: str | None, upload: str | Path | None, text: str | None, public: bool
) -> pb.LoadAdapterRequest:
    if sum(x is not None for x in (path, upload, text)) != 1:
        raise ValueError(
            "give exactly one of path= (on the server), upload= (a local directory) or text="
        )
    request = pb.LoadAdapterRequest(name=name, public=public)
    if upload is not None:
        folder = Path(upload)
        request.files.adapter_config_json = (folder / "adapter_config.json").read_bytes()
        request.files.adapter_model_safetensors = (
            folder / "adapter_model.safetensors"
        ).read_bytes()
    elif path is not None:
        request.path = str(path)
    else:
        request.text = str(text)
    return request


class _Base:
    def __init__(
        self,
        target: str,
        api_key: str | None,
        tls: bool,
        root_certificates: str | Path | bytes | None,
        timeout: float | None,
    ) -> None:
        self.target = target
        key = api_key if api_key is not None else env_api_key()
        self.metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.timeout = timeout
        self.credentials = None
        if tls or root_certificates is not None:
            roots = root_certificates
            if roots is not None and not isinstance(roots, bytes):
                roots = Path(roots).read_bytes()
            self.credentials = grpc.ssl_channel_credentials(root_certificates=roots)
        self.options = [
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.max_send_message_length", 256 * 2**20),
        ]

    def _kw(self, timeout: float | None) -> dict[str, Any]:
        return {"metadata": self.metadata, "timeout": timeout or self.timeout}


class Client(_Base):
    """A blocking client. ``target``: 'host:port'. ``tls``: use TLS with the system's roots, or
    give ``root_certificates`` (PEM path or bytes) for a self-signed server certificate."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str | None = None,
        *,
        tls: bool = False,
        root_certificates: str | Path | bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(target, api_key, tls, root_certificates, timeout)
        if self.credentials is None:
            self.channel = grpc.insecure_channel(target, options=self.options)
        else:
            self.channel = grpc.secure_channel(target, self.credentials, options=self.options)
        self.generation = pb_grpc.GenerationServiceStub(self.channel)
        self.adapters = pb_grpc.AdapterServiceStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def generate(
        self,
        prompt: Prompt,
        adapter: str | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> GenerateResult:
        """Generate the whole answer. ``options``: max_new_tokens, temperature, top_k, top_p,
        min_p, repetition_penalty, seed, stop, stop_token_ids, include_stop_str_in_output,
        ignore_eos, skip_special_tokens, logprobs, request_id, cache_salt (reuse cached KV
        blocks only between requests with the same salt), priority (among your own requests:
        lower runs sooner), and at most one output constraint: json_schema (a dict or its
        text), json_object, regex, choice (a list of strings), grammar (EBNF)."""
        request = build_request(prompt, adapter, options)
        response, call = self.generation.Generate.with_call(request, **self._kw(timeout))
        result = result_of(response)
        result.replica = replica_of(call.trailing_metadata())
        return result

    def generate_stream(
        self,
        prompt: Prompt,
        adapter: str | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> Iterator[StreamChunk]:
        """Stream the answer; leaving the loop early cancels the request on the server."""
        call = self.generation.GenerateStream(
            build_request(prompt, adapter, options), **self._kw(timeout)
        )
        try:
            for message in call:
                chunk = chunk_of(message)
                if chunk.finish_reason is not None:  # the status and trailers follow at once
                    chunk.replica = replica_of(call.trailing_metadata())
                yield chunk
        finally:
            call.cancel()

    def tokenize(self, prompt: str | Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of a text (as given) or of chat messages after the chat template."""
        response = self.generation.Tokenize(tokenize_request(prompt), **self._kw(None))
        return list(response.token_ids)

    def model_info(self) -> pb.ModelInfo:
        return self.generation.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(None))

    def load_adapter(
        self,
        name: str,
        *,
        path: str | None = None,
        upload: str | Path | None = None,
        text: str | None = None,
        public: bool = False,
    ) -> Adapter:
        """Load ``upload`` (a local PEFT adapter directory, sent as files), ``path`` (a directory
        on the server; admins only) or ``text`` (a system prompt) as adapter ``name``."""
        request = load_request(name, path, upload, text, public)
        return Adapter.from_proto(self.adapters.LoadAdapter(request, **self._kw(None)))

    def unload_adapter(self, name: str, owner: str | None = None) -> bool:
        """True if it is gone now, False if it goes when its running requests end.
        ``owner`` (admin keys only): unload that tenant's private adapter ``name``."""
        request = pb.UnloadAdapterRequest(name=name, owner=owner or "")
        return self.adapters.UnloadAdapter(request, **self._kw(None)).unloaded_now

    def list_adapters(self, all_tenants: bool = False) -> list[Adapter]:
        request = pb.ListAdaptersRequest(all_tenants=all_tenants)
        response = self.adapters.ListAdapters(request, **self._kw(None))
        return [Adapter.from_proto(a) for a in response.adapters]

    def get_adapter(self, name: str, owner: str | None = None) -> Adapter:
        request = pb.GetAdapterRequest(name=name, owner=owner or "")
        return Adapter.from_proto(self.adapters.GetAdapter(request, **self._kw(None)))

    def health(self, service: str = "") -> str:
        """'SERVING', 'NOT_SERVING' (model loading or shutting down), ..."""
        response = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_until_serving(self, timeout: float = 300.0) -> None:
        """Block until the server reports SERVING (the model is loaded)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)
        for response in self._health.Watch(health_pb2.HealthCheckRequest(), timeout=timeout):
            if response.status == health_pb2.HealthCheckResponse.SERVING:
                return

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The asyncio client: the same methods as :class:`Client`, as coroutines
    (``generate_stream`` is an async iterator). Create it inside the event loop."""

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        api_key: str | None = None,
        *,
        tls: bool = False,
        root_certificates: str | Path | bytes | None = None,
        timeout: float | None = None,
    ) -> None:
        super().__init__(target, api_key, tls, root_certificates, timeout)
        if self.credentials is None:
            self.channel = aio.insecure_channel(target, options=self.options)
        else:
            self.channel = aio.secure_channel(target, self.credentials, options=self.options)
        self.generation = pb_grpc.GenerationServiceStub(self.channel)
        self.adapters = pb_grpc.AdapterServiceStub(self.channel)

    async def generate(
        self,
        prompt: Prompt,
        adapter: str | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> GenerateResult:
        request = build_request(prompt, adapter, options)
        call = self.generation.Generate(request, **self._kw(timeout))
        result = result_of(await call)
        result.replica = replica_of(await call.trailing_metadata())
        return result

    async def generate_stream(
        self,
        prompt: Prompt,
        adapter: str | None = None,
        *,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamChunk]:
        call = self.generation.GenerateStream(
            build_request(prompt, adapter, options), **self._kw(timeout)
        )
        try:
            async for message in call:
                chunk = chunk_of(message)
                if chunk.finish_reason is not None:
                    chunk.replica = replica_of(await call.trailing_metadata())
                yield chunk
        finally:
            call.cancel()

    async def tokenize(self, prompt: str | Sequence[Mapping[str, str]]) -> list[int]:
        response = await self.generation.Tokenize(tokenize_request(prompt), **self._kw(None))
        return list(response.token_ids)

    async def model_info(self) -> pb.ModelInfo:
        return await self.generation.GetModelInfo(pb.GetModelInfoRequest(), **self._kw(None))

    async def load_adapter(
        self,
        name: str,
        *,
        path: str | None = None,
        upload: str | Path | None = None,
        text: str | None = None,
        public: bool = False,
    ) -> Adapter:
        request = load_request(name, path, upload, text, public)
        return Adapter.from_proto(await self.adapters.LoadAdapter(request, **self._kw(None)))

    async def unload_adapter(self, name: str, owner: str | None = None) -> bool:
        request = pb.UnloadAdapterRequest(name=name, owner=owner or "")
        return (await self.adapters.UnloadAdapter(request, **self._kw(None))).unloaded_now

    async def list_adapters(self, all_tenants: bool = False) -> list[Adapter]:
        request = pb.ListAdaptersRequest(all_tenants=all_tenants)
        response = await self.adapters.ListAdapters(request, **self._kw(None))
        return [Adapter.from_proto(a) for a in response.adapters]

    async def get_adapter(self, name: str, owner: str | None = None) -> Adapter:
        request = pb.GetAdapterRequest(name=name, owner=owner or "")
        return Adapter.from_proto(await self.adapters.GetAdapter(request, **self._kw(None)))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
