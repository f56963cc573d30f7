"""Starting a verifier: load the target, start the engine, serve `Verifier` over gRPC."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from cloud_node.config import VerifierConfig
from cloud_node.engine import VerifierEngine
from cloud_node.service import VerifierService
from lm.checkpoint import load_model
from protocol.v1 import verification_pb2 as pb
from protocol.v1 import verification_pb2_grpc as pb_grpc
from serving.server import RunningServer, ServerConfig, start_server

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Verifier"].full_name


@dataclass
class VerifierServer:
    engine: VerifierEngine
    server: RunningServer

    @property
    def port(self) -> int:
        return self.server.port

    async def drain(self) -> None:
        await self.server.drain()
        await self.engine.stop()


async def start_verifier(
    model: Path | torch.nn.Module,
    config: VerifierConfig,
    server_config: ServerConfig,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
) -> VerifierServer:
    """`model` is a checkpoint path (loaded here) or an already loaded `Transformer`."""
    if isinstance(model, (str, Path)):
        model = load_model(model, device=device, dtype=dtype)
    engine = VerifierEngine(model, config)
    engine.start()

    def add(server) -> list[str]:
        pb_grpc.add_VerifierServicer_to_server(VerifierService(engine), server)
        return [SERVICE_NAME]

    running = await start_server(server_config, add, engine.metrics.registry)
    running.on_drain(engine.drain)
    return VerifierServer(engine, running)
