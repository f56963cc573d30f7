"""Lossless acceptance of a draft token tree: which drafted tokens the target model keeps.

Terms, used the same way everywhere in the project (after vLLM's ``RejectionSampler``):

- **accepted** tokens: draft tokens the target keeps, a root-to-node path of the tree;
- **rejected** tokens: draft tokens tested and refused; once every child of the last accepted
  node is rejected, a **recovered** token is drawn from the residual distribution left over by
  those rejections;
- **bonus** token: when the accepted path ends at a leaf, one more token drawn from the target
  distribution after it, for free from the same forward pass.

Each round yields the accepted tokens plus exactly one target-side token, which
`Acceptance.bonus` carries whether it was a recovered or a bonus token.

Greedy
------
The target distribution is a point mass on its argmax, so the output must be exactly the
argmax chain.  Walk down from the root: at each node move to the child whose token equals the
argmax of that node's target row; stop when there is none.  The bonus is the argmax after the
last accepted node.  No randomness is used, and the generator is not touched.

Sampling: recursive rejection sampling over siblings
----------------------------------------------------
Speculative sampling (Leviathan et al. 2023, arXiv:2211.17192; Chen et al. 2023,
arXiv:2302.01318) checks one draft token x ~ q against the target p: accept with probability
min(1, p(x)/q(x)); on rejection draw from the residual norm(max(0, p - q)).  The output is
distributed exactly as p, because min(p, q)(y) + (1 - sum min(p, q)) * norm(max(0, p - q))(y)
= min(p, q)(y) + max(0, p(y) - q(y)) = p(y).

A tree offers several siblings for the same position.  SpecInfer's multi-step speculative
sampling (Miao et al. 2023, arXiv:2305.09781) tests them one after the other, each against the
residual p' left by the previous rejections.  Here the siblings x_1, x_2, ... of a node were
drawn from the draft distribution q *without replacement*, in tree order, so sibling x_i was
drawn from q_i = q with x_1..x_{i-1} removed and renormalised.  The rule is:

    p' <- p
    for i = 1, 2, ...:  accept x_i with probability min(1, p'(x_i) / q_i(x_i));
                        otherwise p' <- norm(max(0, p' - q_i))
    if every sibling is rejected: the recovered token is drawn from p'

This is the without-replacement variant used by Recursive Speculative Decoding (Jeon et al.
2024, arXiv:2402.14160); SpecTr (Sun et al. 2023, arXiv:2310.15141) analyses multi-draft
verification in general.  It is exact by induction on the number of siblings: given x_1 and its
rejection, x_2, x_3, ... are a without-replacement sample from q_2 that is independent of the
rejection coin, so by induction the rest of the procedure outputs the residual norm(max(0,
p - q_1)) exactly, and the single-draft identity above finishes the step.  Once a child is
accepted, the same argument applies one level down with that child's target row, because its
subtree was drafted from the accepted prefix only.

A node without a `DraftDistribution` is verified as if each child's proposal were the point mass
on it, q_i = delta(x_i): accept with probability p'(x_i); on rejection p' loses x_i and is
renormalised (EAGLE, Li et al. 2024, arXiv:2401.15077, verifies its top-k trees this way).  For
children picked deterministically from the prefix (top-k of the draft model, beam search, a
lookup table) delta(x_i) *is* the proposal, so this is the rule above.  It is in fact exact for
children chosen by any process that does not look at the verifier's coins, sampled ones
included: conditioned on the chosen x_i the proposal is delta(x_i), and p(x_i) 1{y = x_i} +
(1 - p(x_i)) p(y) 1{y != x_i} / (1 - p(x_i)) = p(y) whatever x_i is.  Sending q only raises the
acceptance rate (the first sibling passes with min(1, p(x)/q(x)) >= p(x)).  A q that is sent
must be the one the children were really drawn from without replacement; drafts sampled with
replacement and then deduplicated (sampled beams merged into a tree) must be sent without it.

Worked example (replayed in tests/lm/test_acceptance.py)
---------------------------------------------------------
Vocabulary {0, 1, 2, 3}.  The root's draft distribution is q = (0.1, 0.6, 0.3, 0) and two
children were drawn from it without replacement: x_1 = 1, then x_2 = 2.  The target after the
committed text is p = (0.2, 0.3, 0.4, 0.1).

- x_1 = 1, q_1 = q: accept with probability min(1, 0.3 / 0.6) = 0.5.  Say u = 0.7: rejected,
  p' = norm(max(0, p - q_1)) = norm(0.1, 0, 0.1, 0.1) = (1/3, 0, 1/3, 1/3).
- x_2 = 2, q_2 = norm(0.1, 0, 0.3, 0) = (0.25, 0, 0.75, 0): accept with probability
  (1/3) / 0.75 = 4/9.  Say u = 0.6: rejected, p' = norm(max(0, p' - q_2)) = norm(1/12, 0, 0, 1/3)
  = (0.2, 0, 0, 0.8).
- Both siblings are rejected, so the recovered token is drawn from (0.2, 0, 0, 0.8).

Check that nothing is lost: token 2 comes out when x_1 = 2 is drawn (0.3) and accepted
(p(2) >= q(2)), or when x_1 = 1 is drawn (0.6), rejected (0.5), x_2 = 2 is drawn (0.75) and
accepted (4/9): 0.3 + 0.1 = 0.4 = p(2).

Position-keyed draws (what the verifier does unless a draft distribution is sent)
---------------------------------------------------------------------------------
The target's own token at every row of the tree is drawn first, in one batched step on the
device: the argmax when greedy, else inversion of the warped CDF at a uniform that is a pure
function of (seed, absolute position) (`lm.sampling.position_uniforms`,
`sample_by_inversion`).  `accept_targets` then walks the tree on the host: a child is accepted
exactly when its token equals the target's token at its parent's row, and the bonus is the
target's token after the last accepted node.  The emitted tokens are therefore exactly the
tokens target-only sampling with that seed produces, whatever the tree's shape, so a seeded
`lossless` session writes the same text as a seeded `cloud_only` one.  For deterministic
children this accepts with the same probability as the point-mass rule above (a child x is
accepted with probability p(x); siblings with p(x_1) + p(x_2) + ...).  Sending q buys a
higher acceptance rate for sampled drafts (`verify_tree` below) at the price of that promise.

Randomness of `verify_tree`
---------------------------
`verify_tree` draws tree.size + 1 uniforms in float64 from the generator up front, in one call
on the generator's device: uniform i decides the test of node i (each node is tested at most
once) and the last one draws the bonus by inversion of the CDF.  A round therefore consumes the
same amount of randomness whatever happens, and the arithmetic is done on the host in float64,
one target row at a time (one small device-to-host copy per visited node).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch

from lm.sampling import (
    SamplingParams,
    position_uniforms,
    probs_from_logits,
    sample_by_inversion,
    warped_weights,
)
from lm.tree import TokenTree

PROB_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Acceptance:
    """The outcome of verifying one tree.

    nodes: the accepted root-to-node path, as tree indices (empty when the first level failed).
    tokens: the tokens of those nodes.
    bonus: the one token the target adds after them (recovered or bonus, see the module doc).
    """

    nodes: tuple[int, ...]
    tokens: tuple[int, ...]
    bonus: int


@dataclass(frozen=True)
class DraftDistribution:
    """The draft distribution q that the children of `node` were sampled from.

    node: tree index of the parent (-1 for the children of the last committed token).
    tokens, probs: the support of q and its probabilities (a sparse (vocab,) vector); each prob
    in (0, 1], summing to 1 within PROB_SUM_TOLERANCE (q is renormalised before use).
    """

    node: int
    tokens: tuple[int, ...]
    probs: tuple[float, ...]

    def __post_init__(self) -> None:
        where = f"draft[{self.node}]"
        if len(self.tokens) != len(self.probs) or not self.tokens:
            raise ValueError(
                f"{where}: tokens and probs must be non-empty and of equal length, "
                f"got {len(self.tokens)} and {len(self.probs)}"
            )
        if any(token < 0 for token in self.tokens) or len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"{where}.tokens: must be distinct and >= 0, got {self.tokens}")
        if not all(0 < prob <= 1 for prob in self.probs):
            raise ValueError(f"{where}.probs: each must be in (0, 1], got {self.probs}")
        total = sum(self.probs)
        if abs(total - 1) > PROB_SUM_TOLERANCE:
            raise ValueError(
                f"{where}.probs: must sum to 1 within {PROB_SUM_TOLERANCE:g}, got {total:.6g}"
            )


@dataclass(frozen=True)
class PendingRound:
    """One session's round inside a pass, as `accept_batch` needs it.

    first: the absolute position that row 0 decides (committed + pending tokens).
    key: keys the position uniforms (the request's seed, or entropy without one).
    generator: set only where the session is verified by rejection sampling (an
        unseeded sampled session that sent its draft distributions), on the logits' device.
    """

    tree: TokenTree
    sampling: SamplingParams
    key: int
    first: int
    draft: Mapping[int, DraftDistribution]
    generator: torch.Generator | None = None

    @property
    def uses_rejection(self) -> bool:
        return bool(self.draft) and self.generator is not None and not self.sampling.greedy


def accept_batch(
    logits: torch.Tensor, rounds: Sequence[PendingRound]
) -> list[Acceptance | Exception]:
    """Verifies every session of a pass. logits: (batch, rows, vocab), row r of session b
    being its target after its last pending token (r = 0) or after node r - 1; rows past
    a session's tree.size + 1 are padding.

    The target's token at every row is decided for the whole batch in one step per
    distinct warping (greedy argmax, or inversion at position-keyed uniforms) and copied
    to the host once; each tree is then walked on the host. A session's error is
    returned in its place and leaves the others alone.
    """
    batch, rows = logits.shape[:2]
    uniforms = torch.zeros(batch, rows, dtype=torch.float64)
    groups: dict[SamplingParams, list[int]] = {}
    for b, round_ in enumerate(rounds):
        if round_.uses_rejection:
            continue
        # Sessions that warp alike share one step: greedy ones all, sampled ones by params.
        params = SamplingParams() if round_.sampling.greedy else replace(round_.sampling, seed=None)
        groups.setdefault(params, []).append(b)
        if not params.greedy:
            positions = row_positions(round_.tree, round_.first)
            uniforms[b, : len(positions)] = torch.tensor(
                position_uniforms(round_.key, positions), dtype=torch.float64
            )
    targets = torch.zeros(batch, rows, dtype=torch.long, device=logits.device)
    uniforms = uniforms.to(logits.device, torch.float32)
    for params, members in groups.items():
        if len(members) == batch:  # the common case: no copy of the batch's logits
            targets = target_tokens(logits, params, uniforms)
            continue
        index = torch.tensor(members, device=logits.device)
        targets[index] = target_tokens(logits.index_select(0, index), params, uniforms[index])
    host = targets.tolist()  # the one device-to-host transfer
    out: list[Acceptance | Exception] = []
    for b, round_ in enumerate(rounds):
        size = round_.tree.size + 1
        try:
            if round_.uses_rejection:
                target = probs_from_logits(logits[b, :size], round_.sampling)
                out.append(verify_tree(round_.tree, target, round_.draft, round_.generator, False))
            elif min(host[b][:size]) < 0:
                raise ValueError("logits: not finite (overflow?) where this round needs them")
            else:
                out.append(accept_targets(round_.tree, host[b][:size]))
        except Exception as exc:  # noqa: BLE001 - returned to that session alone
            out.append(exc)
    return out


def target_tokens(
    logits: torch.Tensor, params: SamplingParams, uniforms: torch.Tensor | None
) -> torch.Tensor:
    """The target's own token at every row: logits (..., vocab) -> LongTensor (...).

    Greedy: the argmax (the first on ties). Otherwise inversion of the warped
    distribution's CDF at `uniforms` (..., on logits' device), one per row. -1 for a row
    whose logits are not finite (a half-precision overflow): no token is right there.
    No host sync.
    """
    if params.greedy:
        best, token = logits.max(-1)
        return token.masked_fill_(~torch.isfinite(best), -1)
    if uniforms is None:
        raise ValueError("uniforms: required when sampling")
    return sample_by_inversion(warped_weights(logits, params), uniforms)


def row_positions(tree: TokenTree, first: int) -> list[int]:
    """The absolute position each target row decides: row 0 the token at `first` (right
    after the committed text), row i + 1 the token after node i. Length tree.size + 1."""
    return [first, *(first + depth + 1 for depth in tree.depths())]


def accept_targets(tree: TokenTree, targets: Sequence[int]) -> Acceptance:
    """Position-keyed acceptance (module doc): targets[r] is the target's token at row r
    (row 0 after the committed text, row i + 1 after node i)."""
    if len(targets) != tree.size + 1:
        raise ValueError(f"targets: must have tree.size + 1 = {tree.size + 1} entries")
    nodes: list[int] = []
    node = -1
    while True:
        want = targets[node + 1]
        match = [child for child in tree.children(node) if tree.tokens[child] == want]
        if not match:
            break
        node = match[0]
        nodes.append(node)
    return Acceptance(
        nodes=tuple(nodes), tokens=tuple(tree.tokens[n] for n in nodes), bonus=targets[node + 1]
    )


def verify_tree(
    tree: TokenTree,
    target_probs: torch.Tensor,
    draft: Mapping[int, DraftDistribution] | None,
    generator: torch.Generator | None,
    greedy: bool,
) -> Acceptance:
    """Accept the longest path of `tree` that keeps the output distributed as the target.

    target_probs: (tree.size + 1, vocab), rows summing to 1 (e.g. from `probs_from_logits`);
        row 0 is the target after the last committed token, row i + 1 the target after node i.
    draft: for each node whose children were sampled, the distribution they were drawn from
        (without replacement, in tree order).  Nodes missing here had their children chosen
        deterministically.  Ignored when greedy, but still validated.
    generator: on target_probs' device; required unless greedy.  Greedy never touches it.
    """
    vocab = _check_target_probs(tree, target_probs)
    draft = draft or {}
    check_draft(tree, draft, vocab)
    if greedy:
        return accept_targets(tree, target_probs.argmax(dim=-1).tolist())
    if generator is None:
        raise ValueError("generator: required when greedy is False")
    uniforms = torch.rand(
        tree.size + 1, generator=generator, device=generator.device, dtype=torch.float64
    ).tolist()
    nodes: list[int] = []
    node = -1
    while True:
        target = _host_row(target_probs, node + 1)
        children = tree.children(node)
        proposal = _dense(draft[node], vocab) if node in draft else None
        accepted, target = verify_siblings(
            target,
            proposal,
            [tree.tokens[child] for child in children],
            [uniforms[child] for child in children],
        )
        if accepted is None:
            break
        node = children[accepted]
        nodes.append(node)
    return Acceptance(
        nodes=tuple(nodes),
        tokens=tuple(tree.tokens[n] for n in nodes),
        bonus=int(sample_by_inversion(target, torch.tensor(uniforms[-1]))),
    )


def verify_siblings(
    target: torch.Tensor,
    proposal: torch.Tensor | None,
    tokens: Sequence[int],
    uniforms: Sequence[float],
) -> tuple[int | None, torch.Tensor]:
    """Recursive rejection sampling over the siblings of one node (see the module doc).

    target: (vocab,) float64 on the host, the target p at the parent.
    proposal: (vocab,) float64, the draft q the siblings were drawn from without replacement,
        or None when they were chosen deterministically (point masses).
    tokens: the siblings x_1, x_2, ... in tree order; uniforms: one U[0, 1) per sibling.
    Returns (index of the accepted sibling, or None, and p' at that moment): when none is
    accepted, the recovered token is to be drawn from p'.  With no siblings, p' = p.
    """
    residual = target / target.sum()
    remaining = None if proposal is None else proposal.clone()
    for index, (token, uniform) in enumerate(zip(tokens, uniforms, strict=True)):
        if remaining is None:
            q_token = 1.0
            rejected = residual.clone()
            rejected[token] = 0.0  # max(0, p' - delta(token)) only loses `token`
        else:
            q = remaining / remaining.sum()
            q_token = float(q[token])
            rejected = torch.clamp(residual - q, min=0.0)
            remaining[token] = 0.0
        if uniform * q_token < float(residual[token]):
            return index, residual
        mass = float(rejected.sum())
        # mass == 0 needs p' == q_i, where acceptance was certain: reachable only by rounding.
        if mass > 0:
            residual = rejected / mass
    return None, residual


def _check_target_probs(tree: TokenTree, target_probs: torch.Tensor) -> int:
    if target_probs.dim() != 2 or target_probs.shape[0] != tree.size + 1:
        raise ValueError(
            f"target_probs: must have shape (tree.size + 1, vocab) = ({tree.size + 1}, vocab), "
            f"got {tuple(target_probs.shape)}"
        )
    vocab = target_probs.shape[1]
    for index, token in enumerate(tree.tokens):
        if not 0 <= token < vocab:
            raise ValueError(f"tree.tokens[{index}]: must be in [0, {vocab}), got {token}")
    return vocab


def check_draft(tree: TokenTree, draft: Mapping[int, DraftDistribution], vocab: int) -> None:
    for node, dist in draft.items():
        where = f"draft[{node}]"
        if dist.node != node:
            raise ValueError(f"{where}.node: must equal its key {node}, got {dist.node}")
        if not -1 <= node < tree.size:
            raise ValueError(f"{where}: node must be in [-1, {tree.size}), got {node}")
        if max(dist.tokens) >= vocab:
            raise ValueError(f"{where}.tokens: must be in [0, {vocab}), got {max(dist.tokens)}")
        support = set(dist.tokens)
        children = [tree.tokens[child] for child in tree.children(node)]
        if len(set(children)) != len(children):
            raise ValueError(f"{where}: children sampled without replacement must be distinct")
        outside = [token for token in children if token not in support]
        if outside:
            raise ValueError(f"{where}: children tokens {outside} are not in the support of q")


def _host_row(target_probs: torch.Tensor, row: int) -> torch.Tensor:
    return target_probs[row].to(device="cpu", dtype=torch.float64)


def _dense(dist: DraftDistribution, vocab: int) -> torch.Tensor:
    q = torch.zeros(vocab, dtype=torch.float64)
    q[list(dist.tokens)] = torch.tensor(dist.probs, dtype=torch.float64)
    return q
