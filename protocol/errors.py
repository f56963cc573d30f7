"""The errors of the protocol, on both sides: servers raise them and answer with their
`code` (`serving.errors.abort_with`); the SDK turns a failed call back into one
(`from_rpc_error`). One hierarchy, so a status means the same class everywhere.

Every error an SDK client method raises is an `EdgecloudError` carrying the gRPC status
`code` and the server's `message`; transport exceptions (`grpc.RpcError` and its aio
variant) never reach users. The codes a caller can act on get their own class:

| status code          | exception           | what to do                           |
|----------------------|---------------------|--------------------------------------|
| INVALID_ARGUMENT     | `InvalidRequest`    | fix the named field                  |
| UNAUTHENTICATED      | `Unauthenticated`   | check the token                      |
| UNAVAILABLE          | `Unavailable`       | retry later (already retried once    |
|                      |                     | or more before the first token)      |
| CANCELLED            | `Unavailable`       | the server dropped the call as it    |
|                      |                     | stopped; retry (`code` stays         |
|                      |                     | CANCELLED)                           |
| RESOURCE_EXHAUSTED   | `ResourceExhausted` | back off, or ask for less            |
| DEADLINE_EXCEEDED    | `DeadlineExceeded`  | raise `timeout`                      |
| any other            | `ServerError`       | report it                            |

Client-side validation raises `InvalidRequest` too, before anything is sent.
"""

from __future__ import annotations

import grpc


class EdgecloudError(Exception):
    """Base of every SDK error. `code` is the gRPC status; `message` is the server's text
    (or the SDK's, for errors raised before a call)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class InvalidRequest(EdgecloudError, ValueError):
    """A request field is out of range. `field` names it when the SDK caught it before
    sending (e.g. "top_p"); errors from the server carry the name in `message` only."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class Unauthenticated(EdgecloudError):
    """The bearer token is missing or wrong."""

    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(EdgecloudError):
    """The server cannot be reached or is draining; safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(EdgecloudError):
    """A server limit was hit (capacity, context length, message size)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(EdgecloudError):
    """The call outlived its `timeout`."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ServerError(EdgecloudError):
    """Any other status (INTERNAL, NOT_FOUND, ...), or a server that broke the
    protocol (e.g. a stream that ended without its final statistics). Servers raise it
    for bugs and unexpected failures; details stay in the server log."""

    code = grpc.StatusCode.INTERNAL


class FailedPrecondition(ServerError):
    """The request is well formed but arrives in the wrong state (a round before open)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class OutOfRange(ServerError):
    """The session reached the verifier's context limit: the generation ends there
    (`finish_reason: length`); no other verifier of the same configuration can go on."""

    code = grpc.StatusCode.OUT_OF_RANGE


class NotFound(ServerError):
    code = grpc.StatusCode.NOT_FOUND


_BY_CODE: dict[grpc.StatusCode, type[EdgecloudError]] = {
    cls.code: cls
    for cls in (InvalidRequest, Unauthenticated, Unavailable, ResourceExhausted, DeadlineExceeded)
}


def from_rpc_error(error: grpc.RpcError) -> EdgecloudError:
    """The SDK exception for a failed call (sync or aio)."""
    # Sync errors are `grpc.Call`s, aio ones (`AioRpcError`) only look like one.
    has_status = callable(getattr(error, "code", None)) and callable(
        getattr(error, "details", None)
    )
    code = error.code() if has_status else grpc.StatusCode.UNKNOWN
    message = (error.details() if has_status else None) or str(error)
    if code == grpc.StatusCode.CANCELLED:
        # The SDK ends a stream it cancels itself without reading on, so a CANCELLED that
        # reaches a caller was the server's: it stopped with the call in flight.
        return Unavailable(message, code=code)
    cls = _BY_CODE.get(code)
    if cls is None:
        return ServerError(message, code=code)
    return cls(message)


class translated_rpc_errors:
    """`with translated_rpc_errors(): ...` re-raises a `grpc.RpcError` from the block as
    its SDK exception. Works in sync and async code alike."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if isinstance(exc, grpc.RpcError):
            raise from_rpc_error(exc) from exc
        return False
