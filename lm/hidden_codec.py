"""Hidden states on the wire: the target's final-norm vector, packed for one reply.

A drafter that conditions on the target (ReDrafter's recurrent head, `lm.draft_head`)
needs the hidden state at the last accepted position every round. The verifier
encodes it, the edge decodes it; both use this module, which knows bytes, not gRPC.

Encodings (the values equal the proto enum `edgecloud.v1.HiddenEncoding`):

- FLOAT16: 2 bytes an element, little-endian. Relative error at most 2**-11 in
  float16's normal range.
- INT8: 1 byte an element plus one float scale = max |h| / 127; element i is
  data[i] * scale. Absolute error at most scale / 2 (half a step).

Example: h = (0.5, -1.27, 0.0) in INT8 has scale 0.01 and data (50, -127, 0):
3 bytes plus the scale, against 6 (FLOAT16) or 12 (float32).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class HiddenEncoding(enum.IntEnum):
    NONE = 0
    FLOAT16 = 1
    INT8 = 2


@dataclass(frozen=True)
class EncodedHidden:
    dim: int
    encoding: HiddenEncoding
    data: bytes
    scale: float = 0.0  # INT8 only

    def __post_init__(self) -> None:
        if self.encoding is HiddenEncoding.NONE:
            raise ValueError("encoding: must be FLOAT16 or INT8, got NONE")
        if not 1 <= self.dim <= 1 << 16:
            raise ValueError(f"dim: must be in [1, 65536], got {self.dim}")
        expected = self.dim * _BYTES[self.encoding]
        if len(self.data) != expected:
            raise ValueError(
                f"data: {self.encoding.name} of dim {self.dim} takes {expected} bytes, "
                f"got {len(self.data)}"
            )
        if self.encoding is HiddenEncoding.INT8 and not self.scale >= 0:
            raise ValueError(f"scale: must be >= 0, got {self.scale}")


_BYTES = {HiddenEncoding.FLOAT16: 2, HiddenEncoding.INT8: 1}


def encode_hidden(hidden: torch.Tensor, encoding: HiddenEncoding) -> EncodedHidden:
    """hidden: (dim,) any float dtype and device -> its bytes in `encoding`."""
    h = hidden.detach().float().cpu().reshape(-1)
    if encoding is HiddenEncoding.FLOAT16:
        return EncodedHidden(h.numel(), encoding, h.half().numpy().astype("<f2").tobytes())
    if encoding is HiddenEncoding.INT8:
        absmax = float(h.abs().max())
        scale = absmax / 127 if absmax > 0 else 0.0
        q = torch.zeros_like(h) if scale == 0 else (h / scale).round().clamp(-127, 127)
        return EncodedHidden(h.numel(), encoding, q.to(torch.int8).numpy().tobytes(), scale)
    raise ValueError(f"encoding: must be FLOAT16 or INT8, got {encoding!r}")


def decode_hidden(encoded: EncodedHidden) -> torch.Tensor:
    """The vector (dim,) float32 on the CPU."""
    if encoded.encoding is HiddenEncoding.FLOAT16:
        return torch.frombuffer(bytearray(encoded.data), dtype=torch.float16).float()
    q = torch.frombuffer(bytearray(encoded.data), dtype=torch.int8).float()
    # The scale travels as a float32 on the wire; multiply in float32 as the encoder did.
    return q * torch.tensor(encoded.scale, dtype=torch.float32)
