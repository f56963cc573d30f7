"""The verifier's hidden states for the edge's draft head, through a real gRPC stream:
the right position, within the codec's tolerance, and only for sessions that ask."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from grpc import aio

from edge_node.verifier_client import VerifierSession, hidden_from_message
from lm.hidden_codec import HiddenEncoding, decode_hidden
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from protocol.v1 import verification_pb2 as pb
from protocol.v1 import verification_pb2_grpc as pb_grpc
from tests.tiny import METADATA, MODEL_NAME, tiny_model

CONTEXT = [1, 5, 9, 2, 7]


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=3, sharpen=3.0)


@torch.inference_mode()
def hidden_and_next(model, tokens: list[int]) -> tuple[torch.Tensor, int]:
    """The target's final-norm hidden state at the last token, and its argmax next token."""
    logits, hidden = model(torch.tensor([tokens]), return_hidden=True)
    return hidden[0, -1], int(logits[0, -1].argmax())


def assert_close(received: pb.HiddenState, expected: torch.Tensor) -> None:
    encoded = hidden_from_message(received)
    got = decode_hidden(encoded)
    assert encoded.dim == expected.numel()
    if encoded.encoding is HiddenEncoding.FLOAT16:
        tolerance = expected.abs() * 2**-11 + 1e-4  # codec + cached-vs-plain forward
    else:
        tolerance = encoded.scale / 2 + 1e-4
        assert encoded.scale == pytest.approx(float(expected.abs().max()) / 127, rel=1e-3)
    assert ((got - expected).abs() <= tolerance).all(), (got - expected).abs().max()


def other_token(vocab: int, *avoid: int) -> int:
    return next(t for t in range(vocab) if t not in avoid)


@pytest.mark.parametrize("encoding", [HiddenEncoding.FLOAT16, HiddenEncoding.INT8])
async def test_hidden_is_the_targets_at_the_bonus_position(
    encoding, target, verifier_factory, channel_factory
):
    vocab = target.config.vocab_size
    server = await verifier_factory(target)
    channel = channel_factory(server.port)
    async with VerifierSession(channel, metadata=METADATA) as session:
        opened = await session.open(MODEL_NAME, CONTEXT, SamplingParams(), return_hidden=encoding)
        # At the opening: the next-to-last context token, which predicts the last one.
        assert_close(opened.hidden, hidden_and_next(target, CONTEXT[:-1])[0])

        # The accepted path ends on node 3, at depth 1: the hidden state follows the
        # path's last node, not its length.
        _, g1 = hidden_and_next(target, CONTEXT)
        _, g2 = hidden_and_next(target, [*CONTEXT, g1])
        tree = TokenTree(
            tokens=(other_token(vocab, g1), g1, other_token(vocab, g2), g2),
            parents=(-1, -1, 1, 1),
        )
        result = await session.verify(tree)
        assert list(result.accepted_nodes) == [1, 3]
        history = [*CONTEXT, g1, g2]
        expected, bonus = hidden_and_next(target, history)
        assert result.bonus_token == bonus
        assert_close(result.hidden, expected)

        # Nothing accepted: the hidden state of the last token the verifier holds (the
        # previous bonus), whose distribution gives this round's bonus.
        history.append(bonus)
        expected, bonus = hidden_and_next(target, history)
        result = await session.verify(TokenTree.chain([other_token(vocab, bonus)]))
        assert list(result.accepted_nodes) == []
        assert result.bonus_token == bonus
        assert_close(result.hidden, expected)


async def test_sessions_that_do_not_ask_get_no_hidden_bytes(
    target, verifier_factory, channel_factory
):
    """An edge written before the field (it sends nothing) pays nothing, also when its
    round shares a forward pass with a session that asked."""
    server = await verifier_factory(target, batch_window_ms=200.0)
    tree = TokenTree.chain([4, 4, 4])

    async def run(encoding: HiddenEncoding):
        async with VerifierSession(channel_factory(server.port), metadata=METADATA) as session:
            opened = await session.open(
                MODEL_NAME, CONTEXT, SamplingParams(), return_hidden=encoding
            )
            result = await session.verify(tree)
            return opened, result, session.bytes_received

    (plain_open, plain, plain_bytes), (asked_open, asked, asked_bytes) = await asyncio.gather(
        run(HiddenEncoding.NONE), run(HiddenEncoding.INT8)
    )
    assert plain.batch_size == asked.batch_size == 2
    assert not plain_open.HasField("hidden") and not plain.HasField("hidden")
    assert asked_open.HasField("hidden") and asked.HasField("hidden")
    dim = target.config.dim
    assert asked_bytes - plain_bytes >= 2 * dim  # one int8 vector in each reply
    history = [*CONTEXT, *asked.accepted_tokens]
    assert_close(asked.hidden, hidden_and_next(target, history)[0])


async def test_one_token_context_opens_without_hidden(target, verifier_factory, channel_factory):
    server = await verifier_factory(target)
    async with VerifierSession(channel_factory(server.port), metadata=METADATA) as session:
        opened = await session.open(
            MODEL_NAME, [CONTEXT[0]], SamplingParams(), return_hidden=HiddenEncoding.FLOAT16
        )
        assert not opened.HasField("hidden")
        result = await session.verify(TokenTree.chain([]))
    assert_close(result.hidden, hidden_and_next(target, [CONTEXT[0]])[0])


async def test_unknown_encoding_is_rejected_naming_the_field(
    target, verifier_factory, channel_factory
):
    server = await verifier_factory(target)
    call = pb_grpc.VerifierStub(channel_factory(server.port)).Verify(metadata=METADATA)
    await call.write(
        pb.VerifyRequest(open=pb.OpenSession(model=MODEL_NAME, context=[1], return_hidden=7))
    )
    with pytest.raises(aio.AioRpcError) as error:
        await call.read()
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "open.return_hidden" in error.value.details()
