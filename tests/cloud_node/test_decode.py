"""Server-side decoding (`Round.decode_tokens`) on a real verifier: one request, a stream
of tokens; greedy equals the target's own continuation, seeded sampling equals one
round per token with the same seed, steps share passes with other sessions' rounds, and
the context limit and bad values end the stream with the documented statuses."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc import aio

from edge_node.verifier_client import VerifierSession
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from tests.cloud_node.test_verify_greedy import greedy_reference
from tests.tiny import METADATA, MODEL_NAME, tiny_model

CONTEXT = [1, 5, 9, 2]


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, sharpen=3.0)


async def decoded(session: VerifierSession, tokens: int) -> list[int]:
    return [r.bonus_token async for r in session.decode(tokens)]


async def test_greedy_decoding_is_the_targets_continuation(
    target, verifier_factory, channel_factory
):
    server = await verifier_factory(target)
    channel = channel_factory(server.port)
    async with VerifierSession(channel, metadata=METADATA) as session:
        await session.open(MODEL_NAME, CONTEXT, SamplingParams())
        before = session.bytes_sent
        tokens = await decoded(session, 20)
        sent = session.bytes_sent - before
        # The session goes on afterwards: a verification round continues the text.
        result = await session.verify(TokenTree.chain([0]))
    assert tokens + [result.bonus_token] == greedy_reference(target, CONTEXT, 21)
    assert sent < 20  # one request for twenty tokens


@pytest.mark.parametrize("temperature", [0.7, 1.0])
async def test_seeded_decoding_equals_one_round_per_token(
    temperature, target, verifier_factory, channel_factory
):
    server = await verifier_factory(target)
    channel = channel_factory(server.port)
    sampling = SamplingParams(temperature=temperature, seed=9)
    async with (
        VerifierSession(channel, metadata=METADATA) as streamed,
        VerifierSession(channel, metadata=METADATA) as stepped,
    ):
        await streamed.open(MODEL_NAME, CONTEXT, sampling)
        await stepped.open(MODEL_NAME, CONTEXT, sampling)
        tokens = await decoded(streamed, 24)
        rounds = [(await stepped.verify(TokenTree((), ()))).bonus_token for _ in range(24)]
    assert tokens == rounds
    assert len(set(tokens)) > 1


async def test_decoding_shares_passes_with_other_sessions(
    target, verifier_factory, channel_factory
):
    server = await verifier_factory(target, batch_window_ms=20)
    channel = channel_factory(server.port)
    sessions = [VerifierSession(channel, metadata=METADATA) for _ in range(3)]
    for session in sessions:
        await session.open(MODEL_NAME, CONTEXT, SamplingParams())

    async def verifying(session):
        return [await session.verify(TokenTree.chain([4, 5])) for _ in range(10)]

    async def streaming(session):
        return [r async for r in session.decode(10)]

    results = await asyncio.gather(
        streaming(sessions[0]), streaming(sessions[1]), verifying(sessions[2])
    )
    for session in sessions:
        await session.close()
    assert max(r.batch_size for r in results[0]) >= 2
    assert [r.bonus_token for r in results[0]] == [r.bonus_token for r in results[1]]
    assert [r.bonus_token for r in results[0]] == greedy_reference(target, CONTEXT, 10)


async def test_decoding_past_the_context_is_out_of_range(target, verifier_factory, channel_factory):
    server = await verifier_factory(target, max_context=12)
    channel = channel_factory(server.port)
    tokens = []
    async with VerifierSession(channel, metadata=METADATA) as session:
        await session.open(MODEL_NAME, CONTEXT, SamplingParams())
        with pytest.raises(aio.AioRpcError) as error:
            async for result in session.decode(12):
                tokens.append(result.bonus_token)
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert tokens == greedy_reference(target, CONTEXT, 12 - len(CONTEXT))


async def test_bad_decode_tokens_is_invalid_argument(target, verifier_factory, channel_factory):
    from protocol.v1 import verification_pb2 as pb

    server = await verifier_factory(target)
    channel = channel_factory(server.port)
    async with VerifierSession(channel, metadata=METADATA) as session:
        await session.open(MODEL_NAME, CONTEXT, SamplingParams())
        with pytest.raises(aio.AioRpcError) as error:
            await session._exchange(pb.VerifyRequest(round=pb.Round(decode_tokens=-1)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "round.decode_tokens" in error.value.details()
