"""Beam-search drafts, deduplicated into a token tree (ReDrafter's dynamic tree
attention, Cheng et al. 2024, arXiv:2403.09919).

Beam search keeps the `width` best partial sequences by summed log-probability for
`depth` steps. The final beams usually share prefixes; the tree holds each shared
prefix once, so the verifier scores fewer nodes than width * depth.

Example: width 2, depth 3, final beams [5, 7, 9] and [5, 7, 2] give the tree
tokens (5, 7, 9, 2), parents (-1, 0, 1, 1): 4 nodes instead of 6.

One beam is protected: the SLM's greedy chain. Plain beam search can drop it for
paths whose later tokens score higher together, yet a greedy verifier accepts
exactly the tokens that match its argmax, which the draft's own argmax chain
predicts best. When the greedy continuation is not among a level's `width` best,
it replaces the worst of them (`lm.draft_head.extend_beams`, shared with the recurrent
head's beam search), so the tree always holds the chain drafter's path,
and that path is the draft's main path (what pipelining assumes is accepted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from edge_node.drafters import Draft, DraftShape, ancestors, paths_to_draft
from edge_node.slm import EdgeLM
from lm.draft_head import extend_beams
from lm.sampling import SamplingParams


@dataclass(frozen=True)
class BeamGrowth:
    """Every level of one beam search. Beam search extends its beams level by level and
    never revisits a level, so the search cut after `d` levels is the depth-`d` search:
    `draft(d)` is what drafting at depth d gives (the fleet emulator's draft book keeps
    one growth per width and drafts any depth from it)."""

    tokens: tuple[int, ...]  # (nodes,) node id -> token, level by level
    parents: tuple[int, ...]  # (nodes,) node id -> parent node id, -1 below the history
    levels: tuple[int, ...]  # beams per level: level l holds the next levels[l] node ids
    greedy: tuple[int, ...]  # per level, the beam (index within the level) of the chain

    def draft(self, depth: int) -> Draft:
        """The depth-`depth` draft: the beams of that level with their ancestors,
        deduplicated (the beams' shared prefixes are nodes they share)."""
        if not 1 <= depth <= len(self.levels):
            raise ValueError(f"depth: must be in [1, {len(self.levels)}], got {depth}")
        start = sum(self.levels[: depth - 1])
        frontier = range(start, start + self.levels[depth - 1])
        parents = dict(enumerate(self.parents))
        keep = sorted({a for n in frontier for a in ancestors(n, parents)} | set(frontier))
        return paths_to_draft(
            keep,
            dict(enumerate(self.tokens)),
            parents,
            len(frontier) * depth,
            frontier[self.greedy[depth - 1]],
        )


class BeamDrafter:
    def draft(
        self,
        lm: EdgeLM,
        shape: DraftShape,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft:
        return self.grow(lm, shape).draft(shape.depth)

    def grow(self, lm: EdgeLM, shape: DraftShape) -> BeamGrowth:
        """`shape.depth` levels of beam search below `lm`'s history, in its cache."""
        tokens: list[int] = []
        parents: list[int] = []
        levels: list[int] = []
        greedy_rows: list[int] = []
        logits = lm.next_logits().float()[None]
        beams = torch.empty((1, 0), dtype=torch.long, device=logits.device)
        scores = torch.zeros(1, device=logits.device)
        frontier, greedy = [-1], 0
        for level in range(shape.depth):
            if level:
                parent_of = dict(enumerate(parents))
                paths = [ancestors(n, parent_of) for n in frontier]
                logits = lm.forward_nodes(frontier, [tokens[n] for n in frontier], paths).float()
            rows, beams, scores, greedy = extend_beams(
                beams, scores, greedy, torch.log_softmax(logits, -1), shape.width
            )
            new_frontier = []
            for row, token in zip(rows.tolist(), beams[:, -1].tolist(), strict=True):
                new_frontier.append(len(tokens))
                tokens.append(token)
                parents.append(frontier[row])
            frontier = new_frontier
            levels.append(len(frontier))
            greedy_rows.append(greedy)
        return BeamGrowth(tuple(tokens), tuple(parents), tuple(levels), tuple(greedy_rows))
