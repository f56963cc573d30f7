"""`edge_only`: the SLM alone; every token goes out unverified."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from protocol.types import Chunk

if TYPE_CHECKING:
    from edge_node.generation import Generation


async def run(g: Generation) -> AsyncIterator[Chunk]:
    while not g.out.done:
        token, _ = await g.local_token()
        g.lm.append([token])
        yield g.out.emit([token], verified=False)
