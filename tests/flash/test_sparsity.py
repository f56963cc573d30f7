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
    activity_thresholds,
    allocate_sparsity,
    balanced_bce,
    choose_cut,
    fit_predictor,
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
    thresholds = activity_thresholds(model, windows, 0.6)
    records = record_ffn(model, windows, thresholds)
    for record in records:
        assert abs(record.active.float().mean().item() - 0.4) < 0.02
    per_layer = record_ffn(model, windows, activity_thresholds(model, windows, [0.0, 0.3, 0.9]))
    for record, share in zip(per_layer, (0.0, 0.3, 0.9), strict=True):
        assert abs(record.active.float().mean().item() - (1 - share)) < 0.02
    with pytest.raises(ValueError, match="sparsity"):
        activity_thresholds(model, windows, 1.0)
    with pytest.raises(ValueError, match="sparsity"):
        activity_thresholds(model, windows, [0.5, 0.5])  # three layers


def test_a_silu_neuron_is_active_by_its_coefficient_on_down():
    """|silu(gate) * up|, not the gate alone: a large gate times a tiny up adds nothing."""
    gate = torch.tensor([-10.0, -0.1, 0.1, 10.0, 10.0])
    up = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.001])
    assert active_mask(gate, up, "silu", 0.05).tolist() == [False, False, True, True, False]
    assert active_mask(gate, None, "relu").tolist() == [False, False, True, True, True]
    with pytest.raises(ValueError, match="up"):
        active_mask(gate, None, "silu", 0.05)


def _oracle_top1(model, shares, windows) -> float:
    thresholds = activity_thresholds(model, windows, shares)
    return accuracy_cost(model, sparsify(model, None, thresholds), windows)["top1_agreement"]


def test_allocated_sparsity_keeps_the_bound_and_cuts_more_when_it_is_looser():
    model = make_model(seed=6, activation="silu", hidden=128)
    windows = random_windows(7, 4, 32)
    loose = allocate_sparsity(model, windows, 0.8)
    tight = allocate_sparsity(model, windows, 0.97)
    assert len(loose) == len(tight) == 3
    assert sum(tight) < sum(loose) and sum(loose) > 0
    # accuracy_cost counts next-token positions (all but the last), allocate_sparsity all.
    assert _oracle_top1(model, loose, windows) >= 0.8 - 1 / windows.shape[1]
    assert _oracle_top1(model, tight, windows) >= 0.97 - 1 / windows.shape[1]
    # The greedy search stops where the bound would break: one more level fails it.
    more = [min(0.9, share + 0.1) for share in loose]
    assert _oracle_top1(model, more, windows) < 0.8 + 1 / windows.shape[1]
    with pytest.raises(ValueError, match="min_top1"):
        allocate_sparsity(model, windows, 0.0)


def test_calibrate_a_silu_pack_reports_the_accuracy_cost(tmp_path):
    """SwiGLU: magnitude-threshold sparsity on the neurons' coefficients, predictors trained
    on it, and the report's costs; then the flash model runs with them."""
    model = make_model(seed=6, activation="silu", hidden=128)
    save_model(model, tmp_path / "model")
    pack = tmp_path / "pack"
    pack_model(tmp_path / "model", pack)
    training = PredictorTraining(rank=16, steps=40, batch_size=256, recall=0.95)
    report = calibrate(
        pack, random_windows(7, 8, 32), random_windows(8, 4, 32), training, sparsity=0.5
    )
    assert len(report["layers"]) == 3 and report["sparsity"] == [0.5] * 3
    for layer in report["layers"]:
        assert 0.45 < layer["active"] < 0.55  # half the coefficients fall below threshold
        assert 0 < layer["recall"] <= 1 and 0 <= layer["false_positive_rate"] <= 1
    for name in ("threshold_cost", "predicted_cost"):
        cost = report[name]
        assert 0 <= cost["top1_agreement"] <= 1 and cost["sparse_perplexity"] > 1
        assert cost["kl_nats"] > 0  # skipping half the neurons costs something
    loaded = load_predictors(pack, _manifest(pack), torch.device("cpu"), torch.float32)
    assert loaded.meta["report"]["layers"] == report["layers"]
    assert len(loaded.meta["thresholds"]) == 3
    flash = load_flash_model(pack, 1 << 30, device="cpu", options=OPTIONS)
    flash(random_windows(9, 1, 4))
    assert flash_store(flash).totals.metrics.needed < 3 * 128
    assert (pack / PREDICTOR_META).is_file()


def test_calibrate_chooses_per_layer_sparsity_for_the_accuracy_bound(tmp_path):
    model = make_model(seed=6, activation="silu", hidden=128)
    save_model(model, tmp_path / "model")
    pack = tmp_path / "pack"
    pack_model(tmp_path / "model", pack)
    train = random_windows(7, 8, 32)
    training = PredictorTraining(rank=16, steps=20, batch_size=256, recall=0.95)
    report = calibrate(pack, train, random_windows(8, 4, 32), training, min_top1=0.9)
    assert report["min_top1"] == 0.9 and len(report["sparsity"]) == 3
    assert report["sparsity"] == allocate_sparsity(model, train, 0.9)
    assert report["mean_sparsity"] == pytest.approx(sum(report["sparsity"]) / 3)
    with pytest.raises(ValueError, match="not both"):
        calibrate(pack, train, train, training, sparsity=0.5, min_top1=0.9)


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


def test_silu_threshold_cost_grows_with_the_sparsity():
    """The cost calibrate reports for SwiGLU: none without thresholding, then more KL and
    less top-1 agreement the larger the share of coefficients treated as zero."""
    model = make_model(seed=6, activation="silu", hidden=128)
    train, heldout = random_windows(7, 8, 32), random_windows(8, 4, 32)
    costs = {
        sparsity: accuracy_cost(
            model, sparsify(model, None, activity_thresholds(model, train, sparsity)), heldout
        )
        for sparsity in (0.0, 0.3, 0.9)
    }
    assert costs[0.0]["top1_agreement"] == 1.0 and costs[0.0]["kl_nats"] < 1e-6
    assert 0 < costs[0.3]["kl_nats"] < costs[0.9]["kl_nats"]
    assert costs[0.9]["top1_agreement"] < costs[0.3]["top1_agreement"] <= 1.0


@pytest.mark.parametrize("field", ["sparsity", "min_top1"])
def test_relu_refuses_sparsity(relu_pack, field):
    with pytest.raises(ValueError, match=field):
        calibrate(
            relu_pack,
            random_windows(0, 2, 8),
            random_windows(1, 1, 8),
            PredictorTraining(steps=1),
            **{field: 0.5},
        )


def _manifest(pack):
    from edge_node.flash.pack import read_manifest

    return read_manifest(pack)
