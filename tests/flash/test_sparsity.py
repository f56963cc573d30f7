"""Sparsity predictors: the cut rule, the balanced loss, training, and the cost measures."""

from __future__ import annotations

import math

import pytest
import torch

from edge_node.flash.calibrate import calibrate
from edge_node.flash.ffn import flash_store, load_flash_model
from edge_node.flash.pack import pack_model
from edge_node.flash.predictors import PREDICTOR_META, load_predictors
from lm.checkpoint import save_model
from lm.sparsity import active_mask, sparsify
from lm.training.predictors import (
    FFNRecord,
    PredictorTraining,
    accuracy_cost,
    balanced_bce,
    choose_cut,
    fit_predictor,
    gate_thresholds,
    rates,
    record_ffn,
)
from tests.flash.conftest import OPTIONS, make_model, random_windows


def test_cut_example_from_the_docstring():
    logits = torch.tensor([0.5, 2.0, -1.0, 3.0, 9.0])
    active = torch.tensor([True, True, True, True, False])
    assert choose_cut(logits, active, 0.75) == 0.5
    assert choose_cut(logits, active, 1.0) == -1.0


def test_balanced_loss_weighs_both_classes_equally():
    active = torch.tensor([True] + [False] * 99)
    all_inactive = torch.full((100,), -5.0)
    # Predicting "inactive" everywhere is cheap under plain BCE but costs half the
    # balanced loss's worth on the one active.
    assert balanced_bce(all_inactive, active) > 2.0
    separated = torch.where(active, 5.0, -5.0)
    assert balanced_bce(separated, active) < 0.01


def test_rates_count_recall_and_false_positives():
    predicted = torch.tensor([[True, True, False, False]])
    active = torch.tensor([[True, False, True, False]])
    r = rates(predicted, active)
    assert (r.recall, r.false_positive_rate, r.active, r.predicted) == (0.5, 0.5, 0.5, 0.5)


def test_predictor_learns_a_low_rank_rule():
    """Actives given by a rank-4 rule: a rank-8 predictor recovers it almost perfectly."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2048, 32, generator=generator)
    rule = torch.randn(64, 4, generator=generator) @ torch.randn(4, 32, generator=generator)
    scores = x @ rule.t()
    active = scores > scores.quantile(0.85)  # sparse: 15% active
    training = PredictorTraining(rank=8, steps=100, batch_size=512, lr=2e-2, recall=0.99)
    predictor = fit_predictor(FFNRecord(x[:1536], active[:1536]), training)
    held = rates(predictor.predict(x[1536:]), active[1536:])
    assert held.active < 0.2
    assert held.recall > 0.95 and held.false_positive_rate < 0.15


def test_oracle_mask_on_relu_is_the_dense_model(relu_model):
    windows = random_windows(2, 2, 16)
    oracle = sparsify(relu_model, None)
    torch.testing.assert_close(oracle(windows), relu_model(windows), atol=1e-6, rtol=0)
    cost = accuracy_cost(relu_model, oracle, windows)
    assert cost["top1_agreement"] == 1.0


def test_record_matches_the_activation_rule(relu_model):
    [first, *_] = record_ffn(relu_model, random_windows(3, 2, 8))
    x = first.inputs
    gate = relu_model.layers[0].feed_forward.gate(x)
    assert first.inputs.shape == (16, 64) and torch.equal(first.active, gate > 0)


def test_silu_thresholds_cut_the_requested_share():
    model = make_model(seed=4, activation="silu")
    windows = random_windows(5, 4, 32)
    thresholds = gate_thresholds(model, windows, 0.6)
    records = record_ffn(model, windows, thresholds)
    for record in records:
        assert abs(record.active.float().mean().item() - 0.4) < 0.02
    with pytest.raises(ValueError, match="sparsity"):
        gate_thresholds(model, windows, 1.0)
    gate = torch.tensor([-10.0, -0.1, 0.1, 10.0])
    assert active_mask(gate, "silu", 0.05).tolist() == [False, False, True, True]


def test_calibrate_a_silu_pack_reports_the_accuracy_cost(tmp_path):
    """SwiGLU: magnitude-threshold sparsity on the gate, predictors trained on it, and the
    report's costs; then the flash model runs with them."""
    model = make_model(seed=6, activation="silu", hidden=128)
    save_model(model, tmp_path / "model")
    pack = tmp_path / "pack"
    pack_model(tmp_path / "model", pack)
    training = PredictorTraining(rank=16, steps=40, batch_size=256, recall=0.95)
    report = calibrate(
        pack, random_windows(7, 8, 32), random_windows(8, 4, 32), training, gate_sparsity=0.5
    )
    assert len(report["layers"]) == 3 and report["gate_sparsity"] == 0.5
    for layer in report["layers"]:
        assert 0.45 < layer["active"] < 0.55  # half the activations fall below threshold
        assert 0 < layer["recall"] <= 1 and 0 <= layer["false_positive_rate"] <= 1
    for name in ("threshold_cost", "predicted_cost"):
        cost = report[name]
        assert 0 <= cost["top1_agreement"] <= 1 and cost["sparse_perplexity"] > 1
        assert cost["kl_nats"] > 0  # skipping half the gate activations costs something
    loaded = load_predictors(pack, _manifest(pack), torch.device("cpu"), torch.float32)
    assert loaded.meta["report"]["layers"] == report["layers"]
    assert len(loaded.meta["gate_thresholds"]) == 3
    flash = load_flash_model(pack, 1 << 30, device="cpu", options=OPTIONS)
    flash(random_windows(9, 1, 4))
    assert flash_store(flash).totals.metrics.needed < 3 * 128
    assert (pack / PREDICTOR_META).is_file()


