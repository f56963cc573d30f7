"""Position-keyed acceptance: the draws behind "same seed, same text, whatever the tree".

Exact maths on hand-made distributions, the uniforms' distribution, and the property the
design exists for: the emitted tokens are the target's own tokens at each position,
whatever tree is verified, batched with whatever other sessions, in every dtype's logits.
"""

from __future__ import annotations

import random

import pytest
import torch

from lm.acceptance import (
    DraftDistribution,
    PendingRound,
    accept_batch,
    accept_targets,
    row_positions,
    verify_tree,
)
from lm.sampling import SamplingParams, position_uniforms, probs_from_logits, sample_by_inversion
from lm.tree import TokenTree
from tests.stats import chi_square_pvalue

PROBS = torch.tensor([0.2, 0.0, 0.5, 0.3])  # CDF 0.2, 0.2, 0.7, 1.0


@pytest.mark.parametrize(
    "uniform, token",
    [(0.0, 0), (0.1999, 0), (0.2, 2), (0.5, 2), (0.7, 3), (0.99999, 3)],
)
def test_inversion_picks_the_interval_holding_the_uniform(uniform, token):
    assert int(sample_by_inversion(PROBS, torch.tensor(uniform))) == token


def test_inversion_never_picks_a_zero_probability_token():
    trailing = torch.tensor([0.5, 0.5, 0.0, 0.0])
    nearly_one = torch.tensor([1 - 1e-12, 0.9999999], dtype=torch.float64)
    assert sample_by_inversion(trailing.expand(2, 4), nearly_one).tolist() == [1, 1]
    assert 1 not in sample_by_inversion(PROBS.expand(1000, 4), torch.rand(1000)).tolist()


@pytest.mark.parametrize("vocab", [7, 1024, 2500, 152_064])
def test_blocked_inversion_matches_a_float64_reference(vocab):
    """Against a flat float64 CDF: the same token wherever the uniform is not within
    float32 rounding of a boundary, never a zero-probability one; rows unnormalised."""
    gen = torch.Generator().manual_seed(vocab)
    weights = torch.rand(64, vocab, generator=gen) ** 8 * 3  # peaked, some near zero
    weights[torch.rand(64, vocab, generator=gen) < 0.3] = 0.0  # and exact zeros
    uniforms = torch.rand(64, generator=gen)
    cdf = weights.double().cumsum(-1)
    point = uniforms.double()[:, None] * cdf[:, -1:]
    reference = torch.searchsorted(cdf, point, right=True).squeeze(-1)
    got = sample_by_inversion(weights, uniforms)
    near = ((cdf - point).abs() / cdf[:, -1:]).min(-1).values < 1e-5
    assert ((got == reference) | near).all()
    assert (weights.gather(-1, got[:, None]) > 0).all()


def test_uniforms_are_a_function_of_key_and_position():
    first = position_uniforms(7, range(100))
    assert first == position_uniforms(7, range(100))
    assert first != position_uniforms(8, range(100))
    assert len(set(first)) == 100 and all(0 <= u < 1 for u in first)
    # Uniform on [0, 1): ten equal bins over 20,000 positions.
    many = torch.tensor(position_uniforms(3, range(20_000)))
    counts = torch.histc(many, bins=10, min=0, max=1).long().tolist()
    assert chi_square_pvalue(counts, [0.1] * 10) > 1e-3


def test_inversion_at_keyed_uniforms_follows_the_distribution():
    probs = torch.tensor([0.05, 0.4, 0.0, 0.25, 0.3])
    uniforms = torch.tensor([position_uniforms(key, [12])[0] for key in range(6000)])
    tokens = sample_by_inversion(probs.expand(6000, 5), uniforms)
    counts = torch.bincount(tokens, minlength=5).tolist()
    assert counts[2] == 0
    assert chi_square_pvalue(counts, probs.tolist()) > 1e-3


def test_row_positions_follow_depths():
    tree = TokenTree(tokens=(4, 5, 6, 7), parents=(-1, 0, 0, 1))  # depths 0, 1, 1, 2
    assert row_positions(tree, 10) == [10, 11, 12, 12, 13]


def test_accept_targets_walks_matching_children():
    tree = TokenTree(tokens=(4, 5, 6, 7), parents=(-1, 0, 0, 1))
    # Targets: after the context 4, after node 0 -> 6 (node 2), after node 2 -> 9.
    accepted = accept_targets(tree, [4, 6, 6, 9, 1])
    assert (accepted.nodes, accepted.tokens, accepted.bonus) == ((0, 2), (4, 6), 9)
    assert accept_targets(tree, [8, 0, 0, 0, 0]).bonus == 8
    assert accept_targets(TokenTree((), ()), [3]).bonus == 3


class PrefixModel:
    """Logits as a pure function of the prefix (a stand-in target whose rows a test can
    compute for any tree): hashing gives peaked but varied distributions."""

    def __init__(self, vocab: int, dtype: torch.dtype) -> None:
        self.vocab, self.dtype = vocab, dtype

    def logits(self, prefix: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash(prefix) & 0xFFFFFFFF)
        return (torch.randn(self.vocab, generator=gen) * 3).to(self.dtype).float()

    def rows(self, prefix: tuple[int, ...], tree: TokenTree) -> torch.Tensor:
        paths = [prefix] + [
            prefix + tuple(tree.tokens[n] for n in tree.path(i)) for i in range(tree.size)
        ]
        return torch.stack([self.logits(p) for p in paths])


