"""`lossless`: every token verified. Per round:

    draft a tree (a draft source, in a worker thread) -> send it -> accept path + bonus
    -> keep the accepted path's cache entries -> stream the tokens

With pipelining (greedy, a source that drafts from the history alone), the next round
is drafted in a spare SLM view while this one is verified, assuming this one's main
path and the SLM's own next token are accepted; when they are, that draft goes next
and its time is hidden behind the round trip.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from edge_node.drafters import Draft, DraftContext
from edge_node.slm import EdgeLM
from protocol.types import Chunk
from protocol.v1 import verification_pb2 as pb

if TYPE_CHECKING:
    from edge_node.generation import Generation


@dataclass(frozen=True)
class _Speculation:
    """The next round drafted ahead, valid if the verifier accepts `path` then `bonus`."""

    path: tuple[int, ...]
    bonus: int
    draft: Draft
    previous: EdgeLM  # the view it was forked from: the next spare if adopted
    draft_ms: float  # what drafting it took, hidden behind the verification

    def matches(self, result: pb.RoundResult) -> bool:
        return tuple(result.accepted_nodes) == self.path and result.bonus_token == self.bonus


async def run(g: Generation) -> AsyncIterator[Chunk]:
    pipeline = g.generator is None and g.request.draft.pipeline
    spare = g.lm.spare() if pipeline else None
    # Open before drafting: the verifier's max_tree_nodes bounds round one too, and the
    # head drafts round one from the hidden state the opening returns.
    await g.connection.open(g.lm.tokens, wait=True)
    draft = await g.draft(g.pick())
    while not g.out.done:
        draft = g.connection.fit(draft)
        verify = asyncio.ensure_future(g.connection.round(draft))
        speculation = None
        ahead = g.choice.may_speculate() if spare is not None else None
        if ahead is not None and g.last_draft_ms < g.connection.last_round_ms:
            # The thread owns the SLM until it returns, so wait for it before `verify`.
            speculation = await g.in_thread(_speculate, g, draft, spare, ahead)
        sent, result = await verify
        # A failover may have cut the draft to another verifier's limits: a
        # speculation made from the uncut one no longer applies.
        if speculation is not None and sent is draft and speculation.matches(result):
            yield g.accept(draft, result, adopt=spare)
            spare = speculation.previous
            name = g.pick()  # this reply may have made `auto` prefer another source
            if name == ahead:
                draft, g.last_draft_ms = speculation.draft, speculation.draft_ms
                g.counters.pipelined_rounds += 1
            elif not g.out.done:
                draft = await g.draft(name)
            continue
        yield g.accept(sent, result)
        if not g.out.done:
            draft = await g.draft(g.pick())


def _speculate(g: Generation, draft: Draft, spare: EdgeLM, name: str) -> _Speculation:
    """Drafts the round after `draft` with source `name` in `spare`, assuming its main
    path is accepted and followed by the SLM's own next token (runs in the worker
    thread)."""
    path = draft.main_path
    g.lm.fork(spare, [draft.tree.tokens[i] for i in path], [draft.node_ids[i] for i in path])
    bonus = int(spare.next_logits().argmax())
    spare.append([bonus])
    start = time.perf_counter()
    context = DraftContext(spare, None, g.request.sampling, None)
    following = g.draft_with(name, context)
    draft_ms = (time.perf_counter() - start) * 1000
    g.counters.draft_ms += draft_ms
    return _Speculation(tuple(path), bonus, following, previous=g.lm, draft_ms=draft_ms)
