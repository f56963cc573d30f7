"""Starting an edge's `Generation` service: `edgecloud edge serve`."""

from __future__ import annotations

from dataclasses import dataclass

from edge_node.runtime import EdgeRuntime
from edge_node.service import GenerationService
from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import generation_pb2_grpc as gpb_grpc
from serving.server import RunningServer, ServerConfig, start_server

SERVICE_NAME = gpb.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass
class EdgeServer:
    runtime: EdgeRuntime
    server: RunningServer

    @property
    def port(self) -> int:
        return self.server.port

    async def drain(self) -> None:
        await self.server.drain()
        await self.runtime.close()


async def start_edge_server(runtime: EdgeRuntime, server_config: ServerConfig) -> EdgeServer:
    def add(server) -> list[str]:
        gpb_grpc.add_GenerationServicer_to_server(GenerationService(runtime), server)
        return [SERVICE_NAME]

    running = await start_server(server_config, add, runtime.metrics.registry)
    return EdgeServer(runtime, running)
