"""Registration, heartbeats, expiry, events, and recovery from a Redis restart, on real Redis."""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AsyncExitStack

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator.heartbeat import HeartbeatTask
from orchestrator.placement import AsyncPlacement, Placement, RegistryUnavailable
from orchestrator.redis_server import RedisServer
from orchestrator.registry import (
    AsyncRegistry,
    Keyspace,
    NodeStats,
    Registry,
    connect,
    connect_async,
    redact_url,
)
from tests.orchestrator.conftest import make_node, wait_until


def test_register_writes_the_hash_with_ttl_and_one_join_event(registry, redis_client) -> None:
    node = make_node("cloud-0", labels={"region": "eu", "tier": "gpu", "host": "h1"})
    assert registry.register(node, ttl_s=5) is True
    assert registry.register(node, ttl_s=5) is False  # a refresh, not a second join

    key = registry.keyspace.node_key("cloud-0")
    fields = redis_client.hgetall(key)
    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    assert 0 <= now_ms - int(fields.pop("heartbeat_ms")) < 5000
    assert fields == {
        "kind": "cloud",
        "address": "cloud-0.local:50051",
        "models": '["target"]',
        "capacity": "4",
        "labels": '{"host": "h1", "region": "eu", "tier": "gpu"}',
        "version": "1.0",
        "metrics_address": "",
    }
    assert 0 < redis_client.pttl(key) <= 5000
    [state] = registry.list_nodes()
    assert state.info == node and state.load == 0 and state.stats == NodeStats()
    assert state.heartbeat_ms > 0
    assert registry.get("cloud-0") == state
    assert registry.get("cloud-9") is None
    [event] = registry.events()
    assert (event.type, event.node_id, event.kind, event.address) == (
        "join",
        "cloud-0",
        "cloud",
        "cloud-0.local:50051",
    )
    assert abs(event.time_ms - redis_client.time()[0] * 1000) < 5000


def test_route_keys_replay_the_docstring_example() -> None:
    keyspace = Keyspace(prefix="ec")
    node = make_node("v", models=("m",), labels={"region": "eu", "tier": "gpu", "host": "h1"})
    assert keyspace.route_keys(node) == (
        "ec:load:cloud:m",
        "ec:load:cloud:m:region=eu",
        "ec:load:cloud:m:tier=gpu",
        "ec:load:cloud:m:region=eu,tier=gpu",
    )
    assert (
        Keyspace().route_key("cloud", "llama-7b", {"tier": "gpu", "region": "eu"})
        == "edgecloud:load:cloud:llama-7b:region=eu,tier=gpu"
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kind": "gpu"}, r"kind: must be one of \('edge', 'cloud'\), got 'gpu'"),
        ({"capacity": 0}, r"capacity: must be an int in \[1, 1000000\], got 0"),
        ({"capacity": True}, r"capacity: must be an int"),
        ({"models": ()}, r"models: must name at least one model"),
        ({"models": "target"}, r"models: must be a sequence of model names"),
        ({"models": ("a:b",)}, r"models\[0\]: must be 1-200 characters"),
        ({"models": ("a", "a")}, r"models: must be distinct"),
        ({"labels": {"region": "eu=1"}}, r"labels\['region'\]: must be 1-63 characters"),
        ({"labels": {"re gion": "eu"}}, r"labels key: must be"),
        ({"address": ""}, r"address: must be a string of 1-256 characters, got ''"),
        ({"version": ""}, r"version: must be a string of 1-64 characters"),
    ],
)
def test_node_info_validation_names_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_node("cloud-0", **overrides)


def test_other_inputs_are_validated(registry) -> None:
    with pytest.raises(ValueError, match=r"node_id: must be 1-128 characters"):
        make_node("bad id")
    with pytest.raises(ValueError, match=r"ttl_s: must be a finite number > 0, got 0"):
        registry.register(make_node("cloud-0"), ttl_s=0)
    with pytest.raises(ValueError, match=r"node_id: must be"):
        registry.heartbeat("a/b", ttl_s=1)
    with pytest.raises(ValueError, match=r"accepted_tokens: must be <= proposed_tokens \(1\)"):
        NodeStats(rounds=1, proposed_tokens=1, accepted_tokens=2)
    with pytest.raises(ValueError, match=r"routing_labels: must be a tuple of at most 4"):
        Keyspace(routing_labels=("a", "b", "c", "d", "e"))
    with pytest.raises(ValueError, match=r"after: must be a stream id"):
        registry.events(after="latest")
    with pytest.raises(ValueError, match=r"client: must be created with decode_responses=True"):
        Registry(redis.Redis())


