"""Request bytes that do not parse become INVALID_ARGUMENT, not UNKNOWN or INTERNAL.

gRPC's asyncio server deserializes a request before the handler runs; a corrupt
message raises there and the client gets UNKNOWN ("Unexpected DecodeError"), or
the handler's catch-all turns it into INTERNAL with a traceback in the log. This
interceptor swaps every deserializer for one that returns an `Undecodable` marker
instead, and wraps the handler so that the marker ends the call with
INVALID_ARGUMENT: before the handler for a single request, from the request
iterator (as a `serving.errors.InvalidRequest`) for a request stream.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc import aio

from protocol.errors import EdgecloudError, InvalidRequest
from serving.errors import abort_with


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    message: str


def _tolerant(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserializer is None:
        return None

    def deserialize(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception as exc:  # protobuf's DecodeError, or anything a parser raises
            return Undecodable(f"request: malformed message ({type(exc).__name__}: {exc})")

    return deserialize


async def _checked(requests: AsyncIterator[object]) -> AsyncIterator[object]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise InvalidRequest(request.message)
        yield request


def _guard(behavior: Callable, request_streaming: bool) -> Callable:
    """`behavior` with its request checked; the same kind of callable (coroutine or
    async generator function), since gRPC picks the calling convention by kind."""

    async def admit(request: object, context: aio.ServicerContext) -> object:
        if request_streaming:
            return _checked(request)
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return request

    if inspect.isasyncgenfunction(behavior):

        async def stream(request, context):
            try:
                admitted = await admit(request, context)
                async with contextlib.aclosing(behavior(admitted, context)) as replies:
                    async for reply in replies:
                        yield reply
            except EdgecloudError as error:  # raised by `_checked` through a handler
                await abort_with(context, error)

        return stream
    if inspect.iscoroutinefunction(behavior):

        async def single(request, context):
            try:
                return await behavior(await admit(request, context), context)
            except EdgecloudError as error:
                await abort_with(context, error)

        return single
    return behavior  # a synchronous handler: none is registered on these servers


class MalformedRequestInterceptor(aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        kind = ("stream" if handler.request_streaming else "unary") + (
            "_stream" if handler.response_streaming else "_unary"
        )
        behavior = getattr(handler, kind)
        return handler._replace(
            request_deserializer=_tolerant(handler.request_deserializer),
            **{kind: _guard(behavior, handler.request_streaming)},
        )
