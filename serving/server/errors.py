"""The one place where failures become gRPC statuses.

Handlers raise plain exceptions (``ValueError`` from validation, the engine's ``QueueFullError``,
the errors below); :class:`ErrorInterceptor` wraps every handler and turns whatever escapes into a
status with an actionable message. Unexpected exceptions become INTERNAL with an error id that is
also logged with the traceback; nothing leaves as UNKNOWN and no request takes the server down.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from grpc import aio

from ..async_engine import EngineDeadError, QueueFullError
from ..engine import StepError

logger = logging.getLogger(__name__)


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
    """An upload beyond the server's size limit (gRPC's own code for oversized messages)."""

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
    if isinstance(error, ValueError):  # validation, including the engine's AdapterError
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    error_id = uuid.uuid4().hex[:12]
    logger.error("internal error %s", error_id, exc_info=error)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal server error (id {error_id}; the server log has the details)",
    )


async def _abort(context: aio.ServicerContext, error: Exception, method: str) -> None:
    code, message = status_of(error)
    if code is not grpc.StatusCode.INTERNAL:
        logger.info("%s -> %s: %s", method, code.name, message)
    await context.abort(code, message)


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Any]:
    async def handler(request: Any, context: aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _abort(context, e, method)

    return handler


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], method: str) -> Callable[..., Any]:
    async def handler(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for response in behavior(request, context):
                yield response
        except (aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as e:
            await _abort(context, e, method)

    return handler


class ErrorInterceptor(aio.ServerInterceptor):
    """Wraps every handler of the ``prefixserve.v1`` services with :func:`status_of` (health
    and reflection are grpc's own and handle their errors themselves)."""

    PREFIX = "/prefixserve.v1."

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or not method.startswith(self.PREFIX):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
