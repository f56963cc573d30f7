"""Tiny models and credentials the tests create; nothing is downloaded."""

from __future__ import annotations

from typing import Any

import torch

from lm.config import ModelConfig
from lm.model import Transformer
from protocol.channel import bearer_metadata

TOKEN = "test-token-4f1c"
MODEL_NAME = "tiny-target"
METADATA = bearer_metadata(TOKEN)

# ModelConfig fields of a random multi-head latent attention model (tiny_model, and
# tests.lm.conftest.random_transformer).
MLA_SHAPE = dict(
    architecture="DeepseekV3ForCausalLM",
    n_kv_heads=4,
    head_dim=8,
    kv_lora_rank=16,
    q_lora_rank=12,
    qk_nope_head_dim=12,
    v_head_dim=10,
)

# ModelConfig fields of a random Gemma 3 model: a 3-token sliding window on layer 0 (token
# trees cross it), its own RoPE base there, QK-norm, sandwich norms, scaled embeddings.
GEMMA3_SHAPE = dict(
    architecture="Gemma3ForCausalLM",
    norm="gemma_rmsnorm",
    activation="gelu_tanh",
    head_dim=16,
    sliding_window=3,
    sliding_layers=(0,),
    rope_local_theta=100.0,
    query_pre_attn_scalar=24,
    tie_embeddings=True,
)
# The architectures whose machinery differs (cache layout, masks), for parametrized tests.
SHAPES = {"gqa": {}, "mla": MLA_SHAPE, "gemma3": GEMMA3_SHAPE}


def tiny_model(
    seed: int,
    *,
    vocab: int = 64,
    dim: int = 32,
    layers: int = 2,
    sharpen: float = 1.0,
    max_seq_len: int = 512,
    **fields: Any,
):
    """A random Llama-family model (or another ModelConfig `fields` names); `sharpen` scales
    the output head so its distributions are peaked rather than near-uniform, which makes
    acceptance tests meaningful."""
    torch.manual_seed(seed)
    shape: dict[str, Any] = dict(
        vocab_size=vocab,
        dim=dim,
        n_layers=layers,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        max_seq_len=max_seq_len,
    )
    config = ModelConfig(**{**shape, **fields})
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # matrices; norms stay at 1 so the model does not collapse
                p.normal_(0, 0.3)
        model.output.weight.mul_(sharpen)
    return model
