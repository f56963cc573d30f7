"""KVCache: chunked decoding, rollback, commit and batched rows against fresh forwards."""

import copy

import pytest
import torch

from lm.config import ModelConfig
from lm.kv_cache import KVCache, bytes_per_position

ATOL = 1e-5
SEQ = [5, 60, 2, 33, 33, 18, 90, 7, 41, 12, 3, 70]


def new_cache(model, rows: int = 1, max_len: int = 40) -> KVCache:
    return KVCache(model.config, rows=rows, max_len=max_len, device="cpu", dtype=torch.float32)


def fresh(model, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), vocab) logits of a cache-free forward."""
    return model(torch.tensor([tokens]))[0]


def test_buffers_shape(tiny_model):
    c = tiny_model.config
    cache = new_cache(tiny_model, rows=3, max_len=16)
    assert cache.k.shape == (c.n_layers, 3, c.n_kv_heads, 16, c.head_dim)
    assert cache.v.shape == cache.k.shape
    assert cache.lengths == [0, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nbytes_is_rows_times_positions_times_bytes_per_position(tiny_model, dtype):
    cache = KVCache(tiny_model.config, rows=3, max_len=16, device="cpu", dtype=dtype)
    assert cache.nbytes == 3 * 16 * bytes_per_position(tiny_model.config, dtype)


def test_bytes_per_position_replays_its_example():
    smollm2 = ModelConfig(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536
    )
    assert bytes_per_position(smollm2, torch.float32) == 46080


@torch.no_grad()
def test_token_by_token_decoding_equals_full_forward(tiny_model):
    cache = new_cache(tiny_model)
    steps = []
    for token in SEQ:
        steps.append(tiny_model(torch.tensor([[token]]), cache=cache)[0])
        cache.commit(0, [0])
    torch.testing.assert_close(torch.cat(steps), fresh(tiny_model, SEQ), atol=ATOL, rtol=0)


@torch.no_grad()
def test_rollback_then_recompute_equals_fresh_forward(tiny_model):
    cache = new_cache(tiny_model)
    tiny_model(torch.tensor([SEQ]), cache=cache)
    cache.commit(0, range(len(SEQ)))
    cache.rollback(0, 5)
    assert cache.lengths == [5]
    new = [9, 8, 7, 6]
    logits = tiny_model(torch.tensor([new]), cache=cache)[0]
    torch.testing.assert_close(logits, fresh(tiny_model, SEQ[:5] + new)[5:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_uncommitted_tokens_are_discarded(tiny_model):
    """A forward never advances lengths; the next forward overwrites its pending entries."""
    cache = new_cache(tiny_model)
    tiny_model(torch.tensor([SEQ[:6]]), cache=cache)
    cache.commit(0, range(6))
    tiny_model(torch.tensor([[50, 51, 52]]), cache=cache)
    assert cache.lengths == [6]
    logits = tiny_model(torch.tensor([[SEQ[6]]]), cache=cache)[0]
    torch.testing.assert_close(logits, fresh(tiny_model, SEQ[:7])[6:], atol=ATOL, rtol=0)


@torch.no_grad()
def test_commit_moves_selected_entries(tiny_model):
    """commit(row, [0, 2]) copies pending entries 0 and 2 to the first two free slots."""
    cache = new_cache(tiny_model, rows=2)
    cache.lengths[1] = 3  # any committed length; the entries themselves are irrelevant here
    tiny_model(torch.tensor([[4, 5, 6, 7]]), cache=cache, rows=[1])
    pending_k = cache.k[:, 1, :, 3:7].clone()
    pending_v = cache.v[:, 1, :, 3:7].clone()
    cache.commit(1, [0, 2])
    assert cache.lengths == [0, 5]
    torch.testing.assert_close(cache.k[:, 1, :, 3:5], pending_k[:, :, [0, 2]], atol=0, rtol=0)
    torch.testing.assert_close(cache.v[:, 1, :, 3:5], pending_v[:, :, [0, 2]], atol=0, rtol=0)


@torch.no_grad()
def test_batched_rows_with_different_prefix_lengths(tiny_model):
    """A right-padded prefill of two rows, then one decode step of both: same as alone."""
    seqs = [SEQ[:9], SEQ[3:7]]
    cache = new_cache(tiny_model, rows=2)
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, -1, -1).clone()
    ids[0], ids[1, :4] = torch.tensor(seqs[0]), torch.tensor(seqs[1])
    mask[1, 4:] = torch.eye(9, dtype=torch.bool)[4:]  # padding sees only itself
    logits = tiny_model(ids, cache=cache, mask=mask)
    torch.testing.assert_close(logits[0], fresh(tiny_model, seqs[0]), atol=ATOL, rtol=0)
    torch.testing.assert_close(logits[1, :4], fresh(tiny_model, seqs[1]), atol=ATOL, rtol=0)
    cache.commit(0, range(9))
    cache.commit(1, range(4))
    step = tiny_model(torch.tensor([[21], [22]]), cache=cache)
    torch.testing.assert_close(step[0, 0], fresh(tiny_model, seqs[0] + [21])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(step[1, 0], fresh(tiny_model, seqs[1] + [22])[-1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_rows_subset_and_order(tiny_model):
    """Batch rows map onto arbitrary cache rows; untouched rows keep their state."""
    cache = new_cache(tiny_model, rows=3)
    for row, seq in ((0, SEQ[:3]), (1, SEQ[:5]), (2, SEQ[2:8])):
        tiny_model(torch.tensor([seq]), cache=cache, rows=[row])
        cache.commit(row, range(len(seq)))
    step = tiny_model(torch.tensor([[1], [2]]), cache=cache, rows=[2, 0])
    torch.testing.assert_close(step[0, 0], fresh(tiny_model, SEQ[2:8] + [1])[-1], atol=ATOL, rtol=0)
    torch.testing.assert_close(step[1, 0], fresh(tiny_model, SEQ[:3] + [2])[-1], atol=ATOL, rtol=0)
    assert cache.lengths == [3, 5, 6]
    cache.reset(1)
    tiny_model(torch.tensor([[8, 9]]), cache=cache, rows=[1])
    cache.commit(1, [0, 1])
    step = tiny_model(torch.tensor([[4]]), cache=cache, rows=[1])
    torch.testing.assert_close(step[0, 0], fresh(tiny_model, [8, 9, 4])[-1], atol=ATOL, rtol=0)


@torch.no_grad()
def test_return_hidden(tiny_model):
    logits, hidden = tiny_model(torch.tensor([SEQ]), return_hidden=True)
    assert hidden.shape == (1, len(SEQ), tiny_model.config.dim)
    torch.testing.assert_close(tiny_model.output(hidden).float(), logits, atol=0, rtol=0)


def test_invalid_use_raises(tiny_model):
    cache = new_cache(tiny_model, rows=2, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        new_cache(tiny_model, max_len=tiny_model.config.max_seq_len + 1)
    with pytest.raises(ValueError, match="row"):
        cache.rollback(2, 0)
    with pytest.raises(ValueError, match=r"length: must be in \[0, 0\]"):
        cache.rollback(0, 1)
    with torch.no_grad():
        tiny_model(torch.tensor([[1, 2, 3]]), cache=cache, rows=[1])
        with pytest.raises(ValueError, match="exceed max_len=8"):
            tiny_model(torch.tensor([[1] * 9]), cache=cache, rows=[0])
        with pytest.raises(ValueError, match="rows: must be distinct"):
            tiny_model(torch.tensor([[1], [2]]), cache=cache, rows=[1, 1])
        with pytest.raises(ValueError, match="mask: must be bool"):
            tiny_model(torch.tensor([[1, 2]]), cache=cache, mask=torch.ones(1, 2, 2))
        with pytest.raises(ValueError, match="cache: torch.float16 on cpu must match"):
            tiny_model(
                torch.tensor([[1]]), cache=KVCache(tiny_model.config, 1, 4, dtype=torch.half)
            )
    with pytest.raises(ValueError, match=r"offsets: must be in \[0, 3\)"):
        cache.commit(1, [0, 3])
    cache.commit(1, [0, 1, 2])
    with pytest.raises(ValueError, match=r"offsets: must be in \[0, 0\)"):
        cache.commit(1, [0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_cached_forward_never_syncs_with_the_gpu(tiny_model):
    model = tiny_model.to("cuda")
    cache = KVCache(model.config, rows=2, max_len=32, device="cuda", dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]], device="cuda")
    mask = torch.ones(2, 3, 3, dtype=torch.bool, device="cuda").tril()
    model(ids, cache=cache, mask=mask)  # warm-up: lazy CUDA initialisation may sync
    cache.commit(0, [0, 2])
    torch.cuda.set_sync_debug_mode("error")
    try:
        model(ids, cache=cache, rows=[1, 0], mask=mask)
        cache.commit(1, [0, 2])
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_a_decode_step_without_a_mask_equals_the_masked_one(tiny_model, dtype):
    """One new token per row after rows of one length takes attention's no-mask path
    (`Transformer._sees_whole_rows`); with stale entries past the rows' ends it must
    equal the same step through an explicit all-visible mask."""
    model = copy.deepcopy(tiny_model).to(dtype)
    cache = KVCache(model.config, rows=3, max_len=40, device="cpu", dtype=dtype)
    prompts = torch.tensor([SEQ[:6], SEQ[3:9], SEQ[6:12]])
    model(prompts, cache=cache)
    for row in range(3):
        cache.commit(row, range(6))
    model(prompts[:, :4], cache=cache)  # a draft of 4; one token kept, three left stale
    for row in range(3):
        cache.commit(row, [0])
    step = torch.tensor([[9], [21], [44]])
    fast = model(step, cache=cache)
    for row in range(3):
        cache.rollback(row, 7)
    visible = torch.ones(3, 1, 8, dtype=torch.bool)
    masked = model(step, cache=cache, cache_mask=visible)
    torch.testing.assert_close(fast, masked, atol=0, rtol=0)
