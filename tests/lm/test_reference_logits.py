"""Our logits against Hugging Face transformers on tiny random checkpoints of every family."""

import json

import pytest
import torch

from lm.checkpoint import load_model
from lm.config import ModelConfig
from lm.kv_cache import KVCache

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(hf_name, hf_model_dir, load_hf):
    """(name, ours, reference) for one tiny checkpoint, both float32 on CPU."""
    directory = hf_model_dir(hf_name)
    return hf_name, load_model(directory, device="cpu"), load_hf(directory)


def _tokens(seed: int, batch: int, time: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, time), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_full_forward_matches_transformers(pair):
    name, ours, ref = pair
    ids = _tokens(1, batch=2, time=17, vocab=ours.config.vocab_size)
    expected = ref(ids).logits
    assert expected.std() > 0.3, "reference logits too flat for a 1e-4 comparison to mean much"
    torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_cached_chunks_match_transformers(pair):
    """Prefill 9 tokens, then decode 1, then a chunk of 4: the cache path, same numbers."""
    _, ours, ref = pair
    ids = _tokens(2, batch=1, time=14, vocab=ours.config.vocab_size)
    expected = ref(ids).logits
    cache = KVCache(ours.config, rows=1, max_len=32, device="cpu", dtype=torch.float32)
    pieces = []
    for start, stop in ((0, 9), (9, 10), (10, 14)):
        pieces.append(ours(ids[:, start:stop], cache=cache))
        cache.commit(0, range(stop - start))
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, atol=1e-4, rtol=0)


def test_config_fields_come_from_config_json(hf_model_dir):
    """The numerics-changing fields are read, not defaulted."""
    llama = load_model(hf_model_dir("llama_gqa_untied"), device="cpu").config
    assert (llama.n_kv_heads, llama.rope_theta, llama.tie_embeddings) == (2, 5000.0, False)
    tied = load_model(hf_model_dir("llama_gqa_tied"), device="cpu").config
    assert (tied.n_kv_heads, tied.norm_eps, tied.tie_embeddings) == (1, 1e-2, True)
    assert load_model(hf_model_dir("llama_relu"), device="cpu").config.activation == "relu"
    qwen = load_model(hf_model_dir("qwen2_bias"), device="cpu").config
    assert (qwen.architecture, qwen.qkv_bias, qwen.rope_theta) == ("Qwen2ForCausalLM", True, 1e6)


def test_tied_classifier_is_the_embedding(hf_model_dir):
    model = load_model(hf_model_dir("llama_gqa_tied"), device="cpu")
    assert model.output.weight is model.tok_embeddings.weight


@torch.no_grad()
def test_sharded_checkpoint_loads_to_same_logits(tmp_path, make_hf, load_hf):
    make_hf("llama_gqa_untied", seed=3).save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    ids = _tokens(4, batch=1, time=8, vocab=211)
    ours = load_model(tmp_path, device="cpu")
    torch.testing.assert_close(ours(ids), load_hf(tmp_path)(ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs_and_stays_close(hf_model_dir, load_hf, dtype):
    """Half-precision forward (plain and cached) is finite and near the float32 reference."""
    directory = hf_model_dir("qwen2_bias")
    ours = load_model(directory, device="cpu", dtype=dtype)
    assert ours.tok_embeddings.weight.dtype == dtype
    ids = _tokens(5, batch=1, time=12, vocab=ours.config.vocab_size)
    expected = load_hf(directory)(ids).logits
    plain = ours(ids)
    cache = KVCache(ours.config, rows=1, max_len=16, device="cpu", dtype=dtype)
    prefill = ours(ids[:, :8], cache=cache)
    cache.commit(0, range(8))
    cached = torch.cat([prefill, ours(ids[:, 8:], cache=cache)], dim=1)
    for got in (plain, cached):
        assert got.dtype == torch.float32 and torch.isfinite(got).all()
        scale = expected.abs().max()
        assert (got - expected).abs().max() < 0.05 * scale


def test_sliding_window_limits_context(hf_model_dir):
    """Mistral's window is not implemented, so caches may not outgrow it (see from_hf)."""
    hf = json.loads((hf_model_dir("mistral") / "config.json").read_text())
    assert ModelConfig.from_hf(hf).max_seq_len == 64  # window 4096 > max_position_embeddings
    assert ModelConfig.from_hf({**hf, "sliding_window": 16}).max_seq_len == 16
    assert ModelConfig.from_hf({**hf, "sliding_window": None}).max_seq_len == 64
