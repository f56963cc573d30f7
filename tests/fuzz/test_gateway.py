"""The gateway (`edgecloud up`: Redis, Ray with one verifier and one edge actor, the
gateway) under the shared `Generation` fuzz tests, plus its auth checks, on one
stack for the whole module since starting Ray takes a while: missing or wrong
tokens get UNAUTHENTICATED on every method, the clients' token does not open a
session on the stack's verifier, and neither token shows in the gateway's log."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import grpc
import pytest

from orchestrator.registry import AsyncRegistry, connect_async
from protocol.v1 import generation_pb2 as gpb
from tests.fleet import CLIENT_METADATA, CLIENT_TOKEN, start_gateway, write_files
from tests.fuzz import calls
from tests.fuzz.cases import (
    healthy_generate,
    test_generated_generate_requests,  # noqa: F401
    test_list_models_with_any_bytes,  # noqa: F401
    test_mutated_generate_requests,  # noqa: F401
    test_random_bytes_to_the_port,  # noqa: F401
    test_server_survived_healthy_and_memory_bounded,  # noqa: F401
)

pytestmark = pytest.mark.slow
WRONG = [(), (("authorization", "Bearer nope"),), (("authorization", CLIENT_TOKEN),)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("fuzz-gateway"))


@pytest.fixture(scope="module")
def server(files):
    with tempfile.TemporaryDirectory(prefix="ec-ray-") as ray_dir:
        gateway = start_gateway(files, Path(ray_dir), log_level="DEBUG")
        yield gateway
        gateway.stop()


@pytest.mark.parametrize("metadata", WRONG, ids=["missing", "wrong", "no-bearer-prefix"])
def test_gateway_rejects_a_missing_or_wrong_token(channel, metadata):
    request = gpb.GenerateRequest(prompt_tokens=[1, 2], max_tokens=2).SerializeToString()
    for call in (calls.generate, calls.list_models):
        code, details = call(channel, request, metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED, details
        assert CLIENT_TOKEN not in details


async def test_the_clients_token_does_not_open_a_verifier_session(files, server):
    """The stack's verifier (found in its Redis) takes only the internal credential."""
    redis_url = json.loads((files.root / "up.json").read_text())["redis_url"]
    client = connect_async(redis_url)
    (node,) = await AsyncRegistry(client).list_nodes(kind="cloud")
    await client.aclose()
    with grpc.insecure_channel(node.info.address) as channel:
        for metadata in (CLIENT_METADATA, ()):
            code, details = calls.verify(channel, [b""], metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, details


def test_no_token_in_the_gateway_log(server, channel):
    healthy_generate(channel)
    for metadata in WRONG:
        calls.list_models(channel, b"", metadata)
    assert "DEBUG" in server.output()  # the log was captured at DEBUG
    assert CLIENT_TOKEN not in server.output()
