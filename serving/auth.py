"""Bearer-token authentication for every gRPC service.

Clients send `authorization: Bearer <token>` metadata. The interceptor compares in
constant time and answers UNAUTHENTICATED without reaching the handler. The health
service stays open so that load balancers and Ray can probe liveness without a
secret. Tokens are never logged: errors say "missing" or "wrong", nothing more.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc import aio

from protocol.channel import AUTH_HEADER

OPEN_SERVICES = ("/grpc.health.v1.Health/",)


@dataclass(frozen=True)
class AuthConfig:
    """`token` None with `insecure_no_auth` True is the explicit local-demo mode."""

    token: str | None = None
    insecure_no_auth: bool = False

    def __post_init__(self) -> None:
        if self.token is None and not self.insecure_no_auth:
            raise ValueError(
                "auth: give --auth-token or --auth-token-file "
                "(or --insecure-no-auth for a local demo)"
            )
        if self.token is not None and not self.token.strip():
            raise ValueError("auth_token: must be non-empty")

    def __repr__(self) -> str:
        token = "<set>" if self.token else None
        return f"AuthConfig(token={token}, insecure_no_auth={self.insecure_no_auth})"

    @classmethod
    def from_flags(
        cls, token: str | None, token_file: str | None, insecure_no_auth: bool
    ) -> AuthConfig:
        if token and token_file:
            raise ValueError("auth: give only one of --auth-token and --auth-token-file")
        if token_file:
            try:
                token = Path(token_file).read_text().strip()
            except OSError as exc:
                raise ValueError(
                    f"auth_token_file: cannot read {token_file}: {exc.strerror}"
                ) from exc
        return cls(token=token, insecure_no_auth=insecure_no_auth and not token)


def _deny(message: str) -> grpc.RpcMethodHandler:
    async def abort(request_or_iterator, context: aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.stream_stream_rpc_method_handler(abort)


def bearer_denial(expected: str | None, sent: str | None) -> str | None:
    """Why a call carrying the `authorization` value `sent` is refused, or None to let
    it in; `expected` is the token (None: no auth). Compared in constant time. The one
    check of the gRPC interceptor and the HTTP front alike."""
    if expected is None:
        return None
    if sent is None:
        return "missing bearer token in the authorization header"
    if not hmac.compare_digest(str(sent).encode(), f"Bearer {expected}".encode()):
        return "wrong bearer token"
    return None


class TokenAuthInterceptor(aio.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        if handler_call_details.method.startswith(OPEN_SERVICES):
            return await continuation(handler_call_details)
        sent = dict(handler_call_details.invocation_metadata or ()).get(AUTH_HEADER)
        if (denial := bearer_denial(self._token, sent)) is not None:
            return _deny(denial)
        return await continuation(handler_call_details)
