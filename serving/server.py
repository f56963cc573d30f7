"""Building, running and draining a `grpc.aio` server the same way for every service.

Every server gets token auth (unless explicitly disabled), optional TLS or mutual
TLS, the standard health service, server reflection, a message-size cap, and a
drain that flips health to NOT_SERVING, stops accepting calls and lets in-flight
ones finish within a grace period, and, on a port of its own, Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from serving.auth import AuthConfig, TokenAuthInterceptor
from serving.decoding import MalformedRequestInterceptor
from serving.metrics import MetricsEndpoint, serve_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsConfig:
    """PEM files. With `client_ca`, clients must present a certificate it signed (mTLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        def read(name: str, path: Path) -> bytes:
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"{name}: cannot read {path}: {exc.strerror}") from exc

        pair = [(read("tls_key", self.key), read("tls_cert", self.cert))]
        if self.client_ca is None:
            return grpc.ssl_server_credentials(pair)
        ca = read("tls_client_ca", self.client_ca)
        return grpc.ssl_server_credentials(pair, root_certificates=ca, require_client_auth=True)


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    # 0 picks a free port; the bound one is in `RunningServer.port`.
    port: int = 0
    auth: AuthConfig = field(default_factory=lambda: AuthConfig(insecure_no_auth=True))
    tls: TlsConfig | None = None
    # Largest message either way; bigger ones get RESOURCE_EXHAUSTED from gRPC itself.
    max_message_bytes: int = 4 * 1024 * 1024
    # How long a drain waits for in-flight calls before cancelling them.
    grace_s: float = 10.0
    # Prometheus `/metrics` on this port of `host`, without a token (so on a port the
    # operator chose for it); None: no endpoint; 0 picks a free port.
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name}: must be in [0, 65535], got {value}")
        if not 1024 <= self.max_message_bytes <= 1 << 30:
            raise ValueError(
                f"max_message_bytes: must be in [1024, 2**30], got {self.max_message_bytes}"
            )


class RunningServer:
    """A started server. `drain()` is the graceful stop; `wait()` blocks until stopped."""

    def __init__(
        self,
        server: aio.Server,
        port: int,
        health: HealthServicer,
        grace_s: float,
        metrics: MetricsEndpoint | None = None,
    ) -> None:
        self.server = server
        self.port = port
        self.health = health
        self.metrics = metrics
        self._grace_s = grace_s
        self._on_drain: list[Callable[[], None]] = []

    def on_drain(self, callback: Callable[[], None]) -> None:
        """Runs `callback` when draining starts, e.g. to refuse new sessions."""
        self._on_drain.append(callback)

    async def drain(self) -> None:
        for callback in self._on_drain:
            callback()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self._grace_s)
        if self.metrics is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.metrics.stop)

    async def wait(self) -> None:
        await self.server.wait_for_termination()

    def drain_on_signals(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> None:
        loop = asyncio.get_running_loop()
        for sig in signals:
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))


async def start_server(
    config: ServerConfig,
    add_services: Callable[[aio.Server], Sequence[str]],
    metrics: CollectorRegistry | None = None,
) -> RunningServer:
    """Starts a server; `add_services` registers servicers and returns their full names.
    `metrics` is served on `config.metrics_port` when that is set."""
    interceptors = [] if config.auth.token is None else [TokenAuthInterceptor(config.auth.token)]
    interceptors.append(MalformedRequestInterceptor())
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        ("grpc.so_reuseport", 0),
        # Accept the clients' keepalive pings (every 30 s, also when idle) without
        # answering them with GOAWAY "too_many_pings".
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    server = aio.server(interceptors=interceptors, options=options)
    names = list(add_services(server))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    address = f"{config.host}:{config.port}"
    if config.tls is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, config.tls.credentials())
    if port == 0:
        raise OSError(f"port: cannot bind {address}")
    endpoint = None
    if metrics is not None and config.metrics_port is not None:
        try:  # before serving, so that a taken port leaves nothing running
            endpoint = serve_metrics(metrics, config.host, config.metrics_port)
        except OSError as error:
            await server.stop(None)
            raise OSError(
                f"metrics_port: cannot bind {config.host}:{config.metrics_port} ({error.strerror})"
            ) from error
    await server.start()
    for name in ("", *names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", extra={"address": f"{config.host}:{port}", "services": names})
    return RunningServer(server, port, health, config.grace_s, endpoint)
