"""save_model writes a directory that transformers loads to the same logits."""

import json

import pytest
import torch
from safetensors import safe_open

from lm.checkpoint import load_model, save_model
from tests.tiny import GEMMA3_SHAPE, MLA_SHAPE

pytest.importorskip("transformers")

VARIANTS = {
    "llama_tied": dict(tie_embeddings=True, rope_theta=777.0, norm_eps=1e-3),
    "llama_untied_relu": dict(activation="relu", n_kv_heads=1),
    "llama_head_dim_gelu": dict(head_dim=16, activation="gelu_tanh"),
    "qwen2": dict(architecture="Qwen2ForCausalLM", qkv_bias=True, tie_embeddings=True),
    "mistral": dict(architecture="MistralForCausalLM", n_kv_heads=4),
    "deepseek_v3_mla": MLA_SHAPE,
    "deepseek_v3_mla_direct_q": dict(MLA_SHAPE, q_lora_rank=None, tie_embeddings=True),
    "gemma3": GEMMA3_SHAPE,
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_transformers_loads_our_save(variant, make_transformer, load_hf, tmp_path):
    ours = make_transformer(seed=1, **VARIANTS[variant])
    save_model(ours, tmp_path)
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 15), generator=torch.Generator().manual_seed(0)
    )
    expected = ours(ids)
    ref = load_hf(tmp_path)
    assert type(ref).__name__ == ours.config.architecture
    torch.testing.assert_close(ref(ids).logits, expected, atol=1e-4, rtol=0)
    again = load_model(tmp_path, device="cpu")
    assert again.config == ours.config
    torch.testing.assert_close(again(ids), expected, atol=0, rtol=0)


def test_tied_embeddings_are_saved_once(make_transformer, tmp_path):
    save_model(make_transformer(tie_embeddings=True), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
    assert json.loads((tmp_path / "config.json").read_text())["tie_word_embeddings"] is True


def test_saves_in_the_model_dtype(make_transformer, tmp_path):
    save_model(make_transformer().to(torch.bfloat16), tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(tmp_path, device="cpu", dtype=torch.bfloat16).config.dim == 32
