"""The OpenAI-compatible HTTP API, beside gRPC on the same engine, tenants and registry.

``prefixserve serve --http-port 8000`` serves, in the server's own event loop:

* ``GET /v1/models``: the base model and the adapters the caller may use (own and public);
* ``POST /v1/chat/completions``, ``POST /v1/completions``: ``model`` is an adapter's name or the
  base model's; streamed as Server-Sent Events ending in ``data: [DONE]``;
* ``POST /v1/adapters`` (multipart: ``name`` with the two PEFT files, a server ``path`` for
  admins, or ``text``), ``GET``/``DELETE /v1/adapters/{name}``, and vLLM's
  ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``: the gRPC AdapterService's own
  transactions;
* ``GET /health``: 200 serving, 503 while the model loads or the server stops.

Every generation goes through :func:`~prefixserve.server.service.generation`, the gRPC API's own
path (adapter resolution as the tenant sees it, origin, metrics), and every error through
:func:`~prefixserve.server.errors.status_of`, answered in OpenAI's JSON shape with the matching
HTTP status. A client that disconnects mid-stream aborts its requests and frees their blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._proto import prefixserve_pb2 as pb
from ..async_engine import EngineDeadError, QueueFullError
from ..engine import Prompt
from ..request import RequestOutput
from ..sampler import TokenLogprobs
from ..sampling_params import SamplingParams
from ..text import shorten
from . import protocol
from .adapter_service import AdapterService
from .errors import NotReadyError, TooLargeError, status_of
from .openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    UnloadLoraAdapterRequest,
)
from .service import GenerationCall, ServingState, generation
from .tenants import Tenant

Outputs = AsyncGenerator[RequestOutput, None]
"""One engine request's outputs (:func:`~prefixserve.server.service.generation`)."""

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.INTERNAL: (500, "internal_error"),
}
"""The HTTP status and OpenAI error type of each status the services raise."""
RETRY_AFTER_S = 1
"""``Retry-After`` of a 429 (the queue or a tenant's share of it is full) and a 503."""


class HTTPError(Exception):
    """An error answered as is, in OpenAI's shape (for what has no gRPC status)."""

    def __init__(self, status: int, kind: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param


def error_response(error: BaseException) -> JSONResponse:
    """``{"error": {"message", "type", "param", "code"}}`` with the status that fits."""
    param = None
    if isinstance(error, HTTPError):
        status, kind, message, param = error.status, error.kind, str(error), error.param
    else:
        code, message = status_of(error)
        status, kind = HTTP_STATUS.get(code, (500, "internal_error"))
        if isinstance(error, TooLargeError):
            status, kind = 413, "request_too_large"
    retry = isinstance(error, QueueFullError | NotReadyError | EngineDeadError)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(error: ValidationError | RequestValidationError) -> HTTPError:
    """A 400 naming the first bad field (``messages.0.role``) and what is wrong with it."""
    first = error.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _type_tag(str(p))]
    param = ".".join(loc) or None
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if param and not message.startswith(param.split(".")[0]):
        message = f"{param}: {message}"
    return HTTPError(400, "invalid_request_error", message, param)


def _type_tag(part: str) -> bool:
    """Whether a part of a pydantic error location names a member of a union (``str``,
    ``list[int]``), not a field."""
    return "[" in part or part in ("str", "int", "float", "bool", "list", "dict", "none")