def test_heartbeat_keeps_a_node_alive_and_expiry_takes_it_out(registry, placement) -> None:
    registry.register(make_node("cloud-0"), ttl_s=1.0)
    registry.register(make_node("cloud-1"), ttl_s=1.0)
    for _ in range(5):  # 1.5 s in all, longer than the TTL
        time.sleep(0.3)
        assert registry.heartbeat("cloud-0", ttl_s=1.0) is True

    assert [s.info.node_id for s in registry.list_nodes()] == ["cloud-0"]
    # cloud-0's own heartbeats swept the expired cloud-1 out and said so.
    assert ("expire", "cloud-1") in [(e.type, e.node_id) for e in registry.events()]
    assert registry.heartbeat("cloud-1", ttl_s=1.0) is False
    leases = [placement.pick("cloud", "target") for _ in range(4)]  # capacity 4
    assert {lease.node_id for lease in leases} == {"cloud-0"}
    assert placement.pick("cloud", "target") is None


def test_sweep_removes_expired_nodes_and_all_their_keys(registry, redis_client) -> None:
    for i in range(3):
        registry.register(make_node(f"cloud-{i}"), ttl_s=0.2)
    time.sleep(0.3)
    assert registry.sweep() == 3
    assert registry.sweep() == 0
    assert sorted(e.node_id for e in registry.events() if e.type == "expire") == [
        "cloud-0",
        "cloud-1",
        "cloud-2",
    ]
    assert redis_client.keys("*") == [registry.keyspace.events_key]


def test_a_node_whose_hash_vanished_is_never_picked_and_is_cleaned_up(
    registry, placement, redis_client
) -> None:
    """The heartbeat deadline is still ahead, so only the pick's own check can catch it."""
    keyspace = registry.keyspace
    registry.register(make_node("cloud-0", capacity=100), ttl_s=30)
    registry.register(make_node("cloud-1", capacity=100), ttl_s=30)
    redis_client.delete(keyspace.node_key("cloud-0"))

    assert placement.pick("cloud", "target").node_id == "cloud-1"
    route_keys = keyspace.route_keys(make_node("cloud-0"))
    assert all(redis_client.zscore(key, "cloud-0") is None for key in route_keys)
    assert redis_client.zscore(keyspace.nodes_key, "cloud-0") is None
    assert ("expire", "cloud-0") in [(e.type, e.node_id) for e in registry.events()]
    for _ in range(10):
        assert placement.pick("cloud", "target").node_id == "cloud-1"


def test_deregister_takes_the_node_out_at_once(registry, placement, redis_client) -> None:
    registry.register(make_node("cloud-0"), ttl_s=30)
    lease = placement.pick("cloud", "target")
    assert registry.deregister("cloud-0") is True
    assert registry.deregister("cloud-0") is False
    assert placement.pick("cloud", "target") is None
    assert placement.release(lease) is False
    assert registry.list_nodes() == []
    assert [e.type for e in registry.events()] == ["join", "leave"]
    assert redis_client.keys("*") == [registry.keyspace.events_key]


def test_stats_are_stored_kept_on_refresh_and_never_resurrect(registry, redis_client) -> None:
    registry.register(make_node("cloud-0"), ttl_s=30)
    stats = NodeStats(rounds=10, proposed_tokens=40, accepted_tokens=30)
    assert registry.update_stats("cloud-0", stats) is True
    registry.register(make_node("cloud-0", version="1.1"), ttl_s=30)
    state = registry.get("cloud-0")
    assert state.stats == stats and state.stats.acceptance_rate == 0.75
    assert state.info.version == "1.1"

    assert registry.update_stats("ghost", stats) is False
    assert not redis_client.exists(registry.keyspace.node_key("ghost"))


def test_reregistering_with_other_models_and_labels_moves_the_node(registry, placement) -> None:
    registry.register(make_node("n", models=("a",), labels={"region": "eu"}), ttl_s=30)
    registry.register(make_node("n", models=("b",), labels={"region": "us"}), ttl_s=30)
    assert placement.pick("cloud", "a") is None
    assert placement.pick("cloud", "b", labels={"region": "eu"}) is None
    assert placement.pick("cloud", "b", labels={"region": "us"}).node_id == "n"


