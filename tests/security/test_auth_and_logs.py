"""Token auth on the edge server and the verifier as real processes logging at DEBUG:
a missing or wrong token gets UNAUTHENTICATED on every method (reflection included),
the edge-to-verifier credential and the clients' one are not interchangeable, and
neither token ever appears in either server's output. (The gateway gets the same
checks in tests/fuzz/test_gateway.py, on the stack that suite starts.)"""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2

from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import verification_pb2 as pb
from tests.fleet import (
    CLIENT_METADATA,
    CLIENT_TOKEN,
    VERIFIER_METADATA,
    VERIFIER_TOKEN,
    start_edge,
    start_verifier,
    write_files,
)
from tests.fuzz import calls
from tests.fuzz.strategies import identity
from tests.tiny import MODEL_NAME

pytestmark = pytest.mark.slow
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
GENERATE = gpb.GenerateRequest(prompt_tokens=[1, 5, 9], max_tokens=6).SerializeToString()
VERIFY = [
    pb.VerifyRequest(open=pb.OpenSession(model=MODEL_NAME, context=[1, 2])).SerializeToString(),
    pb.VerifyRequest(
        round=pb.Round(tree=pb.DraftTree(tokens=[3], parents=[-1]))
    ).SerializeToString(),
]
WRONG = {
    "missing": (),
    "wrong": (("authorization", "Bearer not-it"),),
    "no-bearer-prefix": (("authorization", CLIENT_TOKEN),),
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    files = write_files(tmp_path_factory.mktemp("security"))
    verifier = start_verifier(files, log_level="DEBUG")
    edge = start_edge(files, verifier, log_level="DEBUG")
    yield edge, verifier
    edge.stop()
    verifier.stop()


def reflection(channel, metadata) -> grpc.StatusCode:
    request = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    call = channel.stream_stream(REFLECTION, request_serializer=identity)
    try:
        for _ in call(iter([request]), metadata=metadata, timeout=10):
            pass
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("case", sorted(WRONG))
def test_every_method_needs_the_token(servers, case):
    edge, verifier = servers
    metadata = WRONG[case]
    with grpc.insecure_channel(edge.address) as channel:
        assert calls.generate(channel, GENERATE, metadata)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert calls.list_models(channel, b"", metadata)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert reflection(channel, metadata) == grpc.StatusCode.UNAUTHENTICATED
        assert reflection(channel, CLIENT_METADATA) == grpc.StatusCode.OK
    with grpc.insecure_channel(verifier.address) as channel:
        code, details = calls.verify(channel, VERIFY, metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED and CLIENT_TOKEN not in details
        assert reflection(channel, metadata) == grpc.StatusCode.UNAUTHENTICATED
        assert reflection(channel, VERIFIER_METADATA) == grpc.StatusCode.OK


def test_the_two_credentials_are_not_interchangeable(servers):
    edge, verifier = servers
    with grpc.insecure_channel(verifier.address) as channel:
        assert calls.verify(channel, VERIFY, VERIFIER_METADATA)[0] == grpc.StatusCode.OK
        assert calls.verify(channel, VERIFY, CLIENT_METADATA)[0] == grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(edge.address) as channel:
        assert calls.generate(channel, GENERATE, CLIENT_METADATA)[0] == grpc.StatusCode.OK
        code = calls.generate(channel, GENERATE, VERIFIER_METADATA)[0]
        assert code == grpc.StatusCode.UNAUTHENTICATED


def test_no_token_in_the_server_logs(servers):
    """Runs after the auth failures and successful calls above (and makes more)."""
    edge, verifier = servers
    with grpc.insecure_channel(edge.address) as channel:
        for metadata in (CLIENT_METADATA, VERIFIER_METADATA, *WRONG.values()):
            calls.generate(channel, GENERATE, metadata)
    for server in (edge, verifier):
        output = server.output()
        assert " DEBUG " in output  # captured at DEBUG
        assert CLIENT_TOKEN not in output and VERIFIER_TOKEN not in output
