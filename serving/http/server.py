"""uvicorn serving an ASGI app as a task of the caller's event loop, with the gRPC
servers' TLS files."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

import uvicorn
from starlette.applications import Starlette

from serving.server import TlsConfig


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signals to the process embedding it (the CLI drains on them)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class HttpServer:
    """uvicorn serving an app as a task of the running event loop."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task, url: str, port: int) -> None:
        self._server = server
        self._task = task
        self.url = url  # e.g. http://127.0.0.1:8000
        self.port = port

    async def stop(self) -> None:
        """Graceful: stops accepting, lets in-flight responses finish within the grace
        period, then cancels what is left."""
        self._server.should_exit = True
        await self._task


async def start_http_server(
    app: Starlette,
    host: str,
    port: int,
    *,
    tls: TlsConfig | None = None,
    grace_s: float = 10.0,
) -> HttpServer:
    """Binds `host:port` (0 picks a free port: see `HttpServer.port`) and serves `app`;
    OSError naming http_port when the address cannot be bound."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise OSError(f"http_port: cannot bind {host}:{port} ({error.strerror})") from error
    tls_options = {}
    if tls is not None:
        tls_options = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.client_ca is not None:
            tls_options |= {"ssl_ca_certs": str(tls.client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=grace_s,
        **tls_options,
    )
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"http_port: the server on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    url = f"{'http' if tls is None else 'https'}://{shown}:{bound}"
    return HttpServer(server, task, url, bound)
