"""Reader for GGUF files (llama.cpp's format): a Llama-family or Gemma 3 model's config
and tensors, and its tokenizer (byte-level BPE, or Gemma's SentencePiece BPE).

The `{arch}.*` metadata becomes a `ModelConfig`; the tensors keep their quantized bytes in
the file until loaded, when `gguf.quants.dequantize` (llama.cpp's own numpy reference:
F32, F16, BF16, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0, the K-quants, ...) turns each into float32 under
its Hugging Face name, so `lm.checkpoint` checks and casts it like any other checkpoint's.

llama.cpp's converter (convert_hf_to_gguf.py, `LlamaModel.permute`) reorders the rows of
each Llama q and k projection from the "rotate halves" RoPE layout to interleaved pairs,
the layout its Llama kernel rotates; `interleaved_to_halves` undoes it. Qwen2 and Gemma 3
files are not permuted (llama.cpp rotates them NeoX-style, i.e. halves). A file without
`output.weight` ties the classifier to the token embedding.

Gemma 3: the converter stores every norm weight as 1 + w (llama.cpp multiplies by the weight
as stored; HF by 1 + w), so 1 is taken off again. Its files carry the sliding window but not
which layers use it, their RoPE base or the attention scale: llama.cpp's own constants are
used (every sixth layer global, the others local with base 10000, scale head_dim ** -0.5).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
import torch
from gguf import GGMLQuantizationType, GGUFReader, Keys, ReaderTensor, TokenType
from gguf.quants import dequantize
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from lm.config import GEMMA3_GLOBAL_EVERY, GEMMA3_LOCAL_THETA, Architecture, ModelConfig
from lm.errors import CheckpointError
from lm.llama2c import interleaved_to_halves

# general.architecture -> (our architecture, whether llama.cpp permuted q/k rows).
_ARCHITECTURES: dict[str, tuple[Architecture, bool]] = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "gemma3": ("Gemma3ForCausalLM", False),
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# Per layer, without the "blk.{i}." / "model.layers.{i}." prefixes.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 3's: ffn_norm is its pre-MLP norm, and each half has a norm after it too.
_GEMMA3_LAYER_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(.+)")
# tokenizer.ggml.pre values whose pre-tokenizer is GPT-2's regex (tokenizers' ByteLevel).
_GPT2_SPLIT = frozenset({"default", "gpt-2", "gpt2", "smollm"})


def read_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, Callable[[], torch.Tensor]]]:
    """The config and, per Hugging Face tensor name, a loader of the float32 tensor
    (dequantized, q/k rows back in the halves layout).

    Raises CheckpointError naming the file for a file that is not GGUF, an architecture
    other than llama/qwen2/gemma3, RoPE scaling, a tensor name it does not know, or a
    tensor type `gguf` cannot dequantize (raised by the loader).
    """
    model = _GGUFModel.read(Path(path))
    loaders = {
        model.hf_names[name]: _loader(
            model.path, tensor, model.permuted_heads(name), model.norm_offset(name)
        )
        for name, tensor in model.tensors.items()
    }
    return model.config, loaders


def read_gguf_int4(path: str | Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The Q4_0 and Q4_1 tensors of a GGUF file's decoder layers as int4 groups (the
    embedding and classifier stay int8, `lm.quantized`), without a float copy:
    per Hugging Face name, codes (out, in) uint8 in [0, 15] and scales, zeros
    (out, in / 32) float32 with w = (q - 8) * scale + zero (`lm.quantized.Int4Linear`),
    q/k rows back in the halves layout. Raises CheckpointError as `read_gguf` does.

    A 32-value block holds a float16 scale d (Q4_1: and a minimum m) and 16 bytes: value j
    in the low nibble of byte j, value j + 16 in its high nibble. Q4_0 decodes as
    (q - 8) * d, Q4_1 as q * d + m = (q - 8) * d + (m + 8d).
    """
    model = _GGUFModel.read(Path(path))
    out = {}
    for name, tensor in model.tensors.items():
        if tensor.tensor_type not in _INT4_BLOCKS or not name.startswith("blk."):
            continue
        header = _INT4_BLOCKS[tensor.tensor_type]
        rows = tensor.data.shape[0]
        blocks = np.ascontiguousarray(tensor.data).reshape(rows, -1, header + 16)
        halves = blocks[..., :header].copy().view(np.float16).astype(np.float32)
        d = halves[..., 0]  # Q4_1: halves[..., 1] is m
        quants = torch.from_numpy(blocks[..., header:].copy())  # (rows, blocks, 16)
        codes = torch.cat((quants & 0x0F, quants >> 4), dim=-1).reshape(rows, -1)
        scales = torch.from_numpy(d)
        zeros = (
            torch.from_numpy(halves[..., 1] + 8 * d) if header == 4 else torch.zeros_like(scales)
        )
        heads = model.permuted_heads(name)
        if heads is not None:  # rows move; groups run along a row, so they move whole
            codes, scales, zeros = (interleaved_to_halves(t, heads) for t in (codes, scales, zeros))
        out[model.hf_names[name]] = (codes.contiguous(), scales, zeros)
    return out


