"""The one place where failures become gRPC statuses.

Handlers raise plain exceptions (``ValueError`` from validation, the engine's ``QueueFullError``,
the errors below); :class:`ErrorInterceptor` wraps every handler and turns whatever escapes into a
status with an actionable message. Unexpected exceptions become INTERNAL with an error id that is
also logged with the traceback; nothing leaves as UNKNOWN and no request takes the server down.

The interceptor also guards parsing: a request larger than its RPC's limit (see
:func:`request_limits`) answers RESOURCE_EXHAUSTED unparsed, and one that is not a valid message
answers INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc import aio

from .._proto import prefixserve_pb2 as pb
from ..adapters import AdapterNameTakenError, AdapterNotFoundError
from ..async_engine import EngineDeadError, QueueFullError
from ..engine import StepError

logger = logging.getLogger(__name__)

MAX_STATUS_MESSAGE = 2000
"""Characters of a status message sent (and logged); gRPC refuses statuses beyond its metadata
limit (8 KiB by default), and the client would then see RESOURCE_EXHAUSTED instead."""
SMALL_REQUEST_BYTES = 64 * 2**10
"""Limit of the RPCs that carry only names and flags."""


class ServiceError(Exception):
    """An error with a fixed status code; the message goes to the client as is."""

    code = grpc.StatusCode.INTERNAL


class NotFoundError(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class UnauthenticatedError(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(ServiceError):
    code = grpc.StatusCode.PERMISSION_DENIED


class TooLargeError(ServiceError):
    """A request or upload beyond the server's size limit (gRPC's own code for oversized
    messages)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class MalformedRequestError(ServiceError):
    """Request bytes that do not parse as the RPC's message."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class QuotaError(ServiceError):
    """A tenant's quota (adapters, adapter bytes, waiting requests) is used up; the message
    names the limit and the server option that sets it."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class NotReadyError(ServiceError):
    """The model is still loading or the server is shutting down."""

    code = grpc.StatusCode.UNAVAILABLE


def status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for ``error``."""
    if isinstance(error, ServiceError):
        return error.code, str(error)
    if isinstance(error, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"the server is busy: {error}"
    if isinstance(error, EngineDeadError):
        return grpc.StatusCode.UNAVAILABLE, f"{error}; retry on another replica or later"
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, str(error) or "the operation timed out"
    if isinstance(error, StepError):  # the engine logged the cause and serves the others
        return (
            grpc.StatusCode.INTERNAL,
            f"the engine failed on the step that carried this request ({error.cause!r}); it was "
            "stopped and the server goes on serving",
        )
    if isinstance(error, AdapterNameTakenError):
        return grpc.StatusCode.ALREADY_EXISTS, str(error)
    if isinstance(error, AdapterNotFoundError):  # e.g. unloaded between lookup and use
        return grpc.StatusCode.NOT_FOUND, f"{error}; ListAdapters shows the adapters you can use"
    if isinstance(error, ValueError):  # validation, including the engine's AdapterError
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s", error_id, exc_info=error)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal server error (id {error_id}; the server log has the details)",
    )


CLIENT_OUTCOMES = {
    grpc.StatusCode.NOT_FOUND: "not_found",
    grpc.StatusCode.INVALID_ARGUMENT: "invalid",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "rejected",
    grpc.StatusCode.PERMISSION_DENIED: "rejected",
    grpc.StatusCode.UNAUTHENTICATED: "rejected",
    grpc.StatusCode.UNAVAILABLE: "rejected",
}
"""The metrics' outcome of a request that ended with a status a client caused or must retry."""


def outcome_of(error: BaseException) -> str:
    """The ``outcome`` label of a generation that ended with ``error``: ``error`` only for a
    fault of the server (what :func:`status_of` answers INTERNAL), else who ended it
    (``not_found``, ``invalid``, ``deadline``, ``rejected``). Logs nothing."""
    if isinstance(error, StepError):
        return "error"
    if isinstance(error, ServiceError):
        return CLIENT_OUTCOMES.get(error.code, "error")
    if isinstance(error, QueueFullError | EngineDeadError):
        return "rejected"
    if isinstance(error, TimeoutError):
        return "deadline"
    if isinstance(error, AdapterNotFoundError):  # e.g. unloaded between lookup and use
        return "not_found"
    if isinstance(error, ValueError):
        return "invalid"
    return "error"


