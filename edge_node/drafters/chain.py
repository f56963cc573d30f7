"""A single chain of draft tokens.

Greedy requests draft the SLM's argmax chain. Sampled requests draw each token from
q, the SLM's distribution under the request's temperature and top-p, truncated to
its `Q_SUPPORT` most likely tokens; q is sent with the round on that support only,
so the verifier can run exact rejection sampling at a small wire cost.
"""

from __future__ import annotations

import torch

from edge_node.drafters import Draft, DraftShape
from edge_node.slm import EdgeLM
from lm.acceptance import DraftDistribution
from lm.sampling import SamplingParams, probs_from_logits, sample
from lm.tree import TokenTree

Q_SUPPORT = 16


class ChainDrafter:
    def draft(
        self,
        lm: EdgeLM,
        shape: DraftShape,
        sampling: SamplingParams,
        generator: torch.Generator | None,
    ) -> Draft:
        q_params = SamplingParams(
            temperature=sampling.temperature,
            top_k=min(sampling.top_k or Q_SUPPORT, Q_SUPPORT, lm.vocab_size),
            top_p=sampling.top_p,
        )
        logits = lm.next_logits()
        tokens: list[int] = []
        dists: dict[int, DraftDistribution] = {}
        for depth in range(shape.depth):
            if depth:
                logits = lm.forward_nodes([depth - 1], [tokens[-1]], [list(range(depth - 1))])[0]
            if sampling.greedy:
                tokens.append(int(logits.argmax()))
                continue
            q = probs_from_logits(logits.float(), q_params)
            token = int(sample(q, generator))
            support = torch.nonzero(q).flatten().tolist()
            dists[depth - 1] = DraftDistribution(
                node=depth - 1, tokens=tuple(support), probs=tuple(q[support].tolist())
            )
            tokens.append(token)
        tree = TokenTree.chain(tokens)
        return Draft(
            tree=tree,
            dists=dists,
            node_ids=tuple(range(len(tokens))),
            undeduplicated=len(tokens),
            main_path=tuple(range(len(tokens))),
        )