@dataclass(frozen=True)
class _GGUFModel:
    """A GGUF model file parsed once: what `read_gguf` and `read_gguf_int4` share.

    tensors: per GGUF tensor name, its (memory-mapped) tensor; hf_names: the same names ->
    Hugging Face names; permuted: whether llama.cpp permuted the q/k rows (`_ARCHITECTURES`).
    """

    path: Path
    config: ModelConfig
    permuted: bool
    tensors: dict[str, ReaderTensor]
    hf_names: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> _GGUFModel:
        """Raises CheckpointError naming the file for a file that is not GGUF, an
        architecture other than llama/qwen2/gemma3, RoPE scaling or an unknown tensor name."""
        fields = _Fields(path)
        arch = fields.require(Keys.General.ARCHITECTURE)
        if arch not in _ARCHITECTURES:
            raise CheckpointError(
                f"{path}: general.architecture {arch!r} is not supported; "
                f"supported: {', '.join(_ARCHITECTURES)}"
            )
        architecture, permuted = _ARCHITECTURES[arch]
        tensors = {tensor.name: tensor for tensor in fields.reader.tensors}
        config = _config(fields, arch, architecture, tensors)
        layer_names = _GEMMA3_LAYER_NAMES if arch == "gemma3" else _LAYER_NAMES
        hf_names = {name: _hf_name(path, name, layer_names) for name in tensors}
        return cls(path, config, permuted, tensors, hf_names)

    def norm_offset(self, name: str) -> float:
        """What to add to tensor `name` for HF's values: -1 for Gemma 3's norms (stored 1 + w)."""
        return -1.0 if self.config.gemma3 and name.endswith("norm.weight") else 0.0

    def permuted_heads(self, name: str) -> int | None:
        """Heads whose q/k rows llama.cpp permuted in tensor `name` (None: not permuted)."""
        if self.permuted and name.endswith("attn_q.weight"):
            return self.config.n_heads
        if self.permuted and name.endswith("attn_k.weight"):
            return self.config.n_kv_heads
        return None


# Q4_0 / Q4_1 -> bytes before each block's 16 bytes of nibbles (d; d and m, float16).
_INT4_BLOCKS = {GGMLQuantizationType.Q4_0: 2, GGMLQuantizationType.Q4_1: 4}


@dataclass(frozen=True)
class GGUFTokenizer:
    """What a GGUF file says about its tokenizer."""

    inner: tokenizers.Tokenizer
    bos_token: str | None  # spellings of tokenizer.ggml.bos_token_id / eos_token_id
    eos_token: str | None
    chat_template: str | None  # tokenizer.chat_template, a Jinja template (not rendered here)


