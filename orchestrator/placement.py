"""The router's Redis side: pick a node and take a slot on it, release it, renew it.

Layout (prefix `P`, see `orchestrator.registry.Keyspace`):

- `P:load:<kind>:<model>[:<k=v,...>]` sorted sets of node ids scored by
  **utilisation = live leases / capacity**. A node is in one set per model it serves and per
  subset of its routing labels, so a pick restricted to a model and labels reads exactly one
  set. Scoring by utilisation (not by lease count) compares nodes of different capacity and
  makes "has a free slot" the score range [0, 1).
  Why one set per label subset instead of scanning the low-utilisation end and filtering:
  a selective filter (one region of fifty) would have to scan past arbitrarily many
  non-matching nodes, or stop early and wrongly answer "none". The subsets cost 2**L score
  updates per lease change (L <= 4 routing labels; 4 with region and tier) and make every
  filter exact and O(log N).
- `P:leases:<node>` sorted set of lease ids scored by expiry (ms, Redis clock). Its size is
  the node's load. `P:lease-due` indexes nodes by their oldest lease expiry, so that the
  scripts find expired leases without scanning.
- `P:session:<session>` the node a session is bound to, with a TTL (affinity).
- `P:events` stream of join / leave / expire / failover.

The pick (orchestrator/lua/pick.lua) runs atomically in Redis, so concurrent routers never
push a node over capacity:

1. bounded sweep: up to `sweep_batch` expired nodes are removed (event 'expire') and up to
   `sweep_batch` nodes with an overdue lease get their slots back;
2. affinity: the node the session is bound to, if it is still in the set, alive, not in
   `exclude` and below capacity;
3. otherwise power of two choices: `ZRANGEBYSCORE set -inf (1 LIMIT 0 window` gives the
   `window` least utilised nodes with a free slot; they are sampled without replacement until
   two are confirmed eligible, and the less utilised of the two wins. Confirming a node
   prunes its expired leases first; a node whose hash is gone (heartbeat expired) is removed
   from the sets there and then, never picked. The cost is O(log N + window): the fleet size
   only enters through the sorted-set lookups.
4. take: add the lease, raise the node's score in all its sets, bind the session; if the
   session was bound elsewhere, emit 'failover' with the reason.

Release removes the lease and lowers the score. A lease whose holder died is never
released: it expires after `lease_ttl_s`, and the next script that meets it (a pick that
considers the node, the node's own heartbeat, or any sweep through `lease-due`) gives the
slot back. A holder that is alive and needs longer calls `renew`; renewing a lease Redis
lost (a Redis restart) takes the slot again, so the load figures heal as holders renew.

Worked example (capacity 2 each, lease TTL 30 s; times are Redis ms):

    t=0      v1, v2 register        load:cloud:m = {v1: 0.0, v2: 0.0}
    t=1000   pick(session s1)       window [v1, v2], both 0.0: P2C takes the first sampled,
                                    say v1; lease L1
                                    leases:v1 = {L1: 31000}, lease-due = {v1: 31000}
                                    load:cloud:m = {v2: 0.0, v1: 0.5}, session:s1 = v1
    t=2000   pick(session s1)       affinity -> v1 (L2); v1 at 1.0 leaves the [0, 1) range
    t=3000   pick(session s2)       window [v2] -> v2 (L3)
             the process holding L1 and L2 crashes: nothing is released
    t=4000   pick(session s1)       v1 is full (1.0), affinity fails -> v2 (L4), 'failover'
                                    event {session s1, from v1, to v2, reason full}
    t=31000  any pick or heartbeat  lease-due says v1 is due: L1 pruned; at 32000 L2 too,
                                    load:cloud:m v1 -> 0.0

`tests/orchestrator/test_placement.py::test_worked_example` replays this example.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import redis
import redis.asyncio

from orchestrator.registry import (
    AnyRedis,
    Keyspace,
    NodeKind,
    check_client,
    check_node_id,
    check_positive,
    load_scripts,
    seconds_to_ms,
)

_SCRIPTS = ("pick", "release", "renew")


@dataclass(frozen=True)
class PlacementConfig:
    lease_ttl_s: float = 30.0
    """A slot whose holder neither releases nor renews it comes back after this long."""
    affinity_ttl_s: float = 600.0
    """How long a session stays bound to its node after its last pick."""
    window: int = 8
    """Power of two choices samples among this many least utilised nodes (1: least utilised
    wins; larger spreads ties over more nodes)."""
    outage_memory_s: float = 300.0
    """While Redis is unreachable, `AsyncPlacement` falls back on the nodes its picks
    returned within this long."""

    def __post_init__(self) -> None:
        check_positive("lease_ttl_s", self.lease_ttl_s)
        check_positive("affinity_ttl_s", self.affinity_ttl_s)
        check_positive("outage_memory_s", self.outage_memory_s)
        if (
            isinstance(self.window, bool)
            or not isinstance(self.window, int)
            or not (1 <= self.window <= 1024)
        ):
            raise ValueError(f"window: must be an int in [1, 1024], got {self.window!r}")


@dataclass(frozen=True)
class Lease:
    """One slot taken on one node; give it back with `release`."""

    lease_id: str
    node_id: str
    address: str
    kind: NodeKind
    model: str
    load: int
    """Leases on the node right after this one was taken."""
    capacity: int
    expires_at_ms: int
    """Redis server time after which the slot comes back unless renewed."""
    affinity: bool
    """True when the session's existing binding was honoured, False for a fresh choice."""
    outage: bool = False
    """Handed out from memory while Redis was unreachable: the slot is not counted there
    until a `renew` takes it again (renew re-takes leases Redis does not hold)."""


