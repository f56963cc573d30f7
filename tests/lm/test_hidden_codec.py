"""The hidden-state codec: the docstring's example, the stated error bounds, and
malformed inputs named by field."""

from __future__ import annotations

import pytest
import torch

from lm.hidden_codec import EncodedHidden, HiddenEncoding, decode_hidden, encode_hidden


def test_docstring_example():
    encoded = encode_hidden(torch.tensor([0.5, -1.27, 0.0]), HiddenEncoding.INT8)
    assert encoded.scale == pytest.approx(0.01)
    assert list(torch.frombuffer(bytearray(encoded.data), dtype=torch.int8)) == [50, -127, 0]
    assert len(encoded.data) == 3
    assert len(encode_hidden(torch.tensor([0.5, -1.27, 0.0]), HiddenEncoding.FLOAT16).data) == 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_within_the_stated_bounds(dtype):
    h = (torch.randn(256, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    exact = h.float()
    half = decode_hidden(encode_hidden(h, HiddenEncoding.FLOAT16))
    assert half.dtype == torch.float32 and half.shape == (256,)
    assert ((half - exact).abs() <= exact.abs() * 2**-11).all()
    encoded = encode_hidden(h, HiddenEncoding.INT8)
    int8 = decode_hidden(encoded)
    assert encoded.scale == pytest.approx(float(exact.abs().max()) / 127)
    assert ((int8 - exact).abs() <= encoded.scale / 2 * (1 + 1e-5)).all()
    # Not a trivially loose bound: the error uses most of half a step somewhere.
    assert (int8 - exact).abs().max() > encoded.scale / 4


def test_zero_vector_and_malformed_messages():
    zeros = encode_hidden(torch.zeros(4), HiddenEncoding.INT8)
    assert zeros.scale == 0.0 and decode_hidden(zeros).abs().sum() == 0
    with pytest.raises(ValueError, match="data: INT8 of dim 4 takes 4 bytes, got 3"):
        EncodedHidden(4, HiddenEncoding.INT8, b"\0\0\0", 1.0)
    with pytest.raises(ValueError, match="encoding: must be FLOAT16 or INT8"):
        EncodedHidden(4, HiddenEncoding.NONE, b"")
    with pytest.raises(ValueError, match="dim: must be in"):
        EncodedHidden(0, HiddenEncoding.FLOAT16, b"")
    with pytest.raises(ValueError, match="scale: must be >= 0"):
        EncodedHidden(1, HiddenEncoding.INT8, b"\1", float("nan"))
    with pytest.raises(ValueError, match="encoding: must be FLOAT16 or INT8"):
        encode_hidden(torch.ones(2), HiddenEncoding.NONE)
