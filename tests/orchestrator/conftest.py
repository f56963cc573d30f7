"""A real redis-server (pytest-redis, with the binary orchestrator.redis_server finds) and
helpers to build nodes. Each test gets a flushed database."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from pytest_redis import factories

from orchestrator.placement import Placement, PlacementConfig
from orchestrator.redis_server import find_redis_server
from orchestrator.registry import NodeInfo, Registry

redis_process = factories.redis_proc(executable=str(find_redis_server()))
redis_client = factories.redisdb("redis_process", decode=True)
redis_async_client = factories.redisdb_async("redis_process", decode=True)


def make_node(node_id: str, **overrides: object) -> NodeInfo:
    fields: dict[str, object] = {
        "kind": "cloud",
        "address": f"{node_id}.local:50051",
        "models": ("target",),
        "capacity": 4,
        "labels": {"region": "eu", "tier": "gpu"},
        "version": "1.0",
    }
    fields.update(overrides)
    return NodeInfo(node_id=node_id, **fields)  # type: ignore[arg-type]


def wait_until(condition: Callable[[], object], timeout_s: float = 5.0) -> None:
    """Polls `condition` every 20 ms; fails the test if it stays false for `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition still false after {timeout_s} s")
        time.sleep(0.02)


@pytest.fixture
def registry(redis_client) -> Registry:
    return Registry(redis_client)


@pytest.fixture
def placement(redis_client) -> Placement:
    return Placement(redis_client, config=PlacementConfig(lease_ttl_s=30, affinity_ttl_s=60))
