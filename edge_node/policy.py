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

Under load the verifier's time is what every client shares, so a round also pays for the
nodes it makes the verifier score on behalf of the others: each reply carries the
verifier's load (the busy share of its last second), its pass time and how many sessions
shared the pass, from which the edge keeps a cost per verified node and the load others
put on the verifier, load * (1 - 1 / batch size); cost(L) gains that shared load *
node_ms * (1 + width * L) (the pending token plus the tree). A client alone on a busy
verifier pays for its nodes in its round trip already, so only others' load counts. A
saturated shared verifier thus shrinks trees, and once the shared load reaches
`plain_above` a plain round (no draft, depth 0: the pending token alone) competes too; at
`narrow_load` and above the width drops to 1 (branches are the first nodes to go). An idle
verifier costs nothing extra, and the shape is the latency-optimal one above.

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
    acceptance: Sequence[float],
    round_trip_ms: float,
    draft_ms_per_level: float,
    max_depth: int,
    *,
    node_ms: float = 0.0,
    width: int = 1,
    min_depth: int = 1,
) -> int:
    """The depth in [min_depth, max_depth] with the most tokens per ms of cost (module
    docstring); node_ms: what one verified node costs here (load x the verifier's ms per
    node), charged for the pending token and width x depth tree nodes."""

    def rate(depth: int) -> float:
        cost = round_trip_ms + draft_ms_per_level * depth + node_ms * (1 + width * depth)
        return expected_tokens(acceptance, depth) / max(cost, 1e-6)

    return max(range(min_depth, max_depth + 1), key=rate)


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
    # The load other sessions put on the verifier (0 idle .. 1 busy all the time with
    # them) and the verifier's ms per verified node, both from its replies.
    verifier_load: float = 0.0
    verify_ms_per_node: float = 0.0
    plain_above: float = 0.5
    narrow_load: float = 0.8

    def __post_init__(self) -> None:
        self.width = self.initial.width
        self.acceptance = [0.7] * max(self.max_depth, self.initial.depth)

    def shape(self) -> DraftShape | None:
        """The next round's shape; None for a plain round (no draft), which only a busy
        verifier makes worth it."""
        depth, width = self.initial.depth, min(self.width, self.max_nodes)
        if self.adapt and self.round_trip_ms is not None:
            if self.verifier_load >= self.narrow_load:
                width = 1
            depth = best_depth(
                self.acceptance,
                self.round_trip_ms,
                self.draft_ms_per_level,
                self.max_depth,
                node_ms=self.verifier_load * self.verify_ms_per_node,
                width=width,
                min_depth=0 if self.verifier_load >= self.plain_above else 1,
            )
            if depth == 0:
                return None
        return DraftShape(width, max(1, min(depth, self.max_nodes // width)))

    def observe(
        self,
        depth: int,
        accepted: int,
        off_main_path: bool,
        round_trip_ms: float,
        draft_ms: float,
        verifier_load: float = 0.0,
        verify_ms_per_node: float | None = None,
        batch_size: int = 1,
    ) -> None:
        """Folds one round in: `accepted` of `depth` drafted positions were kept.
        verifier_load, verify_ms_per_node, batch_size: from the reply (sessions in its
        pass; None / 0: the verifier did not say)."""
        s = self.smoothing
        shared = min(max(verifier_load, 0.0), 1.0) * (1 - 1 / max(batch_size, 1))
        self.verifier_load += s * (shared - self.verifier_load)
        if verify_ms_per_node is not None:
            self.verify_ms_per_node += s * (verify_ms_per_node - self.verify_ms_per_node)
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
