"""A real verifier on loopback, serving a tiny model the tests create."""

from __future__ import annotations

import pytest
from grpc import aio

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.tiny import MODEL_NAME, TOKEN


@pytest.fixture
async def verifier_factory():
    started = []

    async def start(model, **overrides):
        config = VerifierConfig(model_name=MODEL_NAME, **{"max_context": 256, **overrides})
        server = await start_verifier(
            model, config, ServerConfig(port=0, auth=AuthConfig(token=TOKEN))
        )
        started.append(server)
        return server

    yield start
    for server in started:
        await server.drain()


@pytest.fixture
async def channel_factory():
    channels = []

    def open_channel(port: int) -> aio.Channel:
        channel = aio.insecure_channel(f"127.0.0.1:{port}")
        channels.append(channel)
        return channel

    yield open_channel
    for channel in channels:
        await channel.close()
