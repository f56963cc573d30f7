"""The adaptive draft-shape policy: the docstring's example, and how observations move it."""

from __future__ import annotations

import random

import pytest

from edge_node.drafters import DraftShape
from edge_node.policy import (
    ShapePolicy,
    VerifierView,
    best_depth,
    cheapest_depth,
    expected_tokens,
)

EXAMPLE = (0.9, 0.8, 0.7, 0.5)


def test_docstring_example():
    assert [round(expected_tokens(EXAMPLE, d), 2) for d in (1, 2, 3, 4)] == [1.9, 2.62, 3.12, 3.38]
    assert best_depth(EXAMPLE, round_trip_ms=50, draft_ms_per_level=1, max_depth=4) == 4
    assert best_depth(EXAMPLE, round_trip_ms=2, draft_ms_per_level=1, max_depth=4) == 2


def observe(policy: ShapePolicy, rounds: int, accepted_of_depth, rtt_ms: float, off_main=False):
    for _ in range(rounds):
        depth = policy.shape().depth
        policy.observe(
            depth=depth,
            accepted=accepted_of_depth(depth),
            off_main_path=off_main,
            round_trip_ms=rtt_ms,
            draft_ms=depth * 1.0,
        )


def test_full_acceptance_over_a_slow_link_drafts_deep():
    policy = ShapePolicy(DraftShape(2, 4), max_depth=12)
    observe(policy, 60, lambda depth: depth, rtt_ms=50)
    assert policy.shape().depth >= 10


def test_rejections_over_a_fast_link_draft_shallow():
    policy = ShapePolicy(DraftShape(2, 6), max_depth=12)
    observe(policy, 60, lambda depth: 0, rtt_ms=1)
    assert policy.shape().depth == 1


