"""The edge's verifier picker backed by the Redis registry.

Each pick takes a slot on the least loaded live verifier of the model (power of two
choices, session affinity first) with a lease; the lease is renewed while the
session lives and released when it ends, so a crashed edge's slots come back after
one lease TTL.
"""

from __future__ import annotations

import asyncio
import contextlib

from edge_node.picker import VerifierEndpoint
from orchestrator.placement import AsyncPlacement, Lease, PlacementConfig, RegistryUnavailable
from orchestrator.registry import connect_async


class RegistryPicker:
    def __init__(
        self,
        redis_url: str,
        model: str,
        *,
        config: PlacementConfig = PlacementConfig(),
        labels: dict[str, str] | None = None,
    ) -> None:
        self.placement = AsyncPlacement(connect_async(redis_url), config=config)
        self.model = model
        self.labels = dict(labels or {})
        self._leases: dict[str, Lease] = {}
        # Address -> node id of every verifier a pick returned: `exclude` names addresses
        # of verifiers that just failed, whose leases are already released.
        self._node_ids: dict[str, str] = {}
        self._renewer: asyncio.Task | None = None

    async def pick(self, session_id: str, exclude: frozenset[str]) -> VerifierEndpoint | None:
        """`exclude` holds addresses; the registry excludes by node id, so map them."""
        excluded_ids = {self._node_ids[a] for a in exclude if a in self._node_ids}
        try:
            lease = await self.placement.pick(
                "cloud",
                self.model,
                labels=self.labels or None,
                session_id=session_id,
                exclude=excluded_ids,
            )
        except RegistryUnavailable:
            return None  # as with no verifier: the edge waits for one within the deadline
        if lease is None or lease.address in exclude:
            if lease is not None:
                await self.placement.release(lease)
            return None
        self._leases[session_id] = lease
        self._node_ids[lease.address] = lease.node_id
        if self._renewer is None:
            self._renewer = asyncio.create_task(self._renew_forever())
        return VerifierEndpoint(lease.address, lease.model)

    async def release(self, session_id: str, endpoint: VerifierEndpoint) -> None:
        lease = self._leases.pop(session_id, None)
        if lease is not None:
            await self.placement.release(lease)

    async def close(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        await self.placement.aclose()

    async def _renew_forever(self) -> None:
        interval = self.placement.config.lease_ttl_s / 3
        while True:
            await asyncio.sleep(interval)
            for session_id, lease in list(self._leases.items()):
                with contextlib.suppress(Exception):
                    renewed = await self.placement.renew(lease)
                    if renewed is not None and session_id in self._leases:
                        self._leases[session_id] = renewed