def create_app(state: ServingState, adapters: AdapterService, max_request_bytes: int) -> FastAPI:
    """The HTTP API over the server's shared ``state`` and its ``adapters`` service."""
    app = FastAPI(title="prefixserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, default=max_request_bytes, uploads=state.max_upload_bytes)
    ids = itertools.count()

    @app.exception_handler(Exception)
    async def _any(request: Request, error: Exception) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            error.status_code, "invalid_request_error"
        )
        return error_response(HTTPError(error.status_code, kind, str(error.detail)))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(error))

    @app.middleware("http")
    async def _request_id(request: Request, call_next: Callable[[Request], Any]) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = shorten(request_id, 64).strip("'\"")
        try:
            response: Response = await call_next(request)
        except Exception as error:  # anything the exception handlers did not answer
            response = error_response(error)
        response.headers["X-Request-Id"] = request.state.request_id
        return response

    def tenant_of(request: Request) -> Tenant:
        return state.keys.authenticate(
            [(k.lower(), v) for k, v in request.headers.items() if k.lower() == "authorization"]
        )

    async def body_of(request: Request, model: type[Any], limit: int = max_request_bytes) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise TooLargeError(
                f"requests to {request.url.path} are limited to {limit} bytes on this server; "
                f"this one has {declared} bytes (server option --max-request-kb)"
            )
        raw = await request.body()
        if len(raw) > limit:
            raise TooLargeError(
                f"requests to {request.url.path} are limited to {limit} bytes on this server; "
                f"this one has {len(raw)} bytes (server option --max-request-kb)"
            )
        try:
            data = json.loads(raw or b"{}")
        except (ValueError, RecursionError) as e:
            raise HTTPError(400, "invalid_request_error", f"the body is not JSON: {e}") from None
        try:
            return model.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    # -- health and models -----------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        state.ready()
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        tenant = tenant_of(request)
        engine = state.ready()
        base = state.model_info.model
        records = state.registry.visible(tenant)
        infos = await engine.adapter_info([r.engine_name for r in records])
        created = int(time.time())
        data = [{"id": base, "object": "model", "created": created, "owned_by": "system"}]
        for record, info in zip(records, infos, strict=True):
            if info is None:
                continue
            data.append(
                {
                    "id": record.name,
                    "object": "model",
                    "created": int(record.created) or created,
                    "owned_by": record.owner or "system",
                    "parent": base,
                    "root": base,
                    "kind": info.kind,
                    "prefix_tokens": info.num_tokens,
                }
            )
        return JSONResponse({"object": "list", "data": data})

    # -- generation -----------------------------------------------------------------------

    def adapter_of(model: str) -> str:
        """The adapter a ``model`` field names ('' for the base model)."""
        return "" if model == state.model_info.model else model

    def runs(
        request: Request,
        tenant: Tenant,
        body: ChatCompletionRequest | CompletionRequest,
        prompts: Sequence[Callable[[], Prompt]],
        params: Callable[[], Any],
    ) -> list[Outputs]:
        """One engine request per prompt and choice (``n``), all started now."""
        http_id = request.state.request_id
        calls: list[Outputs] = []
        for prompt in prompts:
            for choice in range(body.n):
                call = GenerationCall(
                    tenant=tenant,
                    adapter=adapter_of(body.model),
                    prompt=prompt,
                    params=_choice_params(params, choice),
                    request_id=f"http-{http_id}:{next(ids)}",
                    priority=body.priority,
                    cache_salt=body.cache_salt,
                )
                calls.append(generation(state, call, lambda: "cancelled"))
        return calls

    async def prefix_tokens(tenant: Tenant, model: str) -> int:
        """The prefix length of the adapter ``model`` names (0 for the base model)."""
        adapter = adapter_of(model)
        if not adapter:
            return 0
        record = state.registry.resolve(tenant, adapter)
        (info,) = await state.ready().adapter_info([record.engine_name])
        return info.num_tokens if info is not None else 0

    async def respond(
        request: Request,
        body: ChatCompletionRequest | CompletionRequest,
        streams: list[Outputs],
        chat: bool,
    ) -> Response:
        """The completion as a whole, or as Server-Sent Events when ``body.stream``."""
        kind = "chat.completion" if chat else "text_completion"
        completion = Completion(kind, body.model, request.state.request_id, body.n)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            # Every choice admitted (or refused) before the 200 goes out: a full queue, a bad
            # constraint or a prompt too long is an HTTP error, not an event after a 200.
            primed = await _primed(streams)
            return _sse(completion.stream(primed, state, include_usage, chat=chat))
        return JSONResponse(await completion.whole(streams, state, chat=chat))

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        tenant = tenant_of(request)
        state.ready()
        body: ChatCompletionRequest = await body_of(request, ChatCompletionRequest)
        tokenizer = state.tokenizer
        assert tokenizer is not None
        messages = [
            pb.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
            for m in body.messages
        ]
        prompt_ids: list[int] = []

        def prompt() -> list[int]:
            if not prompt_ids:
                prompt_ids.extend(protocol.chat_token_ids(tokenizer, messages))
            return prompt_ids

        await asyncio.to_thread(prompt)  # tokenized once, off the event loop
        used = len(prompt_ids) + await prefix_tokens(tenant, body.model)
        params = body.sampling_params(max(1, state.model_info.max_model_len - used))
        streams = runs(request, tenant, body, [prompt], lambda: params)
        return await respond(request, body, streams, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        tenant = tenant_of(request)
        state.ready()
        body: CompletionRequest = await body_of(request, CompletionRequest)
        tokenizer = state.tokenizer
        assert tokenizer is not None

        def tokenized(p: str | list[int]) -> Callable[[], Prompt]:
            if isinstance(p, str):
                return lambda: list(tokenizer.encode(p, add_special_tokens=False))
            return lambda: p

        params = body.sampling_params()
        prompts = [tokenized(p) for p in body.prompts()]
        streams = runs(request, tenant, body, prompts, lambda: params)
        return await respond(request, body, streams, chat=False)

    # -- adapters ---------------------------------------------------------------------------

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> JSONResponse:
        tenant = tenant_of(request)
        state.ready()
        message = await _load_request(request, state.max_upload_bytes)
        adapter = await adapters.load(tenant, message)
        return JSONResponse(_adapter_json(adapter), status_code=201)

    @app.get("/v1/adapters/{name}")
    async def get_adapter(request: Request, name: str) -> JSONResponse:
        tenant = tenant_of(request)
        adapter = await adapters.get(tenant, pb.GetAdapterRequest(name=name))
        return JSONResponse(_adapter_json(adapter))

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(request: Request, name: str) -> JSONResponse:
        tenant = tenant_of(request)
        result = await adapters.unload(tenant, pb.UnloadAdapterRequest(name=name))
        return JSONResponse({"id": name, "deleted": True, "unloaded_now": result.unloaded_now})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        tenant = tenant_of(request)
        state.ready()
        body: LoadLoraAdapterRequest = await body_of(request, LoadLoraAdapterRequest)
        message = pb.LoadAdapterRequest(name=body.lora_name, path=body.lora_path)
        await adapters.load(tenant, message)
        return Response(f"Success: adapter '{body.lora_name}' added successfully.", 200)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        tenant = tenant_of(request)
        body: UnloadLoraAdapterRequest = await body_of(request, UnloadLoraAdapterRequest)
        await adapters.unload(tenant, pb.UnloadAdapterRequest(name=body.lora_name))
        return Response(f"Success: adapter '{body.lora_name}' removed successfully.", 200)

    return app


async def _load_request(request: Request, max_upload_bytes: int) -> pb.LoadAdapterRequest:
    """A LoadAdapter message from a multipart form (``name``; ``adapter_config`` and
    ``adapter_model`` files, or ``path``, or ``text``; ``public``) or a JSON body (``name``
    and ``path`` or ``text``; ``public``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_upload_bytes + 2**20:
        raise TooLargeError(
            f"the upload is {declared} bytes but this server accepts at most {max_upload_bytes} "
            f"bytes ({max_upload_bytes / 2**20:.4g} MiB, server option --max-upload-mb)"
        )
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            form: dict[str, Any] = json.loads(await request.body())
        except ValueError as e:
            raise HTTPError(400, "invalid_request_error", f"the body is not JSON: {e}") from None
        if not isinstance(form, dict):
            raise HTTPError(400, "invalid_request_error", "the body must be a JSON object")
    else:
        form = dict(await request.form(max_part_size=max_upload_bytes + 1))
    name = form.get("name")
    if not isinstance(name, str) or not name:
        raise HTTPError(400, "invalid_request_error", "name: an adapter name is required", "name")
    public = str(form.get("public", "")).lower() in ("1", "true", "yes")
    message = pb.LoadAdapterRequest(name=name, public=public)
    config, weights = form.get("adapter_config"), form.get("adapter_model")
    if isinstance(config, UploadFile) and isinstance(weights, UploadFile):
        message.files.adapter_config_json = await config.read()
        message.files.adapter_model_safetensors = await weights.read()
    elif isinstance(form.get("path"), str):
        message.path = form["path"]
    elif isinstance(form.get("text"), str):
        message.text = form["text"]
    else:
        raise HTTPError(
            400,
            "invalid_request_error",
            "give the adapter as files adapter_config and adapter_model (adapter_config.json "
            "and adapter_model.safetensors), a server path (admins), or text",
            "adapter_model",
        )
    return message


def _adapter_json(adapter: pb.Adapter) -> dict[str, Any]:
    return {
        "id": adapter.name,
        "object": "adapter",
        "owned_by": adapter.owner or "system",
        "public": adapter.public,
        "kind": adapter.kind,
        "prefix_tokens": adapter.num_tokens,
        "host_bytes": adapter.host_bytes,
        "kv_bytes": adapter.kv_bytes,
        "resident": adapter.resident,
        "source": adapter.source,
    }


def _sse(chunks: AsyncGenerator[dict[str, Any], None]) -> StreamingResponse:
    async def events() -> AsyncIterator[bytes]:
        async with contextlib.aclosing(chunks) as stream:
            try:
                async for chunk in stream:
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
            except Exception as error:  # after the 200 went out: the error as an event
                body = json.loads(bytes(error_response(error).body))
                yield f"data: {json.dumps(body)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return StreamingResponse(
        events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


class Completion:
    """The responses of one chat or text completion: whole, or as stream chunks."""

    def __init__(self, kind: str, model: str, request_id: str, n: int) -> None:
        self.kind = kind
        self.model = model
        self.n = n
        """Choices per prompt."""
        self.id = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{request_id}"
        self.created = int(time.time())

    def _envelope(self, obj: str, **fields: Any) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            **fields,
        }

    async def whole(
        self, streams: Sequence[Outputs], state: ServingState, chat: bool
    ) -> dict[str, Any]:
        finals = await _all_last(streams)
        choices = []
        for index, out in enumerate(finals):
            logprobs = _logprobs(out.logprobs, state, chat) if out.logprobs is not None else None
            if chat:
                message = {"role": "assistant", "content": out.text}
                choices.append(
                    {
                        "index": index,
                        "message": message,
                        "logprobs": logprobs,
                        "finish_reason": _finish(out.finish_reason),
                    }
                )
            else:
                choices.append(
                    {
                        "index": index,
                        "text": out.text,
                        "logprobs": logprobs,
                        "finish_reason": _finish(out.finish_reason),
                    }
                )
        return self._envelope(self.kind, choices=choices, usage=_usage(finals, self.n))

    async def stream(
        self,
        streams: Sequence[Outputs],
        state: ServingState,
        include_usage: bool,
        chat: bool,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Chunks of every choice as they come (merged), then the usage if asked for."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        finals: dict[int, RequestOutput] = {}
        try:
            if chat:
                for index in range(len(streams)):
                    delta = {"role": "assistant", "content": ""}
                    choice = {
                        "index": index,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": None,
                    }
                    yield self._envelope(obj, choices=[choice])
            merged = contextlib.aclosing(_merged(streams))
            async with merged as items:
                async for index, item in items:
                    step = len(item.delta_token_ids)
                    logprobs = None
                    if item.logprobs is not None and step:
                        logprobs = _logprobs(
                            item.logprobs[len(item.logprobs) - step :], state, chat
                        )
                    text_field = (
                        {"delta": {"content": item.delta_text}}
                        if chat
                        else {"text": item.delta_text}
                    )
                    finish = _finish(item.finish_reason) if item.finished else None
                    if item.delta_text or finish or logprobs:
                        choice = {
                            "index": index,
                            **text_field,
                            "logprobs": logprobs,
                            "finish_reason": finish,
                        }
                        yield self._envelope(obj, choices=[choice])
                    if item.finished:
                        finals[index] = item
            if include_usage:
                outs = [finals[i] for i in sorted(finals)]
                yield self._envelope(obj, choices=[], usage=_usage(outs, self.n))
        finally:
            for stream in streams:  # those not run to their end abort their requests
                await stream.aclose()


async def _merged(
    streams: Sequence[Outputs],
) -> AsyncGenerator[tuple[int, RequestOutput], None]:
    """``(index, output)`` of every stream as they come; one stream is read directly (no task
    per token on the common path, ``n=1``)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, outputs: Outputs) -> None:
        try:
            async for out in outputs:
                await queue.put((index, out))
        except Exception as error:
            await queue.put((index, error))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        done = 0
        while done < len(streams):
            index, item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _choice_params(params: Callable[[], SamplingParams], choice: int) -> Callable[[], Any]:
    """Choice ``choice``'s parameters: a seeded request's choices get seeds ``seed + choice``
    (else ``n`` seeded choices would all be one)."""

    def made() -> SamplingParams:
        p = params()
        if choice and p.seed is not None:
            return dataclasses.replace(p, seed=p.seed + choice)
        return p

    return made


