"""The edge runs its SLM from a flash pack: drafting (lossless) and edge_only, unchanged."""

from __future__ import annotations

import pytest
import torch

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.actor import EdgeNode
from edge_node.flash.ffn import flash_store, load_flash_model
from edge_node.flash.pack import pack_model
from edge_node.flash.predictors import save_predictors
from edge_node.runtime import EdgeConfig
from edge_node.slm import EdgeLM
from edge_node.types import DraftOptions, GenerationRequest, Mode
from lm.checkpoint import save_model
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.edge_node.conftest import make_runtime, noisy_copy
from tests.flash.conftest import OPTIONS, budget_info, exact_predictors, make_model
from tests.tiny import MODEL_NAME, TOKEN

PROMPT = (1, 5, 9, 33, 2)


@pytest.fixture(scope="module")
def target():
    model = make_model(seed=21)
    model.output.weight.data.mul_(4.0)  # peaked distributions: drafts often accepted
    return model


@pytest.fixture(scope="module")
def draft(target):
    return noisy_copy(target, 0.01, seed=5)


@pytest.fixture(scope="module")
def draft_pack(draft, tmp_path_factory):
    """The draft as a flash pack with exact ReLU predictors (so its outputs are the
    dense draft's), served within half of what holding everything would take."""
    model_dir = tmp_path_factory.mktemp("draft")
    save_model(draft, model_dir)
    pack = tmp_path_factory.mktemp("draft_pack")
    manifest = pack_model(model_dir, pack)
    save_predictors(pack, manifest, exact_predictors(draft), {"activation": "relu"})
    return pack


@pytest.fixture
async def verifier(target):
    server = await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_context=256),
        ServerConfig(port=0, auth=AuthConfig(token=TOKEN)),
    )
    yield server
    await server.drain()


def flash_draft(pack):
    minimum, everything = budget_info(pack)
    return load_flash_model(pack, (minimum + everything) // 2, device="cpu", options=OPTIONS)


async def run(runtime, mode, draft=DraftOptions("beam", 3, 4)):
    request = GenerationRequest(prompt_tokens=PROMPT, max_tokens=16, mode=mode, draft=draft)
    chunks = [c async for c in runtime.generate(request)]
    return [t for c in chunks for t in c.tokens], chunks[-1].stats


def test_edge_lm_scores_prefill_and_tree_nodes_like_the_dense_draft(draft, draft_pack):
    views = [EdgeLM(draft), EdgeLM(flash_draft(draft_pack))]
    results = []
    for lm in views:
        lm.reset(PROMPT)
        root = lm.next_logits()
        # A two-level tree: nodes 0 and 1 under the root, node 2 under node 0.
        first = lm.forward_nodes([0, 1], [7, 8], [[], []])
        second = lm.forward_nodes([2], [9], [[0]])
        results.append(torch.cat([root[None], first, second]))
    torch.testing.assert_close(results[1], results[0], atol=1e-5, rtol=0)


async def test_lossless_with_a_flash_drafter_equals_cloud_only(draft_pack, verifier):
    flash = flash_draft(draft_pack)
    runtime = make_runtime(flash, [f"127.0.0.1:{verifier.port}"])
    try:
        expected, _ = await run(runtime, Mode.CLOUD_ONLY)
        tokens, stats = await run(runtime, Mode.LOSSLESS)
    finally:
        await runtime.close()
    assert tokens == expected
    assert stats.rounds < 16 and stats.accepted_tokens > 0  # its drafts were accepted
    assert flash_store(flash).totals.metrics.neurons_read > 0


async def test_edge_only_from_a_pack_through_the_actor(draft, draft_pack):
    node = EdgeNode("edge-0", str(draft_pack), EdgeConfig(model_name="d"), None, flash_budget_mb=64)
    assert flash_store(node.runtime.model).plan.rows == 256  # 64 MiB holds everything
    expected = EdgeLM(draft)
    expected.reset(PROMPT)
    greedy = []
    for _ in range(10):
        token = int(expected.next_logits().argmax())
        greedy.append(token)
        expected.append([token])
    try:
        tokens, stats = await run(node.runtime, Mode.EDGE_ONLY)
    finally:
        await node.runtime.close()
    assert tokens[:10] == greedy
    assert stats.cloud_forward_passes == 0