def test_listing_filters_and_a_fresh_registry_sees_the_same_fleet(redis_client) -> None:
    """The orchestrator keeps no cache: a new one (after a restart) rebuilds its view."""
    first = Registry(redis_client)
    first.register(make_node("cloud-0", models=("a", "b")), ttl_s=30)
    first.register(make_node("edge-0", kind="edge", models=("draft",)), ttl_s=30)
    Placement(redis_client).pick("cloud", "b")

    second = Registry(connect(f"unix://{redis_client.connection_pool.connection_kwargs['path']}"))
    assert second.list_nodes() == first.list_nodes()
    assert [s.info.node_id for s in second.list_nodes(kind="edge")] == ["edge-0"]
    [cloud] = second.list_nodes(model="a")
    assert cloud.info.node_id == "cloud-0" and cloud.load == 1
    assert second.list_nodes(kind="cloud", model="draft") == []


def test_events_page_with_a_cursor_and_the_stream_is_trimmed(redis_client) -> None:
    registry = Registry(redis_client, keyspace=Keyspace(events_maxlen=10))
    for i in range(300):
        registry.register(make_node(f"n{i}"), ttl_s=30)
    first = registry.events(count=5)
    assert len(first) == 5
    after = registry.events(after=first[-1].event_id, count=1)[0]
    assert after.event_id > first[-1].event_id
    # Approximate trimming drops whole stream nodes (100 entries each by default).
    assert redis_client.xlen(registry.keyspace.events_key) <= 110


async def test_heartbeat_task_recovers_an_expired_node_and_pushes_stats(
    redis_async_client,
) -> None:
    registry = AsyncRegistry(redis_async_client)
    stats = NodeStats(rounds=2, proposed_tokens=8, accepted_tokens=5)
    task = HeartbeatTask(registry, make_node("cloud-0"), ttl_s=5, stats=lambda: stats)
    await task.start()
    assert task.registrations == 1
    await task.beat()
    assert (await registry.get("cloud-0")).stats == stats

    await redis_async_client.delete(registry.keyspace.node_key("cloud-0"))  # as if expired
    await task.beat()
    assert task.registrations == 2
    assert (await registry.get("cloud-0")).info == task.node
    types = [e.type for e in await registry.events()]
    assert types == ["join", "expire", "join"]

    await task.stop()
    assert not task.running
    assert await registry.list_nodes() == []
    assert (await registry.events())[-1].type == "leave"


async def test_nodes_reregister_by_themselves_after_a_redis_restart(caplog) -> None:
    caplog.set_level(logging.INFO)
    async with AsyncExitStack() as stack:
        server = stack.enter_context(RedisServer())
        client = connect_async(server.url)
        stack.push_async_callback(client.aclose)
        sync_client = stack.enter_context(connect(server.url))
        registry = AsyncRegistry(client)
        tasks = [
            await stack.enter_async_context(
                HeartbeatTask(registry, make_node(f"cloud-{i}"), ttl_s=1.0, interval_s=0.1)
            )
            for i in range(3)
        ]
        placement = Placement(sync_client)
        held = placement.pick("cloud", "target")  # the scripts are now cached in Redis

        server.stop()
        await asyncio.sleep(0.3)  # beats fail meanwhile
        server.start()  # same port, empty: no nodes, no scripts
        assert sync_client.dbsize() == 0

        nodes_key = registry.keyspace.nodes_key
        await asyncio.to_thread(wait_until, lambda: sync_client.zcard(nodes_key) == 3)
        assert [task.registrations for task in tasks] == [2, 2, 2]
        assert {s.info.node_id for s in await registry.list_nodes()} == {
            "cloud-0",
            "cloud-1",
            "cloud-2",
        }
        assert [e.type for e in await registry.events()] == ["join"] * 3
        # The first script call after the restart gets NOSCRIPT; redis-py loads it again.
        assert placement.release(held) is False  # Redis lost the lease with everything else
        assert placement.renew(held).load == 1  # the holder, still alive, re-takes its slot
        assert (await registry.get(held.node_id)).load == 1
    assert caplog.text.count("was not registered (expired, or Redis restarted)") == 3