async def _primed(streams: Sequence[Outputs]) -> list[Outputs]:
    """The streams with their first output already awaited (so that a refusal is raised here,
    before any response is sent); if one fails, all are closed and the error raised."""
    firsts = [asyncio.create_task(anext(s)) for s in streams]
    try:
        values = await asyncio.gather(*firsts)
    except BaseException:
        for task in firsts:
            task.cancel()
        await asyncio.gather(*firsts, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
        raise
    return [_prepend(first, stream) for first, stream in zip(values, streams, strict=True)]


async def _first(stream: Outputs) -> RequestOutput:
    return await stream.__anext__()


async def _prepend(first: RequestOutput, stream: Outputs) -> Outputs:
    """``first``, then the rest of ``stream`` (closed with this generator)."""
    try:
        yield first
        async for out in stream:
            yield out
    finally:
        await stream.aclose()


async def _all_last(streams: Sequence[Outputs]) -> list[RequestOutput]:
    """The last output of every stream; if one fails, the others are stopped (their engine
    requests aborted) before the error is raised."""
    tasks = [asyncio.create_task(_last(s)) for s in streams]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _last(outputs: Outputs) -> RequestOutput:
    last = None
    async with contextlib.aclosing(outputs) as stream:
        async for out in stream:
            last = out
    if last is None:
        raise NotReadyError("the engine stream ended without an output")
    return last


def _finish(reason: str | None) -> str | None:
    """OpenAI's finish reasons: ``stop``, ``length``; an aborted request says ``abort``."""
    return reason


def _usage(outputs: Sequence[RequestOutput], n: int) -> dict[str, Any]:
    """Prompt tokens once per prompt (its ``n`` choices, consecutive in ``outputs``, share it:
    the first one's, with the tokens it found in the prefix cache), completion tokens of every
    choice."""
    firsts = outputs[::n]
    prompt = sum(o.num_prompt_tokens for o in firsts)
    completion = sum(len(o.token_ids) for o in outputs)
    cached = sum(o.num_cached_tokens for o in firsts)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


LOGPROB_FLOOR = -9999.0
"""What a log-probability of -inf (a token the constraint forbids) is sent as: JSON has no
infinity (vLLM sends the same)."""


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def _token(state: ServingState, token_id: int) -> str:
    tokenizer = state.tokenizer
    assert tokenizer is not None
    return str(tokenizer.decode([token_id]))


def _logprobs(entries: Sequence[TokenLogprobs], state: ServingState, chat: bool) -> dict[str, Any]:
    """Chat: ``{"content": [{token, logprob, bytes, top_logprobs}]}``; completions: the legacy
    ``{tokens, token_logprobs, top_logprobs, text_offset}``."""
    if chat:
        content = []
        for e in entries:
            token = _token(state, e.token_id)
            top = [
                {"token": (t := _token(state, i)), "logprob": _lp(lp), "bytes": list(t.encode())}
                for i, lp in e.top
            ]
            content.append(
                {
                    "token": token,
                    "logprob": _lp(e.logprob),
                    "bytes": list(token.encode()),
                    "top_logprobs": top,
                }
            )
        return {"content": content}
    tokens = [_token(state, e.token_id) for e in entries]
    offsets = list(itertools.accumulate((len(t) for t in tokens), initial=0))[:-1]
    return {
        "tokens": tokens,
        "token_logprobs": [_lp(e.logprob) for e in entries],
        "top_logprobs": [{_token(state, i): _lp(lp) for i, lp in e.top} for e in entries],
        "text_offset": offsets,
    }


class BodyLimit:
    """Refuses a request body beyond its limit as it arrives, declared or not (chunked bodies
    have no ``content-length``): ``uploads`` plus 1 MiB for ``/v1/adapters``, ``default`` for
    the rest. The endpoint reading the body gets :class:`TooLargeError` (a 413)."""

    def __init__(self, app: ASGIApp, default: int, uploads: int) -> None:
        self.app, self.default, self.uploads = app, default, uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        upload = path.startswith("/v1/adapters")
        limit = self.uploads + 2**20 if upload else self.default
        option = "--max-upload-mb" if upload else "--max-request-kb"
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise TooLargeError(
                        f"requests to {path} are limited to {limit} bytes on this server; this "
                        f"one has more (server option {option})"
                    )
            return message

        await self.app(scope, counted, send)
