"""Calibrating a pack's sparsity predictors: record, train, measure, save.

The packed model (FFN decoded, so a quantized pack is calibrated as it will run) reads
calibration text; each layer's FFN inputs and true active neurons train that layer's
low-rank predictor (lm.training.predictors). Held-out text then gives each layer's recall and
false-positive rate, and what the predicted sparsity costs the model: top-1 agreement
with the dense model and both perplexities, teacher-forced. SwiGLU models first get
per-layer magnitude thresholds on the gate (`gate_sparsity`), and the report adds the
cost of that thresholding alone (the oracle mask).
"""

from __future__ import annotations

import dataclasses
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from edge_node.flash.pack import load_dense, read_manifest
from edge_node.flash.predictors import save_predictors
from lm.sparsity import sparsify
from lm.tokenizer import Tokenizer
from lm.training import corpus
from lm.training.predictors import (
    PredictorTraining,
    accuracy_cost,
    fit_predictor,
    gate_thresholds,
    rates,
    record_ffn,
)

logger = logging.getLogger(__name__)

DEFAULT_GATE_SPARSITY = 0.5  # SwiGLU: share of |silu(gate)| values treated as zero


def text_windows(
    tokenizer: Tokenizer, paths: Sequence[Path], tokens: int, context: int, seed: int = 0
) -> torch.Tensor:
    """(tokens // context, context) ids from files of `paths` taken in a seeded random order
    (so a small budget still samples the whole corpus), each framed as the tokenizer's
    model was trained (`corpus.document_frame`: SmolLM2's documents end in <|endoftext|>,
    not its chat markers)."""
    order = list(paths)
    random.Random(seed).shuffle(order)
    documents, total = [], 0
    for path in order:
        if total >= tokens:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        ids = tokenizer.encode(text, add_special_tokens=False)
        documents.append(ids)
        total += len(ids) + 2
    if not documents:
        raise corpus.CorpusError(f"corpus: no readable text in {len(order)} file(s)")
    frame = corpus.document_frame(tokenizer, order[0].parent)
    stream = corpus.pack(documents, frame.bos, frame.eos)
    return corpus.sequential_windows(stream, context, limit=max(1, tokens // context))


def calibrate(
    pack_dir: str | Path,
    train_windows: torch.Tensor,
    heldout_windows: torch.Tensor,
    training: PredictorTraining,
    *,
    gate_sparsity: float | None = None,
    progress: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Trains and saves the pack's predictors; returns the held-out report.

    train_windows, heldout_windows: (n, time) token ids.
    gate_sparsity: SwiGLU only (default 0.5): share of gate activations treated as zero.
    """
    manifest = read_manifest(pack_dir)
    activation = manifest.config.activation
    if activation == "relu" and gate_sparsity is not None:
        raise ValueError("gate_sparsity: only for SwiGLU (silu) models; ReLU is sparse as is")
    dense = load_dense(pack_dir, device="cpu", dtype=torch.float32)
    thresholds = None
    if activation == "silu":
        sparsity = DEFAULT_GATE_SPARSITY if gate_sparsity is None else gate_sparsity
        thresholds = gate_thresholds(dense, train_windows, sparsity)
        progress(f"gate thresholds for sparsity {sparsity}: {[round(t, 5) for t in thresholds]}")
    records = record_ffn(dense, train_windows, thresholds)
    predictors = []
    for i, record in enumerate(records):
        predictors.append(fit_predictor(record, training))
        progress(f"layer {i}: trained on {len(record.inputs)} tokens")
    del records
    heldout = record_ffn(dense, heldout_windows, thresholds)
    layers = []
    with torch.no_grad():
        for predictor, record in zip(predictors, heldout, strict=True):
            layer_rates = rates(predictor.predict(record.inputs), record.active)
            layers.append({k: round(v, 5) for k, v in dataclasses.asdict(layer_rates).items()})
    del heldout
    report: dict[str, Any] = {
        "activation": activation,
        "train_tokens": train_windows.numel(),
        "heldout_tokens": heldout_windows.numel(),
        "layers": layers,
        "predicted_cost": accuracy_cost(dense, sparsify(dense, predictors), heldout_windows),
    }
    if thresholds is not None:
        report["gate_sparsity"] = sparsity
        report["threshold_cost"] = accuracy_cost(
            dense, sparsify(dense, None, thresholds), heldout_windows
        )
    save_predictors(
        pack_dir,
        manifest,
        predictors,
        {
            "activation": activation,
            "gate_thresholds": thresholds,
            "training": dataclasses.asdict(training),
            "report": report,
        },
    )
    return report
