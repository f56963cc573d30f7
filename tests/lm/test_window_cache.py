"""Sliding-window layers keep only their window (plus slack) in a ring buffer, and every
cache operation still gives the logits of the whole sequence run without a cache.

The model is a random Gemma 3 (window 3 on layer 0, tests.tiny.GEMMA3_SHAPE); caches get
window_slack 4, so layer 0 keeps 7 entries a row while layer 1 keeps all 64.
"""

import pytest
import torch

from lm.config import ModelConfig
from lm.kv_cache import row_bytes
from lm.tree import TokenTree
from tests.lm.conftest import random_transformer
from tests.tiny import GEMMA3_SHAPE

SLACK = 4
ATOL, RTOL = 1e-5, 1e-5
TOKENS = [3, 17, 42, 8, 8, 91, 5, 60, 61, 12, 33, 70, 2, 9, 44, 45, 46, 10, 11, 12, 13, 14]


@pytest.fixture(scope="module")
def model():
    return random_transformer(**GEMMA3_SHAPE)


def cache_of(model, rows: int = 1):
    return model.new_cache(rows, 64, window_slack=SLACK)


@torch.no_grad()
def alone(model, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), vocab) without a cache: the reference."""
    return model(torch.tensor([tokens]))[0]


@torch.no_grad()
def test_the_window_layers_hold_a_ring_and_decode_matches(model):
    cache = cache_of(model)
    ring = GEMMA3_SHAPE["sliding_window"] + SLACK
    assert cache.ring_layers == (0,) and cache.full_layers == (1,)
    assert tuple(cache.k_ring.shape) == (1, 1, 2, ring, 16)
    assert tuple(cache.k.shape) == (1, 1, 2, 64, 16)
    assert cache.nbytes == 2 * 2 * 16 * 4 * (ring + 64)
    # a chunk longer than the ring, then one token at a time, then a chunk of 3
    got = [model(torch.tensor([TOKENS[:12]]), cache=cache)[0]]
    cache.commit(0, range(12))
    for i in range(12, 19):
        got.append(model(torch.tensor([[TOKENS[i]]]), cache=cache)[0])
        cache.commit(0, [0])
    got.append(model(torch.tensor([TOKENS[19:22]]), cache=cache)[0])
    torch.testing.assert_close(torch.cat(got), alone(model, TOKENS), atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_tree_commit_rows_of_different_lengths_and_a_copied_row(model):
    cache = cache_of(model, rows=3)
    prefixes = [TOKENS[:15], TOKENS[:4]]
    for row, prefix in enumerate(prefixes):
        model(torch.tensor([prefix]), cache=cache, rows=[row])
        cache.commit(row, range(len(prefix)))
    tree = TokenTree.from_beams([[50, 51], [50, 52], [53]])  # 4 nodes, within the slack
    logits = model(
        torch.tensor([tree.tokens] * 2),
        cache=cache,
        rows=[0, 1],
        positions=torch.stack([tree.positions(len(p)) for p in prefixes]),
        mask=tree.attention_mask()[None].expand(2, -1, -1),
    )
    for b, prefix in enumerate(prefixes):
        for leaf in tree.leaves():
            path = tree.path(leaf)
            expected = alone(model, prefix + [tree.tokens[n] for n in path])[len(prefix) :]
            torch.testing.assert_close(logits[b, path], expected, atol=ATOL, rtol=RTOL)
    path = tree.path(2)  # 50 -> 52: offsets 0 and 2, so entry 2 moves to 1
    cache.commit(0, path)
    text = prefixes[0] + [50, 52]
    step = model(torch.tensor([[7]]), cache=cache, rows=[0])[0, -1]
    torch.testing.assert_close(step, alone(model, text + [7])[-1], atol=ATOL, rtol=RTOL)
    cache.commit(0, [0])
    cache.copy_row(0, 2, range(len(text) + 1))  # 18 entries: the ring's last 7 are copied
    step = model(torch.tensor([[8]]), cache=cache, rows=[2])[0, -1]
    torch.testing.assert_close(step, alone(model, text + [7, 8])[-1], atol=ATOL, rtol=RTOL)


@torch.no_grad()
def test_what_the_ring_no_longer_holds_is_an_error_not_a_wrong_answer(model):
    cache = cache_of(model)
    model(torch.tensor([TOKENS[:12]]), cache=cache)
    cache.commit(0, range(12))
    model(torch.tensor([TOKENS[12:20]]), cache=cache)  # 8 pending entries: more than the slack
    # discarded: the window of the next token needs entries 10 and 11, overwritten since
    with pytest.raises(ValueError, match="left the ring"):
        model(torch.tensor([[5]]), cache=cache)
    cache = cache_of(model)
    model(torch.tensor([TOKENS[:20]]), cache=cache)
    cache.commit(0, range(20))
    cache.rollback(0, 10)  # 10 back: entries 8 and 9 are gone from the 7-slot ring
    with pytest.raises(ValueError, match="left the ring"):
        model(torch.tensor([[5]]), cache=cache)
    # copying entries the ring lost marks them missing; a pass that needs them fails
    cache = cache_of(model, rows=2)
    model(torch.tensor([TOKENS[:20]]), cache=cache)
    cache.commit(0, range(20))
    cache.copy_row(0, 1, [0, 1, 2])
    with pytest.raises(ValueError, match="left the ring"):
        model(torch.tensor([[5]]), cache=cache, rows=[1])


def test_row_bytes_replays_its_example_and_counts_what_a_cache_allocates(model):
    shape = dict(GEMMA3_SHAPE, head_dim=256, sliding_window=512)
    shape["sliding_layers"] = tuple(i for i in range(18) if (i + 1) % 6)
    gemma_270m = ModelConfig(
        vocab_size=262144,
        dim=640,
        n_layers=18,
        n_heads=4,
        n_kv_heads=1,
        hidden_dim=2048,
        max_seq_len=32768,
        **shape,
    )
    assert row_bytes(gemma_270m, torch.bfloat16, 32768) == 112_459_776
    assert row_bytes(gemma_270m, torch.bfloat16, 600) == 600 * 18 * 1024  # no ring: 512 + 256
    for slack in (4, 100):
        cache = model.new_cache(3, 64, window_slack=slack)
        assert cache.nbytes == 3 * row_bytes(model.config, torch.float32, 64, slack)
