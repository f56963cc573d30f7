"""The edge runs its SLM from a flash pack: drafting (lossless) and edge_only, unchanged."""

from __future__ import annotations

import pytest
import torch

from edge_node.actor import EdgeNode
from edge_node.flash.ffn import flash_store, load_flash_model
from edge_node.flash.pack import pack_model
from edge_node.flash.predictors import save_predictors
from edge_node.runtime import EdgeConfig
from edge_node.slm import EdgeLM
from edge_node.types import DraftConfig, GenerationRequest
from lm.checkpoint import save_model
from protocol.types import Mode
from tests.edge_node.conftest import make_runtime, noisy_copy
from tests.flash.conftest import OPTIONS, budget_info, exact_predictors, make_model
from tests.tiny import MODEL_NAME

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


def flash_draft(pack):
    minimum, everything = budget_info(pack)
    return load_flash_model(pack, (minimum + everything) // 2, device="cpu", options=OPTIONS)


async def run(runtime, mode, draft=DraftConfig("beam", 3, 4)):
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
    assert set(flash_store(node.runtime.model).plan.rows) == {256}  # 64 MiB holds it all
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


@pytest.mark.slow
async def test_up_runs_every_edge_from_the_flash_pack(target, draft, draft_pack, tmp_path):
    """`edgecloud up --draft PACK --draft-flash-budget-mb 8 --draft-dtype float16` on a real
    local Ray: each edge actor holds the pack within 8 MiB with a float16 resident part,
    and edge_only output equals the dense draft's greedy decoding."""
    import ray

    import edgecloud
    from orchestrator.cli import build_parser
    from orchestrator.commands.stack import stack_config
    from orchestrator.stack import Stack

    target_dir = tmp_path / MODEL_NAME
    save_model(target, target_dir)
    argv = ["up", "--target", str(target_dir), "--draft", str(draft_pack), "--edges", "2"]
    argv += ["--draft-flash-budget-mb", "8", "--draft-dtype", "float16", "--port", "0"]
    config = stack_config(build_parser().parse_args(argv))
    assert (config.draft_flash_budget_mb, config.draft_dtype) == (8.0, "float16")
    greedy, ids = [], torch.tensor([PROMPT])
    with torch.no_grad():
        for _ in range(8):
            greedy.append(int(draft(ids)[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[greedy[-1]]])], dim=1)

    stack = await Stack(config).start()
    try:

        def store_state(node):
            model = node.runtime.model
            return flash_store(model).plan.budget, str(model.tok_embeddings.weight.dtype)

        for actor in stack.edge_actors:
            assert await actor.__ray_call__.remote(store_state) == (8 << 20, "torch.float16")
        async with edgecloud.AsyncClient(stack.gateway_address, token=stack.client_token) as c:
            result = await c.generate(list(PROMPT), max_tokens=8, mode="edge_only")
        assert list(result.tokens) == greedy
    finally:
        await stack.stop()
    assert not ray.is_initialized()


def test_stack_config_checks_the_flash_fields(draft_pack, tmp_path):
    from orchestrator.stack import StackConfig

    model_dir = tmp_path / "model"
    save_model(make_model(seed=3), model_dir)
    base = {"target_dir": model_dir, "draft_dir": draft_pack}
    with pytest.raises(ValueError, match="draft_flash_budget_mb: must be > 0, got 0"):
        StackConfig(**base, draft_flash_budget_mb=0)
    with pytest.raises(ValueError, match="draft_dir: .* is not a flash pack"):
        StackConfig(**base | {"draft_dir": model_dir}, draft_flash_budget_mb=8)
    with pytest.raises(ValueError, match="draft_dtype: must be float32, float16 or bfloat16"):
        StackConfig(**base, draft_dtype="float64")
    assert StackConfig(**base, draft_flash_budget_mb=8).draft_flash_budget_mb == 8


def test_stack_config_rejects_quantizing_a_flash_pack(draft_pack, tmp_path):
    from orchestrator.stack import StackConfig

    model_dir = tmp_path / "model"
    save_model(make_model(seed=3), model_dir)
    with pytest.raises(ValueError, match="draft_quantize: not with a flash pack draft_dir"):
        StackConfig(target_dir=model_dir, draft_dir=draft_pack, draft_quantize="int4")
    # A checkpoint draft quantizes.
    config = StackConfig(target_dir=model_dir, draft_dir=model_dir, draft_quantize="int4")
    assert config.draft_quantize == "int4"
