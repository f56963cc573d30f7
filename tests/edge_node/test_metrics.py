"""Prometheus metrics after real traffic: a real verifier and a real edge server, each
with its /metrics on a port of its own, scraped over HTTP after SDK generations. Every
counter checked moved by exactly what the generations' own statistics say."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

import edgecloud
from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.server import start_edge_server
from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import generation_pb2_grpc as gpb_grpc
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.edge_node.conftest import make_runtime
from tests.tiny import MODEL_NAME, TOKEN

CLIENT_TOKEN = "metrics-client-token"
PROMPT = [1, 5, 9, 22]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of the endpoint on loopback `port`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
async def servers(target, draft):
    verifier = await start_verifier(
        target,
        # A batch window long enough that concurrent sessions' rounds share passes
        # whatever the machine's load (the pass-count assertion below depends on it).
        VerifierConfig(model_name=MODEL_NAME, max_context=256, max_sessions=6, batch_window_ms=50),
        ServerConfig(port=0, auth=AuthConfig(token=TOKEN), metrics_port=0),
    )
    runtime = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    edge = await start_edge_server(
        runtime, ServerConfig(port=0, auth=AuthConfig(token=CLIENT_TOKEN), metrics_port=0)
    )
    yield verifier, edge
    await edge.drain()
    await verifier.drain()


async def test_verifier_and_edge_count_what_the_generations_report(servers):
    verifier, edge = servers
    async with edgecloud.AsyncClient(f"127.0.0.1:{edge.port}", token=CLIENT_TOKEN) as client:
        lossless = await asyncio.gather(
            client.generate(PROMPT, max_tokens=24),
            client.generate(PROMPT, max_tokens=24),
            client.generate(PROMPT, max_tokens=20, temperature=0.7, seed=3),
        )
        cloud = await client.generate(PROMPT, max_tokens=12, mode="cloud_only")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{edge.port}") as channel:
        stub = gpb_grpc.GenerationStub(channel)
        bad = gpb.GenerateRequest(prompt_tokens=PROMPT, max_tokens=8, top_p=2.0)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Generate(
                bad, metadata=[("authorization", f"Bearer {CLIENT_TOKEN}")]
            ):
                pass
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    stats = [r.stats for r in lossless]
    assert all(s.failovers == 0 for s in stats)
    edge_samples = await asyncio.to_thread(scrape, edge.server.metrics.port)
    verifier_samples = await asyncio.to_thread(scrape, verifier.server.metrics.port)

    def at_edge(name: str, **labels: str) -> float:
        return value(edge_samples, name, **labels)

    def at_verifier(name: str, **labels: str) -> float:
        return value(verifier_samples, name, **labels)

    # Requests by mode and outcome, and their latency histograms.
    assert at_edge("edgecloud_requests_total", mode="lossless", outcome="length") == 3
    assert at_edge("edgecloud_requests_total", mode="cloud_only", outcome="length") == 1
    assert at_edge("edgecloud_requests_total", mode="lossless", outcome="invalid_argument") == 1
    assert at_edge("edgecloud_time_to_first_token_seconds_count", mode="lossless") == 3
    assert at_edge("edgecloud_time_per_output_token_seconds_count", mode="cloud_only") == 1
    assert at_edge("edgecloud_generation_tokens_total", mode="lossless") == 24 + 24 + 20
    # Per-token inter-token latency: one observation per token after the first.
    assert at_edge("edgecloud_inter_token_latency_seconds_count", mode="lossless") == 68 - 3
    # Speculative decoding at the edge: the sums of the streams' own statistics.
    everything = [*stats, cloud.stats]
    assert at_edge("edgecloud_spec_decode_num_drafts_total") == sum(s.rounds for s in everything)
    drafted = sum(s.draft_tokens for s in stats)
    accepted = sum(s.accepted_tokens for s in stats)
    assert 0 < accepted < drafted
    assert at_edge("edgecloud_spec_decode_num_draft_tokens_total") == drafted
    assert at_edge("edgecloud_spec_decode_num_accepted_tokens_total") == accepted
    per_position = [
        at_edge("edgecloud_spec_decode_num_accepted_tokens_per_pos_total", position=str(i))
        for i in range(max(len(s.accepted_per_position) for s in stats))
    ]
    assert sum(per_position) == accepted
    assert per_position == sorted(per_position, reverse=True)
    # The verifier saw the same drafts, and decoded cloud_only's tokens itself.
    assert at_verifier("edgecloud_verifier_draft_tokens_total") == drafted
    assert at_verifier("edgecloud_verifier_accepted_tokens_total") == accepted
    # cloud_only's request is one round (an empty tree) and the verifier's own steps.
    assert at_verifier("edgecloud_verifier_rounds_total") == sum(s.rounds for s in stats) + 1
    assert at_verifier("edgecloud_verifier_decode_steps_total") >= len(cloud.tokens) - 1
    round_passes = at_verifier("edgecloud_verifier_forward_passes_total", kind="round")
    assert round_passes == at_verifier("edgecloud_verifier_batch_size_count")
    steps = at_verifier("edgecloud_verifier_batch_size_sum")
    assert steps == at_verifier("edgecloud_verifier_rounds_total") + at_verifier(
        "edgecloud_verifier_decode_steps_total"
    )
    assert round_passes < steps  # concurrent sessions shared passes
    assert at_verifier("edgecloud_verifier_busy_seconds_total", kind="round") > 0
    # Four sessions: the three opened together may share prefill passes, cloud_only's not.
    assert 2 <= at_verifier("edgecloud_verifier_forward_passes_total", kind="prefill") <= 4
    assert at_verifier("edgecloud_verifier_kv_rows") == 6
    assert at_verifier("edgecloud_verifier_queue_depth") == 0
    # The heartbeat's numbers are the same counts.
    assert verifier.engine.metrics.totals == {
        "rounds": sum(s.rounds for s in stats) + 1,
        "proposed_tokens": drafted,
        "accepted_tokens": accepted,
    }


async def test_servers_without_a_metrics_port_open_none(target):
    verifier = await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_context=256),
        ServerConfig(port=0, auth=AuthConfig(token=TOKEN)),
    )
    try:
        assert verifier.server.metrics is None
    finally:
        await verifier.drain()