async def test_credentials_work_and_never_reach_the_log(caplog) -> None:
    caplog.set_level(logging.DEBUG)
    password = "pa ss:w@rd/1"
    with RedisServer(password=password) as server:
        assert password not in redact_url(server.url) and "***" in redact_url(server.url)
        admin = connect(server.url)
        admin.acl_setuser(
            "router",
            enabled=True,
            passwords=["+router-secret"],
            keys=["edgecloud:*"],
            commands=["+@all"],
        )
        acl_url = f"redis://router:router-secret@127.0.0.1:{server.port}/0"
        assert redact_url(acl_url) == f"redis://router:***@127.0.0.1:{server.port}/0"

        client = connect_async(acl_url, retry=Retry(NoBackoff(), 0))  # fail beats fast
        task = HeartbeatTask(AsyncRegistry(client), make_node("cloud-0"), ttl_s=1, interval_s=0.1)
        await task.start()
        lease = Placement(connect(acl_url)).pick("cloud", "target")
        assert lease.node_id == "cloud-0"

        with pytest.raises(redis.AuthenticationError):
            await HeartbeatTask(
                AsyncRegistry(connect_async(f"redis://router:wrong@127.0.0.1:{server.port}/0")),
                make_node("cloud-1"),
            ).start()
        with pytest.raises(redis.AuthenticationError):
            Registry(connect(f"redis://127.0.0.1:{server.port}/0")).list_nodes()

        server.stop()
        await asyncio.sleep(0.3)  # failing beats log warnings
        await task.stop(deregister=False)
        await client.aclose()
    assert "heartbeat for cloud-0 failed" in caplog.text
    assert password not in caplog.text and "router-secret" not in caplog.text


async def test_placement_rides_out_a_redis_outage() -> None:
    """While Redis is down, picks hand out outage leases on nodes seen before (round-robin,
    honouring `exclude`), releases forget them, and a renewal after Redis is back (and the
    node has registered again) turns one into a counted slot."""
    with RedisServer() as server:
        client = connect_async(server.url, retry=Retry(NoBackoff(), 0))
        registry = AsyncRegistry(client)
        for i in range(2):
            await registry.register(make_node(f"cloud-{i}", capacity=4), ttl_s=30)
        placement = AsyncPlacement(client)
        with pytest.raises(RegistryUnavailable):
            await AsyncPlacement(connect_async("redis://127.0.0.1:1/0")).pick("cloud", "target")
        seen = {(await placement.pick("cloud", "target")).node_id for _ in range(4)}
        assert seen == {"cloud-0", "cloud-1"}

        server.stop()
        outage = [await placement.pick("cloud", "target") for _ in range(4)]
        assert all(lease.outage for lease in outage)
        assert {lease.node_id for lease in outage} == {"cloud-0", "cloud-1"}
        only = await placement.pick("cloud", "target", exclude=["cloud-0"])
        assert only.node_id == "cloud-1"
        assert await placement.pick("cloud", "target", exclude=["cloud-0", "cloud-1"]) is None
        with pytest.raises(RegistryUnavailable):  # never seen: nothing to fall back on
            await placement.pick("cloud", "other-model")
        assert await placement.release(only) is False

        server.start()
        await registry.register(make_node("cloud-1", capacity=4), ttl_s=30)
        counted = await placement.renew(only)
        assert counted.node_id == "cloud-1" and counted.load == 1 and not counted.outage
        assert (await registry.get("cloud-1")).load == 1
        assert await placement.release(counted) is True
        assert (await registry.get("cloud-1")).load == 0
        await client.aclose()


async def test_a_node_starting_during_a_redis_outage_registers_when_redis_is_back() -> None:
    with RedisServer() as server:
        server.stop()
        client = connect_async(server.url, retry=Retry(NoBackoff(), 0))
        task = HeartbeatTask(AsyncRegistry(client), make_node("cloud-0"), ttl_s=5)
        starting = asyncio.ensure_future(task.start())
        await asyncio.sleep(1.0)
        assert not starting.done()
        server.start()
        await asyncio.wait_for(starting, 5)
        assert task.registrations == 1
        assert [n.info.node_id for n in await AsyncRegistry(client).list_nodes()] == ["cloud-0"]
        await task.stop()
        await client.aclose()

        stopped = HeartbeatTask(
            AsyncRegistry(connect_async("redis://127.0.0.1:1/0", retry=Retry(NoBackoff(), 0))),
            make_node("cloud-1"),
            start_timeout_s=0.6,
        )
        with pytest.raises(redis.ConnectionError):
            await stopped.start()
