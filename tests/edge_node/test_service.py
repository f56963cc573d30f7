"""The SDK against a real stack on loopback: an edge serving `Generation` and a
verifier, both real gRPC servers. Sync, async and streaming agree; every error code
reaches the client as its exception; cancellation leaves no session behind."""

from __future__ import annotations

import asyncio

import grpc
import pytest

import edgecloud
from edge_node.runtime import EdgeConfig, EdgeRuntime
from edge_node.server import start_edge_server
from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import generation_pb2_grpc as gpb_grpc
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.edge_node.conftest import make_runtime
from tests.tiny import MODEL_NAME

CLIENT_TOKEN = "client-token-91"
PROMPT = [1, 5, 9, 22]


@pytest.fixture
async def edge(draft, verifier):
    runtime = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    server = await start_edge_server(
        runtime, ServerConfig(port=0, auth=AuthConfig(token=CLIENT_TOKEN))
    )
    yield server
    await server.drain()


def client_for(edge, **kw) -> edgecloud.AsyncClient:
    return edgecloud.AsyncClient(f"127.0.0.1:{edge.port}", token=CLIENT_TOKEN, **kw)


async def test_sync_async_and_streaming_agree(edge):
    async with client_for(edge) as client:
        result = await client.generate(PROMPT, max_tokens=40)
        async with client.stream(PROMPT, max_tokens=40) as stream:
            streamed = [t async for chunk in stream for t in chunk.tokens]
        cloud = await client.generate(PROMPT, max_tokens=40, mode="cloud_only")

    def sync_generate():
        with edgecloud.Client(f"127.0.0.1:{edge.port}", token=CLIENT_TOKEN) as client:
            return client.generate(PROMPT, max_tokens=40)

    sync = await asyncio.to_thread(sync_generate)
    assert list(result.tokens) == streamed == list(sync.tokens) == list(cloud.tokens)
    assert len(result.tokens) == 40
    assert result.stats.rounds < cloud.stats.rounds == 40
    assert result.stats.tau > 1.5


async def test_list_models_and_health(edge):
    async with client_for(edge) as client:
        models = await client.list_models()
        health = await client.health()
    assert [m.name for m in models] == [MODEL_NAME]
    assert models[0].vocab_size == 64
    assert health == edgecloud.HealthStatus.SERVING


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_tokens", 0),
        ("temperature", -1.0),
        ("top_p", 2.0),
        ("top_k", 65),
        ("prompt_tokens", [64]),
    ],
)
async def test_server_checks_input_itself(edge, field, value):
    """A client that skips the SDK's checks gets INVALID_ARGUMENT naming the field."""
    request = gpb.GenerateRequest(prompt_tokens=PROMPT, max_tokens=5)
    if isinstance(value, list):
        del request.prompt_tokens[:]
        request.prompt_tokens.extend(value)
    else:
        setattr(request, field, value)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
        stub = gpb_grpc.GenerationStub(channel)
        call = stub.Generate(request, metadata=(("authorization", f"Bearer {CLIENT_TOKEN}"),))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field.split("_tokens")[0] in caught.value.details()
    async with client_for(edge) as client:
        assert len((await client.generate(PROMPT, max_tokens=3)).tokens) == 3


async def test_text_prompt_without_tokenizer_is_invalid(edge):
    async with client_for(edge) as client:
        with pytest.raises(edgecloud.InvalidRequest, match="prompt"):
            await client.generate("hello", max_tokens=3)


async def test_wrong_token_is_unauthenticated(edge):
    async with edgecloud.AsyncClient(f"127.0.0.1:{edge.port}", token="nope") as client:
        with pytest.raises(edgecloud.Unauthenticated):
            await client.generate(PROMPT, max_tokens=3)
    async with edgecloud.AsyncClient(f"127.0.0.1:{edge.port}") as client:
        with pytest.raises(edgecloud.Unauthenticated):
            await client.generate(PROMPT, max_tokens=3)


async def test_deadline_exceeded(edge):
    async with client_for(edge, timeout=0.001) as client:
        with pytest.raises(edgecloud.DeadlineExceeded):
            await client.generate(PROMPT, max_tokens=50)


async def test_busy_edge_is_resource_exhausted(draft, verifier):
    runtime = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    runtime.config = EdgeConfig(model_name=MODEL_NAME, max_concurrency=1)
    server = await start_edge_server(
        runtime, ServerConfig(port=0, auth=AuthConfig(token=CLIENT_TOKEN))
    )
    try:
        async with client_for(server) as client:
            async with client.stream(PROMPT, max_tokens=200) as stream:
                await stream.__anext__()
                with pytest.raises(edgecloud.ResourceExhausted, match="max_concurrency"):
                    await client.generate(PROMPT, max_tokens=3)
    finally:
        await server.drain()


async def test_edge_without_verifier_serves_edge_only_and_refuses_cloud_modes(draft):
    runtime = EdgeRuntime(draft, EdgeConfig(model_name=MODEL_NAME))
    server = await start_edge_server(
        runtime, ServerConfig(port=0, auth=AuthConfig(token=CLIENT_TOKEN))
    )
    try:
        async with client_for(server) as client:
            with pytest.raises(edgecloud.InvalidRequest, match="mode"):
                await client.generate(PROMPT, max_tokens=3)
            result = await client.generate(PROMPT, max_tokens=5, mode="edge_only")
        assert len(result.tokens) == 5 and result.stats.rounds == 0
    finally:
        await server.drain()


async def test_cancelled_generation_leaves_no_verifier_session(edge, verifier):
    async with client_for(edge) as client:
        async with client.stream(PROMPT, max_tokens=200) as stream:
            await stream.__anext__()
            assert len(verifier.engine.sessions) == 1
    for _ in range(100):
        if not verifier.engine.sessions:
            break
        await asyncio.sleep(0.02)
    assert verifier.engine.sessions == {}
    assert edge.runtime.load.active == 0


async def test_priority_and_tpot_target_reach_the_verifier(edge, verifier):
    """The request's scheduling fields cross SDK -> edge -> verifier once each: the
    verifier's session carries them (its open is wrapped to record, then runs)."""
    engine, opened = verifier.engine, []
    real_open = engine.open

    async def recording_open(request):
        opened.append(request.schedule)
        return await real_open(request)

    engine.open = recording_open
    async with client_for(edge) as client:
        await client.generate(PROMPT, max_tokens=8, priority=-3, tpot_slo_ms=40.0)
        with pytest.raises(edgecloud.InvalidRequest, match="tpot_slo_ms"):
            await client.generate(PROMPT, max_tokens=8, tpot_slo_ms=-1.0)
    assert [(s.priority, s.tpot_slo_ms) for s in opened] == [(-3, 40.0)]
