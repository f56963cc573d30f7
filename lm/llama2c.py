"""Reader for llama2.c `.bin` checkpoints (legacy version 0, as written by karpathy/llama2.c).

Layout: seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len),
then float32 tensors: token_embedding (vocab, dim), rms_att (layers, dim),
wq (layers, dim, dim), wk and wv (layers, kv_dim, dim), wo (layers, dim, dim),
rms_ffn (layers, dim), w1 (layers, hidden, dim), w2 (layers, dim, hidden),
w3 (layers, hidden, dim), rms_final (dim), two RoPE tables (seq_len, head_dim / 2) that we
ignore, and the classifier (vocab, dim) only when vocab_size is negative (untied).

llama2.c's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face Llama
(and `lm.model`) rotates the halves (x_i, x_{i + head_dim/2}). Permuting the output rows
of wq and wk turns one into the other: row 2i + c of a head becomes row c * head_dim/2 + i.
"""

import math
import struct
from pathlib import Path

import torch

from lm.config import ModelConfig
from lm.errors import CheckpointError

_HEADER = struct.Struct("<7i")
_VERSIONED_MAGIC = 0x616B3432  # "ak42": llama2.c export versions 1 and 2


def read_llama2c(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and float32 tensors under Hugging Face LlamaForCausalLM names (q/k permuted).

    Raises CheckpointError naming the file when the header is invalid or the file size
    does not match it.
    """
    path = Path(path)
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise CheckpointError(f"{path}: {len(data)} bytes is too short for a llama2.c header")
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = _HEADER.unpack_from(data)
    if dim == _VERSIONED_MAGIC:
        raise CheckpointError(
            f"{path}: llama2.c export version >= 1 (magic 'ak42') is not supported; "
            "export with the legacy version 0"
        )
    try:
        config = ModelConfig(
            vocab_size=abs(vocab),
            dim=dim,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            hidden_dim=hidden,
            max_seq_len=seq_len,
            norm_eps=1e-5,  # hard-coded in run.c
            tie_embeddings=vocab > 0,
            bos_token_id=1,
            eos_token_id=2,
        )
    except ValueError as e:
        raise CheckpointError(f"{path}: invalid llama2.c header: {e}") from e
    shapes = _tensor_shapes(config)
    expected = _HEADER.size + 4 * sum(math.prod(shape) for _, shape in shapes)
    if len(data) != expected:
        raise CheckpointError(
            f"{path}: file has {len(data)} bytes but its header "
            f"(dim={dim}, hidden_dim={hidden}, n_layers={n_layers}, n_heads={n_heads}, "
            f"n_kv_heads={n_kv_heads}, vocab_size={vocab}, seq_len={seq_len}) "
            f"implies {expected}"
        )
    floats = torch.frombuffer(bytearray(data), dtype=torch.float32, offset=_HEADER.size)
    raw: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in shapes:
        raw[name] = floats[offset : offset + math.prod(shape)].view(shape)
        offset += math.prod(shape)
    return config, _to_hf_names(raw, config)


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the rows of a q/k projection (n_heads * head_dim, in) from pairs to halves."""
    out_features, in_features = weight.shape
    head_dim = out_features // n_heads
    return (
        weight.view(n_heads, head_dim // 2, 2, in_features)
        .transpose(1, 2)
        .reshape(out_features, in_features)
    )


def _tensor_shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    layers, dim, hidden = config.n_layers, config.dim, config.hidden_dim
    kv_dim = config.n_kv_heads * config.head_dim
    shapes = [
        ("token_embedding", (config.vocab_size, dim)),
        ("rms_att", (layers, dim)),
        ("wq", (layers, dim, dim)),
        ("wk", (layers, kv_dim, dim)),
        ("wv", (layers, kv_dim, dim)),
        ("wo", (layers, dim, dim)),
        ("rms_ffn", (layers, dim)),
        ("w1", (layers, hidden, dim)),
        ("w2", (layers, dim, hidden)),
        ("w3", (layers, hidden, dim)),
        ("rms_final", (dim,)),
        ("freq_cis_real", (config.max_seq_len, config.head_dim // 2)),
        ("freq_cis_imag", (config.max_seq_len, config.head_dim // 2)),
    ]
    if not config.tie_embeddings:
        shapes.append(("wcls", (config.vocab_size, dim)))
    return shapes


def _to_hf_names(raw: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    out = {
        "model.embed_tokens.weight": raw["token_embedding"],
        "model.norm.weight": raw["rms_final"],
    }
    if not config.tie_embeddings:
        out["lm_head.weight"] = raw["wcls"]
    per_layer = {
        "input_layernorm": raw["rms_att"],
        "self_attn.q_proj": [interleaved_to_halves(w, config.n_heads) for w in raw["wq"]],
        "self_attn.k_proj": [interleaved_to_halves(w, config.n_kv_heads) for w in raw["wk"]],
        "self_attn.v_proj": raw["wv"],
        "self_attn.o_proj": raw["wo"],
        "post_attention_layernorm": raw["rms_ffn"],
        "mlp.gate_proj": raw["w1"],
        "mlp.down_proj": raw["w2"],
        "mlp.up_proj": raw["w3"],
    }
    for name, stacked in per_layer.items():
        for i in range(config.n_layers):
            out[f"model.layers.{i}.{name}.weight"] = stacked[i]
    return out
