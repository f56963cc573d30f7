"""Weight-only int8 and int4 layers for decoding on CPU: the whole model, not only the FFN.

Decode at batch 1 is bound by the bytes of weights read per token (SmolLM2-135M: about
540 MB in float32, 270 MB in bfloat16, 85 MB in int4). These layers keep their weights
as integer codes and multiply them as they lie, with torch's CPU kernels:

- int4, group-wise with a scale and a zero per group of `group_size` inputs:
  w = (q - 8) * scale + zero for codes q in [0, 15] (`torch._weight_int4pack_mm_for_cpu`,
  the layout llama.cpp's Q4_0 and Q4_1 blocks map to exactly, see `lm.gguf`);
- int8, one scale per output row: w = q * scale (`torch._weight_int8pack_mm`).

Both kernels take bfloat16 activations (their float16 and float32 paths run 15-30x
slower on this CPU) and compute one row of activations at a time, so their cost grows
with the rows: beyond `ROW_KERNEL_MAX_ROWS` (prefill, wide passes) a layer decodes its
weight to bfloat16 and runs one matmul. Everything else stays float32: the residual
stream, norms, RoPE, attention and the KV cache (float32 attention also runs 1.5-3x
faster than bfloat16 on this CPU at one query); the layers return bfloat16, which the
residual adds promote.

Measured on 2 AMD EPYC cores (batch 1, SmolLM2's 1536 x 576 FFN matrix): float32 79 us,
bfloat16 60 us, int8 26 us, int4 27 us (`python benchmarks/edge_decode.py` for the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lm.model import Transformer

COMPUTE_DTYPE = torch.bfloat16
# codes (out, in) uint8 in [0, 15], scales and zeros (out, in / group_size): see Int4Linear.
Int4Groups = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
# Rows of activations up to which the row kernels beat decode-and-matmul (measured on
# 2 EPYC cores: at 8 rows int4pack 1536 x 576 takes 95 us, decode + bfloat16 matmul 150 us).
ROW_KERNEL_MAX_ROWS = 8
INT4_GROUP_SIZES = (32, 64, 128, 256)  # what int4pack accepts
INT4PACK_BLOCK = 64  # rows per block of int4pack's CPU layout (`_unpack_int4pack`)
# The multiple of rows and inputs int4pack needs, and of inputs int8pack needs (here and in
# `edge_node.flash.fused`): int8pack's CPU kernel reads rows in blocks of 16 values, and
# other lengths crash it or give garbage (segfaults at 4 to 56 values off the multiple, on
# an AVX-512 machine).
ROW_MULTIPLE = 16


@dataclass(frozen=True)
class QuantScheme:
    """How `quantize_model` stores a model.

    bits: the decoder layers' linear weights (attention and FFN): 4 or 8.
    group_size: inputs sharing one int4 scale and zero (GGUF's Q4_0/Q4_1 blocks: 32).

    The token embedding and the classifier are int8 with a scale per row whatever `bits`
    says, as llama.cpp's files keep them at 8 bits or more (SmolLM2's is Q8_0): at int4
    in groups of 32, SmolLM2's classifier moved logits by up to 1.6 (of 13.7) and changed
    the greedy token at the first step.
    """

    bits: Literal[4, 8] = 4
    group_size: int = 32

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits: must be 4 or 8, got {self.bits!r}")
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(
                f"group_size: must be one of {INT4_GROUP_SIZES}, got {self.group_size}"
            )

    @classmethod
    def named(cls, name: str) -> QuantScheme:
        """'int4' (4-bit layers) or 'int8' (8 bits throughout)."""
        if name not in SCHEMES:
            raise ValueError(f"quantize: must be one of {', '.join(SCHEMES)}, got {name!r}")
        return SCHEMES[name]


SCHEMES = {"int4": QuantScheme(bits=4), "int8": QuantScheme(bits=8)}


def int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per row: weight (out, in) float -> codes (out, in)
    int8, scales (out,) float32; |w - q * scale| <= scale / 2 with scale = max|w_row| / 127
    rounded to bfloat16 (what the layers multiply by), the codes computed against it."""
    weight = weight.float()
    scales = (weight.abs().amax(1) / 127).clamp_min(torch.finfo(torch.bfloat16).tiny)
    scales = scales.to(COMPUTE_DTYPE).float()
    codes = torch.round(weight / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scales


def int4_groups(
    weight: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` inputs (min to max in 15 steps):
    weight (out, in) float -> codes (out, in) uint8 in [0, 15], scales and zeros
    (out, in / group_size) float32 with w ~ (q - 8) * scale + zero, error <= scale / 2."""
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(-1), groups.amax(-1)
    scales = ((high - low) / 15).clamp_min(torch.finfo(torch.float32).tiny)
    codes = torch.round((groups - low[..., None]) / scales[..., None]).clamp_(0, 15)
    zeros = low + 8 * scales  # q = 0 decodes to the group's minimum
    return codes.to(torch.uint8).reshape(out_features, in_features), scales, zeros


class Int8Linear(nn.Module):
    """y = x W^T (+ b) with W as int8 codes and one bfloat16 scale per output row."""

    def __init__(
        self, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
    ) -> None:
        """codes (out, in) int8; scales (out,); bias (out,) or None."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))
        self.register_buffer("bias", None if bias is None else bias.float())
        # The kernel reads rows in blocks of ROW_MULTIPLE inputs.
        self.row_kernel = self.in_features % ROW_MULTIPLE == 0

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
        return cls(*int8_rows(weight), bias)

    def weight(self) -> torch.Tensor:
        """The decoded weight (out, in) in bfloat16."""
        return self.codes.to(COMPUTE_DTYPE) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) bfloat16 (float32 with a bias), from x rounded to
        bfloat16."""
        rows = _rows(x)
        buffers = self._buffers  # (nn.Module's attribute lookup costs ~0.7 us a buffer)
        if self.row_kernel and rows.shape[0] <= ROW_KERNEL_MAX_ROWS:
            y = torch._weight_int8pack_mm(rows, buffers["codes"], buffers["scales"])
        else:
            y = F.linear(rows, self.weight())
        return _unrows(y, x, buffers["bias"])


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W as int4 codes in int4pack's layout, a bfloat16 scale and
    zero per group of inputs: w = (q - 8) * scale + zero."""

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bias: torch.Tensor | None = None,
    ) -> None:
        """codes (out, in) uint8 in [0, 15]; scales, zeros (out, in / group_size) with
        group_size in INT4_GROUP_SIZES; bias (out,) or None. out and in must be multiples
        of 16 (int4pack's)."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = self.in_features // scales.shape[1]
        if (
            self.group_size not in INT4_GROUP_SIZES
            or self.in_features % self.group_size
            or self.out_features % ROW_MULTIPLE
            or self.in_features % ROW_MULTIPLE
        ):
            raise ValueError(
                f"codes: int4 needs rows and inputs in multiples of {ROW_MULTIPLE} and a group "
                f"size in {INT4_GROUP_SIZES}, got {tuple(codes.shape)} with "
                f"{scales.shape[1]} groups"
            )
        packed = torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        self.register_buffer("packed", packed)
        # (in / group_size, out, 2): the kernel's scale-and-zero layout.
        self.register_buffer(
            "scales_zeros", torch.stack((scales.T, zeros.T), dim=-1).to(COMPUTE_DTYPE).contiguous()
        )
        self.register_buffer("bias", None if bias is None else bias.float())
        # Many-row passes decode the codes from the packed layout; a torch build whose
        # layout differs from the one `_unpack_int4pack` knows runs them by the row kernel.
        self.unpackable = torch.equal(_unpack_int4pack(packed, self.in_features), codes)

    @classmethod
    def from_float(
        cls, weight: torch.Tensor, group_size: int, bias: torch.Tensor | None = None
    ) -> Int4Linear:
        return cls(*int4_groups(weight, group_size), bias)

    def weight(self) -> torch.Tensor:
        """The decoded weight (out, in) in bfloat16."""
        codes = _unpack_int4pack(self.packed, self.in_features).to(COMPUTE_DTYPE) - 8
        groups = codes.view(self.out_features, -1, self.group_size)
        scales, zeros = self.scales_zeros.transpose(0, 1).unbind(-1)  # (out, groups) each
        return (groups * scales[..., None] + zeros[..., None]).view(
            self.out_features, self.in_features
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> (..., out) bfloat16 (float32 with a bias), from x rounded to
        bfloat16."""
        rows = _rows(x)
        buffers = self._buffers  # (nn.Module's attribute lookup costs ~0.7 us a buffer)
        if rows.shape[0] <= ROW_KERNEL_MAX_ROWS or not self.unpackable:
            y = torch._weight_int4pack_mm_for_cpu(
                rows, buffers["packed"], self.group_size, buffers["scales_zeros"]
            )
        else:
            y = F.linear(rows, self.weight())
        return _unrows(y, x, buffers["bias"])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) as the kernels take it: (rows, in) bfloat16. A decode step's layers run
    this about 120 times a token, so it does the least it can: eager calls cost 1-3 us."""
    if x.dim() != 2:
        x = x.view(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1])
    return x if x.dtype == COMPUTE_DTYPE else x.bfloat16()  # COMPUTE_DTYPE, in one call


def _unrows(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A layer's (rows, out) output back to x's leading dims, with its bias added in
    float32 (Qwen2's q/k biases are large)."""
    if bias is not None:
        y = y.float() + bias
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])


def _unpack_int4pack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """int4pack's CPU layout back to codes (out, in) uint8.

    Output rows go in blocks of INT4PACK_BLOCK; a block of r rows stores, for each input,
    r / 2 bytes. In a whole block byte j holds row j in its low nibble and row j + 32 in
    its high one; in the shorter last block, rows 2j and 2j + 1. (Read off the packing
    kernel, and checked against it for every layer built: `Int4Linear.unpackable`.)
    """
    out_features = packed.shape[0]
    whole = out_features // INT4PACK_BLOCK * INT4PACK_BLOCK
    flat = packed.reshape(-1)
    parts = []
    if whole:
        blocks = flat[: whole * in_features // 2].view(-1, in_features, INT4PACK_BLOCK // 2)
        codes = torch.cat((blocks & 0x0F, blocks >> 4), dim=2)  # (blocks, in, 64)
        parts.append(codes.transpose(1, 2).reshape(whole, in_features))
    if whole < out_features:
        tail = flat[whole * in_features // 2 :].view(in_features, -1)
        codes = torch.stack((tail & 0x0F, tail >> 4), dim=2)  # (in, rows / 2, 2)
        parts.append(codes.reshape(in_features, -1).T)
    return torch.cat(parts) if len(parts) > 1 else parts[0].contiguous()


class Int8Embedding(nn.Module):
    """Token embedding whose rows are int8 codes with one scale each; a tied classifier
    (`Int8Linear` on the same codes and scales) reads the same bytes."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("codes", codes)  # (vocab, dim) int8
        self.register_buffer("scales", scales.to(COMPUTE_DTYPE))  # (vocab,)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) -> (..., dim) float32."""
        return self.codes[ids].float() * self.scales[ids].float()[..., None]


def quantize_model(
    model: Transformer,
    scheme: QuantScheme,
    int4_weights: dict[str, Int4Groups] | None = None,
) -> Transformer:
    """Turns `model` (in place) into one whose linear layers, token embedding and
    classifier are quantized as `scheme` says, computing in float32 around them
    (`Transformer.dtype`, norms, attention, cache); returns it.

    Each attention's q, k and v become one layer (`Attention.wqkv`) and each FFN's gate
    and up another (`FeedForward.gate_up`): one kernel call where there were three and two.
    int4_weights: per state-dict weight name ("layers.0.attention.wq.weight"), int4 groups
        to use as they are instead of quantizing that layer's float weight (GGUF Q4_0/Q4_1
        blocks, `lm.gguf.read_gguf_int4`), whatever `scheme.bits` says. A fused layer
        uses them when all its parts have them.
    A layer int4 cannot hold (rows or inputs not multiples of 16) is stored as int8.
    Not multi-head latent attention (ValueError: its up-projections are absorbed as
    float matrices).
    """
    if model.config.mla:
        raise ValueError(
            f"quantize: {model.config.architecture} cannot be quantized; "
            "Llama, Qwen2, Mistral and Gemma 3 models can"
        )
    int4_weights = int4_weights or {}
    model.float()
    for i, layer in enumerate(model.layers):
        parts = {
            "attention.wqkv": [("attention", name) for name in ("wq", "wk", "wv")],
            "attention.wo": [("attention", "wo")],
            "feed_forward.gate_up": [("feed_forward", name) for name in ("gate", "up")],
            "feed_forward.down": [("feed_forward", "down")],
        }
        for target, sources in parts.items():
            linears = [getattr(getattr(layer, owner), name) for owner, name in sources]
            names = [f"layers.{i}.{owner}.{name}.weight" for owner, name in sources]
            groups = [int4_weights.get(name) for name in names]
            fused = _quantized_linear(linears, scheme, groups if all(groups) else None)
            owner, name = target.split(".")
            for _, source in sources:
                setattr(getattr(layer, owner), source, None)
            setattr(getattr(layer, owner), name, fused)
    codes, scales = int8_rows(model.tok_embeddings.weight.detach())
    model.tok_embeddings = Int8Embedding(codes, scales)
    model.output = (
        Int8Linear(codes, model.tok_embeddings.scales)  # the same bytes
        if model.config.tie_embeddings
        else Int8Linear.from_float(model.output.weight.detach())
    )
    return model


def _quantized_linear(
    linears: list[nn.Linear], scheme: QuantScheme, groups: list[Int4Groups] | None
) -> nn.Module:
    """One layer computing `linears` side by side (their outputs concatenated)."""
    weight = torch.cat([linear.weight.detach() for linear in linears])
    biases = [linear.bias for linear in linears]
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    out_features, in_features = weight.shape
    fits_int4 = out_features % ROW_MULTIPLE == 0 and in_features % ROW_MULTIPLE == 0
    if groups is not None and fits_int4:
        return Int4Linear(*(torch.cat(parts) for parts in zip(*groups, strict=True)), bias)
    if scheme.bits == 4 and fits_int4 and in_features % scheme.group_size == 0:
        return Int4Linear.from_float(weight, scheme.group_size, bias)
    return Int8Linear.from_float(weight, bias)


def load_quantized(
    path: str | Path, scheme: QuantScheme, *, device: torch.device | str = "cpu"
) -> Transformer:
    """A checkpoint (`lm.checkpoint.load_model`'s kinds) loaded and quantized for the CPU.

    From a GGUF file with an int4 `scheme`, Q4_0 and Q4_1 tensors keep their own codes,
    scales and minima (the model llama.cpp runs from the same file, up to bfloat16
    rounding of the scales); other types (Q8_0, K-quants, F16), and every tensor for int8,
    are dequantized and requantized to `scheme`.
    """
    if torch.device(device).type != "cpu":
        raise ValueError(f"device: quantized models run on the CPU, got {device}")
    from lm.checkpoint import hf_names, load_model

    path = Path(path)
    model = load_model(path, device="cpu", dtype=torch.float32)
    int4_weights: dict[str, Int4Groups] = {}
    if path.suffix == ".gguf" and scheme.bits == 4:
        from lm.gguf import read_gguf_int4

        ours = {hf: name for name, hf in hf_names(model.config).items()}
        int4_weights = {ours[hf]: groups for hf, groups in read_gguf_int4(path).items()}
    return quantize_model(model, scheme, int4_weights)
