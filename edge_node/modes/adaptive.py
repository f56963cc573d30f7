"""`adaptive`: confident edge tokens go out unverified and reach the verifier as
`new_tokens` with the next escalated round; the rest is drafted and verified. Without
a verifier it carries on alone; when one answers again, the unverified span is checked
in catch-up rounds, and where the cloud disagrees a rollback chunk replaces the tail.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from edge_node.cloud_link import NoVerifier, Verdict, verdict
from edge_node.connection import ContextFull
from lm.tree import TokenTree
from protocol.errors import EdgecloudError
from protocol.types import Chunk

if TYPE_CHECKING:
    from edge_node.generation import Generation

log = logging.getLogger(__name__)

# Without a verifier: try to reconnect after this many local tokens.
RECONNECT_EVERY_TOKENS = 8


async def run(g: Generation) -> AsyncIterator[Chunk]:
    unseen: list[int] = []  # tokens the open session has not been sent yet
    offline_from: int | None = None  # history index where the outage began
    since_retry = 0
    while not g.out.done:
        if offline_from is not None and since_retry >= RECONNECT_EVERY_TOKENS:
            since_retry = 0
            async for chunk in _catch_up(g, offline_from):
                yield chunk
            if g.connection.session is not None:
                offline_from, unseen = None, []
            continue
        token, confidence = await g.local_token()
        if offline_from is not None or confidence >= g.request.adaptive_threshold:
            g.lm.append([token])
            unseen.append(token)
            since_retry += 1
            yield g.out.emit([token], verified=False)
            continue
        draft = g.connection.fit(await g.draft())
        try:
            draft, result = await g.connection.round(draft, new_tokens=unseen, wait=False)
        except NoVerifier:
            g.counters.degraded = True
            offline_from = len(g.lm.tokens) - len(unseen)
            continue
        unseen = []
        yield g.accept(draft, result)


async def _catch_up(g: Generation, start: int) -> AsyncIterator[Chunk]:
    """Verifies history[start:] (made while offline) in chain rounds; on the first
    disagreement rolls the output back and continues from the cloud's token."""
    link = g.connection
    try:
        await link.open(g.lm.tokens[:start], wait=False)
    except NoVerifier:
        return
    pos = start
    while pos < len(g.lm.tokens):
        room = link.room(history=pos)
        size = link.max_tree_nodes if room is None else min(link.max_tree_nodes, room)
        piece = g.lm.tokens[pos : pos + size]  # none when room is 0: the bonus checks one
        try:
            result = await link.verify(TokenTree.chain(piece), {})
        except EdgecloudError:
            raise
        except Exception as error:  # the same policy as a round, with no resend
            if verdict(error) is Verdict.LENGTH:
                raise ContextFull from error
            log.warning("catch-up failed; still offline", extra={"session": g.session_id})
            await link.close(failed=True)
            return
        g.counters.count_round(None, result)
        pos += len(result.accepted_tokens)
        if pos < len(g.lm.tokens) and g.lm.tokens[pos] == result.bonus_token:
            pos += 1
            continue
        if pos < len(g.lm.tokens):
            g.counters.rollbacks += 1
            rollback = g.out.rollback(pos - len(g.request.prompt_tokens))
            g.lm.truncate(pos)
            g.lm.append([result.bonus_token])
            yield g.out.emit([result.bonus_token], verified=True, rollback=rollback)
            return
        g.lm.append([result.bonus_token])
        yield g.out.emit([result.bonus_token], verified=True)
        return