def read_gguf_tokenizer(path: str | Path) -> GGUFTokenizer:
    """The tokenizer a GGUF file holds: byte-level BPE (`tokenizer.ggml.model` "gpt2"), or
    Gemma's SentencePiece BPE ("llama" in a gemma3 file, `_sentencepiece_bpe`).

    The vocabulary comes from tokenizer.ggml.tokens, merges from tokenizer.ggml.merges
    (byte-level) or the vocabulary itself (Gemma's files list none); tokens typed CONTROL
    become special added tokens and USER_DEFINED ones plain added tokens, so both are
    matched whole, as llama.cpp does. BOS/EOS are added only where add_bos_token /
    add_eos_token say so (default: not, as llama.cpp for this model type).
    """
    path = Path(path)
    fields = _Fields(path)
    model = fields.get(Keys.Tokenizer.MODEL)
    arch = fields.get(Keys.General.ARCHITECTURE)
    if model == "gpt2":
        inner, tokens = _byte_level_bpe(fields)
    elif model == "llama" and arch == "gemma3":
        inner, tokens = _sentencepiece_bpe(fields)
    else:
        raise CheckpointError(
            f"{path}: tokenizer.ggml.model {model!r} is not supported (byte-level BPE, 'gpt2', "
            "and Gemma 3's SentencePiece, 'llama')"
        )
    types = fields.get(Keys.Tokenizer.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)
    by_type = {TokenType.CONTROL: [], TokenType.USER_DEFINED: []}
    for token, token_type in zip(tokens, types, strict=True):
        if token_type in by_type:
            by_type[token_type].append(token)
    inner.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in by_type[TokenType.CONTROL]]
    )
    inner.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in by_type[TokenType.USER_DEFINED]]
    )
    bos = _special(fields, Keys.Tokenizer.BOS_ID, tokens)
    eos = _special(fields, Keys.Tokenizer.EOS_ID, tokens)
    first = [bos] if bos and fields.get(Keys.Tokenizer.ADD_BOS, False) else []
    last = [eos] if eos and fields.get(Keys.Tokenizer.ADD_EOS, False) else []
    if first or last:
        before, after = [token for token, _ in first], [token for token, _ in last]
        inner.post_processor = processors.TemplateProcessing(
            single=[*before, "$A", *after],
            pair=[*before, "$A", "$B:1", *after],
            special_tokens=first + last,
        )
    return GGUFTokenizer(
        inner,
        bos_token=None if bos is None else bos[0],
        eos_token=None if eos is None else eos[0],
        chat_template=fields.get(Keys.Tokenizer.CHAT_TEMPLATE),
    )


def _byte_level_bpe(fields: _Fields) -> tuple[tokenizers.Tokenizer, list[str]]:
    """GPT-2 style BPE over bytes spelt as characters, with the file's merges; and the
    vocabulary, by id."""
    pre = fields.get(Keys.Tokenizer.PRE, "default")
    if pre not in _GPT2_SPLIT:
        raise CheckpointError(
            f"{fields.path}: tokenizer.ggml.pre {pre!r} is not supported; "
            f"supported: {', '.join(sorted(_GPT2_SPLIT))}"
        )
    tokens: list[str] = fields.require(Keys.Tokenizer.LIST)
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    merges = [tuple(merge.split(" ", 1)) for merge in fields.require(Keys.Tokenizer.MERGES)]
    inner = tokenizers.Tokenizer(models.BPE(vocab, merges))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(fields.get(Keys.Tokenizer.ADD_PREFIX, False)), use_regex=True
    )
    inner.decoder = decoders.ByteLevel()
    return inner, tokens


def _sentencepiece_bpe(fields: _Fields) -> tuple[tokenizers.Tokenizer, list[str]]:
    """Gemma's tokenizer: BPE over text whose spaces are "▁", falling back to the
    <0xNN> byte tokens, no prefix space; and the vocabulary, by id.

    Its files list no merges. A token's merges are its splits into two tokens of the
    vocabulary; they rank by the token's place in the file (Gemma's scores do not follow
    its merge order, its token order does), then by the longer left part. Tokens that are
    runs of spaces are stored as spaces but looked up as runs of "▁".
    """
    tokens = [
        "▁" * len(t) if t and not t.strip(" ") else t for t in fields.require(Keys.Tokenizer.LIST)
    ]
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    found = _special(fields, Keys.Tokenizer.UNK_ID, tokens)
    unknown = "<unk>" if found is None else found[0]
    merges = []
    for token in tokens:
        for cut in range(len(token) - 1, 0, -1):  # longer left part first
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    inner = tokenizers.Tokenizer(
        models.BPE(vocab, merges, unk_token=unknown, fuse_unk=True, byte_fallback=True)
    )
    inner.normalizer = normalizers.Replace(" ", "▁")
    inner.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    return inner, tokens


