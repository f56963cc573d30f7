"""Tiny models and credentials the tests create; nothing is downloaded."""

from __future__ import annotations

import torch

from lm.config import ModelConfig
from lm.model import Transformer
from protocol.channel import bearer_metadata

TOKEN = "test-token-4f1c"
MODEL_NAME = "tiny-target"
METADATA = bearer_metadata(TOKEN)


def tiny_model(
    seed: int,
    *,
    vocab: int = 64,
    dim: int = 32,
    layers: int = 2,
    sharpen: float = 1.0,
    max_seq_len: int = 512,
):
    """A random Llama-family model; `sharpen` scales the output head so its distributions
    are peaked rather than near-uniform, which makes acceptance tests meaningful."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=layers,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        max_seq_len=max_seq_len,
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # matrices; norms stay at 1 so the model does not collapse
                p.normal_(0, 0.3)
        model.output.weight.mul_(sharpen)
    return model