class _FixedLogits(torch.nn.Module):
    """A "model" whose next-token logits are `logits` (vocab,) at every position."""

    def __init__(self, logits: list[float]) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(torch.tensor(logits))

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*batch.shape, -1)


def test_accuracy_cost_example_from_the_docstring():
    dense = _FixedLogits([0.0, 0.0])  # probabilities (0.5, 0.5)
    sparse = _FixedLogits([math.log(3.0), 0.0])  # (0.75, 0.25)
    cost = accuracy_cost(dense, sparse, torch.tensor([[0, 1, 0]]))  # next tokens 1, 0
    assert cost["top1_agreement"] == 1.0
    assert cost["kl_nats"] == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(2))
    assert cost["dense_perplexity"] == pytest.approx(2.0)
    assert cost["sparse_perplexity"] == pytest.approx(math.sqrt(1 / (0.25 * 0.75)))


def test_silu_threshold_cost_grows_with_the_gate_sparsity():
    """The cost calibrate reports for SwiGLU: none without thresholding, then more KL and
    less top-1 agreement the larger the share of gate activations treated as zero."""
    model = make_model(seed=6, activation="silu", hidden=128)
    train, heldout = random_windows(7, 8, 32), random_windows(8, 4, 32)
    costs = {
        sparsity: accuracy_cost(
            model, sparsify(model, None, gate_thresholds(model, train, sparsity)), heldout
        )
        for sparsity in (0.0, 0.3, 0.9)
    }
    assert costs[0.0]["top1_agreement"] == 1.0 and costs[0.0]["kl_nats"] < 1e-6
    assert 0 < costs[0.3]["kl_nats"] < costs[0.9]["kl_nats"]
    assert costs[0.9]["top1_agreement"] < costs[0.3]["top1_agreement"] <= 1.0


def test_relu_refuses_gate_sparsity(relu_pack):
    with pytest.raises(ValueError, match="gate_sparsity"):
        calibrate(
            relu_pack,
            random_windows(0, 2, 8),
            random_windows(1, 1, 8),
            PredictorTraining(steps=1),
            gate_sparsity=0.5,
        )


def _manifest(pack):
    from edge_node.flash.pack import read_manifest

    return read_manifest(pack)
