"""The flash model computes what the dense model computes.

Float32 comparisons use atol 1e-5: the flash FFN multiplies the same weights in the same
dtype, but as (neurons, dim) rows gathered from the cache, so BLAS may sum in another order.
"""

from __future__ import annotations

import pytest
import torch

from edge_node.flash.ffn import flash_store, load_flash_model
from edge_node.flash.pack import load_dense, pack_model
from edge_node.flash.predictors import load_predictors, save_predictors
from edge_node.flash.store import BudgetError, StoreOptions
from lm.checkpoint import load_model
from lm.kv_cache import KVCache
from lm.quantize import QuantSpec
from lm.sparsity import LowRankPredictor, sparsify
from tests.flash.conftest import OPTIONS, budget_info, random_windows

ATOL = 1e-5


@torch.inference_mode()
def decode(model, prompt: torch.Tensor, steps: int, forced: list[int] | None = None):
    """Logits of a prefill of `prompt` (1, n) and of `steps` single-token steps after it,
    feeding `forced` tokens (or the model's own greedy ones): ((steps + 1, vocab), tokens)."""
    dtype = model.tok_embeddings.weight.dtype
    cache = KVCache(model.config, 1, prompt.shape[1] + steps + 1, dtype=dtype)
    logits = model(prompt, cache=cache)[0, -1:]
    cache.commit(0, range(prompt.shape[1]))
    rows, tokens = [logits], []
    for i in range(steps):
        token = forced[i] if forced is not None else int(rows[-1].argmax())
        tokens.append(token)
        rows.append(model(torch.tensor([[token]]), cache=cache)[0])
        cache.commit(0, [0])
    return torch.cat(rows), tokens


@pytest.fixture(scope="module")
def prompt():
    return random_windows(11, 1, 24)


@pytest.fixture(scope="module")
def dense_run(relu_model, prompt):
    return decode(relu_model, prompt, 12)


@pytest.mark.parametrize("where", [0.0, 0.3, 1.0])
def test_all_neurons_any_budget_equals_dense(relu_pack, prompt, dense_run, where):
    """Predictor off: every neuron, from a one-neuron cache up to one holding everything."""
    minimum, everything = budget_info(relu_pack)
    budget = int(minimum + where * (everything - minimum))
    model = load_flash_model(relu_pack, budget, device="cpu", options=OPTIONS)
    logits, tokens = decode(model, prompt, 12, forced=dense_run[1])
    torch.testing.assert_close(logits, dense_run[0], atol=ATOL, rtol=0)
    store = flash_store(model)
    if where == 1.0:  # everything fits: the first step reads each neuron once, then all hit
        assert store.totals.metrics.neurons_read == 3 * 256
    else:
        assert max(store.plan.rows) < 256


def test_exact_predictor_for_relu_equals_dense(predicted_pack, prompt, dense_run):
    """ReLU with a predictor of perfect recall: skipped neurons contribute exactly zero."""
    minimum, everything = budget_info(predicted_pack)
    model = load_flash_model(predicted_pack, (minimum + everything) // 2, options=OPTIONS)
    logits, _ = decode(model, prompt, 12, forced=dense_run[1])
    torch.testing.assert_close(logits, dense_run[0], atol=ATOL, rtol=0)
    metrics = flash_store(model).totals.metrics
    assert metrics.needed < 13 * 3 * 256  # the predictor really skipped neurons
    assert metrics.computed == metrics.needed  # it predicted only active ones: none to skip


@pytest.mark.parametrize(
    ("dtype", "ulp"),
    # Same weights; but the flash FFN multiplies in float32 (the CPU default, see
    # load_flash_model) in cache-sized chunks and rounds its output once, where the dense
    # half model rounds after each matmul. So the logits (|logit| < 4 here) differ by a
    # few units in the last place at [2, 4): 2 ** -9 in float16 (10 mantissa bits),
    # 2 ** -6 in bfloat16 (7). Measured: 2.5 and 2.25 ulps; the test allows 16. A float32
    # resident part would pass this too: the budget assertions catch that.
    [(torch.float16, 2.0**-9), (torch.bfloat16, 2.0**-6)],
)
def test_half_precision_resident_part_matches_the_dense_half_model(
    relu_dir, tmp_path, prompt, dtype, ulp
):
    """Pack and run in float16/bfloat16: embeddings, attention and norms stay in that dtype
    (half the float32 bytes), so a budget below the float32 minimum works."""
    pack_model(relu_dir, tmp_path, dtype=dtype)
    minimum, everything = budget_info(tmp_path, dtype=dtype)
    minimum32, _ = budget_info(tmp_path, dtype=torch.float32)
    small = (minimum + minimum32) // 2  # enough in half precision, too little in float32
    with pytest.raises(BudgetError):
        load_flash_model(tmp_path, small, device="cpu", options=OPTIONS)  # float32
    dense = load_model(relu_dir, device="cpu", dtype=dtype)
    expected, tokens = decode(dense, prompt, 12)
    resident = sum(t.numel() for n, t in dense.state_dict().items() if "feed_forward" not in n)
    resident -= dense.output.weight.numel() if dense.config.tie_embeddings else 0
    for budget in (small, everything):
        model = load_flash_model(tmp_path, budget, device="cpu", dtype=dtype, options=OPTIONS)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert flash_store(model).compute_dtype == torch.float32
        plan = flash_store(model).plan
        assert plan.resident == resident * dtype.itemsize and plan.total <= budget
        logits, _ = decode(model, prompt, 12, forced=tokens)
        torch.testing.assert_close(logits.float(), expected.float(), atol=16 * ulp, rtol=0)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))
        assert plan.resident + flash_store(model).allocated_bytes() <= budget


