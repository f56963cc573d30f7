"""Greedy verification over a real gRPC stream gives exactly the target's greedy
continuation, whatever the drafts are."""

from __future__ import annotations

import random

import pytest
import torch

from edge_node.verifier_client import VerifierSession
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from tests.tiny import METADATA, MODEL_NAME, SHAPES, tiny_model

CONTEXT = [1, 5, 9, 2]
N_TOKENS = 24


@torch.inference_mode()
def greedy_reference(model, context: list[int], n: int) -> list[int]:
    tokens = list(context)
    for _ in range(n):
        logits = model(torch.tensor([tokens]))
        tokens.append(int(logits[0, -1].argmax()))
    return tokens[len(context) :]


def random_tree(rng: random.Random, vocab: int, size: int) -> TokenTree:
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, size)]
    return TokenTree(
        tokens=tuple(rng.randrange(vocab) for _ in range(size)), parents=tuple(parents)
    )


async def speculate(session: VerifierSession, draft, context: list[int], n: int):
    await session.open(MODEL_NAME, context, SamplingParams())
    out: list[int] = []
    accepted_per_round = []
    while len(out) < n:
        result = await session.verify(draft(context + out))
        accepted_per_round.append(len(result.accepted_tokens))
        out += [*result.accepted_tokens, result.bonus_token]
    return out[:n], accepted_per_round


@pytest.fixture(scope="module", params=sorted(SHAPES))
def target(request):
    """Grouped-query attention, multi-head latent attention (its cache holds latents) and
    Gemma 3 (a sliding window that trees and batches cross)."""
    return tiny_model(seed=0, sharpen=3.0, **SHAPES[request.param])


@pytest.mark.parametrize(
    "kind", ["random_chain", "random_tree", "chain_of_one", "perfect", "perfect_in_tree"]
)
async def test_greedy_output_equals_target_greedy(kind, target, verifier_factory, channel_factory):
    reference = greedy_reference(target, CONTEXT, N_TOKENS + 8)
    rng = random.Random(kind)
    vocab = target.config.vocab_size

    def perfect_chain(tokens: list[int], depth: int = 4) -> list[int]:
        done = len(tokens) - len(CONTEXT)
        return reference[done : done + depth]

    drafts = {
        "random_chain": lambda t: TokenTree.chain([rng.randrange(vocab) for _ in range(4)]),
        "random_tree": lambda t: random_tree(rng, vocab, 9),
        "chain_of_one": lambda t: TokenTree.chain([rng.randrange(vocab)]),
        "perfect": lambda t: TokenTree.chain(perfect_chain(t)),
        "perfect_in_tree": lambda t: TokenTree.from_beams(
            [[rng.randrange(vocab) for _ in range(4)], perfect_chain(t), [rng.randrange(vocab)] * 3]
        ),
    }
    server = await verifier_factory(target)
    async with VerifierSession(channel_factory(server.port), metadata=METADATA) as session:
        out, accepted = await speculate(session, drafts[kind], CONTEXT, N_TOKENS)
    assert out == reference[:N_TOKENS]
    if kind.startswith("perfect"):
        assert all(a == 4 for a in accepted), accepted


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")
@pytest.mark.parametrize("attention", ["sdpa", "flex"])
async def test_batched_sessions_each_match_reference(
    target, verifier_factory, channel_factory, attention, monkeypatch
):
    """Sessions verified together in one forward pass still decode exactly, with SDPA and
    with FlexAttention block masks (eager on CPU)."""
    import asyncio

    import lm.model

    calls = []
    kernel = lm.model.flex_attend
    monkeypatch.setattr(lm.model, "flex_attend", lambda *a: calls.append(1) or kernel(*a))
    server = await verifier_factory(target, batch_window_ms=50.0, attention=attention)
    contexts = [[1, 2], [3, 4, 5, 6, 7], [9], [11, 12, 13]]
    rng = random.Random(7)
    vocab = target.config.vocab_size

    async def one(context):
        async with VerifierSession(channel_factory(server.port), metadata=METADATA) as session:
            out, _ = await speculate(session, lambda t: random_tree(rng, vocab, 6), context, 16)
        return out

    outs = await asyncio.gather(*(one(c) for c in contexts))
    for context, out in zip(contexts, outs, strict=True):
        assert out == greedy_reference(target, context, 16)
    assert server.engine.forward_passes < sum(len(o) for o in outs)
    assert bool(calls) == (attention == "flex" and not target.config.mla)  # MLA keeps SDPA


async def test_cloud_only_rounds_are_one_token_each(target, verifier_factory, channel_factory):
    server = await verifier_factory(target)
    async with VerifierSession(channel_factory(server.port), metadata=METADATA) as session:
        out, accepted = await speculate(session, lambda t: TokenTree.chain([]), CONTEXT, 10)
    assert out == greedy_reference(target, CONTEXT, 10)
    assert accepted == [0] * 10


async def test_new_tokens_are_appended_before_the_tree(target, verifier_factory, channel_factory):
    """Tokens the edge adds itself (adaptive mode) enter the context unverified."""
    server = await verifier_factory(target)
    async with VerifierSession(channel_factory(server.port), metadata=METADATA) as session:
        await session.open(MODEL_NAME, CONTEXT, SamplingParams())
        first = await session.verify(TokenTree.chain([]))
        result = await session.verify(TokenTree.chain([]), new_tokens=[7, 8])
    expected = greedy_reference(target, CONTEXT + [first.bonus_token, 7, 8], 1)
    assert result.bonus_token == expected[0]
