"""Internal errors and the single mapping from them to gRPC status codes.

Servers raise these; `abort_with` turns one into the status the client sees. Messages
name the offending field and the allowed range, and never carry credentials.
"""

from __future__ import annotations

import grpc
from grpc import aio


class ServingError(Exception):
    """Base of every error a server answers with a status; `code` is the gRPC status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(ServingError):
    """The request is malformed: the message names the field (e.g. `round.tree.parents[3]`)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class FailedPrecondition(ServingError):
    """The request is well formed but arrives in the wrong state (round before open)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(ServingError):
    """A configured limit was hit; the message names the limit and its value."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class OutOfRange(ServingError):
    """The session reached the verifier's context limit: the generation ends there
    (`finish_reason: length`); no other verifier of the same configuration can go on."""

    code = grpc.StatusCode.OUT_OF_RANGE


class Unavailable(ServingError):
    """Retryable: the server is draining, or no peer can take the work right now."""

    code = grpc.StatusCode.UNAVAILABLE


class Internal(ServingError):
    """A bug or an unexpected failure; details stay in the server log."""

    code = grpc.StatusCode.INTERNAL


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


async def abort_with(context: aio.ServicerContext, error: ServingError) -> None:
    """Ends the RPC with the error's status; raises, like `context.abort`."""
    await context.abort(error.code, str(error))
