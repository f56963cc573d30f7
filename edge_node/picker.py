"""Where the edge's verifier sessions go.

A `VerifierPicker` names the next verifier to try, skipping the ones that just
failed. The default walks a fixed list; the orchestrator supplies one backed by
its Redis registry (least loaded live verifier, with session affinity).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class VerifierEndpoint:
    address: str  # host:port
    model: str


class VerifierPicker(Protocol):
    async def pick(self, session_id: str, exclude: frozenset[str]) -> VerifierEndpoint | None:
        """A verifier not in `exclude` (addresses), or None when there is none."""
        ...

    async def release(self, session_id: str, endpoint: VerifierEndpoint) -> None:
        """The session no longer uses `endpoint`."""
        ...

    async def close(self) -> None:
        """Frees what the picker holds (connections, background tasks)."""
        ...


class FixedListPicker:
    """Round-robin over a fixed list, so sessions spread and failover moves on."""

    def __init__(self, endpoints: Sequence[VerifierEndpoint]) -> None:
        self.endpoints = list(endpoints)
        self._next = itertools.cycle(range(len(self.endpoints))) if endpoints else None

    async def pick(self, session_id: str, exclude: frozenset[str]) -> VerifierEndpoint | None:
        if self._next is None:
            return None
        for _ in range(len(self.endpoints)):
            endpoint = self.endpoints[next(self._next)]
            if endpoint.address not in exclude:
                return endpoint
        return None

    async def release(self, session_id: str, endpoint: VerifierEndpoint) -> None:
        return None

    async def close(self) -> None:
        return None
