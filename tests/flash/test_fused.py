"""The fused int8 path: int8 segments are fbgemm's byte-rowwise rows, and decode steps
multiply the codes as they lie (edge_node.flash.fused) to the precision bfloat16 allows."""

from __future__ import annotations

import pytest
import torch

from edge_node.flash import fused
from edge_node.flash.bundle import BundleFormat
from edge_node.flash.ffn import flash_store, load_flash_model
from edge_node.flash.pack import load_dense, pack_model
from edge_node.flash.predictors import save_predictors
from lm.quantize import QuantSpec, dequantize, quantize
from lm.sparsity import LowRankPredictor
from tests.flash.conftest import OPTIONS, budget_info, exact_predictors, random_windows
from tests.flash.test_equivalence import ATOL, decode

DIM = 64


def encoded(k: int, group: int, seed: int = 0) -> tuple[BundleFormat, torch.Tensor, torch.Tensor]:
    """A format, k bundles of random weights, and their dequantized (k, 3, DIM) values."""
    torch.manual_seed(seed)
    fmt = BundleFormat(dim=DIM, dtype=torch.float32, quant=QuantSpec(8, group))
    gate, up, down = torch.randn(k, DIM), torch.randn(k, DIM), torch.randn(DIM, k)
    codes, scales = quantize(torch.stack((gate, up, down.t()), dim=1), fmt.quant)
    return fmt, fmt.encode(gate, up, down), dequantize(codes, scales, fmt.quant)


@pytest.mark.parametrize("group", [16, DIM])
def test_int8_segments_are_byte_rowwise_rows_that_fbgemm_reads(group):
    fmt, rows, expected = encoded(5, group)
    assert fmt.segment_bytes == DIM // group * (group + 8)  # codes + float32 scale, bias
    # value = (code + 128) * scale - 128 * scale: the int8 value to float32 rounding.
    torch.testing.assert_close(fmt.decode(rows, torch.float32), expected, atol=1e-6, rtol=0)
    out = torch.empty(5, 3, DIM)
    assert fmt.decode(rows, torch.float32, out) is not None
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    assert fmt.decode(rows[:0], torch.float32).shape == (0, 3, DIM)  # a piece none survive
    # In half types too the decode is lm.quantize's, exactly: code - 128 first, then scale
    # (quantizing the dequantized weights again gives back the same codes and scales).
    codes, scales = quantize(expected, fmt.quant)
    half = dequantize(codes, scales, fmt.quant, torch.bfloat16)
    assert torch.equal(fmt.decode(rows, torch.bfloat16), half.view(5, 3, DIM))
    # fbgemm's table: every group a row; bags of one row give that row back decoded.
    table = rows.view(-1, group + 8)
    one_each = torch.arange(len(table))
    bags = fused.weighted_rows(table, one_each, torch.eye(len(table)))
    torch.testing.assert_close(bags.view(5, 3, DIM), expected, atol=1e-6, rtol=0)


def test_fused_kernels_match_the_decoded_weights():
    fmt, rows, weights = encoded(40, DIM)
    assert fused.supported(fmt) and not fused.supported(encoded(1, 16)[0])
    # int8pack's CPU kernel crashes on rows that are not a multiple of 16 values long.
    odd = BundleFormat(dim=40, dtype=torch.float32, quant=QuantSpec(8, 40))
    assert not fused.supported(odd) and not fused.int8pack_fits(24)
    x = torch.randn(3, DIM)
    segment = rows.view(40, 3, DIM + 8)
    for s in (0, 1):  # gate, up: codes as int8 (xor 128) with their float32 scales
        codes = (segment[:, s, :DIM] ^ fused.MIXED_SIGN).view(torch.int8)
        scales = segment[:, s, DIM : DIM + 4].contiguous().view(torch.float32)[:, 0]
        got = fused.project(x.bfloat16(), codes, scales)
        expected = x @ weights[:, s].t()
        # bfloat16 keeps 8 significant bits: x rounds by 2^-9 relatively, so a product
        # moves by at most 2^-9 of sum |x_j w_j|, and its own rounding adds 2^-9 of |y|.
        bound = 2.0**-9 * ((x.abs() @ weights[:, s].abs().t()) + expected.abs()) + 1e-6
        assert ((got - expected).abs() <= bound).all()
        assert (got - expected).abs().max() > 0  # it did run in bfloat16
    a = torch.randn(3, 40)
    down = fused.weighted_rows(rows.view(-1, DIM + 8), torch.arange(40) * 3 + 2, a)
    torch.testing.assert_close(down, a @ weights[:, 2], atol=1e-5, rtol=1e-5)
    nothing = fused.weighted_rows(rows.view(-1, DIM + 8), torch.arange(0), torch.ones(3, 0))
    assert torch.equal(nothing, torch.zeros(3, DIM))


