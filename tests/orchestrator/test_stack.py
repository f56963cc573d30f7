"""The whole system on one machine: a private Redis, local Ray with verifier and edge
actors, and the gateway; driven through the SDK."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

import pytest
import pytest_asyncio
import ray
from prometheus_client.parser import text_string_to_metric_families

import edgecloud
from orchestrator.registry import AsyncRegistry, NodeInfo, connect_async
from orchestrator.stack import Stack, StackConfig
from tests.edge_node.conftest import save_model_pair
from tests.tiny import MODEL_NAME

PROMPT = [1, 5, 9, 22]
# One stack for the module (starting Ray and its actors takes seconds); the test that
# kills a verifier runs last.
pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    return save_model_pair(tmp_path_factory.mktemp("models"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(model_dirs):
    target, draft = model_dirs
    s = Stack(
        StackConfig(
            target_dir=target,
            draft_dir=draft,
            edges=2,
            verifiers=2,
            gateway_port=0,
            http_port=0,
            metrics_port=0,
        )
    )
    await s.start()
    yield s
    await s.stop()
    assert not ray.is_initialized()


async def test_stack_serves_lossless_equal_to_cloud_only_and_spreads_load(stack):
    async with edgecloud.AsyncClient(stack.gateway_address, token=stack.client_token) as client:
        results = await asyncio.gather(
            *(client.generate(PROMPT, max_tokens=24) for _ in range(6)),
            client.generate(PROMPT, max_tokens=24, mode="cloud_only"),
        )
        models = await client.list_models()
    *lossless, cloud = results
    assert all(list(r.tokens) == list(cloud.tokens) for r in lossless)
    assert all(r.stats.rounds < cloud.stats.rounds for r in lossless)
    assert [(m.name, list(m.roles)) for m in models] == [(MODEL_NAME, ["cloud", "edge"])]
    registry = AsyncRegistry(connect_async(stack.redis_url))
    nodes = await registry.list_nodes()
    assert sorted(n.info.node_id for n in nodes) == ["edge-0", "edge-1", "verifier-0", "verifier-1"]
    completed = [await a.load.remote() for a in stack.edge_actors]
    assert all(report.completed > 0 for report in completed), completed
    passes = [await a.forward_passes.remote() for a in stack.verifier_actors]
    assert all(p > 0 for p in passes), passes


async def test_gateway_rejects_clients_without_the_token(stack):
    async with edgecloud.AsyncClient(stack.gateway_address) as client:
        with pytest.raises(edgecloud.Unauthenticated):
            await client.generate(PROMPT, max_tokens=3)
    async with edgecloud.AsyncClient(stack.gateway_address, token=stack.client_token) as client:
        with pytest.raises(edgecloud.InvalidRequest, match="top_k"):
            await client.generate(PROMPT, max_tokens=3, top_k=10_000)


async def test_an_edge_error_reaches_the_client_clean(stack):
    """The edge rejects a token outside the vocabulary; the client gets that message,
    not a Ray traceback."""
    async with edgecloud.AsyncClient(stack.gateway_address, token=stack.client_token) as client:
        with pytest.raises(edgecloud.InvalidRequest) as caught:
            await client.generate([1, 64], max_tokens=3)
    assert "prompt_tokens" in str(caught.value)
    assert "Traceback" not in str(caught.value) and "ray" not in str(caught.value).lower()


async def test_heartbeats_and_every_metrics_endpoint_count_the_traffic(stack):
    """`edgecloud status` reads acceptance from the heartbeats: after traffic, the edges'
    and the verifiers' totals grew by what the generations report; the gateway's
    /metrics (behind the token on the HTTP port) counted the requests, and each actor's
    own /metrics, found through the registry, counted its share."""
    registry = AsyncRegistry(connect_async(stack.redis_url))

    async def totals() -> dict[str, tuple[int, int, int]]:
        by_kind: dict[str, tuple[int, int, int]] = {}
        for node in await registry.list_nodes():
            old = by_kind.get(node.info.kind, (0, 0, 0))
            s = node.stats
            by_kind[node.info.kind] = (
                old[0] + s.rounds,
                old[1] + s.proposed_tokens,
                old[2] + s.accepted_tokens,
            )
        return by_kind

    async def loads() -> tuple[int, int, int]:
        reports = [await a.load.remote() for a in stack.edge_actors]
        return tuple(
            sum(getattr(r, name) for r in reports)
            for name in ("rounds", "draft_tokens", "accepted_tokens")
        )

    before = await loads()
    async with edgecloud.AsyncClient(stack.gateway_address, token=stack.client_token) as client:
        results = await asyncio.gather(*(client.generate(PROMPT, max_tokens=20) for _ in range(3)))
    after = await loads()
    stats = [r.stats for r in results]
    assert after == (
        before[0] + sum(s.rounds for s in stats),
        before[1] + sum(s.draft_tokens for s in stats),
        before[2] + sum(s.accepted_tokens for s in stats),
    )
    assert after[2] > before[2]
    for _ in range(100):  # the next heartbeats carry them (every ttl / 3)
        now = await totals()
        if now["edge"] == after and now["cloud"][1:] == after[1:]:
            break
        await asyncio.sleep(0.1)
    assert now["edge"] == after
    # The verifiers verified what the edges drafted (their rounds leave out cloud_only's
    # server-side steps, which the edges count as rounds).
    assert now["cloud"][1:] == after[1:]

    def scrape(token: str | None, url: str = f"{stack.http.url}/metrics") -> tuple[int, str]:
        request = urllib.request.Request(url)
        if token:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as error:
            return error.code, ""

    assert (await asyncio.to_thread(scrape, None))[0] == 401
    status, text = await asyncio.to_thread(scrape, stack.client_token)
    assert status == 200
    key = ("edgecloud_requests_total", (("mode", "lossless"), ("outcome", "length")))
    assert parse(text)[key] >= 3

    nodes = await registry.list_nodes()
    assert all(n.info.metrics_address for n in nodes), [n.info for n in nodes]
    accepted = {"edge": 0.0, "cloud": 0.0}
    names = {
        "edge": "edgecloud_spec_decode_num_accepted_tokens_total",
        "cloud": "edgecloud_verifier_accepted_tokens_total",
    }
    for node in nodes:
        url = f"http://{node.info.metrics_address}/metrics"
        status, text = await asyncio.to_thread(scrape, None, url)
        assert status == 200, node.info
        accepted[node.info.kind] += parse(text)[(names[node.info.kind], ())]
    assert accepted == {"edge": after[2], "cloud": after[2]}


def parse(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_openai_http_through_the_gateway(stack):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{stack.http.url}/v1", api_key=stack.client_token)
    lossless = await client.completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=16, temperature=0
    )
    cloud = await client.completions.create(
        model=MODEL_NAME,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        extra_body={"mode": "cloud_only"},
    )
    with pytest.raises(openai.NotFoundError, match="no node serves 'nope'"):
        await client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    await client.close()
    assert lossless.choices[0].token_ids == cloud.choices[0].token_ids
    assert len(lossless.choices[0].token_ids) == 16


async def test_models_report_the_edges_vocabulary_and_context(stack):
    """The SDK's list_models (gRPC ListModels) and /v1/models through the gateway give
    the vocabulary and context an edge reports (the registry holds names only); a model
    whose edge does not answer (no actor behind it) is listed with what is known."""
    import openai

    registry = AsyncRegistry(connect_async(stack.redis_url))
    ghost = NodeInfo(
        node_id="edge-ghost", kind="edge", address="ray:edge-ghost", models=("ghost",), capacity=1
    )
    await registry.register(ghost, ttl_s=60)
    try:
        async with edgecloud.AsyncClient(stack.gateway_address, token=stack.client_token) as sdk:
            models = {m.name: m for m in await sdk.list_models()}
        client = openai.AsyncOpenAI(base_url=f"{stack.http.url}/v1", api_key=stack.client_token)
        cards = {m.id: m.edgecloud async for m in client.models.list()}
        await client.close()
    finally:
        await registry.deregister("edge-ghost")
    served, unknown = models[MODEL_NAME], models["ghost"]
    assert (served.vocab_size, served.max_context) == (64, 512)
    assert (unknown.vocab_size, unknown.max_context, tuple(unknown.roles)) == (0, 0, ("edge",))
    assert cards == {
        MODEL_NAME: {"roles": ["cloud", "edge"], "vocab_size": 64, "max_context": 512},
        "ghost": {"roles": ["edge"], "vocab_size": 0, "max_context": 0},
    }


async def test_killed_verifier_leaves_rotation_and_sessions_fail_over(stack):
    async with edgecloud.AsyncClient(stack.gateway_address, token=stack.client_token) as client:
        reference = await client.generate(PROMPT, max_tokens=40, mode="cloud_only")
        ray.kill(stack.verifier_actors[0], no_restart=True)
        results = await asyncio.gather(*(client.generate(PROMPT, max_tokens=40) for _ in range(4)))
    assert all(list(r.tokens) == list(reference.tokens) for r in results)
