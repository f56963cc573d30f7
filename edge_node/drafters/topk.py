"""Top-k trees grown by confidence (EAGLE-2, Li et al. 2024, arXiv:2406.16858).

Every node's score is the product of the draft probabilities along its path, an
estimate of the chance the verifier accepts it. Each level expands the `width` best
frontier nodes with their `width` most likely children; at the end the
`width * depth` best nodes of everything seen form the tree. Because a child never
scores above its parent, the best nodes always include their ancestors.

Example: width 2, depth 2, root children a (0.6) and b (0.3); a's children c (0.5)
and d (0.3), b's children e (0.9) and f (0.05). Scores: a .6, b .3, c .3, e .27,
d .18, f .015. The best 4 nodes: a, b, c, e: tree tokens (a, b, c, e), parents
(-1, -1, 0, 1).
"""

from __future__ import annotations

import torch

from edge_node.drafters import Draft, DraftShape, ancestors, paths_to_draft
from edge_node.slm import EdgeLM
from lm.sampling import SamplingParams


class TopKDrafter:
    def draft(
        self,
        lm: EdgeLM,
        shape: DraftShape,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft:
        width, depth = shape.width, shape.depth
        tokens: dict[int, int] = {}
        parents: dict[int, int] = {}
        score: dict[int, float] = {}

        def expand(parent_ids: list[int], logprobs: torch.Tensor) -> list[int]:
            """Adds each parent's `width` best children; returns the new node ids."""
            best, top = logprobs.topk(min(width, logprobs.shape[-1]), dim=-1)
            added = []
            for row, parent in enumerate(parent_ids):
                base = score[parent] if parent >= 0 else 0.0
                for s, t in zip(best[row].tolist(), top[row].tolist(), strict=True):
                    node = len(tokens)
                    tokens[node], parents[node], score[node] = t, parent, base + s
                    added.append(node)
            return added

        candidates = expand([-1], torch.log_softmax(lm.next_logits().float(), -1)[None])
        for _ in range(depth - 1):
            frontier = sorted(candidates, key=score.__getitem__, reverse=True)[:width]
            logits = lm.forward_nodes(
                frontier, [tokens[n] for n in frontier], [ancestors(n, parents) for n in frontier]
            )
            candidates = expand(frontier, torch.log_softmax(logits.float(), -1))
        best = sorted(score, key=lambda n: (-score[n], n))[: width * depth]
        keep = sorted({a for n in best for a in ancestors(n, parents)} | set(best))
        deepest = max(len(ancestors(n, parents)) for n in keep)
        best = max(
            (n for n in keep if len(ancestors(n, parents)) == deepest), key=score.__getitem__
        )
        return paths_to_draft(keep, tokens, parents, len(keep), best)
