"""Load and save `Transformer` weights: Hugging Face directories, llama2.c `.bin` files and
GGUF files (loading only).

Our module names are gpt-fast style; `hf_names` is the single table that maps them to
Hugging Face LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM /
DeepseekV3ForCausalLM (dense MLPs) / Gemma3ForCausalLM names, used both
ways. Every tensor is checked (present, right shape, nothing unexpected) before the model
is built, and every problem becomes a CheckpointError that names the file.
"""

import json
import logging
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lm.config import ModelConfig
from lm.device import default_device, default_dtype
from lm.errors import CheckpointError
from lm.gguf import read_gguf
from lm.llama2c import read_llama2c
from lm.model import Transformer

logger = logging.getLogger(__name__)

# (ours, Hugging Face) per layer, without the "layers.{i}." / "model.layers.{i}." prefixes.
_LAYER_NAMES = (
    ("attention_norm.weight", "input_layernorm.weight"),
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("feed_forward.gate.weight", "mlp.gate_proj.weight"),
    ("feed_forward.up.weight", "mlp.up_proj.weight"),
    ("feed_forward.down.weight", "mlp.down_proj.weight"),
)
# Multi-head latent attention's in place of the q/k/v/o rows above (lm.model.LatentAttention).
_MLA_NAMES = (
    ("attention.wkv_a.weight", "self_attn.kv_a_proj_with_mqa.weight"),
    ("attention.kv_norm.weight", "self_attn.kv_a_layernorm.weight"),
    ("attention.wkv_b.weight", "self_attn.kv_b_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
)
_MLA_Q_NAMES = {  # by whether queries go through a low-rank bottleneck (q_lora_rank)
    False: (("attention.wq.weight", "self_attn.q_proj.weight"),),
    True: (
        ("attention.wq.0.weight", "self_attn.q_a_proj.weight"),
        ("attention.wq.1.weight", "self_attn.q_a_layernorm.weight"),
        ("attention.wq.2.weight", "self_attn.q_b_proj.weight"),
    ),
}
# Gemma 3's, in place of the ffn_norm row above (ffn_norm is its pre-MLP norm).
_GEMMA3_NAMES = (
    ("attention.q_norm.weight", "self_attn.q_norm.weight"),
    ("attention.k_norm.weight", "self_attn.k_norm.weight"),
    ("post_attention_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_norm.weight", "pre_feedforward_layernorm.weight"),
    ("post_ffn_norm.weight", "post_feedforward_layernorm.weight"),
)
_BIAS_NAMES = (
    ("attention.wq.bias", "self_attn.q_proj.bias"),
    ("attention.wk.bias", "self_attn.k_proj.bias"),
    ("attention.wv.bias", "self_attn.v_proj.bias"),
)

# A tensor source maps an HF tensor name to (file it lives in, loader).
_Tensors = dict[str, tuple[Path, Callable[[], torch.Tensor]]]


def hf_names(config: ModelConfig) -> dict[str, str]:
    """Our state_dict name -> HF name for every tensor stored in a checkpoint.

    A tied classifier is stored once, as the embedding, so "output.weight" is absent then.
    """
    names = {
        "tok_embeddings.weight": "model.embed_tokens.weight",
        "norm.weight": "model.norm.weight",
    }
    if not config.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    if config.mla:
        attention = _MLA_Q_NAMES[config.q_lora_rank is not None] + _MLA_NAMES
        per_layer = tuple(n for n in _LAYER_NAMES if not n[0].startswith("attention.")) + attention
    elif config.gemma3:
        per_layer = tuple(n for n in _LAYER_NAMES if n[0] != "ffn_norm.weight") + _GEMMA3_NAMES
    else:
        per_layer = _LAYER_NAMES + (_BIAS_NAMES if config.qkv_bias else ())
    for i in range(config.n_layers):
        for ours, hf in per_layer:
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{hf}"
    return names


def load_model(
    path: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Transformer:
    """Load a checkpoint into a Transformer in eval mode (its `.config` says what it is).

    path: a Hugging Face directory (config.json plus model.safetensors or a sharded
        model.safetensors.index.json), a llama2.c `.bin` file or a `.gguf` file (its
        quantized tensors are dequantized to `dtype`).
    device: default `lm.device.default_device()`; dtype: default `default_dtype(device)`.
    """
    path = Path(path)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype if dtype is not None else default_dtype(device)
    with ExitStack() as stack:
        if path.is_dir():
            config = read_hf_config(path / "config.json")
            listing, tensors = _open_safetensors(path, stack)
        elif path.suffix == ".bin" and path.is_file():
            config, raw = read_llama2c(path)
            listing, tensors = path, {name: (path, lambda t=t: t) for name, t in raw.items()}
        elif path.suffix == ".gguf" and path.is_file():
            config, loaders = read_gguf(path)
            listing, tensors = path, {name: (path, load) for name, load in loaders.items()}
        elif path.exists():
            raise CheckpointError(
                f"{path}: expected a Hugging Face model directory, a llama2.c .bin file "
                "or a .gguf file"
            )
        else:
            raise CheckpointError(f"{path}: no such file or directory")
        with torch.device("meta"):
            model = Transformer(config)  # shapes only; the loaded tensors replace every weight
        state = _read_state(model, tensors, listing, device, dtype)
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    logger.debug("loaded %s: %s on %s as %s", path, config, device, dtype)
    return model.eval()


def save_model(model: Transformer, out_dir: str | Path) -> None:
    """Write config.json and model.safetensors that transformers' from_pretrained loads."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors = {
        hf: state[ours].detach().to("cpu").contiguous()
        for ours, hf in hf_names(model.config).items()
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    hf_config = model.config.to_hf()
    hf_config["torch_dtype"] = str(model.tok_embeddings.weight.dtype).removeprefix("torch.")
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")


def read_hf_config(file: Path) -> ModelConfig:
    try:
        hf_config = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{file}: missing (a Hugging Face model directory needs it)") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON: {e}") from e
    try:
        return ModelConfig.from_hf(hf_config)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e


def _open_safetensors(directory: Path, stack: ExitStack) -> tuple[Path, _Tensors]:
    """Open model.safetensors, or every shard named by model.safetensors.index.json."""
    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        listing, files = single, [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e!r})") from e
        listing, files = index, sorted({directory / shard for shard in weight_map.values()})
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index}: shard {file.name} is missing")
    else:
        raise CheckpointError(
            f"{directory}: no model.safetensors or model.safetensors.index.json "
            "(other weight formats are not supported)"
        )
    tensors: _Tensors = {}
    for file in files:
        try:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from e
        for name in handle.keys():
            tensors[name] = (file, lambda handle=handle, name=name: handle.get_tensor(name))
    return listing, tensors


def _read_state(
    model: Transformer,
    tensors: _Tensors,
    listing: Path,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """`model`'s state_dict read from `tensors`, checked name by name against its shapes."""
    config, expected = model.config, model.state_dict()
    names = hf_names(config)
    known = set(names.values()) | ({"lm_head.weight"} if config.tie_embeddings else set())
    unexpected = sorted(
        n for n in tensors if n not in known and not n.endswith("rotary_emb.inv_freq")
    )
    if unexpected:
        raise CheckpointError(
            f"{tensors[unexpected[0]][0]}: unexpected tensor {unexpected[0]} "
            f"(does config.json describe this model?)"
        )
    state = {}
    for ours, hf in names.items():
        if hf not in tensors:
            raise CheckpointError(f"{listing}: missing tensor {hf}")
        file, load = tensors[hf]
        tensor = load()
        shape, want = tuple(tensor.shape), tuple(expected[ours].shape)
        if hf in ("model.embed_tokens.weight", "lm_head.weight") and shape[1:] == want[1:]:
            if shape[0] != want[0]:
                raise CheckpointError(
                    f"{file}: vocabulary mismatch: {hf} has {shape[0]} rows but the config's "
                    f"vocab_size is {config.vocab_size}"
                )
        if shape != want:
            raise CheckpointError(f"{file}: tensor {hf} has shape {shape}, expected {want}")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{file}: tensor {hf} has dtype {tensor.dtype}, expected float")
        state[ours] = tensor.to(device=device, dtype=dtype)
    return state
