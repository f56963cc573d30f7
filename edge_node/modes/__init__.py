"""One module per mode, each `run(generation) -> AsyncIterator[Chunk]`, chosen by
`MODES`: the loop that decides each token. What they share (the SLM, the draft
sources, the verifier connection, the output and the counters) is `Generation`'s."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from edge_node.modes import adaptive, cloud_only, edge_only, lossless
from protocol.types import Chunk, Mode

if TYPE_CHECKING:
    from edge_node.generation import Generation

MODES: dict[Mode, Callable[[Generation], AsyncIterator[Chunk]]] = {
    Mode.LOSSLESS: lossless.run,
    Mode.ADAPTIVE: adaptive.run,
    Mode.EDGE_ONLY: edge_only.run,
    Mode.CLOUD_ONLY: cloud_only.run,
}