class RegistryUnavailable(Exception):
    """Redis cannot be reached and no node of the kind asked for was seen before."""


@dataclass(frozen=True)
class _PickCall:
    """The arguments of one pick.lua call, and what the reply needs to become a Lease."""

    keys: list[str]
    args: list[object]
    lease_id: str
    kind: NodeKind
    model: str


class _PlacementBase:
    def __init__(
        self,
        client: AnyRedis,
        keyspace: Keyspace | None,
        config: PlacementConfig,
        rng: random.Random | None,
    ) -> None:
        check_client(client)
        self.keyspace = keyspace or Keyspace()
        self.config = config
        self._client = client
        self._rng = rng or random.Random()
        self._scripts = load_scripts(client, _SCRIPTS)

    def _pick_call(
        self,
        kind: NodeKind,
        model: str,
        labels: Mapping[str, str] | None,
        session_id: str | None,
        exclude: Iterable[str],
    ) -> _PickCall:
        key = self.keyspace.route_key(kind, model, labels or {})
        if session_id is not None:
            check_node_id("session_id", session_id)
        if isinstance(exclude, str):
            raise ValueError(f"exclude: must be a collection of node ids, got {exclude!r}")
        excluded = [check_node_id("exclude", node_id) for node_id in exclude]
        lease_id = uuid.uuid4().hex
        args = [
            *self.keyspace.script_args(),
            lease_id,
            seconds_to_ms("lease_ttl_s", self.config.lease_ttl_s),
            session_id or "",
            seconds_to_ms("affinity_ttl_s", self.config.affinity_ttl_s),
            self._rng.getrandbits(31),
            self.config.window,
            *excluded,
        ]
        return _PickCall([key], args, lease_id, kind, model)

    @staticmethod
    def _lease(call: _PickCall, reply: list[str] | None) -> Lease | None:
        if not reply:
            return None
        node_id, address, load, capacity, expiry, how = reply
        return Lease(
            lease_id=call.lease_id,
            node_id=node_id,
            address=address,
            kind=call.kind,
            model=call.model,
            load=int(load),
            capacity=int(capacity),
            expires_at_ms=int(expiry),
            affinity=how == "affinity",
        )

    def _lease_args(self, lease: Lease, *extra: object) -> list[object]:
        if not isinstance(lease, Lease):
            raise ValueError(f"lease: must be a Lease, got {lease!r}")
        return [*self.keyspace.script_args(), lease.node_id, lease.lease_id, *extra]

    def _renew_args(self, lease: Lease) -> list[object]:
        return self._lease_args(lease, seconds_to_ms("lease_ttl_s", self.config.lease_ttl_s))

    @staticmethod
    def _renewed(lease: Lease, reply: list[str] | None) -> Lease | None:
        if not reply:
            return None
        # Renewed in Redis, the slot is counted again, even if it was handed out in an outage.
        return replace(lease, expires_at_ms=int(reply[0]), load=int(reply[1]), outage=False)


