"""How deep to draft: the adaptive shape policy.

Each round the edge pays a fixed round trip (network plus the verifier's pass) and
a draft cost per level, and gets back the accepted tokens plus the bonus. With
a_j the measured chance that the draft's j-th token is accepted given the ones
before it were, the expected tokens per round for depth L is

    tau(L) = 1 + sum_{k=1..L} prod_{j<=k} a_j

and the policy picks the L in [1, max_depth] that maximises tau(L) / cost(L), with
cost(L) = round_trip_ms + draft_ms_per_level * L (the round trip, measured from
send to reply, includes the verifier's pass).
A long round trip makes deep drafts pay even at modest acceptance; a fast link and
a poor draft make short ones win. Width follows the evidence for branching: if the
accepted path left the main beam in more than `widen_above` of recent rounds,
extra beams are earning their cost and the width grows by one, below
`narrow_below` it shrinks. Estimates are exponential moving averages, so the
shape tracks a session as its text changes; before any observation the request's
own shape is used.

Example: a = (0.9, 0.8, 0.7, 0.5), round trip 50 ms, 1 ms per level, no node cost:
tau = 1.9, 2.62, 3.12, 3.38 for L = 1..4; tau/cost = .037, .050, .059, .062, so L = 4.
With a 2 ms round trip instead: .63, .66, .62, .56, so L = 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edge_node.drafters import DraftShape


def expected_tokens(acceptance: Sequence[float], depth: int) -> float:
    """tau(depth): expected tokens per round, bonus included."""
    tau, survive = 1.0, 1.0
    for a in acceptance[:depth]:
        survive *= a
        tau += survive
    return tau


def best_depth(
    acceptance: Sequence[float], round_trip_ms: float, draft_ms_per_level: float, max_depth: int
) -> int:
    def rate(depth: int) -> float:
        cost = round_trip_ms + draft_ms_per_level * depth
        return expected_tokens(acceptance, depth) / max(cost, 1e-6)

    return max(range(1, max_depth + 1), key=rate)


@dataclass
class ShapePolicy:
    initial: DraftShape
    max_depth: int = 12
    max_width: int = 8
    # The verifier's --max-tree-nodes (and the edge's): width * depth never exceeds it.
    max_nodes: int = 64
    adapt: bool = True
    smoothing: float = 0.2
    widen_above: float = 0.15
    narrow_below: float = 0.03
    # Per-depth acceptance given the previous position was accepted.
    acceptance: list[float] = field(default_factory=list)
    round_trip_ms: float | None = None
    draft_ms_per_level: float = 0.0
    off_main_rate: float = 0.0
    width: int = 0

    def __post_init__(self) -> None:
        self.width = self.initial.width
        self.acceptance = [0.7] * max(self.max_depth, self.initial.depth)

    def shape(self) -> DraftShape:
        depth = self.initial.depth
        if self.adapt and self.round_trip_ms is not None:
            depth = best_depth(
                self.acceptance, self.round_trip_ms, self.draft_ms_per_level, self.max_depth
            )
        width = min(self.width, self.max_nodes)
        return DraftShape(width, max(1, min(depth, self.max_nodes // width)))

    def observe(
        self,
        depth: int,
        accepted: int,
        off_main_path: bool,
        round_trip_ms: float,
        draft_ms: float,
    ) -> None:
        """Folds one round in: `accepted` of `depth` drafted positions were kept."""
        s = self.smoothing
        for j in range(min(depth, accepted + 1)):  # positions actually tested
            hit = 1.0 if j < accepted else 0.0
            self.acceptance[j] += s * (hit - self.acceptance[j])
        if self.round_trip_ms is None:
            self.round_trip_ms = round_trip_ms
        self.round_trip_ms += s * (round_trip_ms - self.round_trip_ms)
        self.draft_ms_per_level += s * (draft_ms / max(depth, 1) - self.draft_ms_per_level)
        self.off_main_rate += s * (float(off_main_path) - self.off_main_rate)
        if self.adapt and self.width > 1 and self.off_main_rate < self.narrow_below:
            self.width -= 1
        elif self.adapt and self.width < self.max_width and self.off_main_rate > self.widen_above:
            self.width += 1
