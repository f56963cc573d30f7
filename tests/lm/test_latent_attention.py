"""Multi-head latent attention (DeepSeek-V3) against transformers, through the latent cache.

Plain and chunked-cache logits are in test_reference_logits ("deepseek_v3_mla" entries),
tree passes, rollback, commit and padded batches against each path run alone in
test_tree_forward ("mla" parameter), transformers loading our save in test_save_model.
Here: tree passes and row copies against transformers itself, what the cache stores, the
batch-invariant path, half precision, and the config's checks.
"""

from dataclasses import replace

import pytest
import torch

from lm.checkpoint import load_model
from lm.config import ModelConfig
from lm.kv_cache import bytes_per_position
from lm.quantized import QuantScheme, quantize_model
from lm.tree import TokenTree

pytest.importorskip("transformers")

PREFIX = [3, 17, 42, 8, 8, 91, 5, 120]
BEAMS = [[10, 11, 12], [10, 11, 13], [10, 14, 15, 16], [20], [21, 22]]


@pytest.fixture(scope="module")
def pair(hf_model_dir, load_hf):
    """(ours, transformers) for the random DeepSeek-V3 MLA checkpoint, float32 on CPU."""
    directory = hf_model_dir("deepseek_v3_mla")
    return load_model(directory, device="cpu"), load_hf(directory)


def _reference(ref, tokens: list[int]) -> torch.Tensor:
    """transformers' logits (time, vocab) for one sequence, no cache."""
    return ref(torch.tensor([tokens])).logits[0]


@torch.no_grad()
def test_tree_pass_matches_transformers_per_path(pair):
    ours, ref = pair
    cache = ours.new_cache(1, 32)
    ours(torch.tensor([PREFIX]), cache=cache)
    cache.commit(0, range(len(PREFIX)))
    tree = TokenTree.from_beams(BEAMS)
    logits = ours(
        torch.tensor([tree.tokens]),
        cache=cache,
        positions=tree.positions(len(PREFIX))[None],
        mask=tree.attention_mask()[None],
    )[0]
    for leaf in tree.leaves():
        path = tree.path(leaf)
        expected = _reference(ref, PREFIX + [tree.tokens[n] for n in path])[len(PREFIX) :]
        torch.testing.assert_close(logits[path], expected, atol=1e-4, rtol=0)
    # keep a branch that is not first in index order, then decode after it
    path = tree.path(6)
    cache.commit(0, path)
    accepted = [tree.tokens[n] for n in path]
    step = ours(torch.tensor([[77]]), cache=cache)[0, -1]
    torch.testing.assert_close(
        step, _reference(ref, PREFIX + accepted + [77])[-1], atol=1e-4, rtol=0
    )


@torch.no_grad()
def test_copied_row_continues_as_transformers(pair):
    """The edge drafts the next round in a spare row (`copy_row`): the copied latents serve."""
    ours, ref = pair
    cache = ours.new_cache(2, 32)
    ours(torch.tensor([PREFIX]), cache=cache, rows=[0])
    cache.commit(0, range(len(PREFIX)))
    kept = list(range(6))  # entries keep the RoPE positions they were written at
    cache.copy_row(0, 1, kept)
    got = ours(torch.tensor([[9, 10]]), cache=cache, rows=[1])[0]
    expected = _reference(ref, [PREFIX[p] for p in kept] + [9, 10])[-2:]
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_cache_holds_the_latent_not_per_head_keys_and_values(pair):
    ours, _ = pair
    config = ours.config
    cache = ours.new_cache(3, 20)
    width = config.kv_lora_rank + config.head_dim  # 16 + 8
    assert cache.names == ("latent",)
    assert tuple(cache.latent.shape) == (config.n_layers, 3, 1, 20, width)
    assert bytes_per_position(config, torch.float32) == config.n_layers * width * 4
    assert cache.nbytes == 3 * 20 * bytes_per_position(config, torch.float32)


@torch.no_grad()
def test_batch_invariant_path_gives_the_same_logits(pair):
    ours, _ = pair
    tree = TokenTree.from_beams(BEAMS)
    outs = []
    for invariant in (False, True):
        ours.batch_invariant = invariant
        cache = ours.new_cache(1, 32)
        ours(torch.tensor([PREFIX]), cache=cache)
        cache.commit(0, range(len(PREFIX)))
        outs.append(
            ours(
                torch.tensor([tree.tokens]),
                cache=cache,
                positions=tree.positions(len(PREFIX))[None],
                mask=tree.attention_mask()[None],
            )
        )
    ours.batch_invariant = False
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_cached_decode_stays_close(hf_model_dir, pair, dtype):
    _, ref = pair
    ours = load_model(hf_model_dir("deepseek_v3_mla"), device="cpu", dtype=dtype)
    tokens = PREFIX + [9, 10, 11]
    cache = ours.new_cache(1, 16)
    assert cache.dtype == dtype
    pieces = [ours(torch.tensor([PREFIX]), cache=cache)]
    cache.commit(0, range(len(PREFIX)))
    for token in tokens[len(PREFIX) :]:
        pieces.append(ours(torch.tensor([[token]]), cache=cache))
        cache.commit(0, [0])
    got = torch.cat(pieces, 1)[0]
    expected = _reference(ref, tokens)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_config_reads_writes_and_refuses_what_it_cannot_run(pair):
    ours, _ = pair
    config = ours.config
    assert (config.kv_lora_rank, config.q_lora_rank, config.head_dim) == (16, 24, 8)
    assert (config.qk_nope_head_dim, config.v_head_dim, config.n_kv_heads) == (12, 10, 4)
    hf = config.to_hf()
    assert ModelConfig.from_hf(hf) == config
    with pytest.raises(ValueError, match="first_k_dense_replace: must be >= num_hidden_layers"):
        ModelConfig.from_hf({**hf, "first_k_dense_replace": 1})
    with pytest.raises(ValueError, match="rope_interleave"):
        ModelConfig.from_hf({**hf, "rope_interleave": False})
    llama = dict(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, hidden_dim=8)
    with pytest.raises(ValueError, match="kv_lora_rank: is for DeepseekV3ForCausalLM only"):
        ModelConfig(**llama, kv_lora_rank=4)
    with pytest.raises(ValueError, match="n_kv_heads: must equal n_heads=4"):
        replace(config, n_kv_heads=2)
    with pytest.raises(ValueError, match="v_head_dim: must be >= 1"):
        replace(config, v_head_dim=None)


def test_quantizing_refuses_latent_attention(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="quantize: DeepseekV3ForCausalLM"):
        quantize_model(ours, QuantScheme.named("int4"))