class Placement(_PlacementBase):
    """Pick / release / renew over a synchronous client. Holds no state besides the RNG."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        keyspace: Keyspace | None = None,
        config: PlacementConfig = PlacementConfig(),
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(client, keyspace, config, rng)

    def pick(
        self,
        kind: NodeKind,
        model: str,
        *,
        labels: Mapping[str, str] | None = None,
        session_id: str | None = None,
        exclude: Iterable[str] = (),
    ) -> Lease | None:
        """Takes a slot on a live node of `kind` serving `model` whose labels include `labels`.

        With `session_id`, prefers the node the session is bound to and (re)binds it to the
        chosen node. `exclude` lists nodes the caller saw fail; a session bound to one of them
        fails over (event 'failover'). Returns None when every such node is at capacity or
        there is none; the caller decides whether to wait, degrade or fail.
        """
        call = self._pick_call(kind, model, labels, session_id, exclude)
        return self._lease(call, self._scripts["pick"](keys=call.keys, args=call.args))

    def release(self, lease: Lease) -> bool:
        """Gives the slot back; False when it already was (released, expired, node gone)."""
        return self._scripts["release"](args=self._lease_args(lease)) == 1

    def renew(self, lease: Lease) -> Lease | None:
        """Extends the lease by `lease_ttl_s` from now, and returns it with the new expiry.

        A lease Redis no longer has (it expired, or Redis restarted empty) is taken again if
        its node has room, so holders that renew every `lease_ttl_s / 3` rebuild the load
        after a Redis restart. None when the node is gone, or the lease lost and the node full:
        the holder should then finish or move its session.
        """
        return self._renewed(lease, self._scripts["renew"](args=self._renew_args(lease)))

    def session_node(self, session_id: str) -> str | None:
        """The node `session_id` is bound to, if the binding has not expired."""
        return self._client.get(self.keyspace.session_key(check_node_id("session_id", session_id)))

    def end_session(self, session_id: str) -> None:
        """Drops the session's binding (its leases are released separately)."""
        self._client.delete(self.keyspace.session_key(check_node_id("session_id", session_id)))


class AsyncPlacement(_PlacementBase):
    """`Placement` over a `redis.asyncio` client; same methods, awaited.

    It also rides out a registry outage, which the serving path must not notice: it
    remembers the nodes its picks returned, and while Redis is unreachable `pick` hands
    out `outage` leases on them round-robin (respecting `exclude`), `release` forgets
    them, and the holders' periodic `renew` turns them into counted slots once Redis is
    back. A node that died during the outage fails its first call, and callers move
    on as after any failure. Only with no node remembered does `pick` raise
    `RegistryUnavailable`.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis,
        *,
        keyspace: Keyspace | None = None,
        config: PlacementConfig = PlacementConfig(),
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(client, keyspace, config, rng)
        # (kind, model, labels) -> node id -> (monotonic time, the last lease a pick returned).
        self._seen: dict[tuple, dict[str, tuple[float, Lease]]] = {}
        self._turn = 0

    async def pick(
        self,
        kind: NodeKind,
        model: str,
        *,
        labels: Mapping[str, str] | None = None,
        session_id: str | None = None,
        exclude: Iterable[str] = (),
    ) -> Lease | None:
        exclude = set(exclude)
        call = self._pick_call(kind, model, labels, session_id, exclude)
        seen = self._seen.setdefault((kind, model, tuple(sorted((labels or {}).items()))), {})
        try:
            reply = await self._scripts["pick"](keys=call.keys, args=call.args)
        except redis.AuthenticationError:
            raise  # a refused password is a configuration error, not an outage
        except (redis.ConnectionError, redis.TimeoutError) as error:
            recent = time.monotonic() - self.config.outage_memory_s
            live = {node: lease for node, (at, lease) in seen.items() if at >= recent}
            candidates = [lease for node, lease in live.items() if node not in exclude]
            if not live:
                raise RegistryUnavailable(f"registry unreachable ({error})") from error
            if not candidates:
                return None
            self._turn += 1
            chosen = candidates[self._turn % len(candidates)]
            return replace(chosen, lease_id=call.lease_id, affinity=False, outage=True)
        lease = self._lease(call, reply)
        if lease is not None:
            seen[lease.node_id] = (time.monotonic(), lease)
        return lease

    async def aclose(self) -> None:
        """Closes the Redis client this placement was given."""
        await self._client.aclose()

    async def release(self, lease: Lease) -> bool:
        if lease.outage:
            return False
        try:
            return await self._scripts["release"](args=self._lease_args(lease)) == 1
        except redis.AuthenticationError:
            raise
        except (redis.ConnectionError, redis.TimeoutError):
            return False  # the slot's record went with the outage, or expires by its TTL

    async def renew(self, lease: Lease) -> Lease | None:
        return self._renewed(lease, await self._scripts["renew"](args=self._renew_args(lease)))

    async def session_node(self, session_id: str) -> str | None:
        key = self.keyspace.session_key(check_node_id("session_id", session_id))
        return await self._client.get(key)

    async def end_session(self, session_id: str) -> None:
        await self._client.delete(
            self.keyspace.session_key(check_node_id("session_id", session_id))
        )