def test_decode_steps_take_the_fused_path_and_stay_close(relu_dir, tmp_path):
    prompt = random_windows(11, 1, 24)
    pack_model(relu_dir, tmp_path, quant=QuantSpec(8, DIM))
    minimum, everything = budget_info(tmp_path)
    model = load_flash_model(tmp_path, (minimum + everything) // 2, options=OPTIONS)
    store = flash_store(model)
    assert store.fused
    expected, tokens = decode(load_dense(tmp_path, device="cpu"), prompt, 12)
    logits, _ = decode(model, prompt, 12, forced=tokens)
    # The prefill (24 positions > MAX_POSITIONS) decodes to float32: the dequantized model.
    assert prompt.shape[1] > fused.MAX_POSITIONS
    torch.testing.assert_close(logits[0], expected[0], atol=ATOL, rtol=0)
    # Decode steps round x and the gate and up products to bfloat16 (2^-9 relative each,
    # four roundings per neuron), in 3 layers whose FFN outputs dominate the residual
    # stream. Measured: 0.7% relative on these logits, below the int8 rounding's own
    # effect (test_quantized_packs_are_close_to_dense); allowed: 2%.
    error = (logits[1:] - expected[1:]).norm() / expected[1:].norm()
    assert 0 < error < 0.02
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    metrics = store.totals.metrics
    assert 0 < metrics.computed < metrics.needed  # ReLU still skips inactive neurons
    # The same store on the generic path gives the dequantized model to float32 rounding.
    store.fused = False
    logits, _ = decode(model, prompt, 12, forced=tokens)
    torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)


def test_int8_predictor_moves_only_decisions_within_its_error_bound():
    torch.manual_seed(5)
    predictor = LowRankPredictor(DIM, 512, 16).half()
    predictor.cut.fill_(0.05)
    quantized = fused.Int8Predictor(predictor)
    x = torch.randn(40, DIM).half()
    with torch.no_grad():
        z, logits, got = predictor.down(x).float(), predictor(x).float(), quantized(x)
    weight = predictor.up.weight.float()
    # Half a step per weight, plus bfloat16 rounding of z and of the product (2^-9 each).
    bound = z.abs().sum(1, keepdim=True) * quantized.scales.float() / 2
    bound += 2.0**-8 * (z.abs() @ weight.abs().t()) + 1e-3  # + float16 rounding of logits
    assert ((got - logits).abs() <= bound).all()
    far = (logits - predictor.cut.float()).abs() > bound
    assert far.float().mean() > 0.9
    assert torch.equal(quantized.predict(x)[far], predictor.predict(x)[far])
    size = lambda m: sum(t.numel() * t.element_size() for t in m.state_dict().values())  # noqa: E731
    # One byte per up weight instead of two, plus a bfloat16 scale per row.
    assert size(quantized) == size(predictor) - 512 * 16 + 512 * 2


def test_fused_packs_load_int8_predictors(relu_model, relu_dir, tmp_path):
    manifest = pack_model(relu_dir, tmp_path, quant=QuantSpec(8, DIM))
    save_predictors(tmp_path, manifest, exact_predictors(relu_model), {"activation": "relu"})
    minimum, everything = budget_info(tmp_path)
    model = load_flash_model(tmp_path, (minimum + everything) // 2, options=OPTIONS)
    assert all(isinstance(b.feed_forward.predictor, fused.Int8Predictor) for b in model.layers)
    prompt = random_windows(12, 1, 8)
    expected, tokens = decode(load_dense(tmp_path, device="cpu"), prompt, 12)
    logits, _ = decode(model, prompt, 12, forced=tokens)
    # As test_decode_steps_take_the_fused_path_and_stay_close, with the neurons whose
    # gate is within the int8 predictor's error of 0 left out (they add almost nothing).
    error = (logits - expected).norm() / expected.norm()
    assert error < 0.02
    metrics = flash_store(model).totals.metrics
    assert metrics.needed < 13 * 3 * 256  # the predictor skipped neurons
