"""Lossless sampling end to end (edge drafts, verifier accepts over gRPC): the first
generated token follows the target's distribution; seeded runs reproduce, also
across a failover to another verifier."""

from __future__ import annotations

import pytest
import torch

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.types import DraftConfig, GenerationRequest
from lm.sampling import SamplingParams, probs_from_logits
from protocol.types import Mode
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.edge_node.conftest import make_runtime, noisy_copy
from tests.stats import chi_square_pvalue
from tests.tiny import MODEL_NAME, SHAPES, TOKEN, tiny_model

VOCAB = 8
PROMPT = (1, 2, 3)
TRIALS = 600


@pytest.fixture(scope="module", params=sorted(SHAPES))
def pair(request):
    """Target and draft of each architecture: GQA, MLA (latent cache) and Gemma 3 (its
    3-token window crossed from the first round)."""
    target = tiny_model(seed=31, vocab=VOCAB, sharpen=2.0, **SHAPES[request.param])
    return target, noisy_copy(target, 0.3, seed=2)


@pytest.fixture
async def small_verifier(pair):
    server = await start_verifier(
        pair[0],
        VerifierConfig(model_name=MODEL_NAME, max_context=128, max_sessions=16),
        ServerConfig(port=0, auth=AuthConfig(token=TOKEN)),
    )
    yield server
    await server.drain()


def sampled(seed: int, draft: DraftConfig, max_tokens: int = 1) -> GenerationRequest:
    return GenerationRequest(
        prompt_tokens=PROMPT,
        max_tokens=max_tokens,
        sampling=SamplingParams(temperature=1.0, seed=seed),
        mode=Mode.LOSSLESS,
        draft=draft,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "draft",
    [DraftConfig("chain", 1, 3, adapt=False), DraftConfig("beam", 3, 2, adapt=False)],
    ids=["sampled-chain-with-q", "beam-tree-point-masses"],
)
async def test_first_token_follows_the_target(pair, small_verifier, draft):
    target, draft_model = pair
    runtime = make_runtime(draft_model, [f"127.0.0.1:{small_verifier.port}"])
    firsts = []
    for seed in range(TRIALS):
        chunks = [c async for c in runtime.generate(sampled(seed, draft))]
        firsts.append(chunks[0].tokens[0])
    await runtime.close()
    with torch.inference_mode():
        p = probs_from_logits(target(torch.tensor([PROMPT]))[0, -1], SamplingParams(1.0))
    p_value = chi_square_pvalue(
        torch.bincount(torch.tensor(firsts), minlength=VOCAB).tolist(), p.tolist()
    )
    print(f"{draft.tree}: p={p_value:.3g}")
    assert p_value > 1e-3


async def test_seeded_sampling_reproduces_across_failover(pair, small_verifier):
    target, draft_model = pair
    other = await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_context=128),
        ServerConfig(port=0, auth=AuthConfig(token=TOKEN)),
    )
    request = sampled(7, DraftConfig("chain", 1, 3, adapt=False), max_tokens=40)
    runtime = make_runtime(
        draft_model, [f"127.0.0.1:{small_verifier.port}", f"127.0.0.1:{other.port}"]
    )
    first = [t async for c in runtime.generate(request) for t in c.tokens]
    again = [t async for c in runtime.generate(request) for t in c.tokens]  # on `other`
    assert first == again
    failed, chunks = [], []
    async for chunk in runtime.generate(request):  # on the first verifier again
        chunks.append(chunk)
        failed += chunk.tokens
        if len(chunks) == 2:
            await small_verifier.server.server.stop(0)  # abrupt: cancels the open stream
    await runtime.close()
    await other.drain()
    assert chunks[-1].stats.failovers == 1
    assert failed == first
