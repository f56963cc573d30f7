"""Activation sparsity of gated MLPs, and applying the predictors that anticipate it.

Neuron i of down(act(gate(x)) * up(x)) is *active* for an input x when it adds something
to the output, i.e. when its coefficient on down's column i, act(gate_i(x)) * up_i(x), is
not negligible:

- relu: gate_i(x) > 0. An inactive neuron contributes exactly zero, so skipping it is free;
  trained ReLU models leave most neurons inactive for any one token.
- silu (SwiGLU): never exactly zero, so we use magnitude-threshold sparsity on the
  coefficient: |silu(gate_i(x)) * up_i(x)| > threshold (TEAL's threshold on the down
  projection's input, Liu et al. 2024), with a per-layer threshold that cuts a chosen
  fraction of them (`lm.training.predictors.activity_thresholds`). Skipping the others
  changes the output; `lm.training.predictors.accuracy_cost` measures by how much.
  Thresholding the gate alone (CATS) ignores up: on SmolLM2-135M at half the neurons
  skipped, teacher-forced top-1 agreement with the dense model was 0.64 by the gate and
  0.85 by the coefficient (oracle masks, 512 tokens of this repository's README).

Whether a neuron is active depends on gate_i(x) and up_i(x), whose weights are exactly
what a flash store wants to avoid reading, so a small *predictor* guesses it from x: one
low-rank linear map per layer (`LowRankPredictor`; Deja Vu, Liu et al. 2023; "LLM in a
Flash", Alizadeh et al. 2023). Fitting predictors lives in `lm.training.predictors`; this
module holds what inference needs: the predictor itself, the true mask, and a model whose
FFNs apply either.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lm.model import FeedForward, Transformer


def active_mask(
    gate_pre: torch.Tensor, up: torch.Tensor | None, activation: str, threshold: float = 0.0
) -> torch.Tensor:
    """gate_pre, up: (..., hidden) gate(x) before the activation and up(x) -> (..., hidden)
    bool active.

    relu: gate_pre > 0 (up and threshold unused, up may be None). silu: |silu(gate_pre) *
    up| > threshold (`coefficients`).
    """
    if activation == "relu":
        return gate_pre > 0
    if activation == "silu":
        if up is None:
            raise ValueError("up: a SwiGLU neuron's activity needs up(x) too")
        return coefficients(gate_pre, up) > threshold
    raise ValueError(f"activation: must be 'relu' or 'silu', got {activation!r}")


def coefficients(gate_pre: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """|silu(gate_pre) * up| in float32, (..., hidden): each SwiGLU neuron's weight on its
    column of down, what skipping the neuron removes from the output."""
    return (F.silu(gate_pre.float()) * up.float()).abs()


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
        gate, up = self.dense.gate_and_up(x)
        if self.predictor is None:
            mask = active_mask(gate, up, self.activation, self.threshold)
        else:
            mask = self.predictor.predict(x)
        return self.dense.down(self.dense.act(gate) * up * mask.to(x.dtype))


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
