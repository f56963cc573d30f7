"""Sampled verification is lossless: a chi-square test against the exact target distribution.

No model is involved.  The target p(. | prefix) and a *different* draft q(. | prefix) are pure
functions of the prefix over a 6-token vocabulary, so the exact law of the generated text is
known: P(t1, t2) = p(t1 | ()) * p(t2 | (t1,)).  Each trial runs the real process: draft a tree
(children sampled from q without replacement, or the top-w tokens of q for deterministic
drafts), verify it with `verify_tree`, append the accepted tokens and the bonus, and start a new
round from the longer context until two tokens exist.  The counts of the first token and of the
first two tokens must pass a chi-square goodness-of-fit test; a rule that is not lossless must
fail it by a wide margin.  Every random source is seeded, so the p-values are fixed numbers.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pytest
import torch

from lm.acceptance import Acceptance, DraftDistribution, verify_tree
from lm.sampling import SamplingParams, probs_from_logits
from lm.tree import TokenTree
from tests.stats import chi_square_pvalue

VOCAB = 6
TRIALS = 8_000
PASS_P_VALUE = 1e-3
FAIL_P_VALUE = 1e-6

Verifier = Callable[
    [TokenTree, torch.Tensor, Mapping[int, DraftDistribution], torch.Generator], Acceptance
]


class ToyModel:
    """A next-token distribution that is a fixed pseudo-random function of the prefix."""

    def __init__(self, salt: int, params: SamplingParams, logit_scale: float = 1.5) -> None:
        self._salt = salt
        self._params = params
        self._logit_scale = logit_scale
        self._cache: dict[tuple[int, ...], torch.Tensor] = {}

    def probs(self, prefix: tuple[int, ...]) -> torch.Tensor:
        """(VOCAB,) float32."""
        if prefix not in self._cache:
            seed = self._salt
            for token in prefix:
                seed = seed * (VOCAB + 1) + token + 1
            generator = torch.Generator().manual_seed(seed)
            logits = torch.randn(VOCAB, generator=generator) * self._logit_scale
            self._cache[prefix] = probs_from_logits(logits, self._params)
        return self._cache[prefix]


@dataclass(frozen=True)
class Drafting:
    """How the edge builds a tree: `widths[d]` children per node at depth d.  Children at
    depths in `sampled` are drawn from q without replacement and q is sent along (unless
    `send_q` is False); the others are q's top-w tokens, sent without a DraftDistribution.
    `claimed` replaces the q that is sent (only the deliberately wrong case uses it)."""

    widths: tuple[int, ...]
    sampled: frozenset[int]
    send_q: bool = True
    claimed: Callable[[tuple[int, ...]], torch.Tensor] | None = None


class Drafter:
    """Builds the trees of one simulation; caches what depends only on the prefix."""

    def __init__(self, drafting: Drafting, draft_model: ToyModel, rng: random.Random) -> None:
        self._drafting = drafting
        self._model = draft_model
        self._rng = rng
        self._q: dict[tuple[int, ...], list[float]] = {}
        self._sent: dict[tuple[int, tuple[int, ...]], DraftDistribution] = {}

    def draft(
        self, context: tuple[int, ...]
    ) -> tuple[TokenTree, dict[int, DraftDistribution], list[tuple[int, ...]]]:
        """One tree (breadth-first, so parents come first), the draft distributions sent with
        it and the prefix of each target row (row 0 is `context`, row i + 1 ends with node i)."""
        tokens: list[int] = []
        parents: list[int] = []
        prefixes = [context]
        sent: dict[int, DraftDistribution] = {}
        frontier = [(-1, context)]
        for depth, width in enumerate(self._drafting.widths):
            next_frontier = []
            for node, prefix in frontier:
                q = self._draft_probs(prefix)
                if depth in self._drafting.sampled:
                    children = self._sample_without_replacement(q, width)
                    if self._drafting.send_q:
                        sent[node] = self._draft_distribution(node, prefix)
                else:
                    children = sorted(range(VOCAB), key=lambda t: -q[t])[:width]
                for token in children:
                    tokens.append(token)
                    parents.append(node)
                    prefixes.append(prefix + (token,))
                    next_frontier.append((len(tokens) - 1, prefix + (token,)))
            frontier = next_frontier
        return TokenTree(tuple(tokens), tuple(parents)), sent, prefixes

    def _draft_probs(self, prefix: tuple[int, ...]) -> list[float]:
        if prefix not in self._q:
            self._q[prefix] = self._model.probs(prefix).tolist()
        return self._q[prefix]

    def _draft_distribution(self, node: int, prefix: tuple[int, ...]) -> DraftDistribution:
        key = (node, prefix)
        if key not in self._sent:
            claimed = self._drafting.claimed
            q = claimed(prefix).tolist() if claimed else self._draft_probs(prefix)
            support = tuple(token for token in range(VOCAB) if q[token] > 0)
            self._sent[key] = DraftDistribution(node, support, tuple(q[t] for t in support))
        return self._sent[key]

    def _sample_without_replacement(self, q: list[float], count: int) -> list[int]:
        weights = list(q)
        drawn = []
        for _ in range(count):
            token = self._rng.choices(range(VOCAB), weights)[0]
            drawn.append(token)
            weights[token] = 0.0
        return drawn


def sampled_verifier(
    tree: TokenTree,
    target_probs: torch.Tensor,
    draft: Mapping[int, DraftDistribution],
    generator: torch.Generator,
) -> Acceptance:
    return verify_tree(tree, target_probs, draft, generator, greedy=False)


def accept_always(
    tree: TokenTree,
    target_probs: torch.Tensor,
    draft: Mapping[int, DraftDistribution],
    generator: torch.Generator,
) -> Acceptance:
    """A wrong rule: trust the draft, follow first children down, add a target token."""
    nodes: list[int] = []
    node = -1
    while tree.children(node):
        node = tree.children(node)[0]
        nodes.append(node)
    bonus = int(torch.multinomial(target_probs[node + 1], 1, generator=generator))
    return Acceptance(tuple(nodes), tuple(tree.tokens[n] for n in nodes), bonus)


def simulate(
    drafting: Drafting,
    target: SamplingParams,
    draft_params: SamplingParams,
    verifier: Verifier = sampled_verifier,
    seed: int = 0,
) -> tuple[float, float]:
    """p-values (first token, first two tokens) of TRIALS generations against the target."""
    target_model = ToyModel(salt=1, params=target)
    draft_model = ToyModel(salt=2, params=draft_params)
    drafter = Drafter(drafting, draft_model, random.Random(seed))
    generator = torch.Generator().manual_seed(seed)
    pairs = torch.zeros(VOCAB * VOCAB, dtype=torch.float64)
    for _ in range(TRIALS):
        output: tuple[int, ...] = ()
        while len(output) < 2:
            tree, draft, prefixes = drafter.draft(output)
            target_probs = torch.stack([target_model.probs(prefix) for prefix in prefixes])
            result = verifier(tree, target_probs, draft, generator)
            output += result.tokens + (result.bonus,)
        pairs[output[0] * VOCAB + output[1]] += 1
    first = target_model.probs(()).double()
    exact_pairs = torch.stack([first[t] * target_model.probs((t,)).double() for t in range(VOCAB)])
    return p_value(pairs.reshape(VOCAB, VOCAB).sum(1), first), p_value(pairs, exact_pairs.flatten())


def p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Chi-square p-value, or 0 when an outcome of probability 0 occurred (pooling the small
    cells could otherwise hide it)."""
    if counts[probs == 0].sum() > 0:
        return 0.0
    return chi_square_pvalue(counts.tolist(), probs.tolist())


