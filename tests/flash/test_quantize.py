"""Group-wise int8/int4 quantization: the docstring example, the error bound, edge cases."""

from __future__ import annotations

import pytest
import torch

from lm.quantize import QuantSpec, dequantize, quantize


def test_docstring_example_int4():
    spec = QuantSpec(bits=4, group_size=4)
    codes, scales = quantize(torch.tensor([0.875, -0.4375, 0.125, 0.0]), spec)
    assert scales.tolist() == [0.125]
    assert codes.tolist() == [0x4F, 0x89]
    assert dequantize(codes, scales, spec).tolist() == [0.875, -0.5, 0.125, 0.0]


@pytest.mark.parametrize("bits", [8, 4])
def test_error_is_at_most_half_a_step(bits):
    spec = QuantSpec(bits=bits, group_size=32)
    w = torch.randn(7, 3, 128) * torch.logspace(-3, 1, 128)  # groups of very different scales
    codes, scales = quantize(w, spec)
    assert codes.dtype == torch.uint8 and codes.shape == (7, 3, 128 * bits // 8)
    assert scales.dtype == torch.float16 and scales.shape == (7, 3, 4)
    error = (dequantize(codes, scales, spec) - w).abs().view(7, 3, 4, 32)
    half_step = scales.float()[..., None] / 2
    assert torch.all(error <= half_step * (1 + 1e-3) + 1e-7)


def test_codes_use_the_full_range_and_zero_groups_stay_zero():
    spec = QuantSpec(bits=8, group_size=8)
    w = torch.tensor([[1.0, -1.0, 0.5, 0, 0, 0, 0, 0], [0.0] * 8])
    codes, scales = quantize(w, spec)
    assert codes.view(torch.int8)[0, :2].tolist() == [127, -127]
    assert dequantize(codes, scales, spec)[1].abs().sum() == 0


def test_dequantize_into_out_matches():
    spec = QuantSpec(bits=4, group_size=16)
    codes, scales = quantize(torch.randn(5, 64), spec)
    out = torch.empty(5, 64, dtype=torch.bfloat16)
    result = dequantize(codes, scales, spec, torch.bfloat16, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert torch.equal(out, dequantize(codes, scales, spec, torch.bfloat16))


def test_bad_specs_name_the_field():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=3)
    with pytest.raises(ValueError, match="group_size"):
        QuantSpec(group_size=7)
    with pytest.raises(ValueError, match="w: must be a multiple of group_size=64"):
        quantize(torch.randn(4, 100), QuantSpec(group_size=64))