@pytest.fixture(scope="module")
def random_predictor_pack(relu_model, relu_dir, tmp_path_factory):
    """Predictors unrelated to the model: they pick neurons the model would not, so any
    result that matches the dense *masked* reference comes from the predicted set."""
    path = tmp_path_factory.mktemp("random_predictor")
    manifest = pack_model(relu_dir, path)
    torch.manual_seed(3)
    predictors = [LowRankPredictor(64, 256, 8) for _ in range(3)]
    for p in predictors:
        p.cut.fill_(0.1)
    save_predictors(path, manifest, predictors, {"activation": "relu"})
    return path


def test_window_changes_where_neurons_come_from_not_which(random_predictor_pack, prompt):
    pack = random_predictor_pack
    minimum, everything = budget_info(pack)
    budget = minimum + (everything - minimum) // 2
    # The reference reads everything into DRAM and masks with the same predictors.
    dense = load_dense(pack, device="cpu")
    predictors = load_predictors(pack, _manifest(pack), torch.device("cpu"), torch.float32)
    reference = sparsify(dense, predictors.predictors)
    expected, tokens = decode(reference, prompt, 16)
    assert (expected - decode(dense, prompt, 16, forced=tokens)[0]).abs().max() > 1e-2
    runs = {}
    for window in (0, 1, 4):
        options = StoreOptions(window=window, io_threads=2, read_bytes=8192)
        model = load_flash_model(pack, budget, device="cpu", options=options)
        used = record_neurons_used(flash_store(model))
        logits, _ = decode(model, prompt, 16, forced=tokens)
        runs[window] = (logits, flash_store(model).totals.metrics, used)
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0)
    # Every layer of every step multiplied exactly the same neurons whatever the window.
    assert len(runs[0][2]) == 17 * 3
    assert runs[0][2] == runs[1][2] == runs[4][2]
    read = {w: m.neurons_read for w, (_, m, _) in runs.items()}
    assert runs[0][1].hits == 0 and runs[4][1].hits > runs[1][1].hits > 0
    assert read[0] > read[1] > read[4]
    assert all(m.needed == runs[0][1].needed for _, m, _ in runs.values())
    # The unrelated predictors pick inactive neurons too: their up and down are skipped.
    assert all(0 < m.computed < m.needed for _, m, _ in runs.values())


def record_neurons_used(store) -> list[tuple[int, list[int]]]:
    """Instruments `store.stream` (the real one runs): per call, the layer and the sorted
    neurons it made resident for the FFN."""
    used: list[tuple[int, list[int]]] = []
    stream = store.stream

    def recording(layer, needed, *rest):
        pieces = []
        for neurons in stream(layer, needed, *rest):
            pieces.append(neurons)
            yield neurons
        used.append((layer, sorted(torch.cat(pieces).tolist())))

    store.stream = recording
    return used


def _manifest(pack):
    from edge_node.flash.pack import read_manifest

    return read_manifest(pack)


@pytest.mark.parametrize(
    ("bits", "tolerance"),
    # Rounding moves each weight by up to half a step, max|w| / qmax / 2 in its group of
    # 32; for Gaussian weights that is a relative RMS error eps of about 0.5% at int8
    # (qmax 127) and 9.7% at int4 (qmax 7). Gate, up and down errors add up in each FFN
    # (x sqrt(3)), and the three layers' FFN outputs dominate these random models'
    # residual stream (x sqrt(3) again), so the logits move by about 3 * eps: 1.6% and
    # 29%. The test allows twice that.
    [(8, 0.032), (4, 0.58)],
)
def test_quantized_packs_are_close_to_dense(relu_dir, tmp_path, prompt, dense_run, bits, tolerance):
    pack_model(relu_dir, tmp_path, quant=QuantSpec(bits=bits, group_size=32))
    minimum, everything = budget_info(tmp_path)
    model = load_flash_model(tmp_path, (minimum + everything) // 2, options=OPTIONS)
    logits, _ = decode(model, prompt, 12, forced=dense_run[1])
    # Exactly the dequantized model (the store decodes what the pack encoded)...
    dequantized, _ = decode(load_dense(tmp_path, device="cpu"), prompt, 12, forced=dense_run[1])
    torch.testing.assert_close(logits, dequantized, atol=ATOL, rtol=0)
    # ...which is close to the dense one.
    error = (logits - dense_run[0]).norm() / dense_run[0].norm()
    assert 0 < error < tolerance
