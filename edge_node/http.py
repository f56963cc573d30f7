"""`edgecloud edge serve --http-port`: the edge's runtime behind the OpenAI-compatible
HTTP API, on its gRPC server's host, with the same token and TLS."""

from __future__ import annotations

from edge_node.runtime import EdgeRuntime
from serving.http.app import create_app
from serving.http.schema import HttpConfig
from serving.http.server import HttpServer, start_http_server
from serving.server import ServerConfig


async def start_edge_http(runtime: EdgeRuntime, server: ServerConfig, port: int) -> HttpServer:
    async def models():
        return runtime.models()

    config = HttpConfig(auth=server.auth, default_model=runtime.config.model_name)
    app = create_app(runtime.serve, models, config, runtime.metrics.registry)
    return await start_http_server(app, server.host, port, tls=server.tls, grace_s=server.grace_s)
