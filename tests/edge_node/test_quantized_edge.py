"""An edge whose SLM runs from int4/int8 codes (`lm.quantized`) drafting for a float
verifier over real gRPC: the edge's numerics change only what is accepted, never the
output. Greedy lossless equals cloud-only for every drafter (trees, pipelined rounds);
seeded sampling reproduces and its first token follows the target's distribution."""

from __future__ import annotations

import copy

import pytest
import torch

from edge_node.types import DraftConfig
from lm.quantized import Int4Linear, Int8Linear, QuantScheme, quantize_model
from lm.sampling import SamplingParams, probs_from_logits
from protocol.types import Mode
from tests.edge_node.conftest import make_runtime
from tests.edge_node.test_lossless import PROMPTS, run
from tests.edge_node.test_sampling_e2e import PROMPT, VOCAB, pair, sampled, small_verifier
from tests.stats import chi_square_pvalue

__all__ = ["pair", "small_verifier"]  # fixtures this module uses from test_sampling_e2e


QUANT_TAU_FLOOR = {"int4": 1.25, "int8": 2.0}


@pytest.fixture(scope="module", params=["int4", "int8"])
def quantized_draft(request, draft):
    model = quantize_model(copy.deepcopy(draft), QuantScheme.named(request.param))
    kind = Int4Linear if request.param == "int4" else Int8Linear
    assert isinstance(model.layers[0].feed_forward.gate_up, kind)
    return request.param, model


@pytest.mark.parametrize(
    "options",
    [DraftConfig("beam", 4, 5), DraftConfig("chain", 1, 4), DraftConfig("topk", 3, 4)],
    ids=["beam", "chain", "topk"],
)
async def test_lossless_greedy_with_a_quantized_edge_equals_cloud_only(
    quantized_draft, verifier, options
):
    name, model = quantized_draft
    runtime = make_runtime(model, [f"127.0.0.1:{verifier.port}"])
    taus = []
    try:
        for prompt in PROMPTS:
            expected, _, _ = await run(runtime, prompt, Mode.CLOUD_ONLY)
            got, stats, _ = await run(runtime, prompt, Mode.LOSSLESS, options)
            assert got == expected, prompt
            taus.append(stats.tokens_per_round)
    finally:
        await runtime.close()
    # The quantized draft still drafts what the target says. Measured mean tokens per
    # round over PROMPTS: float draft 2.9-3.2, int8 2.7-3.7, int4 1.5-2.7 (this tiny random
    # model loses much at 4 bits), an unrelated model 1.02.
    assert sum(taus) / len(taus) > QUANT_TAU_FLOOR[name]


@pytest.mark.parametrize("temperature", [0.7, 1.0])
async def test_seeded_sampling_with_a_quantized_edge_reproduces(
    quantized_draft, verifier, temperature
):
    runtime = make_runtime(quantized_draft[1], [f"127.0.0.1:{verifier.port}"])
    sampling = SamplingParams(temperature=temperature, seed=11)
    try:
        first, stats, _ = await run(
            runtime, PROMPTS[0], Mode.LOSSLESS, DraftConfig("beam", 3, 4), sampling=sampling
        )
        again, _, _ = await run(
            runtime, PROMPTS[0], Mode.LOSSLESS, DraftConfig("beam", 3, 4), sampling=sampling
        )
    finally:
        await runtime.close()
    assert first == again and len(first) == 30
    assert stats.accepted_tokens > 0


@pytest.mark.slow
async def test_first_token_with_a_quantized_edge_follows_the_target(pair, small_verifier):
    target, draft = pair
    if draft.config.mla:
        pytest.skip("multi-head latent attention is not quantizable (lm.quantized)")
    quantized = quantize_model(copy.deepcopy(draft), QuantScheme.named("int4"))
    runtime = make_runtime(quantized, [f"127.0.0.1:{small_verifier.port}"])
    firsts = []
    for seed in range(400):
        chunks = [c async for c in runtime.generate(sampled(seed, DraftConfig("chain", 1, 3)))]
        firsts.append(chunks[0].tokens[0])
    await runtime.close()
    with torch.inference_mode():
        p = probs_from_logits(target(torch.tensor([PROMPT]))[0, -1], SamplingParams(1.0))
    counts = torch.bincount(torch.tensor(firsts), minlength=VOCAB).tolist()
    assert chi_square_pvalue(counts, p.tolist()) > 1e-3
