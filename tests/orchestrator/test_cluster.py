"""`edgecloud up --ray-address` on a real multi-node Ray cluster (`ray.cluster_utils`,
every node on loopback): verifier actors wait for a GPU node that joins after `up`
started, each node registers its own Ray labels in Redis where the router filters on
them, and the Redis URL actors dial is the head's, not their own loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest
import ray
from ray.cluster_utils import Cluster

import edgecloud
from orchestrator.commands.stack import parse_labels
from orchestrator.config_file import table_to_argv
from orchestrator.placement import AsyncPlacement
from orchestrator.redis_server import RedisServer
from orchestrator.registry import AsyncRegistry, connect_async
from orchestrator.stack import Stack, StackConfig, actor_redis_url, cluster_redis_url
from orchestrator.usage import UsageError
from tests.edge_node.conftest import save_model_pair

PROMPT = [1, 5, 9, 22]


@pytest.mark.parametrize(
    ("url", "resolved"),
    [
        ("redis://:pw@127.0.0.1:6380/0", "redis://:pw@10.0.0.5:6380/0"),
        ("redis://user:p%40ss@localhost:6379/2", "redis://user:p%40ss@10.0.0.5:6379/2"),
        ("redis://[::1]:6379", "redis://10.0.0.5:6379"),
        ("rediss://cache.example:6380/0", "rediss://cache.example:6380/0"),
        ("redis://10.0.0.9:6379/0", "redis://10.0.0.9:6379/0"),
    ],
)
def test_a_loopback_redis_url_becomes_the_heads_address(url, resolved):
    assert actor_redis_url(url, "10.0.0.5") == resolved


def interface_address() -> str:
    """This machine's non-loopback address, where other nodes would reach it; skips when
    there is none or the sandbox refuses connections to it (tests/orchestrator/
    test_multinode.py keeps every node on loopback for such sandboxes)."""
    address = ray.util.get_node_ip_address()
    if address.startswith("127."):
        pytest.skip("this machine's only address is loopback")
    with socket.socket() as server, socket.socket() as client:
        server.bind(("0.0.0.0", 0))
        server.listen()
        client.settimeout(2)
        if client.connect_ex((address, server.getsockname()[1])) != 0:
            pytest.skip(f"connections to this machine's address {address} are refused here")
    return address


async def test_a_redis_other_nodes_cannot_reach_is_refused_with_a_message():
    head = interface_address()
    with RedisServer(password="s3cret") as loopback_only:
        with pytest.raises(RuntimeError, match=rf"not reachable at redis://:\*\*\*@{head}:"):
            await cluster_redis_url(loopback_only.url, head)
    with RedisServer(password="s3cret", bind_all=True) as reachable:
        assert await cluster_redis_url(reachable.url, head) == actor_redis_url(reachable.url, head)


def test_labels_come_from_flags_or_a_config_table():
    argv = table_to_argv({"labels": {"region": "eu-west", "tier": "gpu"}, "edges": 4})
    assert argv == ["--labels", "region=eu-west", "--labels", "tier=gpu", "--edges", "4"]
    assert parse_labels(["region=eu-west", "tier=gpu"]) == {"region": "eu-west", "tier": "gpu"}
    with pytest.raises(UsageError, match="--label: must be KEY=VALUE, got 'eu'"):
        parse_labels(["eu"])


def test_a_cluster_needs_one_redis_every_node_reaches(tmp_path):
    target, draft = save_model_pair(tmp_path)
    with pytest.raises(ValueError, match="redis_url: needed with ray_address"):
        StackConfig(target_dir=target, draft_dir=draft, ray_address="auto")


@pytest.mark.slow
async def test_verifiers_wait_for_a_gpu_node_and_nodes_register_their_labels(tmp_path):
    interface_address()
    target, draft = save_model_pair(tmp_path)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    redis = RedisServer(password="cluster-secret", bind_all=True).start()
    try:
        # A CPU node that offers a `cloud` slot too: a verifier that did not ask for a
        # GPU would land here at once.
        cluster.add_node(
            num_cpus=2,
            resources={"edge": 2, "cloud": 1},
            labels={"region": "eu-west", "tier": "edge"},
        )
        config = StackConfig(
            target_dir=target,
            draft_dir=draft,
            edges=1,
            verifiers=1,
            redis_url=redis.url,
            ray_address=cluster.address,
            gateway_port=0,
            labels={"region": "us-east", "fleet": "test"},
        )
        stack = Stack(config)
        starting = asyncio.ensure_future(stack.start())
        await asyncio.sleep(8)
        assert not starting.done(), "up finished without a GPU node for its verifier"
        # The GPU node joins late, as the autoscaler would add it (a declared GPU: the
        # verifier runs on this machine's CPU). Added from this thread: Ray starts a
        # node's processes from the main thread only; the loop waits the second it takes.
        cluster.add_node(
            num_cpus=2,
            num_gpus=1,
            resources={"cloud": 1},
            labels={"region": "eu-west", "tier": "cloud"},
        )
        await asyncio.wait_for(starting, 180)
        try:
            client = connect_async(redis.url)
            nodes = {n.info.node_id: n.info for n in await AsyncRegistry(client).list_nodes()}
            assert set(nodes) == {"verifier-0", "edge-0"}
            # The node's own labels win over the ones `up` gave every node.
            assert dict(nodes["verifier-0"].labels) == {
                "fleet": "test",
                "region": "eu-west",
                "tier": "cloud",
            }
            assert dict(nodes["edge-0"].labels)["tier"] == "edge"
            placement = AsyncPlacement(client)
            lease = await placement.pick(
                "cloud", config.served_name, labels={"region": "eu-west", "tier": "cloud"}
            )
            assert lease is not None and lease.node_id == "verifier-0"
            await placement.release(lease)
            assert await placement.pick("cloud", config.served_name, labels={"tier": "x"}) is None
            await client.aclose()
            async with edgecloud.AsyncClient(
                stack.gateway_address, token=stack.client_token
            ) as sdk:
                lossless = await sdk.generate(PROMPT, max_tokens=16)
                cloud = await sdk.generate(PROMPT, max_tokens=16, mode="cloud_only")
            assert lossless.tokens == cloud.tokens and lossless.stats.rounds > 0
        finally:
            await stack.stop()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
        redis.stop()
