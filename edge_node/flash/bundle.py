"""One FFN neuron's row-column bundle: the bytes a single flash read brings in.

Neuron i of a gated MLP down(act(gate(x)) * up(x)) needs row i of gate, row i of up and
column i of down, each `dim` values. A bundle stores the three one after another (the
segments gate, up, down), so one contiguous read fetches everything the neuron needs
("LLM in a Flash", Alizadeh et al. 2023, section 3.2).

Float bundles hold the three vectors in the storage dtype. Quantized segments decode on
their own (lm.quantize gives the codes and group scales):

- int4: the packed codes, then their float16 group scales.
- int8: fbgemm's byte-rowwise rows, one per group: the codes plus 128 as uint8, then a
  float32 scale and a float32 bias (-128 * scale), so a value is code * scale + bias.
  8 bytes per group (a 256-value segment with one scale takes 264, as 64-value groups
  with float16 scales did), and it is the layout
  `torch.ops.quantized.embedding_bag_byte_rowwise_offsets` reads: the flash FFN sums down
  columns straight out of the neuron cache, no gather or decode (edge_node.flash.fused).

Bundles sit at a fixed `stride` in the file: the payload rounded up so that a bundle
never straddles a 4 KiB page (stride divides the page) or starts a page (the page
divides stride). Example with align 4096: payload 3072 -> stride 4096, 1536 -> 2048,
12288 -> 12288, 13000 -> 16384.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lm.quantize import QuantSpec, dequantize, quantize

SEGMENTS = ("gate", "up", "down")
# Runs of consecutive segments that can be gathered and decoded on their own.
GATE, UP_DOWN, ALL_SEGMENTS = slice(0, 1), slice(1, 3), slice(0, 3)
ROW_TAIL = 8  # int8 rows: float32 scale and bias after the codes


@dataclass(frozen=True)
class Segment:
    name: str  # "gate", "up" or "down"
    offset: int  # bytes from the start of the bundle
    nbytes: int


@dataclass(frozen=True)
class BundleFormat:
    """Bytes of one bundle of `dim`-long vectors: floats of `dtype`, or `quant` codes."""

    dim: int
    dtype: torch.dtype  # float storage dtype (the dense tensors' dtype when quantized)
    quant: QuantSpec | None = None

    def __post_init__(self) -> None:
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype: must be a float dtype, got {self.dtype}")
        if self.quant is not None:
            self.quant.check(self.dim, "dim")

    @property
    def segment_bytes(self) -> int:
        if self.quant is None:
            return self.dim * self.dtype.itemsize
        if self.quant.bits == 8:
            return self.groups * (self.quant.group_size + ROW_TAIL)
        return self.quant.nbytes(self.dim)

    @property
    def groups(self) -> int:
        """Quantization groups per segment (1 for float bundles)."""
        return 1 if self.quant is None else self.dim // self.quant.group_size

    @property
    def payload(self) -> int:
        return 3 * self.segment_bytes

    @property
    def segments(self) -> tuple[Segment, ...]:
        size = self.segment_bytes
        return tuple(Segment(name, i * size, size) for i, name in enumerate(SEGMENTS))

    def encode(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """gate, up: (hidden, dim) rows; down: (dim, hidden) as nn.Linear stores it.

        Returns (hidden, payload) uint8, row i = neuron i's bundle.
        """
        vectors = torch.stack((gate, up, down.t()), dim=1)  # (hidden, 3, dim)
        if self.quant is None:
            packed = vectors.to(self.dtype).contiguous().view(torch.uint8)
        elif self.quant.bits == 8:
            codes, scales = quantize(vectors, self.quant)
            grouped = (*vectors.shape[:2], self.groups, self.quant.group_size)
            shifted = codes.reshape(grouped) ^ 0x80  # q + 128
            scale = scales.float()[..., None]
            tail = torch.cat((scale, -128 * scale), dim=-1).view(torch.uint8)
            packed = torch.cat((shifted, tail), dim=-1)
        else:
            codes, scales = quantize(vectors, self.quant)
            packed = torch.cat((codes, scales.contiguous().view(torch.uint8)), dim=-1)
        return packed.reshape(len(gate), self.payload)

    def decode(
        self, rows: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """rows: (k, s * segment_bytes) uint8, contiguous: s consecutive segments of k
        bundles (all three: the whole payload) -> (k, s, dim) of `dtype`.

        A float bundle already in `dtype` is returned as a view of `rows` (no copy);
        otherwise the values go to `out` ((k, s, dim) of `dtype`) when given.
        """
        k, segments = rows.shape[0], rows.shape[1] // self.segment_bytes
        if self.quant is None:
            values = rows.view(self.dtype).view(k, segments, self.dim)
            if values.dtype == dtype:
                return values
            return values.to(dtype) if out is None else out.copy_(values)
        if self.quant.bits == 8:
            # (code - 128) * scale, which equals code * scale + bias: subtracting first is
            # exact (small integers), where adding the bias last rounds twice in half types.
            rows8 = rows.view(k, segments, self.groups, self.quant.group_size + ROW_TAIL)
            codes, tail = rows8[..., :-ROW_TAIL], rows8[..., -ROW_TAIL:].contiguous()
            scale = tail.view(torch.float32)[..., :1].to(dtype)
            decoded = codes.to(dtype) if out is None else out.view(codes.shape).copy_(codes)
            return decoded.sub_(128).mul_(scale).view(k, segments, self.dim)
        per_segment = rows.view(k, segments, self.segment_bytes)
        code_bytes = self.quant.code_bytes(self.dim)
        scales = per_segment[..., code_bytes:].contiguous().view(torch.float16)
        return dequantize(per_segment[..., :code_bytes], scales, self.quant, dtype, out)


def bundle_stride(payload: int, align: int) -> int:
    """The smallest stride >= payload that divides `align` or is a multiple of it."""
    if payload >= align:
        return -(-payload // align) * align
    stride = align
    while stride // 2 >= payload and align % (stride // 2) == 0:
        stride //= 2
    return stride
