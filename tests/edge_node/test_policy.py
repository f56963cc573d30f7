"""The adaptive draft-shape policy: the docstring's example, and how observations move it."""

from __future__ import annotations

import pytest

from edge_node.drafters import DraftShape
from edge_node.policy import ShapePolicy, best_depth, expected_tokens

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
