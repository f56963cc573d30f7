"""Fused int8 FFN products for decoding on CPU: the codes are multiplied as they lie.

The generic path gathers each piece's bundles, decodes them to float32 and multiplies.
For a decode step that is arithmetic on one row of activations after two memory-bound
passes over every weight. With int8 bundles whose scale covers a whole segment
(group_size == dim), two kernels of torch's CPU build work on the codes themselves:

- gate and up: `torch._weight_int8pack_mm(x, codes, scales)` with x in bfloat16, on the
  codes gathered from the cache (no decode; one scale per neuron).
- down: fbgemm's `embedding_bag_byte_rowwise_offsets` with per-sample weights computes
  sum_i a_i * down_i straight from the cache rows, no gather either: the int8 segment
  layout is its table format (edge_node.flash.bundle).

bfloat16 rounds x, the per-row scales and the gate and up products to 8 significant
bits (relative error 2^-9 each), below the int8 rounding of the weights (about 0.7% of a
row's RMS with one scale per row). int8pack runs one row of x at a time, so its cost
grows with the positions: the FFN of prefill and large draft trees takes the generic path
(`MAX_POSITIONS`); the int8 predictors use int8pack at every size.
"""

from __future__ import annotations

import torch
from torch import nn

from edge_node.flash.bundle import BundleFormat
from lm.quantized import ROW_MULTIPLE, int8_rows
from lm.sparsity import LowRankPredictor

MAX_POSITIONS = 16  # beyond this, decode-and-matmul is faster than int8pack (one row at a time)
MIXED_SIGN = 0x80  # int8 segments store code + 128: xor gives the two's-complement code


def int8pack_fits(length: int) -> bool:
    """Whether int8pack can multiply rows of `length` values (see lm.quantized.ROW_MULTIPLE)."""
    return length % ROW_MULTIPLE == 0 and hasattr(torch, "_weight_int8pack_mm")


def supported(bundle: BundleFormat) -> bool:
    """Whether `bundle`'s segments are int8 with one scale per segment (the fused path)."""
    quant = bundle.quant
    return (
        quant is not None
        and quant.bits == 8
        and quant.group_size == bundle.dim
        and int8pack_fits(bundle.dim)  # also keeps the scales float32 columns of the rows
        and hasattr(torch.ops.quantized, "embedding_bag_byte_rowwise_offsets")
    )


def project(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (m, dim) bfloat16 times int8 rows `codes` (k, dim) with `scales` (k,) -> (m, k) float32."""
    return torch._weight_int8pack_mm(x, codes, scales.to(x.dtype)).float()


def weighted_rows(table: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i weights[p, i] * row(index[i]) for each position p: (m, dim) float32.

    table: (rows, dim + 8) uint8 byte-rowwise rows; index: (k,) rows of it; weights: (m, k).
    """
    m, k = weights.shape
    return torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
        table,
        index.repeat(m),
        torch.arange(m) * k,  # bag p: positions p * k to (p + 1) * k of the indices
        False,  # scale_grad_by_freq
        0,  # mode: sum
        False,  # pruned_weights
        weights.float().reshape(-1),
        None,  # compressed_indices_mapping
        False,  # include_last_offset
    )


class Int8Predictor(nn.Module):
    """A `LowRankPredictor` whose up projection, (hidden, rank) and nearly all of its
    bytes, is int8 with a bfloat16 scale per row and multiplied by int8pack: half the DRAM
    of float16 (rows for the neuron cache) and a fraction of its CPU time.

    The logits move by at most half a step per weight, sum_j |z_j| * scale / 2 for a
    neuron's row, plus bfloat16 rounding (2^-9 relative): only neurons that close to the
    cut can change side. predict(x) is LowRankPredictor's.
    """

    def __init__(self, predictor: LowRankPredictor) -> None:
        super().__init__()
        self.down = predictor.down
        codes, scales = int8_rows(predictor.up.weight.detach())
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.bfloat16())  # already bfloat16 values
        self.register_buffer("bias", predictor.up.bias.detach().clone())
        self.register_buffer("cut", predictor.cut.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> logits (..., hidden) float32."""
        z = self.down(x).reshape(-1, self.codes.shape[1]).bfloat16()
        logits = project(z, self.codes, self.scales) + self.bias
        return logits.view(*x.shape[:-1], -1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., hidden) bool, True = predicted active."""
        return self(x) >= self.cut
