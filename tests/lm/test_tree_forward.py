"""One cached forward over a token tree equals running every root-to-leaf path on its own,
for grouped-query attention and for multi-head latent attention (its cache holds the
latent; commit, rollback and batched rows move it as they move K/V)."""

import pytest
import torch

from lm.kv_cache import KVCache
from lm.model import Transformer
from lm.tree import TokenTree
from tests.lm.conftest import random_transformer
from tests.tiny import SHAPES

PREFIX = [3, 17, 42, 8, 8, 91, 5]
BEAMS = [[10, 11, 12], [10, 11, 13], [10, 14, 15, 16], [20], [21, 22]]
ATOL = 1e-5
RTOL = 1e-5  # Gemma 3's scaled embeddings give logits in the hundreds


@pytest.fixture(params=sorted(SHAPES))
def tiny_model(request) -> Transformer:
    return random_transformer(**SHAPES[request.param])


def new_cache(model, rows: int = 1) -> KVCache:
    return KVCache(model.config, rows=rows, max_len=48, device="cpu", dtype=torch.float32)


def prefill(model, cache: KVCache, tokens: list[int], row: int = 0) -> torch.Tensor:
    logits = model(torch.tensor([tokens]), cache=cache, rows=[row])
    cache.commit(row, range(len(tokens)))
    return logits


def tree_logits(model, cache: KVCache, tree: TokenTree, row: int = 0) -> torch.Tensor:
    """(tree.size, vocab): one forward over the whole tree after the row's committed tokens."""
    start = cache.lengths[row]
    return model(
        torch.tensor([tree.tokens]),
        cache=cache,
        rows=[row],
        positions=tree.positions(start)[None],
        mask=tree.attention_mask()[None],
    )[0]


def assert_matches_paths(model, tree: TokenTree, logits: torch.Tensor, prefix: list[int]):
    """Each leaf's path, run alone from scratch (no cache), gives the same logits per node."""
    for leaf in tree.leaves():
        path = tree.path(leaf)
        ids = torch.tensor([prefix + [tree.tokens[n] for n in path]])
        alone = model(ids)[0, len(prefix) :]
        torch.testing.assert_close(logits[path], alone, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_tree_forward_equals_each_path(tiny_model):
    tree = TokenTree.from_beams(BEAMS)
    cache = new_cache(tiny_model)
    prefill(tiny_model, cache, PREFIX)
    logits = tree_logits(tiny_model, cache, tree)
    assert cache.lengths == [len(PREFIX)], "a forward must not commit"
    assert_matches_paths(tiny_model, tree, logits, PREFIX)


@torch.no_grad()
def test_tree_forward_after_rollback(tiny_model):
    """Stale entries past the rolled-back length must be invisible."""
    tree = TokenTree.from_beams(BEAMS)
    cache = new_cache(tiny_model)
    prefill(tiny_model, cache, PREFIX + [60, 61, 62, 63])
    cache.rollback(0, len(PREFIX) - 2)
    prefix = PREFIX[:-2]
    logits = tree_logits(tiny_model, cache, tree)
    assert_matches_paths(tiny_model, tree, logits, prefix)


@torch.no_grad()
def test_commit_accepted_path_then_decode(tiny_model):
    """Keep one branch (not the first in index order), then decode: same as a fresh forward."""
    tree = TokenTree.from_beams(BEAMS)
    cache = new_cache(tiny_model)
    prefill(tiny_model, cache, PREFIX)
    tree_logits(tiny_model, cache, tree)
    path = tree.path(6)  # 10 -> 14 -> 15 -> 16: pending offsets 0, 4, 5, 6
    assert path == [0, 4, 5, 6]
    cache.commit(0, path)
    accepted = [tree.tokens[n] for n in path]
    assert cache.lengths == [len(PREFIX) + len(accepted)]
    bonus = 77
    next_logits = tiny_model(torch.tensor([[bonus]]), cache=cache)[0, -1]
    fresh = tiny_model(torch.tensor([PREFIX + accepted + [bonus]]))[0, -1]
    torch.testing.assert_close(next_logits, fresh, atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_batched_trees_with_padding(tiny_model):
    """Two sessions' trees of different sizes and prefixes in one padded forward."""
    trees = [TokenTree.from_beams(BEAMS), TokenTree.from_beams([[30, 31], [32]])]
    prefixes = [PREFIX, [9, 9, 4]]
    cache = new_cache(tiny_model, rows=3)
    rows = [2, 0]  # not consecutive, not in order
    for row, prefix in zip(rows, prefixes, strict=True):
        prefill(tiny_model, cache, prefix, row=row)
    size = max(tree.size for tree in trees)
    ids = torch.zeros(2, size, dtype=torch.long)
    positions = torch.zeros(2, size, dtype=torch.long)
    mask = torch.eye(size, dtype=torch.bool).expand(2, -1, -1).clone()
    for b, (tree, prefix) in enumerate(zip(trees, prefixes, strict=True)):
        ids[b, : tree.size] = torch.tensor(tree.tokens)
        positions[b, : tree.size] = tree.positions(len(prefix))
        mask[b, : tree.size, : tree.size] = tree.attention_mask()
    logits = tiny_model(ids, cache=cache, rows=rows, positions=positions, mask=mask)
    for b, (tree, prefix) in enumerate(zip(trees, prefixes, strict=True)):
        assert_matches_paths(tiny_model, tree, logits[b, : tree.size], prefix)
