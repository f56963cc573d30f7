"""Lossless sampling through the real verifier: the first generated token follows the
target's distribution exactly, whatever the (different) draft model proposes.

A chain and a branching tree are drafted by sampling from a second model's q
(without replacement among siblings) and q is sent with the round. The same drafts
read as "accept always" must fail the test, which shows it has the power to fail.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from edge_node.verifier_client import VerifierSession
from lm.acceptance import DraftDistribution
from lm.sampling import SamplingParams, probs_from_logits
from lm.tree import TokenTree
from tests.stats import chi_square_pvalue
from tests.tiny import METADATA, MODEL_NAME, tiny_model

VOCAB = 8
CONTEXT = [1, 2, 3]
TRIALS = 1000


@torch.inference_mode()
def dist(model, tokens, params: SamplingParams) -> torch.Tensor:
    return probs_from_logits(model(torch.tensor([tokens]))[0, -1].float(), params)


def draw_children(q: torch.Tensor, k: int, gen: torch.Generator) -> list[int]:
    """k distinct tokens from q without replacement, in draw order."""
    return torch.multinomial(q, k, replacement=False, generator=gen).tolist()


def sparse(node: int, q: torch.Tensor) -> DraftDistribution:
    support = torch.nonzero(q).flatten().tolist()
    return DraftDistribution(node=node, tokens=tuple(support), probs=tuple(q[support].tolist()))


def draft_tree(draft, shape: str, params, gen) -> tuple[TokenTree, dict[int, DraftDistribution]]:
    """Draws one draft the way an edge would; `draft` maps a token list to q."""
    q_root = draft(CONTEXT)
    width = 1 if shape == "chain" else 3
    roots = draw_children(q_root, width, gen)
    tokens, parents, dists = list(roots), [-1] * width, {-1: sparse(-1, q_root)}
    frontier = list(range(width))
    for _ in range(2 if shape == "chain" else 1):
        nxt = []
        for node in frontier:
            path = TokenTree(tuple(tokens), tuple(parents)).path(node)
            q = draft(CONTEXT + [tokens[i] for i in path])
            dists[node] = sparse(node, q)
            tokens.append(draw_children(q, 1, gen)[0])
            parents.append(node)
            nxt.append(len(tokens) - 1)
        frontier = nxt
    return TokenTree(tuple(tokens), tuple(parents)), dists


@pytest.mark.slow
@pytest.mark.parametrize(
    "shape,params",
    [
        ("chain", SamplingParams(temperature=1.0)),
        ("tree", SamplingParams(temperature=1.0)),
        ("tree", SamplingParams(temperature=0.8, top_k=5, top_p=0.95)),
    ],
)
async def test_first_token_has_target_distribution(
    shape, params, verifier_factory, channel_factory, record_property
):
    target = tiny_model(seed=3, vocab=VOCAB, sharpen=2.0)
    draft_model = tiny_model(seed=4, vocab=VOCAB, sharpen=2.0)
    p = dist(target, CONTEXT, params)
    server = await verifier_factory(target, max_sessions=16, batch_window_ms=2.0)
    channel = channel_factory(server.port)
    gen = torch.Generator().manual_seed(1234)
    memo: dict[tuple[int, ...], torch.Tensor] = {}

    def q(tokens: list[int]) -> torch.Tensor:
        if tuple(tokens) not in memo:
            memo[tuple(tokens)] = dist(draft_model, tokens, params)
        return memo[tuple(tokens)]

    drafts = [draft_tree(q, shape, params, gen) for _ in range(TRIALS)]

    async def trial(i: int) -> int:
        tree, dists = drafts[i]
        async with VerifierSession(channel, metadata=METADATA) as session:
            await session.open(
                MODEL_NAME,
                CONTEXT,
                SamplingParams(params.temperature, params.top_k, params.top_p, seed=i),
            )
            result = await session.verify(tree, draft=dists)
        return (list(result.accepted_tokens) + [result.bonus_token])[0]

    firsts = []
    for start in range(0, TRIALS, 16):
        firsts += await asyncio.gather(*(trial(i) for i in range(start, min(start + 16, TRIALS))))
    counts = torch.bincount(torch.tensor(firsts), minlength=VOCAB).tolist()
    p_value = chi_square_pvalue(counts, p.tolist())
    accept_always = torch.bincount(torch.tensor([t.tokens[0] for t, _ in drafts]), minlength=VOCAB)
    wrong_p_value = chi_square_pvalue(accept_always.tolist(), p.tolist())
    record_property("p_value", p_value)
    record_property("accept_always_p_value", wrong_p_value)
    print(f"{shape} {params}: p={p_value:.3g}, accept-always p={wrong_p_value:.3g}")
    assert p_value > 1e-3
    assert wrong_p_value < 1e-6