class _Fields:
    """A GGUF file's metadata, read with errors that name the file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise CheckpointError(f"{path}: no such file")
        try:
            self.reader = GGUFReader(path)
        except (ValueError, IndexError, OSError) as error:  # IndexError: a truncated header
            raise CheckpointError(f"{path}: not a readable GGUF file ({error})") from error

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.get_field(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        field = self.reader.get_field(key)
        if field is None:
            raise CheckpointError(f"{self.path}: metadata {key} is missing")
        return field.contents()


def _config(
    fields: _Fields, arch: str, architecture: Architecture, tensors: dict[str, ReaderTensor]
) -> ModelConfig:
    path = fields.path

    def key(template: str) -> str:
        return template.format(arch=arch)

    scaling = fields.get(key(Keys.Rope.SCALING_TYPE), "none")
    if scaling != "none" or "rope_freqs.weight" in tensors:
        raise CheckpointError(f"{path}: RoPE scaling ({scaling}, rope_freqs) is not supported")
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: missing tensor token_embd.weight")
    n_heads = fields.require(key(Keys.Attention.HEAD_COUNT))
    dim = fields.require(key(Keys.LLM.EMBEDDING_LENGTH))
    head_dim = fields.get(key(Keys.Attention.KEY_LENGTH), dim // max(n_heads, 1))
    value_dim = fields.get(key(Keys.Attention.VALUE_LENGTH), head_dim)
    rope_dims = fields.get(key(Keys.Rope.DIMENSION_COUNT), head_dim)
    if value_dim != head_dim or rope_dims != head_dim:
        raise CheckpointError(
            f"{path}: key_length {head_dim}, value_length {value_dim} and rope dimension_count "
            f"{rope_dims} must be equal (partial RoPE and wider values are not supported)"
        )
    try:
        return ModelConfig(
            # The embedding's rows; the tensor's ggml shape is (dim, vocab).
            vocab_size=int(tensors["token_embd.weight"].shape[-1]),
            dim=dim,
            n_layers=fields.require(key(Keys.LLM.BLOCK_COUNT)),
            n_heads=n_heads,
            n_kv_heads=fields.get(key(Keys.Attention.HEAD_COUNT_KV), n_heads),
            hidden_dim=fields.require(key(Keys.LLM.FEED_FORWARD_LENGTH)),
            head_dim=head_dim,
            max_seq_len=fields.get(key(Keys.LLM.CONTEXT_LENGTH), 2048),
            norm_eps=fields.require(key(Keys.Attention.LAYERNORM_RMS_EPS)),
            rope_theta=float(fields.get(key(Keys.Rope.FREQ_BASE), 10000.0)),
            tie_embeddings="output.weight" not in tensors,
            qkv_bias=architecture == "Qwen2ForCausalLM",
            architecture=architecture,
            bos_token_id=fields.get(Keys.Tokenizer.BOS_ID),
            eos_token_id=fields.get(Keys.Tokenizer.EOS_ID),
            **(_gemma3_gguf_fields(fields, key) if arch == "gemma3" else {}),
        )
    except ValueError as error:
        raise CheckpointError(f"{path}: invalid GGUF metadata: {error}") from error


def _gemma3_gguf_fields(fields: _Fields, key: Callable[[str], str]) -> dict[str, Any]:
    """ModelConfig's Gemma 3 fields: the window from the file, the rest llama.cpp's."""
    n_layers = fields.require(key(Keys.LLM.BLOCK_COUNT))
    window = fields.require(key(Keys.Attention.SLIDING_WINDOW))
    local = tuple(i for i in range(n_layers) if (i + 1) % GEMMA3_GLOBAL_EVERY)
    return dict(
        norm="gemma_rmsnorm",
        activation="gelu_tanh",
        sliding_window=window if local else None,
        sliding_layers=local,
        rope_local_theta=GEMMA3_LOCAL_THETA,
        query_pre_attn_scalar=fields.require(key(Keys.Attention.KEY_LENGTH)),
    )


def _hf_name(path: Path, name: str, layer_names: dict[str, str]) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None or match[2] not in layer_names:
        raise CheckpointError(f"{path}: unexpected tensor {name}")
    return f"model.layers.{match[1]}.{layer_names[match[2]]}"


def _loader(
    path: Path, tensor: ReaderTensor, heads: int | None, offset: float = 0.0
) -> Callable[[], torch.Tensor]:
    """Dequantize `tensor` to float32 torch, in HF's (out, in) shape; with `heads`, undo
    llama.cpp's q/k row permutation for that many heads; add `offset`."""

    def load() -> torch.Tensor:
        try:
            array = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise CheckpointError(f"{path}: tensor {tensor.name}: {error}") from error
        # F32 comes back as a read-only view of the memory-mapped file.
        weight = torch.from_numpy(np.array(array, dtype=np.float32, copy=not array.flags.writeable))
        if offset:
            weight += offset
        return weight if heads is None else interleaved_to_halves(weight, heads)

    return load


def _special(fields: _Fields, key: str, tokens: list[str]) -> tuple[str, int] | None:
    """(spelling, id) of the token whose id metadata `key` holds, if it holds one."""
    token_id = fields.get(key)
    if token_id is None:
        return None
    if not 0 <= token_id < len(tokens):
        raise CheckpointError(f"{fields.path}: {key} {token_id} is outside the vocabulary")
    return tokens[token_id], token_id
