"""Group-wise symmetric integer quantization of weight vectors: int8 and int4.

Every run of `group_size` consecutive values along the last axis shares one scale,
max|w| / qmax, stored as float16; each value is stored as round(w / scale) clamped to
[-qmax, qmax] (qmax = 127 for int8, 7 for int4). Codes are computed against the
float16-rounded scale, so dequantizing gives every value back to within scale / 2.
int8 codes are stored as their two's-complement bytes; int4 codes are offset by 8 and
packed two per byte, the even element in the low nibble.

Example (int4, group_size 4): w = [0.875, -0.4375, 0.125, 0.0] -> scale = 0.125
(0.875 / 7); w / scale = [7, -3.5, 1, 0] rounds (half to even) to codes [7, -4, 1, 0];
stored nibbles [15, 4, 9, 8] -> bytes [0x4F, 0x89]; dequantized [0.875, -0.5, 0.125, 0.0].

Pure functions on tensors: the flash pack stores the bytes, the flash store decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

SCALE_DTYPE = torch.float16
SCALE_BYTES = 2


@dataclass(frozen=True)
class QuantSpec:
    """How a vector of n values is quantized; n must be a multiple of group_size."""

    bits: Literal[4, 8] = 8  # int8 or int4 codes
    group_size: int = 64  # values sharing one float16 scale

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits: must be 4 or 8, got {self.bits!r}")
        if not (2 <= self.group_size <= 65536 and self.group_size % 2 == 0):
            raise ValueError(f"group_size: must be even and in [2, 65536], got {self.group_size}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    def check(self, n: int, field: str = "n") -> None:
        """Raises ValueError unless vectors of length n can be quantized."""
        if n % self.group_size:
            raise ValueError(
                f"{field}: must be a multiple of group_size={self.group_size}, got {n}"
            )

    def code_bytes(self, n: int) -> int:
        return n * self.bits // 8

    def scale_bytes(self, n: int) -> int:
        return n // self.group_size * SCALE_BYTES

    def nbytes(self, n: int) -> int:
        """Bytes of codes plus scales for one vector of n values."""
        return self.code_bytes(n) + self.scale_bytes(n)


def quantize(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (..., n) float -> codes (..., code_bytes(n)) uint8, scales (..., n / group) float16."""
    n = w.shape[-1]
    spec.check(n, "w")
    groups = w.float().reshape(*w.shape[:-1], n // spec.group_size, spec.group_size)
    scales = (groups.abs().amax(-1) / spec.qmax).to(SCALE_DTYPE)
    # An all-zero group has scale 0; any divisor gives code 0 there.
    divisor = torch.where(scales > 0, scales.float(), torch.ones_like(scales, dtype=torch.float))
    codes = torch.round(groups / divisor[..., None]).clamp_(-spec.qmax, spec.qmax)
    codes = codes.to(torch.int8).reshape(w.shape)
    if spec.bits == 8:
        return codes.view(torch.uint8), scales
    nibbles = (codes + 8).to(torch.uint8).reshape(*w.shape[:-1], n // 2, 2)
    return nibbles[..., 0] | (nibbles[..., 1] << 4), scales


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    spec: QuantSpec,
    dtype: torch.dtype = torch.float32,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """codes (..., code_bytes(n)) uint8, scales (..., n / group) -> (..., n) in `dtype`.

    out: optional (..., n) tensor of `dtype` to write into (the flash store's scratch).
    """
    if spec.bits == 8:
        values = codes.view(torch.int8)
    else:
        low = (codes & 0x0F).to(torch.int8) - 8
        high = (codes >> 4).to(torch.int8) - 8
        values = torch.stack((low, high), dim=-1).flatten(-2)
    n = values.shape[-1]
    grouped = values.reshape(*values.shape[:-1], n // spec.group_size, spec.group_size)
    if out is None:
        return (grouped.to(dtype) * scales.to(dtype)[..., None]).reshape(values.shape)
    # In place in `out`: no temporary as large as the result (each would be a fresh
    # allocation, page faults included, on every call).
    decoded = out.view(grouped.shape)
    decoded.copy_(grouped)
    decoded.mul_(scales.to(dtype)[..., None])
    return out
