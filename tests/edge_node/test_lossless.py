"""Lossless greedy output equals cloud-only greedy output, token for token, for every
drafter; the statistics add up; adaptive and edge-only modes behave as documented."""

from __future__ import annotations

import pytest
import torch

from edge_node.types import DraftConfig, GenerationRequest
from lm.sampling import SamplingParams
from protocol.types import Mode

PROMPTS = [(1, 5, 9), (3,), (7, 7, 7, 2, 40, 11), (12, 30)]


async def run(runtime, prompt, mode, draft=DraftConfig(), max_tokens=30, sampling=SamplingParams()):
    chunks = [
        c
        async for c in runtime.generate(
            GenerationRequest(
                prompt_tokens=prompt,
                max_tokens=max_tokens,
                sampling=sampling,
                mode=mode,
                draft=draft,
            )
        )
    ]
    tokens = [t for c in chunks for t in c.tokens]
    return tokens, chunks[-1].stats, chunks


@pytest.mark.parametrize(
    "options",
    [
        DraftConfig("beam", 4, 5),
        DraftConfig("chain", 1, 4),
        DraftConfig("topk", 3, 4),
        DraftConfig("beam", 2, 8, adapt=False),
    ],
    ids=["beam", "chain", "topk", "beam-fixed"],
)
async def test_lossless_greedy_equals_cloud_only(runtime, options):
    for prompt in PROMPTS:
        expected, cloud_stats, _ = await run(runtime, prompt, Mode.CLOUD_ONLY)
        got, stats, chunks = await run(runtime, prompt, Mode.LOSSLESS, options)
        assert got == expected, prompt
        assert all(c.verified for c in chunks)
        assert cloud_stats.rounds == 30 and cloud_stats.tokens_per_round == 1.0
        assert stats.rounds < cloud_stats.rounds
        assert stats.generated_tokens == 30
        assert stats.tokens_per_round == pytest.approx(
            (stats.accepted_tokens + stats.rounds) / stats.rounds
        )
        assert sum(stats.accepted_per_position[:1]) <= stats.rounds
        assert stats.bytes_to_cloud > 0 and stats.bytes_from_cloud > 0


async def test_beam_dedup_saving_is_reported(runtime):
    _, stats, _ = await run(
        runtime, PROMPTS[0], Mode.LOSSLESS, DraftConfig("beam", 4, 6, adapt=False)
    )
    assert stats.dedup_saved_tokens > 0
    assert stats.draft_tokens + stats.dedup_saved_tokens == 24 * stats.rounds


async def test_edge_only_never_calls_the_cloud(runtime, verifier):
    before = verifier.engine.forward_passes
    tokens, stats, chunks = await run(runtime, PROMPTS[0], Mode.EDGE_ONLY, max_tokens=12)
    assert len(tokens) == 12 and stats.rounds == 0
    assert not any(c.verified for c in chunks[:-1])
    assert verifier.engine.forward_passes == before


async def test_adaptive_keeps_exactly_the_confident_tokens_unverified(runtime, draft):
    prompt = PROMPTS[2]
    fixed = DraftConfig("chain", 1, 3, adapt=False)  # round boundaries must not depend on timing
    tokens, stats, chunks = await run(runtime, prompt, Mode.ADAPTIVE, fixed, max_tokens=30)
    assert len(tokens) == 30
    history = list(prompt)
    kept = 0
    for chunk in chunks[:-1]:
        if not chunk.verified:
            with torch.inference_mode():
                probs = torch.softmax(draft(torch.tensor([history]))[0, -1], -1)
            assert chunk.tokens == (int(probs.argmax()),)
            assert float(probs.max()) >= 0.9
            kept += 1
        history += chunk.tokens
    assert 0 < kept < 30
    assert stats.rounds > 0 and not stats.degraded


async def test_max_tokens_and_eos_stop(runtime):
    tokens, stats, chunks = await run(runtime, PROMPTS[1], Mode.LOSSLESS, max_tokens=7)
    assert len(tokens) == 7 and chunks[-1].finish_reason == "length"


async def test_pipelined_drafting_is_used_and_changes_nothing(draft, target):
    """With a slow round (here: the verifier's batching window, held open by a second,
    idle session) the edge drafts the next round during verification; when the round
    is accepted whole the pre-made draft is used, and the output stays exact."""
    from cloud_node.config import VerifierConfig
    from cloud_node.server import start_verifier
    from edge_node.verifier_client import VerifierSession
    from serving.auth import AuthConfig
    from serving.server import ServerConfig
    from tests.edge_node.conftest import make_runtime
    from tests.tiny import METADATA, MODEL_NAME, TOKEN

    server = await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_context=256, batch_window_ms=15.0),
        ServerConfig(port=0, auth=AuthConfig(token=TOKEN)),
    )
    runtime = make_runtime(draft, [f"127.0.0.1:{server.port}"])
    channel = runtime.link.channel(f"127.0.0.1:{server.port}")
    async with VerifierSession(channel, metadata=METADATA) as idle:
        await idle.open(MODEL_NAME, [1], SamplingParams())
        options = DraftConfig("beam", 2, 3, adapt=False)
        on, stats_on, _ = await run(runtime, PROMPTS[0], Mode.LOSSLESS, options, max_tokens=48)
        off_options = DraftConfig("beam", 2, 3, adapt=False, pipeline=False)
        off, stats_off, _ = await run(
            runtime, PROMPTS[0], Mode.LOSSLESS, off_options, max_tokens=48
        )
        cloud, _, _ = await run(runtime, PROMPTS[0], Mode.CLOUD_ONLY, max_tokens=48)
    await runtime.close()
    await server.drain()
    assert on == off == cloud
    assert stats_on.pipelined_rounds > 0
    assert stats_off.pipelined_rounds == 0


async def test_the_verifiers_load_reaches_the_edge(runtime, verifier):
    """Replies carry the verifier's load into the edge's shape policy (its statistics
    report the last one): idle, about 0; with six other sessions keeping the verifier busy,
    well above. The output stays exactly cloud-only's either way."""
    import asyncio
    import random

    from edge_node.verifier_client import VerifierSession
    from protocol.channel import open_aio_channel
    from tests.cloud_node.test_verify_greedy import random_tree
    from tests.tiny import METADATA, MODEL_NAME

    prompt = PROMPTS[2]
    expected, _, _ = await run(runtime, prompt, Mode.CLOUD_ONLY)
    await asyncio.sleep(1.1)  # the load window forgets that
    got, idle, _ = await run(runtime, prompt, Mode.LOSSLESS, DraftConfig("beam", 4, 5))
    assert got == expected and idle.verifier_load < 0.2

    stop = asyncio.Event()

    async def hammer(seed: int) -> None:
        rng = random.Random(seed)
        channel = open_aio_channel(f"127.0.0.1:{verifier.port}")
        async with VerifierSession(channel, metadata=METADATA) as session:
            await session.open(MODEL_NAME, [1, 2, 3], SamplingParams())
            while not stop.is_set():
                await session.verify(random_tree(rng, 64, 16))
        await channel.close()

    others = [asyncio.ensure_future(hammer(seed)) for seed in range(6)]
    await asyncio.sleep(0.5)
    got, busy, _ = await run(runtime, prompt, Mode.LOSSLESS, DraftConfig("beam", 4, 5))
    stop.set()
    await asyncio.gather(*others)
    assert got == expected
    assert busy.verifier_load > max(0.2, idle.verifier_load), (idle, busy)
