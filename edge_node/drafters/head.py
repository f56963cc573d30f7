"""Drafts from ReDrafter's recurrent head (`lm.draft_head`, arXiv:2403.09919) instead of
the SLM: beam search over a tiny network fed the target's hidden state.

The verifier sends, with every reply, the target's final-norm hidden state h at the
position whose distribution gave the bonus token b (`RoundResult.hidden`); the head
drafts the tokens after b from (h, b). Each round therefore needs the previous reply,
so head drafts cannot be made ahead (pipelining), and the first round needs the
hidden state of the session's opening (`SessionOpened.hidden`).

The draft is deterministic given (h, b), so, like the SLM's beam drafts, it carries
no proposal distributions: the verifier treats each child as a point mass, which
keeps sampling exact (lm/acceptance.py).

The SLM is not touched: its cache has no entries for head drafts, so `Draft.node_ids`
are negative ids that `EdgeLM.accept` does not find, and the accepted tokens wait in
the SLM's history until something needs the SLM again (`EdgeLM.next_logits` forwards
every pending token in one pass).
"""

from __future__ import annotations

from edge_node.drafters import Draft, DraftContext, DraftShape
from lm.draft_head import DraftHead


class HeadSource:
    name = "head"
    pipelines = False
    needs_hidden = True

    def __init__(self, head: DraftHead) -> None:
        self.head = head

    @property
    def hidden_size(self) -> int:
        """Elements of the hidden state it reads (the target's width)."""
        return self.head.config.hidden_size

    def draft(self, context: DraftContext, shape: DraftShape) -> Draft:
        """From `context.hidden`, (hidden_size,), the target's state before the
        history's last token (the bonus token)."""
        result = self.head.beam_search(
            context.hidden, context.lm.tokens[-1], width=shape.width, depth=shape.depth
        )
        return Draft(
            tree=result.tree,
            dists={},
            node_ids=tuple(-1 - i for i in range(result.tree.size)),
            undeduplicated=result.undeduplicated,
            main_path=result.main_path,
            drafter=self.name,
        )
