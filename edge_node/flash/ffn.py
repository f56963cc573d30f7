"""A Transformer whose FFN weights live on flash: `load_flash_model(pack_dir, budget_bytes)`.

The transform is a module swap after loading: each `layers[i].feed_forward` becomes a
`FlashFeedForward` with the same forward(x) -> y, backed by one shared `FlashStore`.
Attention, norms, embeddings and the KV cache are the ordinary ones, so anything that
runs a Transformer (EdgeLM, the drafters) runs the flash model unchanged.
"""

from __future__ import annotations

import logging
import time
import weakref
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_node.flash import fused
from edge_node.flash.bundle import GATE, UP_DOWN
from edge_node.flash.pack import FFN_PREFIX, load_dram_state, read_manifest, verify_pack
from edge_node.flash.predictors import has_predictors, load_predictors
from edge_node.flash.store import FlashStore, StoreOptions, plan_memory
from lm.device import default_device, default_dtype
from lm.errors import CheckpointError
from lm.model import Transformer
from lm.sparsity import LowRankPredictor

logger = logging.getLogger(__name__)


class FlashFeedForward(nn.Module):
    """down(act(gate(x)) * up(x)) over the neurons the predictor picks (all without one).

    x: (batch, time, dim). Each position uses exactly the neurons predicted for it, so
    results do not depend on how tokens are batched (prefill, tree drafts); the store
    loads the union over positions. For a ReLU model and a predictor of perfect recall
    this is the dense result, as inactive neurons contribute exactly zero. The matmuls
    run in the store's compute dtype (`ffn_dtype` of `load_flash_model`); the predictor
    and the result are in x's dtype. Except for decoding on CPU from an int8 pack with a
    scale per row: up to `fused.MAX_POSITIONS` positions multiply the int8 codes in the
    cache directly, activations in bfloat16 (edge_node.flash.fused).
    """

    def __init__(
        self,
        layer: int,
        store: FlashStore,
        activation: str,
        predictor: LowRankPredictor | fused.Int8Predictor | None,
    ) -> None:
        super().__init__()
        self.layer = layer
        self.store = store
        self.act = getattr(F, activation)
        # ReLU gives exact zeros: a neuron whose gate is inactive at every position adds
        # nothing, so its up and down weights are neither decoded nor multiplied.
        self.skips_inactive = activation == "relu"
        self.predictor = predictor
        self.register_buffer(
            "all_neurons", torch.arange(store.manifest.config.hidden_dim), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store = self.store
        flat = x.reshape(-1, x.shape[-1])
        with store.lock:
            start = time.perf_counter()
            mask = None
            if self.predictor is None:
                needed = self.all_neurons.cpu()
            else:
                mask = self.predictor.predict(flat)  # (positions, hidden)
                needed = true_ids(mask.any(0)).cpu()
            predicted = time.perf_counter()
            flat = flat.to(store.compute_dtype)
            on_codes = (
                store.fused and len(flat) <= fused.MAX_POSITIONS and flat.device.type == "cpu"
            )
            xb = flat.bfloat16() if on_codes else None
            y = torch.zeros_like(flat)
            computed = 0
            pieces = store.stream(self.layer, needed, store.code_rows if on_codes else None)
            for neurons in pieces:
                if on_codes:
                    slots = store.slots(self.layer, neurons)
                    gate = fused.project(xb, *store.codes(self.layer, slots, 0))
                else:
                    gate = flat @ store.weights(self.layer, neurons, GATE)[:, 0].to(flat.device).t()
                h = self.act(gate)
                if mask is not None and len(flat) > 1:
                    h = h * mask[:, neurons.to(flat.device)]
                if self.skips_inactive:
                    live = true_ids(h.ne(0).any(0))
                    neurons, h = neurons.index_select(0, live.cpu()), h.index_select(1, live)
                    if on_codes:
                        slots = slots.index_select(0, live)
                    if not len(neurons):
                        continue
                if on_codes:
                    h = h * fused.project(xb, *store.codes(self.layer, slots, 1))
                    y += store.down_products(self.layer, slots, h)
                else:
                    up, down = store.weights(self.layer, neurons, UP_DOWN).to(flat.device).unbind(1)
                    y += (h * (flat @ up.t())) @ down
                computed += len(neurons)
            store.finish(
                self.layer,
                tokens=len(flat),
                computed=computed,
                predictor_s=predicted - start,
                ffn_s=time.perf_counter() - predicted,
            )
        return y.to(x.dtype).view(x.shape)


def true_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions of the True entries of a 1-D bool mask, on its device. On CPU through
    numpy: torch.nonzero takes about 50 us for 12,288 entries, flatnonzero 10, and the
    flash FFN asks once per layer and once per piece on every token."""
    if mask.device.type != "cpu":
        return mask.nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


def load_flash_model(
    pack_dir: str | Path,
    budget_bytes: int,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    ffn_dtype: torch.dtype | None = None,
    options: StoreOptions | None = None,
    use_predictor: bool = True,
    verify: bool = True,
) -> Transformer:
    """The packed model with its FFN weights served from flash within `budget_bytes`.

    budget_bytes: DRAM for all model weights: the resident part (dram.safetensors and the
        predictors) plus the store's neuron caches, read buffers and scratch. Too small a
        budget raises BudgetError giving the minimum. KV cache and activations are extra.
    dtype: the resident weights and activations (default: the device's, float32 on CPU);
        float16 or bfloat16 halve the resident part's share of the budget.
    ffn_dtype: what the FFN matmuls run in, bundles decoded to it chunk by chunk (the
        scratch is in the budget). Default `dtype`, but float32 for half types on CPU:
        there each new matmul shape (the neuron count changes every token) builds a
        oneDNN kernel, about 10x slower than float32 BLAS.
    options: how the store reads and keeps neurons; default StoreOptions().
    use_predictor: pick neurons with the pack's predictors (`edgecloud flash calibrate`);
        False, or a pack without them, uses every neuron (dense results, any budget).
        With an int8 pack of one scale per row on CPU (the fused path), the predictors'
        up projections are int8 too (fused.Int8Predictor): half their DRAM goes to the
        neuron cache.
    verify: check the sha256 of every pack file first (reads them once).
    """
    manifest = read_manifest(pack_dir)
    if verify:
        verify_pack(pack_dir, manifest)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if ffn_dtype is None:
        ffn_dtype = torch.float32 if device.type == "cpu" and dtype.itemsize < 4 else dtype
    config = manifest.config
    state = load_dram_state(pack_dir, manifest, device, dtype)
    with torch.device("meta"):
        model = Transformer(config)
    missing, _ = model.load_state_dict(state, strict=False, assign=True)
    if any(FFN_PREFIX not in name for name in missing):
        raise CheckpointError(f"{pack_dir}: dram tensors missing: {missing}")
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    predictors, demand = None, None
    if use_predictor and has_predictors(pack_dir):
        loaded = load_predictors(pack_dir, manifest, device, dtype)
        predictors, demand = list(loaded.predictors), predicted_shares(loaded.meta)
        if fused.supported(manifest.bundle) and device.type == "cpu":
            predictors = [
                fused.Int8Predictor(p) if fused.int8pack_fits(p.down.out_features) else p
                for p in predictors
            ]
    elif use_predictor:
        logger.info("%s: no predictor (edgecloud flash calibrate): using every neuron", pack_dir)
    unique = {t.data_ptr(): t for t in state.values()}
    resident = sum(t.numel() * t.element_size() for t in unique.values())
    if predictors is not None:
        resident += sum(
            p.numel() * p.element_size() for m in predictors for p in m.state_dict().values()
        )
    in_place = manifest.bundle.quant is None and manifest.bundle.dtype == ffn_dtype
    decoded_row = 0 if in_place else 3 * config.dim * ffn_dtype.itemsize
    options = options or StoreOptions()
    plan = plan_memory(manifest, budget_bytes, resident, options, decoded_row, demand)
    store = FlashStore(pack_dir, manifest, plan, options, ffn_dtype)
    weakref.finalize(store, store.reader.close)
    for i, block in enumerate(model.layers):
        predictor = None if predictors is None else predictors[i]
        block.feed_forward = FlashFeedForward(i, store, config.activation, predictor).to(device)
    logger.info(
        "flash model %s: %s of %d neurons per layer in DRAM, %s reads",
        pack_dir,
        list(plan.rows),
        config.hidden_dim,
        store.io_mode,
    )
    return model.eval()


def predicted_shares(meta: dict) -> list[float] | None:
    """Each layer's predicted share of neurons on held-out text, from the calibration
    report in predictor.json (None for predictors saved without one)."""
    layers = meta.get("report", {}).get("layers")
    if not layers:
        return None
    return [max(float(layer["predicted"]), 1e-3) for layer in layers]


def flash_store(model: Transformer) -> FlashStore:
    """The store behind a model from `load_flash_model`."""
    ffn = model.layers[0].feed_forward
    if not isinstance(ffn, FlashFeedForward):
        raise TypeError("model: not a flash model (use load_flash_model)")
    return ffn.store
