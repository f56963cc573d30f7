"""Bad input, session lifecycle and auth: each gets its status, and a healthy session
on the same server is unaffected."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edge_node.verifier_client import VerifierSession
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from protocol.v1 import verification_pb2 as pb
from protocol.v1 import verification_pb2_grpc as pb_grpc
from tests.tiny import METADATA, MODEL_NAME, tiny_model

VOCAB = 64


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=1, vocab=VOCAB)


def open_msg(**fields) -> pb.VerifyRequest:
    values = {"model": MODEL_NAME, "context": [1, 2, 3], **fields}
    return pb.VerifyRequest(open=pb.OpenSession(**values))


def round_msg(tokens=(4,), parents=(-1,), **fields) -> pb.VerifyRequest:
    return pb.VerifyRequest(
        round=pb.Round(tree=pb.DraftTree(tokens=tokens, parents=parents), **fields)
    )


BAD_OPENS = {
    "wrong model": (open_msg(model="other"), "open.model"),
    "empty context": (open_msg(context=[]), "open.context"),
    "token out of vocab": (open_msg(context=[1, VOCAB]), "open.context[1]"),
    "negative token": (open_msg(context=[-3]), "open.context[0]"),
    "context too long": (open_msg(context=[1] * 300), "open.context"),
    # A context at the limit leaves no room for a token (it used to prefill, then stop).
    "context at the limit": (open_msg(context=[1] * 256), "open.context: at most 255"),
    "bad temperature": (open_msg(sampling=pb.SamplingParams(temperature=-1)), "temperature"),
    "bad top_p": (open_msg(sampling=pb.SamplingParams(top_p=1.5)), "top_p"),
    "bad top_k": (open_msg(sampling=pb.SamplingParams(top_k=VOCAB + 1)), "top_k"),
    "priority out of range": (open_msg(priority=101), "open.priority: must be in [-100, 100]"),
    "negative tpot target": (open_msg(tpot_slo_ms=-1), "open.tpot_slo_ms: must be in [0, 60000]"),
}

BAD_ROUNDS = {
    "tree token out of vocab": (round_msg(tokens=(VOCAB,)), "round.tree.tokens[0]"),
    "parent after child": (round_msg(tokens=(4, 5), parents=(1, -1)), "parents"),
    "parent below -1": (round_msg(tokens=(4,), parents=(-2,)), "parents"),
    "lengths differ": (round_msg(tokens=(4, 5), parents=(-1,)), "parents"),
    "tree too big": (round_msg(tokens=[4] * 17, parents=[-1] * 17), "round.tree.tokens"),
    "new token out of vocab": (round_msg(new_tokens=[VOCAB + 5]), "round.new_tokens[0]"),
    "q does not sum to one": (
        round_msg(draft_dists=[pb.DraftDistribution(node=-1, tokens=[4, 5], probs=[0.2, 0.2])]),
        "draft_dists[0]",
    ),
    "child outside q's support": (
        round_msg(draft_dists=[pb.DraftDistribution(node=-1, tokens=[6], probs=[1.0])]),
        "draft_dists[0]",
    ),
    "q for a missing node": (
        round_msg(draft_dists=[pb.DraftDistribution(node=3, tokens=[6], probs=[1.0])]),
        "draft_dists[0].node",
    ),
}


async def exchange(channel, messages, metadata=METADATA):
    call = pb_grpc.VerifierStub(channel).Verify(metadata=metadata)
    replies = []
    try:
        for message in messages:
            await call.write(message)
            reply = await call.read()
            if reply is aio.EOF:
                break
            replies.append(reply)
    except aio.AioRpcError:
        pass  # the status is read by `status_of`
    return call, replies


async def status_of(call) -> tuple[grpc.StatusCode, str]:
    return await call.code(), await call.details()


@pytest.fixture
async def served(target, verifier_factory, channel_factory):
    server = await verifier_factory(target, max_tree_nodes=16, max_sessions=4)
    return server, channel_factory(server.port)


async def eventually(predicate, timeout: float = 2.0) -> bool:
    """Streams end asynchronously on the server; poll until `predicate()` holds."""
    for _ in range(int(timeout / 0.02)):
        if predicate():
            return True
        await asyncio.sleep(0.02)
    return predicate()


async def healthy_round_trip(channel) -> None:
    async with VerifierSession(channel, metadata=METADATA) as session:
        await session.open(MODEL_NAME, [1, 2], SamplingParams())
        result = await session.verify(TokenTree.chain([3, 4]))
    assert result.nodes_verified == 2


@pytest.mark.parametrize("case", sorted(BAD_OPENS))
async def test_bad_open_is_invalid_argument(case, served):
    server, channel = served
    message, field = BAD_OPENS[case]
    call, replies = await exchange(channel, [message])
    code, details = await status_of(call)
    assert (code, replies) == (grpc.StatusCode.INVALID_ARGUMENT, [])
    assert field in details
    await healthy_round_trip(channel)
    assert await eventually(lambda: server.engine.sessions == {})


@pytest.mark.parametrize("case", sorted(BAD_ROUNDS))
async def test_bad_round_is_invalid_argument_and_others_unaffected(case, served):
    server, channel = served
    async with VerifierSession(channel, metadata=METADATA) as bystander:
        await bystander.open(MODEL_NAME, [1, 2, 3], SamplingParams())
        message, field = BAD_ROUNDS[case]
        call, replies = await exchange(channel, [open_msg(), message])
        code, details = await status_of(call)
        assert code == grpc.StatusCode.INVALID_ARGUMENT, details
        assert field in details
        assert len(replies) == 1 and replies[0].HasField("opened")
        result = await bystander.verify(TokenTree.chain([5]))
        assert result.nodes_verified == 1
    assert await eventually(lambda: server.engine.sessions == {})


async def test_round_before_open_is_failed_precondition(served):
    _, channel = served
    call, _ = await exchange(channel, [round_msg()])
    code, details = await status_of(call)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "open" in details


async def test_second_open_is_failed_precondition(served):
    _, channel = served
    call, _ = await exchange(channel, [open_msg(), open_msg()])
    assert (await status_of(call))[0] == grpc.StatusCode.FAILED_PRECONDITION


async def test_max_sessions_is_resource_exhausted(served):
    server, channel = served
    sessions = [VerifierSession(channel, metadata=METADATA) for _ in range(4)]
    for s in sessions:
        await s.open(MODEL_NAME, [1], SamplingParams())
    call, _ = await exchange(channel, [open_msg()])
    code, details = await status_of(call)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_sessions" in details
    await sessions[0].close()
    assert await eventually(lambda: len(server.engine.sessions) == 3)
    await healthy_round_trip(channel)
    for s in sessions[1:]:
        await s.close()


async def test_cancelled_stream_frees_its_session(served):
    server, channel = served
    call, replies = await exchange(channel, [open_msg()])
    assert len(server.engine.sessions) == 1
    call.cancel()
    assert await eventually(lambda: server.engine.sessions == {})
    assert len(server.engine._free_rows) == 4


async def test_idle_session_expires(target, verifier_factory, channel_factory):
    server = await verifier_factory(target, session_ttl_s=0.2)
    channel = channel_factory(server.port)
    call, _ = await exchange(channel, [open_msg()])
    await asyncio.sleep(0.6)
    assert server.engine.sessions == {}
    await call.write(round_msg())
    code, details = await status_of(call)
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert "expired" in details


@pytest.mark.parametrize(
    "metadata", [(), (("authorization", "Bearer wrong"),), (("authorization", "test-token-4f1c"),)]
)
async def test_missing_or_wrong_token_is_unauthenticated(metadata, served):
    _, channel = served
    call, _ = await exchange(channel, [open_msg()], metadata=metadata)
    code, details = await status_of(call)
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "test-token" not in details
    await healthy_round_trip(channel)


async def test_health_and_reflection(served):
    _, channel = served
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service="edgecloud.v1.Verifier"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_drain_refuses_new_sessions_and_finishes_open_ones(
    target, verifier_factory, channel_factory
):
    server = await verifier_factory(target)
    channel = channel_factory(server.port)
    async with VerifierSession(channel, metadata=METADATA) as session:
        await session.open(MODEL_NAME, [1, 2], SamplingParams())
        server.engine.drain()
        call, _ = await exchange(channel, [open_msg()])
        assert (await status_of(call))[0] == grpc.StatusCode.UNAVAILABLE
        result = await session.verify(TokenTree.chain([3]))
        assert result.nodes_verified == 1
