"""Opening gRPC channels the same way everywhere: SDK clients and the edge's
verifier client. Only grpcio is needed here."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import grpc
from grpc import aio

AUTH_HEADER = "authorization"


@dataclass(frozen=True)
class TlsOptions:
    """PEM files. `ca` verifies the server (system roots when None); `cert`/`key` are
    the client's own pair for mutual TLS; `server_name` overrides the name checked."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        def read(path: Path | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca),
            private_key=read(self.key),
            certificate_chain=read(self.cert),
        )


@dataclass(frozen=True)
class RetryPolicy:
    """gRPC's own retries (the service config's `retryPolicy`), for UNAVAILABLE only.

    gRPC retries a call only until it is committed, that is until the first response
    arrives. For the `Generate` server stream this means: only before the first token.
    A failure after that surfaces as `Unavailable`, and the tokens received so far stay
    on the stream object. Unary calls (ListModels, health) are retried whole.
    """

    # Attempts in all, the first included. gRPC caps this at 5.
    max_attempts: int = 4
    # Backoff before retry n is random in [0, min(initial * multiplier**(n-1), max)].
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    backoff_multiplier: float = 2.0

    default: ClassVar[RetryPolicy]

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError(
                f"max_attempts: must be in [2, 5] (pass retry=None for no retries), "
                f"got {self.max_attempts}"
            )
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"initial_backoff_s: must be in (0, max_backoff_s={self.max_backoff_s}], "
                f"got {self.initial_backoff_s}"
            )
        if not self.backoff_multiplier > 0:
            raise ValueError(f"backoff_multiplier: must be > 0, got {self.backoff_multiplier}")

    def service_config(self, services: Sequence[str]) -> str:
        """The JSON service config applying this policy to every method of `services`
        (full names, e.g. "edgecloud.v1.Generation")."""
        policy = {
            "maxAttempts": self.max_attempts,
            "initialBackoff": f"{self.initial_backoff_s:.6f}s",
            "maxBackoff": f"{self.max_backoff_s:.6f}s",
            "backoffMultiplier": self.backoff_multiplier,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
        names = [{"service": service} for service in services]
        return json.dumps({"methodConfig": [{"name": names, "retryPolicy": policy}]})


RetryPolicy.default = RetryPolicy()


@dataclass(frozen=True)
class KeepAliveOptions:
    """HTTP/2 pings that detect a dead connection (a NAT that dropped it, a peer that
    vanished) instead of waiting on it until the deadline."""

    # Seconds between pings.
    interval_s: float = 30.0
    # Seconds without a ping ack before the connection counts as dead.
    timeout_s: float = 10.0

    default: ClassVar[KeepAliveOptions]

    def __post_init__(self) -> None:
        for name in ("interval_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


KeepAliveOptions.default = KeepAliveOptions()


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` as `authorization: Bearer <token>`; empty without one."""
    return ((AUTH_HEADER, f"Bearer {token}"),) if token else ()


def channel_options(
    max_message_bytes: int = 4 * 1024 * 1024,
    keepalive_s: float = 30.0,
    server_name: str | None = None,
    service_config: str | None = None,
    keepalive_timeout_s: float = 10.0,
) -> list[tuple[str, object]]:
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    if server_name:
        options.append(("grpc.ssl_target_name_override", server_name))
    if service_config:
        options.append(("grpc.service_config", service_config))
        options.append(("grpc.enable_retries", 1))
    return options


def open_channel(target: str, *, tls: TlsOptions | None = None, **options: object) -> grpc.Channel:
    """A blocking channel; `options` are `channel_options`' arguments."""
    return _open(grpc, target, tls, options)


def open_aio_channel(
    target: str, *, tls: TlsOptions | None = None, **options: object
) -> aio.Channel:
    return _open(aio, target, tls, options)


def _open(api, target: str, tls: TlsOptions | None, options: dict[str, object]):
    """`api` is `grpc` or `grpc.aio`: both spell the two constructors the same way."""
    opts = channel_options(server_name=tls.server_name if tls else None, **options)
    if tls is None:
        return api.insecure_channel(target, options=opts)
    return api.secure_channel(target, tls.credentials(), options=opts)
