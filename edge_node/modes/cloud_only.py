"""`cloud_only`, the baseline: the verifier decodes and streams (server-side,
`VerifierSession.decode`): one request, the round trip paid once, not per token. A
failover reopens with the history and asks for the rest; stopping early cancels the
verifier's decoding."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from protocol.errors import EdgecloudError
from protocol.types import Chunk

if TYPE_CHECKING:
    from edge_node.generation import Generation


async def run(g: Generation) -> AsyncIterator[Chunk]:
    link = g.connection
    retried = False
    while not g.out.done:
        if link.session is None:
            await link.open(g.lm.tokens, wait=True)
        want = g.out.max_tokens - len(g.out.tokens)
        room = link.room()
        if room is not None:
            want = min(want, room + 1)  # tokens the verifier's context still takes
        stream = link.session.decode(want)
        received = 0
        try:
            while received < want and not g.out.done:
                timeout = link.remaining(link.round_timeout_s)
                result = await asyncio.wait_for(anext(stream), timeout)
                received += 1
                g.counters.count_round(None, result)
                g.lm.append([result.bonus_token])
                yield g.out.emit([result.bonus_token], verified=True)
        except EdgecloudError:
            raise
        except Exception as error:
            retried = await link.recover(error, retried)  # closes the session
        finally:
            await stream.aclose()
            # Done early (end of sequence, a stop string; the caller may close this
            # generator at the yield): cancel what the verifier is still decoding.
            if received < want and link.session is not None:
                await link.close(failed=True)