def run_sequence(model, prefix, params, key, trees, n):
    """Decodes n tokens verifying the next tree from `trees` each round."""
    out: list[int] = []
    while len(out) < n:
        tree = trees(prefix + tuple(out))
        rows = model.rows(prefix + tuple(out), tree)[None]
        round_ = PendingRound(tree, params, key, len(prefix) + len(out), {})
        (acceptance,) = accept_batch(rows, [round_])
        out += [*acceptance.tokens, acceptance.bonus]
    return out[:n]


def random_tree_for(rng: random.Random, vocab: int):
    def make(_prefix):
        size = rng.randrange(0, 9)
        parents = [-1] + [rng.randrange(-1, i) for i in range(1, size)]
        return TokenTree(tuple(rng.randrange(vocab) for _ in range(size)), tuple(parents[:size]))

    return make


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_output_is_the_same_whatever_the_trees(dtype, temperature):
    vocab = 12
    model = PrefixModel(vocab, dtype)
    params = SamplingParams(temperature=temperature, top_k=8 if temperature else 0, seed=5)
    prefix = (1, 2, 3)
    one_token = run_sequence(model, prefix, params, 5, lambda _: TokenTree((), ()), 30)

    def perfect(p):  # the target's own next three tokens: all accepted
        tokens = run_sequence(model, p, params, 5, lambda _: TokenTree((), ()), 3)
        return TokenTree.chain(tokens)

    assert run_sequence(model, prefix, params, 5, perfect, 30) == one_token
    for seed in range(4):
        trees = random_tree_for(random.Random(seed), vocab)
        assert run_sequence(model, prefix, params, 5, trees, 30) == one_token
    if temperature:
        assert run_sequence(model, prefix, params, 6, trees, 30) != one_token


def test_batch_mates_do_not_change_a_sessions_tokens():
    vocab = 12
    model = PrefixModel(vocab, torch.float32)
    rng = random.Random(1)
    rounds, rows = [], []
    for i in range(6):
        prefix = tuple(rng.randrange(vocab) for _ in range(4))
        tree = random_tree_for(rng, vocab)(prefix)
        params = SamplingParams() if i % 3 == 0 else SamplingParams(0.7 + i / 10, seed=i)
        rounds.append(PendingRound(tree, params, i, 4, {}))
        rows.append(model.rows(prefix, tree))
    width = max(r.shape[0] for r in rows)
    padded = torch.stack([torch.cat([r, r[:1].expand(width - len(r), -1)]) for r in rows])
    together = accept_batch(padded, rounds)
    alone = [accept_batch(r[None], [x])[0] for r, x in zip(rows, rounds, strict=True)]
    assert together == alone


def test_greedy_agrees_with_the_reference_rule():
    rng = random.Random(2)
    for _ in range(50):
        tree = random_tree_for(rng, 6)(())
        logits = torch.randn(tree.size + 1, 6)
        (got,) = accept_batch(logits[None], [PendingRound(tree, SamplingParams(), 0, 0, {})])
        probs = probs_from_logits(logits, SamplingParams())
        assert got == verify_tree(tree, probs, None, None, greedy=True)


def test_unseeded_sessions_with_q_use_rejection_sampling():
    tree = TokenTree.chain([1])
    q = {-1: DraftDistribution(-1, (0, 1), (0.5, 0.5))}
    params = SamplingParams(temperature=1.0)
    logits = torch.log(torch.tensor([[0.5, 0.5, 1e-9], [0.3, 0.3, 0.4]]))
    # p(1) = q(1): rejection sampling accepts the drafted token every time.
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        (got,) = accept_batch(logits[None], [PendingRound(tree, params, seed, 0, q, generator)])
        assert got.nodes == (0,)


def test_a_sessions_error_is_returned_in_its_place():
    good = PendingRound(TokenTree.chain([1]), SamplingParams(), 0, 0, {})
    bad = PendingRound(
        TokenTree.chain([1]),
        SamplingParams(temperature=1.0),
        0,
        0,
        {-1: DraftDistribution(-1, (0,), (1.0,))},  # q does not hold the drafted token
        torch.Generator(),
    )
    results = accept_batch(torch.randn(2, 2, 4), [good, bad])
    assert not isinstance(results[0], Exception)
    assert isinstance(results[1], ValueError)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=1.0, seed=1)])
def test_non_finite_logits_fail_their_session_with_no_token(bad, params):
    """A half-precision overflow must not become a token id past the vocabulary (the next
    pass would index the embedding with it and fail its whole batch)."""
    logits = torch.randn(2, 2, 1500)
    logits[1, 0, 7] = bad
    rounds = [PendingRound(TokenTree.chain([1]), params, 0, 0, {}) for _ in range(2)]
    good, broken = accept_batch(logits, rounds)
    assert 0 <= good.bonus < 1500
    assert isinstance(broken, ValueError) and "finite" in str(broken)


def test_a_temperature_below_float32s_range_is_the_argmax():
    """Temperatures travel as doubles; 1e-300 used to divide as 0.0 and give NaN (found
    by the edge fuzzer as INTERNAL)."""
    logits = torch.tensor([[0.5, 2.0, 1.0, 2.0]])
    probs = probs_from_logits(logits, SamplingParams(temperature=1e-300))
    assert probs.tolist() == [[0.0, 0.5, 0.0, 0.5]]
    token = sample_by_inversion(probs, torch.tensor([0.9]))
    assert token.tolist() == [3]
