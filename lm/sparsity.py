"""Activation sparsity of gated MLPs, and applying the predictors that anticipate it.

Neuron i of down(act(gate(x)) * up(x)) is *active* for an input x when act(gate_i(x)) is
not negligible:

- relu: gate_i(x) > 0. An inactive neuron contributes exactly zero, so skipping it is free;
  trained ReLU models leave most neurons inactive for any one token.
- silu (SwiGLU): never exactly zero, so we use magnitude-threshold sparsity:
  |silu(gate_i(x))| > threshold, with a per-layer threshold set to cut a chosen fraction
  of activations (`lm.training.predictors.gate_thresholds`). Skipping the others changes
  the output; `lm.training.predictors.accuracy_cost` measures by how much.

Whether a neuron is active depends on gate_i(x), whose weights are exactly what a flash
store wants to avoid reading, so a small *predictor* guesses it from x: one low-rank
linear map per layer (`LowRankPredictor`; Deja Vu, Liu et al. 2023; "LLM in a Flash",
Alizadeh et al. 2023). Fitting predictors lives in `lm.training.predictors`; this module
holds what inference needs: the predictor itself, the true mask, and a model whose FFNs
apply either.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lm.model import FeedForward, Transformer


def active_mask(gate_pre: torch.Tensor, activation: str, threshold: float = 0.0) -> torch.Tensor:
    """gate_pre: (..., hidden) gate(x) before the activation -> (..., hidden) bool active.

    relu: gate_pre > 0 (threshold ignored). silu: |silu(gate_pre)| > threshold.
    """
    if activation == "relu":
        return gate_pre > 0
    if activation == "silu":
        return F.silu(gate_pre.float()).abs() > threshold
    raise ValueError(f"activation: must be 'relu' or 'silu', got {activation!r}")


class LowRankPredictor(nn.Module):
    """Predicts which neurons of one layer are active: logits = up(down(x)), rank `rank`.

    x: (..., dim) the FFN input -> logits (..., hidden); `predict` cuts them at `cut`.
    """

    def __init__(self, dim: int, hidden: int, rank: int) -> None:
        super().__init__()
        if not 1 <= rank <= min(dim, hidden):
            raise ValueError(f"rank: must be in [1, {min(dim, hidden)}], got {rank}")
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, hidden, bias=True)
        self.register_buffer("cut", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., hidden) bool, True = predicted active."""
        return self(x) >= self.cut


class SparseFeedForward(nn.Module):
    """A dense FFN that keeps only the neurons a mask allows: down(act(gate(x)) * up(x) * m).

    With the predictor's mask this computes what the flash store computes (it multiplies
    only the predicted neurons), so it measures the predictor's accuracy cost in DRAM.
    predictor None: the mask is the true `active_mask` at `threshold` (oracle sparsity).
    """

    def __init__(
        self,
        dense: FeedForward,
        activation: str,
        predictor: LowRankPredictor | None,
        threshold: float = 0.0,
    ) -> None:
        super().__init__()
        self.dense = dense
        self.activation = activation
        self.predictor = predictor
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.dense.gate(x)
        if self.predictor is None:
            mask = active_mask(gate, self.activation, self.threshold)
        else:
            mask = self.predictor.predict(x)
        return self.dense.down(self.dense.act(gate) * self.dense.up(x) * mask.to(x.dtype))


def sparsify(
    model: Transformer,
    predictors: Sequence[LowRankPredictor] | None,
    thresholds: Sequence[float] | None = None,
) -> Transformer:
    """A copy of `model` whose FFNs use predicted (or, predictors None, true) masks."""
    sparse = copy.deepcopy(model)
    for i, block in enumerate(sparse.layers):
        block.feed_forward = SparseFeedForward(
            block.feed_forward,
            model.config.activation,
            None if predictors is None else predictors[i],
            0.0 if thresholds is None else thresholds[i],
        )
    return sparse