def test_width_follows_evidence_for_branching():
    narrowing = ShapePolicy(DraftShape(4, 4))
    observe(narrowing, 40, lambda depth: depth // 2, rtt_ms=20, off_main=False)
    assert narrowing.shape().width == 1
    widening = ShapePolicy(DraftShape(2, 4), max_width=6)
    observe(widening, 40, lambda depth: depth // 2, rtt_ms=20, off_main=True)
    assert widening.shape().width == 6


def test_fixed_shape_when_adapt_is_off():
    policy = ShapePolicy(DraftShape(3, 5), adapt=False)
    observe(policy, 20, lambda depth: 0, rtt_ms=1)
    assert policy.shape() == DraftShape(3, 5)


@pytest.mark.parametrize("depth", [0, 33])
def test_shape_bounds(depth):
    with pytest.raises(ValueError, match="depth"):
        DraftShape(1, depth)


def test_shape_never_exceeds_the_verifiers_tree_limit():
    policy = ShapePolicy(DraftShape(8, 12), max_nodes=64)
    assert policy.shape().width * policy.shape().depth <= 64
    observe(policy, 40, lambda depth: depth, rtt_ms=200, off_main=True)
    shape = policy.shape()
    assert shape.width * shape.depth <= 64 and shape.depth >= 1


def loaded(
    policy: ShapePolicy,
    rounds: int,
    load: float,
    node_ms: float,
    seed: int = 0,
    batch: int = 8,
    *,
    accept: float = 0.7,
    round_trip_ms: float = 20.0,
    pass_cost: tuple[float, float] = (0.0, 0.0),
):
    """Rounds over a `round_trip_ms` link whose drafted tokens are each accepted with
    chance `accept` (seeded), the replies carrying the verifier's `load`, `node_ms` per
    node, `pass_cost` and passes shared by `batch` sessions."""
    rng = random.Random(seed)
    for _ in range(rounds):
        shape = policy.shape()
        depth = 0 if shape is None else shape.depth
        accepted = 0
        while accepted < depth and rng.random() < accept:
            accepted += 1
        policy.observe(
            depth=depth,
            accepted=accepted,
            off_main_path=True,  # evidence for branching: only load narrows the width
            round_trip_ms=round_trip_ms,
            draft_ms=depth * 1.0,
            verifier_load=load,
            verify_ms_per_node=node_ms,
            batch_size=batch,
            pass_cost=pass_cost,
        )


def test_a_busy_verifier_shrinks_trees_and_an_idle_one_does_not():
    """Idle: 4 beams, deep. Load 0.95 at 2 ms a node: one beam, shallower. Saturated at
    10 ms a node: plain rounds (no draft). Idle again: 4 beams, deep again."""
    policy = ShapePolicy(DraftShape(4, 4), max_depth=12, max_width=4)
    loaded(policy, 60, load=0.0, node_ms=2.0)
    idle = policy.shape()
    assert idle is not None and idle.width == 4 and idle.depth >= 4
    loaded(policy, 60, load=0.95, node_ms=2.0, seed=1)
    busy = policy.shape()
    assert busy is not None and busy.width == 1 and busy.depth < idle.depth
    loaded(policy, 60, load=1.0, node_ms=10.0, seed=2)
    assert policy.shape() is None
    loaded(policy, 80, load=0.0, node_ms=10.0, seed=3)
    again = policy.shape()
    assert again is not None and again.width == 4 and again.depth >= 4


def test_a_client_alone_on_a_busy_verifier_keeps_its_shape():
    """Its own rounds keep the verifier busy: its nodes cost it the round trip it already
    measures, and nobody else, so the load changes nothing."""
    alone, idle = (ShapePolicy(DraftShape(4, 4), max_depth=12, max_width=4) for _ in range(2))
    loaded(alone, 60, load=1.0, node_ms=10.0, batch=1)
    loaded(idle, 60, load=0.0, node_ms=10.0, batch=1)
    assert alone.shape() == idle.shape() and alone.shape() is not None


def test_a_busy_verifier_still_takes_drafts_it_accepts_whole():
    """Nothing rejected is nothing wasted: at full acceptance a deep draft costs the
    verifier one node per token it gains, so even saturated it keeps drafting deep."""
    policy = ShapePolicy(DraftShape(1, 4), max_depth=8)
    for _ in range(60):
        depth = policy.shape().depth
        policy.observe(
            depth, depth, False, 20.0, depth * 1.0, verifier_load=1.0, verify_ms_per_node=10.0
        )
    shape = policy.shape()
    assert shape is not None and shape.depth >= 6  # grown from 4


def test_a_busy_verifier_gets_the_depth_with_the_most_tokens_per_verifier_ms():
    """From plain_above, with the verifier's pass cost reported, the depth is the one that
    costs it least per token, not the latency-optimal one; without the cost (an older
    verifier) the latency rate stays in charge; idle, the cost changes nothing."""
    assert cheapest_depth([0.85] * 8, 1.6, 0.33, 8) == 5  # the docstring examples
    assert cheapest_depth([0.85] * 8, 1.6, 0.33, 8, width=2) == 3
    assert cheapest_depth([0.85] * 12, 8.0, 0.01, 12) == 12

    def run(load: float, cost: tuple[float, float]) -> ShapePolicy:
        policy = ShapePolicy(DraftShape(1, 4), max_depth=12)
        # A long round trip: latency alone wants deep drafts.
        loaded(policy, 80, load, 0.01, accept=0.85, round_trip_ms=100.0, pass_cost=cost)
        return policy

    busy = run(1.0, (1.6, 0.33))
    cheapest = cheapest_depth(busy.acceptance, 1.6, 0.33, 12)
    assert busy.shape() == DraftShape(1, cheapest) and 3 <= cheapest <= 7
    assert run(1.0, (0.0, 0.0)).shape().depth >= 10  # not reported
    # Never deeper than the latency rate asks: a GPU-like cost wants depth 12, a 2 ms
    # link much less. Never a plain round: a fit with no per-round cost asks for one.
    short = ShapePolicy(DraftShape(1, 4), max_depth=12)
    loaded(short, 80, 1.0, 0.01, accept=0.85, round_trip_ms=2.0, pass_cost=(8.0, 0.01))
    node_ms = short.verifier.shared_load * short.verifier.ms_per_node
    latency = best_depth(
        short.acceptance, short.round_trip_ms, short.draft_ms_per_level, 12, node_ms=node_ms
    )
    assert short.shape().depth == latency < 12 == cheapest_depth(short.acceptance, 8.0, 0.01, 12)
    free_rounds = run(1.0, (0.0, 0.33))
    assert cheapest_depth(free_rounds.acceptance, 0.0, 0.33, 12) == 0
    assert free_rounds.shape() == DraftShape(1, 1)
    assert run(0.0, (1.6, 0.33)).shape() == run(0.0, (0.0, 0.0)).shape()  # idle


def test_a_new_generation_starts_from_what_the_edge_heard_of_a_busy_verifier():
    """Policies of one edge share its VerifierView: a generation that starts while the
    verifier is busy shapes its first round for that, before any reply of its own."""
    view = VerifierView()
    earlier = ShapePolicy(DraftShape(4, 6), max_depth=12, verifier=view)
    loaded(earlier, 40, load=1.0, node_ms=0.5)
    earlier.observe(1, 1, False, 20.0, 1.0, verifier_load=1.0, batch_size=8, pass_cost=(1.6, 0.33))
    fresh = ShapePolicy(DraftShape(4, 6), max_depth=12, verifier=view)
    cheapest = cheapest_depth(fresh.acceptance, 1.6, 0.33, 12)
    assert fresh.shape() == DraftShape(1, cheapest) != DraftShape(4, 6)
    alone = ShapePolicy(DraftShape(4, 6), max_depth=12)  # a view of its own: idle
    assert alone.shape() == DraftShape(4, 6)


def test_load_is_ignored_when_the_shape_is_fixed():
    policy = ShapePolicy(DraftShape(3, 5), adapt=False)
    loaded(policy, 20, load=1.0, node_ms=10.0)
    assert policy.shape() == DraftShape(3, 5)
