"""The core's seams for another architecture (lm.config fields resolved by lm.model's
registries) and the split that keeps training code out of the core.

Logits against transformers for a head_dim other than dim // n_heads and the gelu_tanh
activation: the "llama_head_dim_gelu" entries of conftest.HF_MODELS (test_reference_logits)
and of test_save_model.VARIANTS.
"""

import pkgutil
import subprocess
import sys
from typing import get_args

import pytest
import torch

import lm
from lm.checkpoint import load_model
from lm.config import Activation, Architecture, ModelConfig, Norm
from lm.model import ACTIVATIONS, ARCHITECTURES, NORMS, Transformer
from tests.lm.conftest import REPO

SHAPE = dict(vocab_size=11, n_layers=1, n_heads=4, n_kv_heads=2, hidden_dim=16)


def test_core_imports_nothing_from_training():
    core = sorted(m.name for m in pkgutil.iter_modules(lm.__path__) if m.name != "training")
    script = (
        "import importlib, sys\n"
        f"for name in {core!r}: importlib.import_module('lm.' + name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('lm.training')))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "model" in core and "kv_cache" in core
    assert run.stdout.strip() == "[]"


def test_every_config_name_has_a_registry_entry():
    assert set(ARCHITECTURES) == set(get_args(Architecture))
    assert set(NORMS) == set(get_args(Norm))
    assert set(ACTIVATIONS) == set(get_args(Activation))


def test_head_dim_defaults_to_dim_over_heads():
    derived = ModelConfig(dim=48, **SHAPE)
    assert derived.head_dim == 12
    assert derived == ModelConfig(dim=48, head_dim=12, **SHAPE)


def test_explicit_head_dim_sets_the_attention_and_cache_shapes():
    model = Transformer(ModelConfig(dim=50, head_dim=16, **SHAPE))  # 50 is no multiple of 4
    attention = model.layers[0].attention
    assert tuple(attention.wq.weight.shape) == (4 * 16, 50)
    assert tuple(attention.wk.weight.shape) == (2 * 16, 50)
    assert tuple(attention.wo.weight.shape) == (50, 4 * 16)
    cache = model.new_cache(3, 8)  # the model's device and dtype
    assert tuple(cache.k.shape) == (1, 3, 2, 8, 16)
    assert (cache.k.dtype, cache.k.device) == (attention.wq.weight.dtype, torch.device("cpu"))
    with pytest.raises(ValueError, match="dim: must be a multiple of n_heads"):
        ModelConfig(dim=50, **SHAPE)
    with pytest.raises(ValueError, match="head_dim: must be even"):
        ModelConfig(dim=48, head_dim=15, **SHAPE)
    with pytest.raises(ValueError, match="norm: must be one of"):
        ModelConfig(dim=48, norm="layernorm", **SHAPE)


def test_hf_head_dim_and_activation_are_read_and_written(hf_model_dir):
    model = load_model(hf_model_dir("llama_head_dim_gelu"), device="cpu")
    config = model.config
    assert (config.dim, config.n_heads, config.head_dim) == (48, 4, 16)
    assert (config.activation, config.norm) == ("gelu_tanh", "rmsnorm")
    assert config.to_hf()["hidden_act"] == "gelu_pytorch_tanh"
    assert ModelConfig.from_hf(config.to_hf()) == config