def request_limits(max_upload_bytes: int, max_request_bytes: int) -> dict[str, int]:
    """The largest request, in bytes, each RPC accepts, by method path.

    LoadAdapter carries uploads (``max_upload_bytes`` plus room for the rest of the message);
    the generation RPCs carry prompts and stop lists (``max_request_bytes``); the rest carry
    names and flags. An RPC missing here gets :data:`SMALL_REQUEST_BYTES`.
    """
    generation, adapters = "/prefixserve.v1.GenerationService/", "/prefixserve.v1.AdapterService/"
    return {
        adapters + "LoadAdapter": max_upload_bytes + 2**20,
        generation + "Generate": max_request_bytes,
        generation + "GenerateStream": max_request_bytes,
        generation + "Tokenize": max_request_bytes,
        generation + "GetModelInfo": SMALL_REQUEST_BYTES,
        adapters + "UnloadAdapter": SMALL_REQUEST_BYTES,
        adapters + "ListAdapters": SMALL_REQUEST_BYTES,
        adapters + "GetAdapter": SMALL_REQUEST_BYTES,
    }


def _size(num_bytes: int) -> str:
    if num_bytes < 2**20:
        return f"{num_bytes / 2**10:.4g} KiB"
    return f"{num_bytes / 2**20:.4g} MiB"


def _capped(message: str) -> str:
    if len(message) <= MAX_STATUS_MESSAGE:
        return message
    return f"{message[:MAX_STATUS_MESSAGE]}... (message cut, {len(message)} chars in all)"


async def _abort(context: aio.ServicerContext, error: Exception, method: str) -> None:
    code, message = status_of(error)
    message = _capped(message)
    if code is not grpc.StatusCode.INTERNAL:
        logger.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


@dataclass(frozen=True, slots=True)
class RejectedRequest:
    """What the guarded deserializer hands the handler instead of a request it refused."""

    error: ServiceError


def _guarded_deserializer(
    deserialize: Callable[[bytes], Any] | None, method: str, limit: int
) -> Callable[[bytes], Any]:
    """``deserialize`` behind a size check, returning :class:`RejectedRequest` instead of
    raising: grpc would answer an exception raised here with UNKNOWN, before any handler runs.
    """
    rpc = method.rpartition("/")[2]
    try:
        full_name = method.strip("/").replace("/", ".")
        message_type = pb.DESCRIPTOR.pool.FindMethodByName(full_name).input_type.full_name
    except KeyError:
        message_type = f"{rpc} request"

    def parse(raw: bytes) -> Any:
        if len(raw) > limit:
            return RejectedRequest(
                TooLargeError(
                    f"{rpc} requests are limited to {limit} bytes ({_size(limit)}) on "
                    f"this server; this one has {len(raw)} bytes"
                )
            )
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as e:  # protobuf's DecodeError, or anything else malformed bytes cause
            reason = str(e).rpartition(": ")[2] or type(e).__name__
            return RejectedRequest(
                MalformedRequestError(
                    f"the request is not a valid {message_type} message: {reason}"
                )
            )

    return parse


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Any]:
    async def handler(request: Any, context: aio.ServicerContext) -> Any:
        try:
            if isinstance(request, RejectedRequest):
                raise request.error
            return await behavior(request, context)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _abort(context, e, method)

    return handler


def _wrap_stream(
    behavior: Callable[..., AsyncGenerator[Any, None]], method: str
) -> Callable[..., Any]:
    async def handler(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if isinstance(request, RejectedRequest):
                raise request.error
            # Closed with this handler (a client that goes away), not whenever it is collected.
            async with contextlib.aclosing(behavior(request, context)) as responses:
                async for response in responses:
                    yield response
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _abort(context, e, method)

    return handler


class ErrorInterceptor(aio.ServerInterceptor):
    """Wraps every handler of the ``prefixserve.v1`` services with :func:`status_of` and its
    request parsing with the size limits of :func:`request_limits` (health and reflection are
    grpc's own and handle their errors themselves)."""

    PREFIX = "/prefixserve.v1."

    def __init__(self, limits: dict[str, int]) -> None:
        """limits: the largest request of each RPC by method path (:func:`request_limits`)."""
        self.limits = limits

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self.PREFIX):
            return handler
        deserializer = _guarded_deserializer(
            handler.request_deserializer, method, self.limits.get(method, SMALL_REQUEST_BYTES)
        )
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
