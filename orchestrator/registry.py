"""Node registry in Redis: who is up, where, serving what, and how loaded.

Every edge node and cloud verifier registers one hash, `<prefix>:node:<id>`, that expires
unless a heartbeat refreshes it (see `orchestrator.heartbeat` for the task that does).
Registration also puts the node into the load sorted sets the router picks from
(`orchestrator.placement` documents the whole key layout and the pick). Nothing here is
cached: every read goes to Redis, so an orchestrator that restarts sees the fleet at once,
and a Redis that restarts empty is refilled by the nodes' heartbeats.

Writes are Lua scripts (`orchestrator/lua/*.lua`, loaded with `register_script`), so a
registration, its sorted-set entries and its 'join' event happen together or not at all.
Joins, leaves, expiries and failovers are appended to the stream `<prefix>:events`.

Needs Redis >= 6.2 (ZADD LT, exclusive XRANGE), standalone or with replicas: the scripts
compute node keys at run time, which Redis Cluster does not allow across slots.
Clients must decode responses (`decode_responses=True`); `connect` and `connect_async`
build such clients from a URL, credentials included (`redis://user:password@host:port/0`).
Use `redact_url` before logging a URL.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Literal, get_args
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.commands.core import AsyncScript, Script

NodeKind = Literal["edge", "cloud"]
EventType = Literal["join", "leave", "expire", "failover"]
AnyRedis = redis.Redis | redis.asyncio.Redis

_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/@+-]{0,199}")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_PREFIX = re.compile(r"[A-Za-z0-9{}._-]{1,64}")
_STATS_PREFIX = "stats."
_SCRIPTS = ("register", "heartbeat", "deregister", "update_stats", "sweep")


def check_name(field_name: str, value: object, pattern: re.Pattern[str], what: str) -> str:
    """Returns `value` if it is a string matching `pattern`, else a ValueError naming the field.

    Names end up inside Redis keys, so separators (':' in model names, '=' and ',' in labels)
    are refused rather than escaped.
    """
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ValueError(f"{field_name}: must be {what}, got {value!r}")
    return value


def check_node_id(field_name: str, value: object) -> str:
    return check_name(
        field_name, value, _NODE_ID, "1-128 characters of [A-Za-z0-9._:@-], starting alphanumeric"
    )


def check_model(field_name: str, value: object) -> str:
    return check_name(
        field_name, value, _MODEL, "1-200 characters of [A-Za-z0-9._/@+-], starting alphanumeric"
    )


def check_labels(field_name: str, labels: object) -> dict[str, str]:
    """A plain, key-sorted copy of `labels` after checking every key and value."""
    if not isinstance(labels, Mapping):
        raise ValueError(f"{field_name}: must be a mapping of str to str, got {labels!r}")
    what = "1-63 characters of [A-Za-z0-9._-], starting alphanumeric"
    for key, value in labels.items():
        check_name(f"{field_name} key", key, _LABEL, what)
        check_name(f"{field_name}[{key!r}]", value, _LABEL, what)
    return dict(sorted(labels.items()))


def check_kind(field_name: str, kind: object) -> NodeKind:
    if kind not in get_args(NodeKind):
        raise ValueError(f"{field_name}: must be one of {get_args(NodeKind)}, got {kind!r}")
    return kind  # type: ignore[return-value]


def check_positive(field_name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ValueError(f"{field_name}: must be a finite number > 0, got {value!r}")
    return float(value)


def seconds_to_ms(field_name: str, seconds: float) -> int:
    """Whole milliseconds, at least 1, of a positive duration in seconds."""
    return max(1, round(check_positive(field_name, seconds) * 1000))


@dataclass(frozen=True)
class Keyspace:
    """Where the registry lives in Redis. Every process of one deployment must use the same.

    Keys (all under `prefix`): `node:<id>` hash with TTL; `nodes` sorted set of ids scored by
    heartbeat deadline (ms); `routes` hash id -> JSON {kind, address, keys} naming the load
    sets of a node, kept after its hash expires so it can be cleaned up; `load:<kind>:<model>`
    and `load:<kind>:<model>:<k=v,...>` load sorted sets; `leases:<id>` sorted set of lease ids
    scored by expiry (ms); `lease-due` sorted set of node ids scored by their oldest lease
    expiry; `session:<id>` affinity string with TTL; `events` stream.
    """

    prefix: str = "edgecloud"
    """Key prefix; several deployments can share one Redis with different prefixes."""
    routing_labels: tuple[str, ...] = ("region", "tier")
    """Labels a pick may filter on. Each node is indexed under every subset of its routing
    labels (2**len sets per model), so filtering is one sorted-set lookup, never a scan;
    hence at most 4. Other labels are stored and listed but not routable."""
    events_maxlen: int = 10_000
    """Approximate length the event stream is trimmed to (XADD MAXLEN ~)."""
    sweep_batch: int = 16
    """Expired nodes (and nodes with expired leases) one script call cleans up at most."""

    def __post_init__(self) -> None:
        check_name("prefix", self.prefix, _PREFIX, "1-64 characters of [A-Za-z0-9{}._-]")
        if not isinstance(self.routing_labels, tuple) or len(self.routing_labels) > 4:
            raise ValueError(
                f"routing_labels: must be a tuple of at most 4 names, got {self.routing_labels!r}"
            )
        for name in self.routing_labels:
            check_name("routing_labels", name, _LABEL, "a label name of [A-Za-z0-9._-]")
        if len(set(self.routing_labels)) != len(self.routing_labels):
            raise ValueError(f"routing_labels: must be distinct, got {self.routing_labels!r}")
        for name in ("events_maxlen", "sweep_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")

    def node_key(self, node_id: str) -> str:
        return f"{self.prefix}:node:{node_id}"

    def leases_key(self, node_id: str) -> str:
        return f"{self.prefix}:leases:{node_id}"

    def session_key(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    @property
    def nodes_key(self) -> str:
        return f"{self.prefix}:nodes"

    @property
    def events_key(self) -> str:
        return f"{self.prefix}:events"

    def route_key(self, kind: NodeKind, model: str, labels: Mapping[str, str]) -> str:
        """The load sorted set of nodes of `kind` serving `model` whose labels include `labels`.

        Example: with the default keyspace, `route_key("cloud", "llama-7b", {"tier": "gpu",
        "region": "eu"})` is `"edgecloud:load:cloud:llama-7b:region=eu,tier=gpu"`.
        """
        check_kind("kind", kind)
        check_model("model", model)
        labels = check_labels("labels", labels)
        unroutable = sorted(set(labels) - set(self.routing_labels))
        if unroutable:
            raise ValueError(
                f"labels: can only filter on routing labels {self.routing_labels}, "
                f"got {unroutable[0]!r}"
            )
        key = f"{self.prefix}:load:{kind}:{model}"
        if labels:
            key += ":" + ",".join(f"{k}={v}" for k, v in labels.items())
        return key

    def route_keys(self, node: NodeInfo) -> tuple[str, ...]:
        """Every load sorted set `node` belongs to: one per (model, subset of routing labels).

        Example: routing labels ("region", "tier"), a cloud node serving ("m",) with labels
        {"region": "eu", "tier": "gpu", "host": "h1"} is in `load:cloud:m`,
        `load:cloud:m:region=eu`, `load:cloud:m:tier=gpu` and `load:cloud:m:region=eu,tier=gpu`
        ("host" is not a routing label); a pick filtered on {"region": "eu"} reads the second.
        """
        routable = [(k, v) for k, v in node.labels.items() if k in self.routing_labels]
        subsets = [
            dict(subset)
            for size in range(len(routable) + 1)
            for subset in itertools.combinations(routable, size)
        ]
        return tuple(
            self.route_key(node.kind, model, labels) for model in node.models for labels in subsets
        )

    def script_args(self) -> list[str | int]:
        """ARGV[1..3] that every script starts with (see orchestrator/lua/common.lua)."""
        return [self.prefix, self.events_maxlen, self.sweep_batch]


@dataclass(frozen=True)
class NodeInfo:
    """What a node registers; the hash `<prefix>:node:<node_id>` holds these fields."""

    node_id: str
    """Unique and stable across restarts of the node, e.g. "cloud-0" or "edge-eu-17"."""
    kind: NodeKind
    address: str
    """Where to reach it: a gRPC target ("10.0.0.5:50051") or a Ray actor name."""
    models: tuple[str, ...]
    """Models it serves (cloud: target models; edge: draft models)."""
    capacity: int
    """How many leases (concurrent sessions) it takes at most."""
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    """E.g. {"region": "eu-west", "tier": "gpu"}; stored read-only and key-sorted."""
    version: str = "0"
    """Software version of the node, for rolling upgrades and debugging."""
    metrics_address: str = ""
    """Where Prometheus scrapes its /metrics ("10.0.0.5:9100"); "" when it serves none."""

    def __post_init__(self) -> None:
        check_node_id("node_id", self.node_id)
        check_kind("kind", self.kind)
        if not isinstance(self.address, str) or not 0 < len(self.address) <= 256:
            raise ValueError(f"address: must be a string of 1-256 characters, got {self.address!r}")
        if isinstance(self.models, str) or not isinstance(self.models, Iterable):
            raise ValueError(f"models: must be a sequence of model names, got {self.models!r}")
        models = tuple(self.models)
        if not models:
            raise ValueError("models: must name at least one model, got none")
        for i, model in enumerate(models):
            check_model(f"models[{i}]", model)
        if len(set(models)) != len(models):
            raise ValueError(f"models: must be distinct, got {models!r}")
        object.__setattr__(self, "models", models)
        if (
            isinstance(self.capacity, bool)
            or not isinstance(self.capacity, int)
            or not (1 <= self.capacity <= 1_000_000)
        ):
            raise ValueError(f"capacity: must be an int in [1, 1000000], got {self.capacity!r}")
        object.__setattr__(self, "labels", MappingProxyType(check_labels("labels", self.labels)))
        if not isinstance(self.version, str) or not 0 < len(self.version) <= 64:
            raise ValueError(f"version: must be a string of 1-64 characters, got {self.version!r}")
        if not isinstance(self.metrics_address, str) or len(self.metrics_address) > 256:
            raise ValueError(
                f"metrics_address: must be a string of 0-256 characters, "
                f"got {self.metrics_address!r}"
            )

    def to_fields(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "address": self.address,
            "models": json.dumps(list(self.models)),
            "capacity": str(self.capacity),
            "labels": json.dumps(dict(self.labels)),
            "version": self.version,
            "metrics_address": self.metrics_address,
        }

    @classmethod
    def from_fields(cls, node_id: str, fields: Mapping[str, str]) -> NodeInfo:
        return cls(
            node_id=node_id,
            kind=fields["kind"],  # type: ignore[arg-type]
            address=fields["address"],
            models=tuple(json.loads(fields["models"])),
            capacity=int(fields["capacity"]),
            labels=json.loads(fields["labels"]),
            version=fields["version"],
            metrics_address=fields.get("metrics_address", ""),  # absent: an older node
        )


@dataclass(frozen=True)
class NodeStats:
    """Acceptance statistics a node reports about itself (cumulative since it started).

    A verifier counts the draft tokens it was sent and accepted; an edge node the ones it
    drafted and got accepted. The router does not use them; dashboards and the adaptive
    policy do.
    """

    rounds: int = 0
    """Verification rounds."""
    proposed_tokens: int = 0
    """Draft tokens sent for verification."""
    accepted_tokens: int = 0
    """Draft tokens accepted (bonus tokens not counted); <= proposed_tokens."""

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: must be an int >= 0, got {value!r}")
        if self.accepted_tokens > self.proposed_tokens:
            raise ValueError(
                f"accepted_tokens: must be <= proposed_tokens ({self.proposed_tokens}), "
                f"got {self.accepted_tokens}"
            )

    @property
    def acceptance_rate(self) -> float:
        """Accepted / proposed draft tokens; 0 before any round."""
        return self.accepted_tokens / self.proposed_tokens if self.proposed_tokens else 0.0

    def to_fields(self) -> dict[str, str]:
        return {_STATS_PREFIX + name: str(value) for name, value in self.__dict__.items()}

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> NodeStats:
        """Reads the `stats.*` fields of a node hash; absent ones (never reported) are 0."""
        return cls(
            **{
                stat.name: int(fields.get(_STATS_PREFIX + stat.name, 0))
                for stat in dataclasses.fields(cls)
            }
        )


@dataclass(frozen=True)
class NodeState:
    """A registered node as Redis sees it now."""

    info: NodeInfo
    load: int
    """Live leases on it, between 0 and info.capacity."""
    stats: NodeStats
    heartbeat_ms: int = 0
    """Redis server time of its last registration or heartbeat."""


@dataclass(frozen=True)
class NodeEvent:
    """One entry of the event stream.

    join / leave / expire: `node_id` (and `kind`, `address`) of the node. failover: a session
    bound to `previous_node_id` was moved to `node_id`; `reason` is 'excluded' (the caller
    reported it failing), 'gone' (left, expired, or no longer serving the model and labels) or
    'full'.
    """

    event_id: str
    """Stream id "<ms>-<seq>"; pass it as `after` to read what follows."""
    type: EventType
    node_id: str
    kind: NodeKind | None = None
    address: str | None = None
    session_id: str | None = None
    previous_node_id: str | None = None
    reason: str | None = None

    @property
    def time_ms(self) -> int:
        """Redis server time of the event, ms since the epoch."""
        return int(self.event_id.split("-")[0])

    @classmethod
    def from_entry(cls, event_id: str, fields: Mapping[str, str]) -> NodeEvent:
        return cls(
            event_id=event_id,
            type=fields["type"],  # type: ignore[arg-type]
            node_id=fields["node"],
            kind=fields.get("kind") or None,  # type: ignore[arg-type]
            address=fields.get("address") or None,
            session_id=fields.get("session"),
            previous_node_id=fields.get("from"),
            reason=fields.get("reason"),
        )


def load_scripts(client: AnyRedis, names: Iterable[str]) -> dict[str, Script | AsyncScript]:
    """Registers orchestrator/lua/<name>.lua, with common.lua in front, on `client`."""
    lua = resources.files("orchestrator").joinpath("lua")
    common = lua.joinpath("common.lua").read_text()
    return {
        name: client.register_script(common + "\n" + lua.joinpath(f"{name}.lua").read_text())
        for name in names
    }


def check_client(client: object) -> None:
    """Refuses clients that return bytes: the parsing here works on str."""
    if not isinstance(client, redis.Redis | redis.asyncio.Redis):
        raise ValueError(f"client: must be a redis.Redis or redis.asyncio.Redis, got {client!r}")
    if not client.get_connection_kwargs().get("decode_responses"):
        raise ValueError("client: must be created with decode_responses=True (see connect())")


def connect(url: str, **kwargs: object) -> redis.Redis:
    """A client for `url` (redis://[user:password@]host:port/db, or rediss://) that decodes."""
    return redis.Redis.from_url(url, decode_responses=True, **kwargs)


def connect_async(url: str, **kwargs: object) -> redis.asyncio.Redis:
    """The asyncio twin of `connect`."""
    return redis.asyncio.Redis.from_url(url, decode_responses=True, **kwargs)


def redact_url(url: str) -> str:
    """`url` with its password replaced by '***', safe to log. 'redis://u:pw@h:1/0' ->
    'redis://u:***@h:1/0'."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class _RegistryBase:
    """Argument building and reply parsing shared by `Registry` and `AsyncRegistry`."""

    def __init__(self, client: AnyRedis, keyspace: Keyspace | None) -> None:
        check_client(client)
        self.keyspace = keyspace or Keyspace()
        self._client = client
        self._scripts = load_scripts(client, _SCRIPTS)

    def _register_call(self, node: NodeInfo, ttl_s: float) -> tuple[list[str], list[object]]:
        if not isinstance(node, NodeInfo):
            raise ValueError(f"node: must be a NodeInfo, got {node!r}")
        pairs = [item for kv in node.to_fields().items() for item in kv]
        args = [*self.keyspace.script_args(), node.node_id, seconds_to_ms("ttl_s", ttl_s), *pairs]
        return list(self.keyspace.route_keys(node)), args

    def _node_args(self, node_id: str, *extra: object) -> list[object]:
        return [*self.keyspace.script_args(), check_node_id("node_id", node_id), *extra]

    def _stats_args(self, node_id: str, stats: NodeStats) -> list[object]:
        if not isinstance(stats, NodeStats):
            raise ValueError(f"stats: must be a NodeStats, got {stats!r}")
        return self._node_args(node_id, *(x for kv in stats.to_fields().items() for x in kv))

    def _queue_reads(
        self,
        pipe: redis.client.Pipeline | redis.asyncio.client.Pipeline,
        node_ids: list[str],
        time: tuple[int, int],
    ) -> None:
        """Queues, per node, its hash and its count of leases still live at Redis time `time`."""
        live_after = f"({time[0] * 1000 + time[1] // 1000}"
        for node_id in node_ids:
            pipe.hgetall(self.keyspace.node_key(node_id))
            pipe.zcount(self.keyspace.leases_key(node_id), live_after, "+inf")

    @staticmethod
    def _parse_reads(
        node_ids: list[str],
        replies: list,
        kind: NodeKind | None = None,
        model: str | None = None,
    ) -> list[NodeState]:
        """NodeStates of the nodes still registered, of `kind` and serving `model` if given."""
        states = []
        for node_id, fields, load in zip(node_ids, replies[::2], replies[1::2], strict=True):
            if not fields:
                continue  # expired between the two round trips
            info = NodeInfo.from_fields(node_id, fields)
            if (kind is None or info.kind == kind) and (model is None or model in info.models):
                beat = int(fields.get("heartbeat_ms", 0))
                states.append(NodeState(info, int(load), NodeStats.from_fields(fields), beat))
        return states

    def _events_range(self, after: str, count: int) -> tuple[str, int]:
        if not isinstance(after, str) or not re.fullmatch(r"\d+(-\d+)?", after):
            raise ValueError(f"after: must be a stream id like '1700000000000-0', got {after!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count: must be an int >= 1, got {count!r}")
        return f"({after}", count


class Registry(_RegistryBase):
    """Registration, heartbeat and listing over a synchronous client.

    `register` and `heartbeat` take the TTL: a node missing heartbeats for `ttl_s` is out
    of rotation (the next pick or sweep that meets it removes it and emits 'expire').
    """

    def __init__(self, client: redis.Redis, *, keyspace: Keyspace | None = None) -> None:
        super().__init__(client, keyspace)

    def register(self, node: NodeInfo, *, ttl_s: float) -> bool:
        """Registers or refreshes `node`; True when it joined (was not registered)."""
        keys, args = self._register_call(node, ttl_s)
        return self._scripts["register"](keys=keys, args=args) == 1

    def heartbeat(self, node_id: str, *, ttl_s: float) -> bool:
        """Extends the TTL; False when the node is not registered and must `register` again."""
        args = self._node_args(node_id, seconds_to_ms("ttl_s", ttl_s))
        return self._scripts["heartbeat"](args=args) == 1

    def deregister(self, node_id: str) -> bool:
        """Takes the node out at once ('leave' event); False when it was not registered."""
        return self._scripts["deregister"](args=self._node_args(node_id)) == 1

    def update_stats(self, node_id: str, stats: NodeStats) -> bool:
        """Stores the node's statistics; False when it is not registered."""
        return self._scripts["update_stats"](args=self._stats_args(node_id, stats)) == 1

    def sweep(self) -> int:
        """Cleans up to `keyspace.sweep_batch` expired nodes now; returns how many."""
        return int(self._scripts["sweep"](args=self.keyspace.script_args()))

    def get(self, node_id: str) -> NodeState | None:
        """The node as registered now, or None."""
        states = self._read([check_node_id("node_id", node_id)])
        return states[0] if states else None

    def list_nodes(
        self, *, kind: NodeKind | None = None, model: str | None = None
    ) -> list[NodeState]:
        """Registered nodes, optionally only those of `kind` and serving `model`.

        Reads Redis every time: one round trip for the ids, one pipeline for the nodes.
        """
        if kind is not None:
            check_kind("kind", kind)
        return self._read(None, kind, model)

    def _read(
        self, node_ids: list[str] | None, kind: NodeKind | None = None, model: str | None = None
    ) -> list[NodeState]:
        pipe = self._client.pipeline(transaction=False)
        pipe.time()
        if node_ids is None:
            pipe.zrange(self.keyspace.nodes_key, 0, -1)
        head = pipe.execute()
        node_ids = head[1] if node_ids is None else node_ids
        pipe = self._client.pipeline(transaction=False)
        self._queue_reads(pipe, node_ids, head[0])
        return self._parse_reads(node_ids, pipe.execute(), kind, model)

    def events(self, *, after: str = "0-0", count: int = 100) -> list[NodeEvent]:
        """Up to `count` events after stream id `after`, oldest first."""
        start, count = self._events_range(after, count)
        entries = self._client.xrange(self.keyspace.events_key, start, "+", count=count)
        return [NodeEvent.from_entry(event_id, fields) for event_id, fields in entries]


class AsyncRegistry(_RegistryBase):
    """`Registry` over a `redis.asyncio` client; same methods, awaited."""

    def __init__(self, client: redis.asyncio.Redis, *, keyspace: Keyspace | None = None) -> None:
        super().__init__(client, keyspace)

    async def register(self, node: NodeInfo, *, ttl_s: float) -> bool:
        keys, args = self._register_call(node, ttl_s)
        return await self._scripts["register"](keys=keys, args=args) == 1

    async def heartbeat(self, node_id: str, *, ttl_s: float) -> bool:
        args = self._node_args(node_id, seconds_to_ms("ttl_s", ttl_s))
        return await self._scripts["heartbeat"](args=args) == 1

    async def deregister(self, node_id: str) -> bool:
        return await self._scripts["deregister"](args=self._node_args(node_id)) == 1

    async def update_stats(self, node_id: str, stats: NodeStats) -> bool:
        return await self._scripts["update_stats"](args=self._stats_args(node_id, stats)) == 1

    async def sweep(self) -> int:
        return int(await self._scripts["sweep"](args=self.keyspace.script_args()))

    async def get(self, node_id: str) -> NodeState | None:
        states = await self._read([check_node_id("node_id", node_id)])
        return states[0] if states else None

    async def list_nodes(
        self, *, kind: NodeKind | None = None, model: str | None = None
    ) -> list[NodeState]:
        if kind is not None:
            check_kind("kind", kind)
        return await self._read(None, kind, model)

    async def _read(
        self, node_ids: list[str] | None, kind: NodeKind | None = None, model: str | None = None
    ) -> list[NodeState]:
        pipe = self._client.pipeline(transaction=False)
        pipe.time()
        if node_ids is None:
            pipe.zrange(self.keyspace.nodes_key, 0, -1)
        head = await pipe.execute()
        node_ids = head[1] if node_ids is None else node_ids
        pipe = self._client.pipeline(transaction=False)
        self._queue_reads(pipe, node_ids, head[0])
        return self._parse_reads(node_ids, await pipe.execute(), kind, model)

    async def events(self, *, after: str = "0-0", count: int = 100) -> list[NodeEvent]:
        start, count = self._events_range(after, count)
        entries = await self._client.xrange(self.keyspace.events_key, start, "+", count=count)
        return [NodeEvent.from_entry(event_id, fields) for event_id, fields in entries]
