"""Calibrating a pack's sparsity predictors: record, train, measure, save.

The packed model (FFN decoded, so a quantized pack is calibrated as it will run) reads
calibration text; each layer's FFN inputs and true active neurons train that layer's
low-rank predictor (lm.training.predictors). Held-out text then gives each layer's recall and
false-positive rate, and what the predicted sparsity costs the model: top-1 agreement
with the dense model and both perplexities, teacher-forced. SwiGLU models first get
per-layer magnitude thresholds on each neuron's coefficient |silu(gate(x)) * up(x)|
(`lm.sparsity`): by default at the shares that keep teacher-forced top-1 agreement on
the training text at `min_top1`, chosen per layer (`allocate_sparsity`), or at one
`sparsity` for every layer; the report adds the cost of that thresholding alone (the
oracle mask).
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
    activity_thresholds,
    allocate_sparsity,
    fit_predictor,
    layer_shares,
    rates,
    record_ffn,
)

logger = logging.getLogger(__name__)

# SwiGLU: the teacher-forced top-1 agreement with the dense model that the thresholds keep
# (oracle masks, on the training text), unless one sparsity is given.
DEFAULT_MIN_TOP1 = 0.98
# Training tokens `allocate_sparsity` measures on (it makes about 10 passes per layer).
ALLOCATION_TOKENS = 1024


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
    sparsity: float | Sequence[float] | None = None,
    min_top1: float | None = None,
    progress: Callable[[str], None] = logger.info,
) -> dict[str, Any]:
    """Trains and saves the pack's predictors; returns the held-out report.

    train_windows, heldout_windows: (n, time) token ids.
    SwiGLU only, at most one of: sparsity, the share of coefficients treated as zero,
    one for every layer or one per layer (a report's "sparsity", to calibrate another
    pack of the same model without searching again); min_top1 (default
    DEFAULT_MIN_TOP1), the accuracy the per-layer shares keep.
    """
    manifest = read_manifest(pack_dir)
    activation = manifest.config.activation
    if activation == "relu" and (sparsity is not None or min_top1 is not None):
        field = "sparsity" if sparsity is not None else "min_top1"
        raise ValueError(f"{field}: only for SwiGLU (silu) models; ReLU is sparse as is")
    if sparsity is not None and min_top1 is not None:
        raise ValueError("min_top1: give sparsity or min_top1, not both")
    dense = load_dense(pack_dir, device="cpu", dtype=torch.float32)
    thresholds = None
    if activation == "silu":
        if sparsity is None:
            min_top1 = DEFAULT_MIN_TOP1 if min_top1 is None else min_top1
            windows = train_windows[: max(1, ALLOCATION_TOKENS // train_windows.shape[1])]
            shares = allocate_sparsity(dense, windows, min_top1, progress=progress)
        else:
            shares = layer_shares(sparsity, len(dense.layers))
        thresholds = activity_thresholds(dense, train_windows, shares)
        progress(f"sparsity per layer: {shares}; thresholds {[round(t, 5) for t in thresholds]}")
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
        report["sparsity"] = shares
        report["mean_sparsity"] = sum(shares) / len(shares)
        if min_top1 is not None:
            report["min_top1"] = min_top1
        report["threshold_cost"] = accuracy_cost(
            dense, sparsify(dense, None, thresholds), heldout_windows
        )
    save_predictors(
        pack_dir,
        manifest,
        predictors,
        {
            "activation": activation,
            "thresholds": thresholds,  # on |silu(gate(x)) * up(x)| (lm.sparsity)
            "training": dataclasses.asdict(training),
            "report": report,
        },
    )
    return report
