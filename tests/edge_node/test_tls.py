"""Mutual TLS on the edge-to-verifier hop, with certificates the test makes, and
server reflection listing the verifier's services."""

from __future__ import annotations

import shutil

import pytest
from grpc import aio
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.cloud_link import CloudLink, CloudLinkConfig
from edge_node.picker import FixedListPicker, VerifierEndpoint
from edge_node.runtime import EdgeConfig, EdgeRuntime
from edge_node.types import GenerationRequest
from protocol.channel import TlsOptions
from protocol.errors import Unavailable
from protocol.types import Mode
from serving.auth import AuthConfig
from serving.server import ServerConfig, TlsConfig
from tests.certs import make_certificates
from tests.tiny import METADATA, MODEL_NAME, TOKEN

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
REQUEST = GenerationRequest(prompt_tokens=(1, 5, 9), max_tokens=12, mode=Mode.LOSSLESS)


async def test_mutual_tls_between_edge_and_verifier(tmp_path, target, draft):
    files = make_certificates(tmp_path)
    server = await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_context=128),
        ServerConfig(
            port=0,
            auth=AuthConfig(token=TOKEN),
            tls=TlsConfig(files["server.pem"], files["server.key"], client_ca=files["ca.pem"]),
        ),
    )
    endpoint = VerifierEndpoint(f"127.0.0.1:{server.port}", MODEL_NAME)

    def runtime(tls: TlsOptions) -> EdgeRuntime:
        link = CloudLink(
            FixedListPicker([endpoint]),
            CloudLinkConfig(token=TOKEN, tls=tls, open_timeout_s=2, wait_for_verifier_s=1),
        )
        return EdgeRuntime(draft, EdgeConfig(model_name=MODEL_NAME), link=link)

    trusted = runtime(
        TlsOptions(
            ca=files["ca.pem"],
            cert=files["client.pem"],
            key=files["client.key"],
            server_name="localhost",
        )
    )
    tokens = [t async for c in trusted.generate(REQUEST) for t in c.tokens]
    assert len(tokens) == 12
    stranger = runtime(TlsOptions(ca=files["ca.pem"], server_name="localhost"))
    with pytest.raises(Unavailable):
        async for _ in stranger.generate(REQUEST):
            pass
    await trusted.close()
    await stranger.close()
    await server.drain()


async def test_reflection_lists_the_services(verifier):
    async with aio.insecure_channel(f"127.0.0.1:{verifier.port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        # Reflection needs the token like every service but health.
        async for reply in stub.ServerReflectionInfo(iter([request]), metadata=METADATA):
            names = {s.name for s in reply.list_services_response.service}
            break
    assert {"edgecloud.v1.Verifier", "grpc.health.v1.Health"} <= names
