"""Limits: each abuse gets INVALID_ARGUMENT or RESOURCE_EXHAUSTED (never a hang: every
call has a deadline, and DEADLINE_EXCEEDED would fail the test), and a healthy
client of the same server is unaffected. Servers run in-process on loopback."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.cloud_link import CloudLink, CloudLinkConfig
from edge_node.picker import FixedListPicker, VerifierEndpoint
from edge_node.runtime import EdgeConfig, EdgeRuntime
from edge_node.server import start_edge_server
from edge_node.verifier_client import VerifierSession
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import generation_pb2_grpc as gpb_grpc
from protocol.v1 import verification_pb2 as pb
from protocol.v1 import verification_pb2_grpc as pb_grpc
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.tiny import METADATA, MODEL_NAME, TOKEN

MAX_SESSIONS = 4
MAX_CONCURRENCY = 2
MAX_CONTEXT = 64  # the verifier's; the edge's SLM allows 512 positions
TIMEOUT_S = 20.0


async def start(target, session_ttl_s: float = 120.0):
    config = VerifierConfig(
        model_name=MODEL_NAME,
        max_sessions=MAX_SESSIONS,
        max_tree_nodes=16,
        max_context=MAX_CONTEXT,
        session_ttl_s=session_ttl_s,
    )
    return await start_verifier(target, config, ServerConfig(auth=AuthConfig(token=TOKEN)))


@pytest.fixture
async def verifier(target):
    server = await start(target)
    yield server
    await server.drain()


@pytest.fixture
async def edge(draft, verifier):
    picker = FixedListPicker([VerifierEndpoint(f"127.0.0.1:{verifier.port}", MODEL_NAME)])
    link = CloudLink(picker, CloudLinkConfig(token=TOKEN))
    runtime = EdgeRuntime(
        draft, EdgeConfig(model_name=MODEL_NAME, max_concurrency=MAX_CONCURRENCY), link=link
    )
    server = await start_edge_server(runtime, ServerConfig(auth=AuthConfig(token=TOKEN)))
    yield server
    await server.drain()


@pytest.fixture
async def channels():
    opened = []

    def open_channel(port: int) -> aio.Channel:
        opened.append(aio.insecure_channel(f"127.0.0.1:{port}"))
        return opened[-1]

    yield open_channel
    for channel in opened:
        await channel.close()


async def generate_status(channel, request: gpb.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    stub = gpb_grpc.GenerationStub(channel)
    try:
        async for _ in stub.Generate(request, metadata=METADATA, timeout=TIMEOUT_S):
            pass
    except aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


async def verify_status(channel, messages) -> tuple[grpc.StatusCode, str]:
    call = pb_grpc.VerifierStub(channel).Verify(
        iter(messages), metadata=METADATA, timeout=TIMEOUT_S
    )
    try:
        async for _ in call:
            pass
    except aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


async def healthy_generate(channel) -> None:
    request = gpb.GenerateRequest(prompt_tokens=[1, 5, 9], max_tokens=6)
    assert await generate_status(channel, request) == (grpc.StatusCode.OK, "")


def open_msg(context) -> pb.VerifyRequest:
    return pb.VerifyRequest(open=pb.OpenSession(model=MODEL_NAME, context=context))


async def open_bystander(channel) -> VerifierSession:
    session = VerifierSession(channel, metadata=METADATA, timeout=TIMEOUT_S)
    await session.open(MODEL_NAME, [1, 2, 3], SamplingParams())
    return session


async def bystander_round(session: VerifierSession) -> None:
    result = await session.verify(TokenTree.chain([4, 5]))
    assert result.nodes_verified == 2


async def test_prompt_far_beyond_the_context(edge, verifier, channels):
    edge_channel, verifier_channel = channels(edge.port), channels(verifier.port)
    bystander = await open_bystander(verifier_channel)
    huge = gpb.GenerateRequest(prompt_tokens=[1] * 100_000, max_tokens=4)
    code, details = await generate_status(edge_channel, huge)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in details
    code, details = await verify_status(verifier_channel, [open_msg([1] * 100_000)])
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "open.context" in details
    # Within the edge's context but beyond the verifier's --max-context: the verifier's
    # refusal reaches the client as INVALID_ARGUMENT, not INTERNAL.
    beyond_verifier = gpb.GenerateRequest(prompt_tokens=[1] * (MAX_CONTEXT + 10), max_tokens=4)
    code, details = await generate_status(edge_channel, beyond_verifier)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, details
    assert f"at most {MAX_CONTEXT - 1} tokens" in details
    await bystander_round(bystander)
    await bystander.close()
    await healthy_generate(edge_channel)


async def test_prompt_at_the_edge_of_the_context_leaves_room_for_drafts(edge, channels):
    """A prompt one token short of the SLM's positions used to crash drafting (the
    draft tree overflowed the KV cache: INTERNAL); now it is refused up front."""
    request = gpb.GenerateRequest(prompt_tokens=[1] * 510, max_tokens=1, mode=gpb.MODE_ADAPTIVE)
    code, details = await generate_status(channels(edge.port), request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "drafts need" in details


async def test_a_100000_node_tree(verifier, channels):
    channel = channels(verifier.port)
    bystander = await open_bystander(channel)
    tree = pb.DraftTree(tokens=[3] * 100_000, parents=range(-1, 99_999))
    code, details = await verify_status(
        channel, [open_msg([1, 2]), pb.VerifyRequest(round=pb.Round(tree=tree))]
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "round.tree.tokens" in details
    await bystander_round(bystander)
    await bystander.close()


async def test_ten_times_max_sessions_concurrent_opens(verifier, channels):
    channel = channels(verifier.port)
    bystander = await open_bystander(channel)
    sessions = [
        VerifierSession(channel, metadata=METADATA, timeout=TIMEOUT_S)
        for _ in range(10 * MAX_SESSIONS)
    ]
    outcomes = await asyncio.gather(
        *(s.open(MODEL_NAME, [1, 2], SamplingParams()) for s in sessions), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, aio.AioRpcError)]
    assert {o.code() for o in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert "max_sessions" in refused[0].details()
    assert len(outcomes) - len(refused) == MAX_SESSIONS - 1  # the bystander holds one
    await bystander_round(bystander)
    for session in [*sessions, bystander]:
        await session.close()


async def test_ten_times_max_concurrency_generations(edge, channels):
    channel = channels(edge.port)
    request = gpb.GenerateRequest(prompt_tokens=[1, 5, 9], max_tokens=16)
    outcomes = await asyncio.gather(
        *(generate_status(channel, request) for _ in range(10 * MAX_CONCURRENCY))
    )
    codes = {code for code, _ in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes
    assert grpc.StatusCode.OK in codes
    await healthy_generate(channel)


async def test_streams_that_open_and_never_send(edge, verifier, channels):
    """Silent streams hold no session and no generation slot: others still get them."""
    verifier_channel, edge_channel = channels(verifier.port), channels(edge.port)
    silent = [
        pb_grpc.VerifierStub(verifier_channel).Verify(metadata=METADATA, timeout=TIMEOUT_S)
        for _ in range(10 * MAX_SESSIONS)
    ]
    generate = edge_channel.stream_stream("/edgecloud.v1.Generation/Generate")
    silent += [generate(metadata=METADATA, timeout=TIMEOUT_S) for _ in range(10 * MAX_CONCURRENCY)]
    await asyncio.sleep(0.2)
    sessions = [await open_bystander(verifier_channel) for _ in range(MAX_SESSIONS)]
    for session in sessions:
        await bystander_round(session)
        await session.close()
    await healthy_generate(edge_channel)
    for call in silent:
        call.cancel()


async def test_an_opened_session_left_idle_frees_its_slot(target, channels):
    """All slots held by sessions that went quiet after `open`: new opens get
    RESOURCE_EXHAUSTED until --session-ttl frees them; the quiet streams' next round
    gets FAILED_PRECONDITION."""
    verifier = await start(target, session_ttl_s=0.5)
    channel = channels(verifier.port)
    idle = [await open_bystander(channel) for _ in range(MAX_SESSIONS)]
    code, details = await verify_status(channel, [open_msg([1, 2])])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, details
    await asyncio.sleep(verifier.engine.config.session_ttl_s + 1.0)
    fresh = await open_bystander(channel)
    await bystander_round(fresh)
    await fresh.close()
    with pytest.raises(aio.AioRpcError) as caught:
        await bystander_round(idle[0])
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for session in idle:
        await session.close()
    await verifier.drain()


async def test_messages_above_the_size_limit(edge, verifier, channels):
    edge_channel, verifier_channel = channels(edge.port), channels(verifier.port)
    bystander = await open_bystander(verifier_channel)
    big = gpb.GenerateRequest(prompt="x" * (5 * 1024 * 1024), max_tokens=1)
    code, _ = await generate_status(edge_channel, big)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    code, _ = await verify_status(verifier_channel, [open_msg([1] * (5 * 1024 * 1024))])
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    await bystander_round(bystander)
    await bystander.close()
    await healthy_generate(edge_channel)


async def test_the_edge_fits_its_trees_to_the_verifiers_max_tree_nodes(edge, channels):
    """The edge allows 64-node trees, the verifier 16 (it says so when a session opens):
    a request for 2 x 12 = 24-node drafts must still complete, in trees of 16 at most."""
    channel = channels(edge.port)
    draft = gpb.DraftOptions(tree="beam", width=2, depth=12)
    request = gpb.GenerateRequest(prompt_tokens=[1, 5, 9], max_tokens=24, draft=draft)
    assert await generate_status(channel, request) == (grpc.StatusCode.OK, "")
