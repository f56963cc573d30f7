"""The neuron store: cache bookkeeping, the windowing example, and the DRAM budget."""

from __future__ import annotations

import pytest
import torch

from edge_node.flash.cache import NeuronCache
from edge_node.flash.ffn import flash_store, load_flash_model
from edge_node.flash.pack import pack_model, read_manifest
from edge_node.flash.predictors import save_predictors
from edge_node.flash.store import BudgetError, StoreOptions, plan_memory, split_rows
from lm.kv_cache import KVCache
from tests.flash.conftest import OPTIONS, budget_info, exact_predictors, random_windows


def ids(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def test_cache_example_from_the_docstring():
    cache = NeuronCache(hidden=10, capacity=6, payload=4)
    cache.insert(ids(7, 3, 9, 5))
    for slot, neuron in enumerate((7, 3, 9, 5)):
        cache.rows[slot] = neuron
    rows_before = cache.rows.data_ptr()
    cache.delete(ids(3))
    assert cache.resident().tolist() == [7, 5, 9]
    assert cache.rows[:3, 0].tolist() == [7, 5, 9]  # neuron 5's row moved into slot 1
    cache.insert(ids(2, 4))
    assert cache.resident().tolist() == [7, 5, 9, 2, 4]
    assert [cache.slot_of[n].item() for n in (7, 5, 9, 2, 4, 3)] == [0, 1, 2, 3, 4, -1]
    assert cache.rows.data_ptr() == rows_before  # nothing reallocated


def test_deleting_the_last_rows_and_a_hole_together():
    cache = NeuronCache(hidden=8, capacity=5, payload=1)
    cache.insert(ids(0, 1, 2, 3, 4))
    cache.rows[:, 0] = torch.arange(5, dtype=torch.uint8)
    cache.delete(ids(4, 1))
    assert cache.resident().tolist() == [0, 3, 2]
    assert cache.rows[:3, 0].tolist() == [0, 3, 2]


def test_windowing_example_from_the_docstring(relu_pack):
    """Window 2: steps needing {1,2,3}, {2,4}, {4,5} read {1,2,3}, {4}, {5}; {2,4,5} stay."""
    model = load_flash_model(
        relu_pack,
        1 << 30,
        device="cpu",
        options=StoreOptions(window=2, io_threads=2, read_bytes=8192),
    )
    store = flash_store(model)
    layer = 1
    read_per_step, resident_after = [], []
    for needed in ((1, 2, 3), (2, 4), (4, 5)):
        before = store.resident(layer)
        pieces = [(n, store.weights(layer, n).clone()) for n in store.stream(layer, ids(*needed))]
        read_per_step.append(store.resident(layer) - before)
        neurons = torch.cat([n for n, _ in pieces])  # resident ones first, then those read
        weights = torch.cat([w for _, w in pieces])[neurons.argsort()]
        ffn = model.layers[layer].feed_forward
        expected_gate = load_reference_gate(relu_pack, layer)[list(needed)]
        assert torch.equal(weights[:, 0], expected_gate)  # the right rows came back
        store.finish(layer)
        resident_after.append(store.resident(layer))
        assert ffn.layer == layer
    assert read_per_step == [{1, 2, 3}, {4}, {5}]
    assert resident_after == [{1, 2, 3}, {1, 2, 3, 4}, {2, 4, 5}]


def load_reference_gate(pack, layer):
    from edge_node.flash.pack import load_dense

    return load_dense(pack, device="cpu").layers[layer].feed_forward.gate.weight


def test_budget_below_the_resident_part_is_refused_with_the_minimum(relu_pack):
    minimum, _ = budget_info(relu_pack)
    with pytest.raises(BudgetError, match=f"below the minimum {minimum:,} bytes"):
        load_flash_model(relu_pack, minimum - 1, device="cpu", options=OPTIONS)
    model = load_flash_model(relu_pack, minimum, device="cpu", options=OPTIONS)
    assert flash_store(model).plan.rows == (1, 1, 1)


def test_budget_is_never_exceeded_over_a_long_generation(predicted_pack):
    minimum, everything = budget_info(predicted_pack)
    budget = minimum + (everything - minimum) * 3 // 4
    model = load_flash_model(predicted_pack, budget, device="cpu", options=OPTIONS)
    store = flash_store(model)
    plan = store.plan
    assert plan.total <= budget and 1 < min(plan.rows) <= max(plan.rows) < 256
    pointers = [c.rows.data_ptr() for c in store.caches]
    cache = KVCache(model.config, 1, 400)
    token = random_windows(5, 1, 8)
    with torch.inference_mode():
        logits = model(token, cache=cache)
        cache.commit(0, range(8))
        for _ in range(200):
            token = logits[:, -1:].argmax(-1)
            logits = model(token, cache=cache)
            cache.commit(0, [0])
            assert plan.resident + store.allocated_bytes() <= budget
            assert all(c.count <= c.capacity for c in store.caches)
    assert [c.rows.data_ptr() for c in store.caches] == pointers
    assert store.totals.steps == 201 and store.totals.metrics.neurons_read > 0
    assert 0 < store.totals.metrics.hits  # the window kept neurons between tokens


def test_a_step_larger_than_the_cache_streams_through_it_and_still_hits(relu_pack):
    minimum, _ = budget_info(relu_pack)
    payload = 3 * 64 * 4
    # About 40 rows per layer (3 layers) beyond the minimum's one.
    model = load_flash_model(relu_pack, minimum + 130 * payload, device="cpu", options=OPTIONS)
    store = flash_store(model)
    rows = store.plan.rows[0]
    assert 8 < rows < 100
    needed = torch.arange(0, 200)
    hits = []
    for _ in range(3):
        step_hits = 0
        resident = store.resident(0)
        for piece in store.stream(0, needed):
            assert len(piece) <= rows // 2
            step_hits += len(resident & set(piece.tolist()))
            resident = store.resident(0)
        store.finish(0)
        hits.append(step_hits)
    # Half the cache streams; what stays is what the next step needs soonest.
    assert hits[0] == 0 and min(hits[1:]) >= rows // 2 - 1


def test_split_rows_example_and_limits():
    assert split_rows(10, [3, 1, 1], hidden=4) == (4, 3, 3)
    assert split_rows(3, [5, 1, 1], hidden=100) == (1, 1, 1)  # one row each, always
    assert split_rows(2, [1, 1, 1], hidden=100) == ()  # not even that
    # Layer 0 fills up; so does layer 2 from what is left; layer 1 takes the rest.
    assert split_rows(1000, [0.6, 0.1, 0.3], hidden=400) == (400, 200, 400)


def test_cache_rows_follow_each_layers_demand(relu_pack):
    """A layer that uses four times the neurons gets (about) four times the rows, in the
    same total, and the plan still fits the budget."""
    manifest = read_manifest(relu_pack)
    minimum, everything = budget_info(relu_pack)
    budget = minimum + (everything - minimum) // 8
    uniform = plan_memory(manifest, budget, 0, OPTIONS, 0)
    skewed = plan_memory(manifest, budget, 0, OPTIONS, 0, demand=[0.4, 0.1, 0.1])
    assert len(set(uniform.rows)) == 1 and uniform.total <= budget >= skewed.total
    assert abs(sum(skewed.rows) - sum(uniform.rows)) <= 3 + 2 * skewed.chunk_rows
    assert skewed.rows[0] == pytest.approx(4 * skewed.rows[1], abs=4)
    with pytest.raises(ValueError, match="demand: must be 3 positive shares"):
        plan_memory(manifest, budget, 0, OPTIONS, 0, demand=[1.0, 0.0, 1.0])


def test_the_calibration_report_sets_each_layers_rows(relu_model, relu_dir, tmp_path):
    """load_flash_model splits the cache by the predicted shares predictor.json reports."""
    manifest = pack_model(relu_dir, tmp_path)
    report = {"layers": [{"predicted": share} for share in (0.1, 0.5, 0.2)]}
    meta = {"activation": "relu", "report": report}
    save_predictors(tmp_path, manifest, exact_predictors(relu_model), meta)
    minimum, everything = budget_info(tmp_path)
    budget = (7 * minimum + everything) // 8
    model = load_flash_model(tmp_path, budget, device="cpu", options=OPTIONS)
    rows = flash_store(model).plan.rows
    assert rows[1] == pytest.approx(5 * rows[0], abs=5) and rows[2] == pytest.approx(
        2 * rows[0], abs=5
    )
