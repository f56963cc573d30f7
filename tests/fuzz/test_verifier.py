"""Fuzzing `edgecloud cloud serve`: generated and mutated `Verify` streams (mostly a
valid open followed by perturbed rounds, so they reach the engine) and random bytes
on the port. Every reply must be a documented status; the verifier must stay up,
healthy, free of tracebacks and within the memory bound, and free every session."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.v1 import verification_pb2 as pb
from tests.fleet import VERIFIER_METADATA, start_verifier, write_files
from tests.fuzz import calls
from tests.fuzz.cases import (
    check_survived,
    test_random_bytes_to_the_port,  # noqa: F401
)
from tests.fuzz.strategies import EDITS, FUZZ, mutate, verify_streams
from tests.tiny import MODEL_NAME

pytestmark = pytest.mark.slow
HEALTHY = [
    pb.VerifyRequest(open=pb.OpenSession(model=MODEL_NAME, context=[1, 2])),
    pb.VerifyRequest(round=pb.Round(tree=pb.DraftTree(tokens=[3, 4], parents=[-1, 0]))),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = write_files(tmp_path_factory.mktemp("fuzz-verifier"))
    verifier = start_verifier(files)
    yield verifier
    verifier.stop()


def healthy_verify(channel) -> None:
    messages = [m.SerializeToString() for m in HEALTHY]
    code, details = calls.verify(channel, messages, VERIFIER_METADATA)
    assert code == grpc.StatusCode.OK, details


@pytest.fixture(scope="module")
def baseline(server, channel) -> int:
    healthy_verify(channel)
    return server.rss_kib()


def test_generated_verify_streams(channel, baseline, tally):
    @FUZZ
    @given(verify_streams())
    def run(messages):
        data = [m.SerializeToString() for m in messages]
        code, details = calls.verify(channel, data, VERIFIER_METADATA)
        tally.record("Verify (generated)", code, details)

    run()
    healthy_verify(channel)


def test_mutated_verify_streams(channel, baseline, tally):
    """One message of a generated stream has its bytes mutated."""

    @FUZZ
    @given(verify_streams(), EDITS, st.integers(0, 3))
    def run(messages, edits, which):
        data = [m.SerializeToString() for m in messages]
        which %= len(data)
        data[which] = mutate(data[which], edits)
        code, details = calls.verify(channel, data, VERIFIER_METADATA)
        tally.record("Verify (mutated)", code, details)

    run()
    healthy_verify(channel)


def test_verifier_survived_healthy_and_memory_bounded(server, channel, baseline, tally, capsys):
    healthy_verify(channel)
    check_survived("verifier", server, baseline, tally, capsys)
