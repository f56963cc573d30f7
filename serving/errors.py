"""Ending a server call with the status of a `protocol.errors` exception, over gRPC
(`abort_with`) or HTTP (`http_status`).

Servers raise the protocol's errors (`InvalidRequest`, `ResourceExhausted`, ...);
`abort_with` turns one into the status the client sees. Messages name the offending
field and the allowed range, and never carry credentials.
"""

from __future__ import annotations

import grpc
from grpc import aio

from protocol.errors import EdgecloudError

# The HTTP status of each gRPC status the HTTP front answers with; any other: 500.
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


async def abort_with(context: aio.ServicerContext, error: EdgecloudError) -> None:
    """Ends the RPC with the error's status; raises, like `context.abort`."""
    await context.abort(error.code, error.message)


def http_status(code: grpc.StatusCode) -> int:
    return HTTP_STATUS.get(code, 500)
