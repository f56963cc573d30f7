"""Cached passes through FlexAttention block masks (`Transformer.flex_attention`, lm.flex)
give the logits of SDPA with dense masks: prefill, a tree, padded batches of rows with
different lengths, a sliding window. On CPU the kernel runs eagerly (the rule is what is
tested); on CUDA compiled, the path the verifier takes there."""

import pytest
import torch

import lm.model
from lm.tree import TokenTree
from tests.lm.conftest import random_transformer
from tests.tiny import SHAPES

PREFIXES = [[3, 17, 42, 8, 8, 91, 5, 60, 61], [12, 33]]
BEAMS = [[10, 11, 12], [10, 11, 13], [10, 14, 15, 16], [20], [21, 22]]

pytestmark = pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")


def passes(model, device: str) -> list[torch.Tensor]:
    """Logits of a batched prefill, then a batch of two trees (the second padded)."""
    cache = model.new_cache(2, 48, device=device)
    logits = []
    for row, prefix in enumerate(PREFIXES):
        logits.append(model(torch.tensor([prefix], device=device), cache=cache, rows=[row]))
        cache.commit(row, range(len(prefix)))
    trees = [TokenTree.from_beams(BEAMS), TokenTree.from_beams([[30, 31]])]
    time = max(t.size for t in trees)
    ids = torch.zeros(2, time, dtype=torch.long)
    positions = torch.zeros(2, time, dtype=torch.long)
    mask = torch.eye(time, dtype=torch.bool).repeat(2, 1, 1)  # padding sees itself
    for b, (tree, prefix) in enumerate(zip(trees, PREFIXES, strict=True)):
        ids[b, : tree.size] = torch.tensor(tree.tokens)
        positions[b, : tree.size] = tree.positions(len(prefix))
        mask[b, : tree.size, : tree.size] = tree.attention_mask()
    logits.append(
        model(
            ids.to(device),
            cache=cache,
            rows=[0, 1],
            positions=positions.to(device),
            mask=mask.to(device),
        )
    )
    return logits


@pytest.mark.parametrize("shape", sorted(SHAPES))
@torch.no_grad()
def test_flex_equals_sdpa_on_cpu(shape, monkeypatch):
    model = random_transformer(**SHAPES[shape])
    dense = passes(model, "cpu")
    calls = []
    kernel = lm.model.flex_attend
    monkeypatch.setattr(lm.model, "flex_attend", lambda *a: calls.append(1) or kernel(*a))
    model.flex_attention = True
    flex = passes(model, "cpu")
    for got, expected in zip(flex, dense, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    # every layer of every cached pass (3), except MLA's, which keeps SDPA
    assert len(calls) == (0 if shape == "mla" else 3 * model.config.n_layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled FlexAttention)")
@pytest.mark.parametrize("shape", ["gqa", "gemma3"])
@torch.no_grad()
def test_compiled_flex_equals_sdpa_on_cuda(shape):
    model = random_transformer(**SHAPES[shape]).cuda()
    dense = passes(model, "cuda")
    model.flex_attention = True
    flex = passes(model, "cuda")
    for got, expected in zip(flex, dense, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