SAMPLED = SamplingParams(temperature=1.0)
DRAFT_TOP_4 = SamplingParams(temperature=1.0, top_k=4)
ALL_DEPTHS = frozenset(range(3))

LOSSLESS_CASES = {
    "chain-depth3-sampled": (Drafting((1, 1, 1), ALL_DEPTHS), SAMPLED, SAMPLED),
    "tree-3x2-sampled": (Drafting((3, 2), ALL_DEPTHS), SAMPLED, SAMPLED),
    "tree-3x2x1-deterministic": (Drafting((3, 2, 1), frozenset()), SAMPLED, SAMPLED),
    # Point masses are exact for sampled children too (see lm/acceptance.py).
    "tree-2x2-sampled-sent-without-q": (
        Drafting((2, 2), ALL_DEPTHS, send_q=False),
        SAMPLED,
        SAMPLED,
    ),
    "tree-2x2-mixed-draft-topk": (Drafting((2, 2), frozenset({1})), SAMPLED, DRAFT_TOP_4),
    "tree-3x1-target-t0.7-topk3": (
        Drafting((3, 1), ALL_DEPTHS),
        SamplingParams(temperature=0.7, top_k=3),
        SAMPLED,
    ),
    "chain-depth2-target-t1.6-topp0.8": (
        Drafting((1, 1), ALL_DEPTHS),
        SamplingParams(temperature=1.6, top_p=0.8),
        DRAFT_TOP_4,
    ),
}


@pytest.mark.parametrize("case", list(LOSSLESS_CASES))
def test_sampled_verification_matches_target(case: str, record_property) -> None:
    drafting, target, draft_params = LOSSLESS_CASES[case]
    first, pairs = simulate(drafting, target, draft_params)
    record_property("p_first_token", first)
    record_property("p_first_two_tokens", pairs)
    print(f"{case}: p(first token) = {first:.4f}, p(first two tokens) = {pairs:.4f}")
    assert first > PASS_P_VALUE
    assert pairs > PASS_P_VALUE


def uniform_q(prefix: tuple[int, ...]) -> torch.Tensor:
    return torch.full((VOCAB,), 1 / VOCAB)


WRONG_CASES = {
    "accept-always": (Drafting((2, 2), ALL_DEPTHS), accept_always),
    "q-reported-as-uniform": (Drafting((2, 2), ALL_DEPTHS, claimed=uniform_q), sampled_verifier),
}


@pytest.mark.parametrize("case", list(WRONG_CASES))
def test_wrong_rule_fails_the_same_test(case: str, record_property) -> None:
    drafting, verifier = WRONG_CASES[case]
    first, pairs = simulate(drafting, SAMPLED, SAMPLED, verifier)
    record_property("p_first_token", first)
    record_property("p_first_two_tokens", pairs)
    print(f"{case}: p(first token) = {first:.3g}, p(first two tokens) = {pairs:.3g}")
    assert min(first, pairs) < FAIL_P_VALUE


def test_p_value_flags_impossible_outcomes_and_accepts_exact_counts() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0], dtype=torch.float64)
    assert p_value(torch.tensor([50.0, 30.0, 20.0, 1.0]), probs) == 0.0
    assert p_value(torch.tensor([50.0, 30.0, 20.0, 0.0]), probs) == pytest.approx(1.0)
