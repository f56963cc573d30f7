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
it replaces the worst of them, so the tree always holds the chain drafter's path,
and that path is the draft's main path (what pipelining assumes is accepted).
"""

from __future__ import annotations

import torch

from edge_node.drafters import Draft, DraftShape, ancestors, paths_to_draft
from edge_node.slm import EdgeLM
from lm.sampling import SamplingParams


class BeamDrafter:
    def draft(
        self,
        lm: EdgeLM,
        shape: DraftShape,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft:
        width, depth = shape.width, shape.depth
        logprobs = torch.log_softmax(lm.next_logits().float(), -1)
        scores, top = logprobs.topk(min(width, lm.vocab_size))
        tokens: dict[int, int] = {}
        parents: dict[int, int] = {}
        score: dict[int, float] = {}
        frontier = []
        for s, t in zip(scores.tolist(), top.tolist(), strict=True):
            node = len(tokens)
            tokens[node], parents[node], score[node] = t, -1, s
            frontier.append(node)
        greedy = frontier[0]
        for _ in range(depth - 1):
            logits = lm.forward_nodes(
                frontier, [tokens[n] for n in frontier], [ancestors(n, parents) for n in frontier]
            )
            totals = (
                torch.log_softmax(logits.float(), -1)
                + torch.tensor([score[n] for n in frontier], device=logits.device)[:, None]
            )
            best, flat = totals.flatten().topk(width)
            vocab = totals.shape[-1]
            row = frontier.index(greedy)
            greedy_flat = row * vocab + int(totals[row].argmax())
            picks = list(zip(best.tolist(), flat.tolist(), strict=True))
            if greedy_flat not in flat.tolist():
                picks[-1] = (float(totals[row, greedy_flat % vocab]), greedy_flat)
            new_frontier = []
            for s, f in picks:
                node = len(tokens)
                tokens[node], parents[node], score[node] = f % vocab, frontier[f // vocab], s
                new_frontier.append(node)
                if f == greedy_flat:
                    greedy = node
            frontier = new_frontier
        keep = sorted({a for n in frontier for a in ancestors(n, parents)} | set(frontier))
        return paths_to_draft(keep, tokens, parents, len(frontier) * depth, greedy)
