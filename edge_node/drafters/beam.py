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

import torch

from edge_node.drafters import Draft, DraftShape, ancestors, paths_to_draft
from edge_node.slm import EdgeLM
from lm.draft_head import extend_beams
from lm.sampling import SamplingParams


class BeamDrafter:
    def draft(
        self,
        lm: EdgeLM,
        shape: DraftShape,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft:
        tokens: dict[int, int] = {}
        parents: dict[int, int] = {}
        logits = lm.next_logits().float()[None]
        beams = torch.empty((1, 0), dtype=torch.long, device=logits.device)
        scores = torch.zeros(1, device=logits.device)
        frontier, greedy = [-1], 0
        for level in range(shape.depth):
            if level:
                paths = [ancestors(n, parents) for n in frontier]
                logits = lm.forward_nodes(frontier, [tokens[n] for n in frontier], paths).float()
            rows, beams, scores, greedy = extend_beams(
                beams, scores, greedy, torch.log_softmax(logits, -1), shape.width
            )
            new_frontier = []
            for row, token in zip(rows.tolist(), beams[:, -1].tolist(), strict=True):
                node = len(tokens)
                tokens[node], parents[node] = token, frontier[row]
                new_frontier.append(node)
            frontier = new_frontier
        keep = sorted({a for n in frontier for a in ancestors(n, parents)} | set(frontier))
        return paths_to_draft(keep, tokens, parents, len(frontier) * shape.depth, frontier[greedy])
