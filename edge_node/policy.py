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
saturated shared verifier thus shrinks trees. Branches are the first nodes to go: from
a shared load of `narrow_load` the width is 1. From `plain_above` the verifier's time is
what the clients run short of, so the depth is the one with the most expected tokens per
millisecond of verifier time, tau(L) / (per_round + per_position * (1 + width * L)), from
the pass cost each reply carries (cloud_node/load.py), but no deeper than the latency
rate asks and at least 1 (a plain round would stop measuring the acceptance). A verifier
that does not report its pass cost leaves the latency rate in charge there, with a plain
round (no draft, depth 0: the pending token alone) competing too. An idle verifier costs
nothing extra, and the shape is the latency-optimal one above.

Why the thresholds: on `benchmarks/load_aware.py` (demo pair, CPU verifier, 24-32
clients at 20 ms, single runs), with the depth still chosen for latency, goodput was
0.72-0.74x the best fixed shape's (1x4) with the width kept up to a shared load of 0.8,
0.83-0.86x narrowing from 0.5 and 0.87-0.92x from 0.3; at 8 clients 1.2x 1x4's either
way. A branch costs as many nodes as it is deep for tokens it adds only when the main path
fails. With the depth by verifier cost as well: 0.96-0.98x at 16-24 clients and 0.86x at
32 (20 ms), 1.05-1.25x at 80 ms (README, "Load-aware drafting against fixed shapes").

Example: a = (0.9, 0.8, 0.7, 0.5), round trip 50 ms, 1 ms per level, no node cost:
tau = 1.9, 2.62, 3.12, 3.38 for L = 1..4; tau/cost = .037, .050, .059, .062, so L = 4.
With a 2 ms round trip instead: .63, .66, .62, .56, so L = 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edge_node.drafters import DraftShape
from lm.tree import TokenTree
from protocol.v1 import verification_pb2 as pb


def expected_tokens(acceptance: Sequence[float], depth: int) -> float:
    """tau(depth): expected tokens per round, bonus included."""
    tau, survive = 1.0, 1.0
    for a in acceptance[:depth]:
        survive *= a
        tau += survive
    return tau


def cheapest_depth(
    acceptance: Sequence[float],
    per_round_ms: float,
    per_position_ms: float,
    max_depth: int,
    *,
    width: int = 1,
) -> int:
    """The depth in [0, max_depth] with the most expected tokens per millisecond of the
    verifier's time: a round costs it per_round_ms plus per_position_ms for the pending
    token and each of width x depth nodes.

    Example: a = 0.85 at every level, 1.6 ms a round, 0.33 ms a position: tokens per ms
    .52, .82, .99, 1.09, 1.14, 1.160, 1.158 for L = 0..6 at width 1, so L = 5; at width 2
    .52, .71, .79, .82, .81 for L = 0..4, so L = 3. A GPU-like 8 ms a round and 0.01 ms a
    position make every level pay: the deepest wins."""

    def rate(depth: int) -> float:
        cost = per_round_ms + per_position_ms * (1 + width * depth)
        return expected_tokens(acceptance, depth) / max(cost, 1e-6)

    return max(range(max_depth + 1), key=rate)


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
class VerifierView:
    """What an edge has heard of its verifier's load, from its replies. One edge keeps
    one for all its generations and their policies (`EdgeRuntime`), so that a new
    generation starts from the verifier as it is rather than as if it idled: a short
    request would otherwise spend its first rounds drafting for an idle verifier."""

    # The load other sessions put on the verifier (0 idle .. 1 busy all the time with
    # them), smoothed over replies, and its ms per verified node (about: trees differ).
    shared_load: float = 0.0
    ms_per_node: float = 0.0
    # The verifier's fitted cost of a round pass (0, 0: not reported).
    pass_ms_per_round: float = 0.0
    pass_ms_per_position: float = 0.0


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
    # Shared with the edge's other generations (VerifierView).
    verifier: VerifierView = field(default_factory=VerifierView)
    # Shared loads from which the depth follows the verifier's cost (or, when it reports
    # none, plain rounds compete) and the width is 1 (module docstring).
    plain_above: float = 0.5
    narrow_load: float = 0.3

    def __post_init__(self) -> None:
        self.width = self.initial.width
        self.acceptance = [0.7] * max(self.max_depth, self.initial.depth)

    def shape(self) -> DraftShape | None:
        """The next round's shape; None for a plain round (no draft), which only a busy
        verifier makes worth it. Before the first reply a busy verifier (as the edge's
        earlier generations heard it) already shapes the round; an idle one leaves the
        request's own shape."""
        depth, width = self.initial.depth, min(self.width, self.max_nodes)
        if not self.adapt:
            return DraftShape(width, max(1, min(depth, self.max_nodes // width)))
        view = self.verifier
        if view.shared_load >= self.narrow_load:
            width = 1
        busy = view.shared_load >= self.plain_above
        costed = view.pass_ms_per_round + view.pass_ms_per_position > 0
        if self.round_trip_ms is not None:
            depth = best_depth(
                self.acceptance,
                self.round_trip_ms,
                self.draft_ms_per_level,
                self.max_depth,
                node_ms=view.shared_load * view.ms_per_node,
                width=width,
                min_depth=0 if busy and not costed else 1,
            )
        if busy and costed:
            # Never deeper than the latency rate asks (load only shrinks drafts), never a
            # plain round: it would stop measuring the acceptance this choice rests on.
            cheapest = cheapest_depth(
                self.acceptance,
                view.pass_ms_per_round,
                view.pass_ms_per_position,
                self.max_depth,
                width=width,
            )
            depth = max(1, min(cheapest, depth))
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
        pass_cost: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        """Folds one round in: `accepted` of `depth` drafted positions were kept.
        verifier_load, verify_ms_per_node, batch_size, pass_cost (ms per round, ms per
        position): from the reply (sessions in its pass; None / 0: the verifier did not
        say)."""
        s, view = self.smoothing, self.verifier
        if sum(pass_cost) > 0:  # already smoothed by the verifier's fit
            view.pass_ms_per_round, view.pass_ms_per_position = pass_cost
        shared = min(max(verifier_load, 0.0), 1.0) * (1 - 1 / max(batch_size, 1))
        view.shared_load += s * (shared - view.shared_load)
        if verify_ms_per_node is not None:
            view.ms_per_node += s * (verify_ms_per_node - view.ms_per_node)
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

    def observe_reply(
        self,
        tree: TokenTree,
        main_path: Sequence[int],
        result: pb.RoundResult,
        round_trip_ms: float,
        draft_ms: float,
        *,
        with_load: bool = True,
    ) -> None:
        """`observe` for a round that sent `tree` (its drafter's most likely path
        `main_path`) and got `result`. with_load=False withholds the verifier's load and
        pass cost: the latency-only policy, for comparison."""
        accepted = tuple(result.accepted_nodes)
        in_pass = result.batch_size * (result.nodes_verified + 1)  # about: trees differ
        self.observe(
            depth=max(tree.depths(), default=-1) + 1,
            accepted=len(accepted),
            off_main_path=accepted != tuple(main_path[: len(accepted)]),
            round_trip_ms=round_trip_ms,
            draft_ms=draft_ms,
            verifier_load=result.load if with_load else 0.0,
            verify_ms_per_node=result.server_ms / in_pass if result.batch_size else None,
            batch_size=result.batch_size,
            pass_cost=(result.pass_ms_per_round, result.pass_ms_per_position)
            if with_load
            else (0.0, 0.0),
        )
