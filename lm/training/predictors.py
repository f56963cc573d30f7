"""Fitting the low-rank predictors of activation sparsity (`lm.sparsity`) to a model.

A predictor guesses which neurons of a layer's gated MLP are active from the FFN input x.
Each one is trained on activations recorded from the dense model (`record_ffn`) with a
class-balanced loss (actives are rare), and cut at the logit that keeps a target recall
on the training data (`choose_cut`). SwiGLU models get per-layer magnitude thresholds
first (`gate_thresholds`). `rates` and `accuracy_cost` measure the result on held-out text.

Everything here is plain torch on tensors and modules; `edge_node.flash.calibrate` runs it
on a pack.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lm.model import FeedForward, Transformer
from lm.sparsity import LowRankPredictor, active_mask


@dataclass(frozen=True)
class FFNRecord:
    """What one layer's FFN saw: inputs (tokens, dim) float32, active (tokens, hidden) bool."""

    inputs: torch.Tensor
    active: torch.Tensor


@torch.no_grad()
def record_ffn(
    model: Transformer,
    windows: torch.Tensor,
    thresholds: Sequence[float] | None = None,
    batch_size: int = 8,
) -> list[FFNRecord]:
    """Runs `windows` (n, time) token ids through the dense model; per layer, the FFN
    inputs and which neurons were active (`active_mask` with thresholds[layer])."""
    config = model.config
    inputs: list[list[torch.Tensor]] = [[] for _ in model.layers]
    active: list[list[torch.Tensor]] = [[] for _ in model.layers]

    def hook(layer: int):
        def capture(module: FeedForward, args: tuple[torch.Tensor]) -> None:
            x = args[0].reshape(-1, config.dim)
            threshold = 0.0 if thresholds is None else thresholds[layer]
            inputs[layer].append(x.float().cpu())
            active[layer].append(active_mask(module.gate(x), config.activation, threshold).cpu())

        return capture

    run_with_ffn_hooks(model, windows, batch_size, hook)
    return [FFNRecord(torch.cat(x), torch.cat(a)) for x, a in zip(inputs, active, strict=True)]


def run_with_ffn_hooks(
    model: Transformer,
    windows: torch.Tensor,
    batch_size: int,
    hook: Callable[[int], Callable[[FeedForward, tuple[torch.Tensor]], None]],
) -> None:
    """Runs `windows` (n, time) through `model` in batches with `hook(layer)` seeing each
    layer's FFN input, then removes the hooks."""
    handles = [
        block.feed_forward.register_forward_pre_hook(hook(i))
        for i, block in enumerate(model.layers)
    ]
    device = next(model.parameters()).device
    try:
        for batch in windows.split(batch_size):
            model(batch.to(device))
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def gate_thresholds(
    model: Transformer, windows: torch.Tensor, sparsity: float, batch_size: int = 8
) -> list[float]:
    """Per layer, the |act(gate(x))| below which a `sparsity` fraction of activations fall
    on `windows` (n, time): thresholds for magnitude sparsity of SwiGLU models."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity: must be in [0, 1), got {sparsity}")
    magnitudes: list[list[torch.Tensor]] = [[] for _ in model.layers]
    generator = torch.Generator().manual_seed(0)

    def hook(layer: int):
        def capture(module: FeedForward, args: tuple[torch.Tensor]) -> None:
            values = module.act(module.gate(args[0]).float()).abs().flatten().cpu()
            keep = torch.randperm(len(values), generator=generator)[: 1 << 18]
            magnitudes[layer].append(values[keep])

        return capture

    run_with_ffn_hooks(model, windows, batch_size, hook)
    return [torch.quantile(torch.cat(m), sparsity).item() for m in magnitudes]


@dataclass(frozen=True)
class PredictorTraining:
    rank: int = 64  # predictor rank (capped at the model's dim)
    steps: int = 400  # optimizer steps per layer
    batch_size: int = 1024  # recorded tokens per step
    lr: float = 3e-3
    recall: float = 0.99  # the cut keeps this share of training actives
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.recall <= 1.0:
            raise ValueError(f"recall: must be in (0, 1], got {self.recall}")
        for name in ("rank", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")


def balanced_bce(logits: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with actives and inactives weighted equally (half each).

    With 5% actives a plain BCE is minimised by predicting "inactive" everywhere; here a
    missed active costs as much, in total, as all false alarms together.
    """
    losses = F.binary_cross_entropy_with_logits(logits, active.float(), reduction="none")
    pos = active.sum()
    neg = active.numel() - pos
    weights = torch.where(active, 0.5 / pos.clamp(min=1), 0.5 / neg.clamp(min=1))
    return (losses * weights).sum()


def fit_predictor(record: FFNRecord, training: PredictorTraining) -> LowRankPredictor:
    """Trains one layer's predictor on `record` and sets its cut for `training.recall`."""
    dim, hidden = record.inputs.shape[1], record.active.shape[1]
    generator = torch.Generator().manual_seed(training.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(training.seed)
        predictor = LowRankPredictor(dim, hidden, min(training.rank, dim, hidden))
    optimizer = torch.optim.Adam(predictor.parameters(), lr=training.lr)
    n = len(record.inputs)
    for step in range(training.steps):
        batch = torch.randint(0, n, (min(training.batch_size, n),), generator=generator)
        for group in optimizer.param_groups:  # cosine decay to 10%
            group["lr"] = training.lr * (0.55 + 0.45 * math.cos(math.pi * step / training.steps))
        loss = balanced_bce(predictor(record.inputs[batch]), record.active[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        predictor.cut.fill_(choose_cut(predictor(record.inputs), record.active, training.recall))
    return predictor.eval().requires_grad_(False)


def choose_cut(logits: torch.Tensor, active: torch.Tensor, recall: float) -> float:
    """The largest logit cut with `logits >= cut` catching >= `recall` of the actives.

    Example: active logits [0.5, 2.0, -1.0, 3.0], recall 0.75 -> cut 0.5 (3 of 4 kept).
    """
    positives = logits[active].float()
    if not len(positives):
        return math.inf
    missed = int(math.floor((1.0 - recall) * len(positives) + 1e-9))
    return torch.sort(positives).values[missed].item()


@dataclass(frozen=True)
class Rates:
    """How a predicted mask compares with the true one, over all (token, neuron) pairs."""

    recall: float  # true actives predicted active
    false_positive_rate: float  # true inactives predicted active
    active: float  # share of neurons truly active (1 - sparsity)
    predicted: float  # share predicted active (what the store reads)


def rates(predicted: torch.Tensor, active: torch.Tensor) -> Rates:
    """predicted, active: (tokens, hidden) bool."""
    pos = active.sum().item()
    neg = active.numel() - pos
    return Rates(
        recall=(predicted & active).sum().item() / pos if pos else 1.0,
        false_positive_rate=(predicted & ~active).sum().item() / neg if neg else 0.0,
        active=pos / active.numel(),
        predicted=predicted.sum().item() / predicted.numel(),
    )


@torch.no_grad()
def accuracy_cost(
    dense: Transformer, sparse: Transformer, windows: torch.Tensor, batch_size: int = 8
) -> dict[str, float]:
    """Teacher-forced on `windows` (n, time): how often the sparse model's top-1 equals the
    dense one's, the mean KL(dense || sparse) of their next-token distributions in nats,
    and both models' perplexity on the next tokens.

    Example: dense probabilities (0.5, 0.5) and sparse (0.75, 0.25) at one position agree
    on top-1 (ties go to the first) and cost KL = 0.5 ln(0.5/0.75) + 0.5 ln(0.5/0.25)
    = 0.1438 nats.
    """
    device = next(dense.parameters()).device
    agree = total = 0
    kl = 0.0
    nll = {"dense": 0.0, "sparse": 0.0}
    for batch in windows.split(batch_size):
        batch = batch.to(device)
        dense_logits, sparse_logits = dense(batch)[:, :-1], sparse(batch)[:, :-1]
        targets = batch[:, 1:]
        agree += (dense_logits.argmax(-1) == sparse_logits.argmax(-1)).sum().item()
        total += targets.numel()
        kl += F.kl_div(
            F.log_softmax(sparse_logits.float(), -1).flatten(0, 1),
            F.log_softmax(dense_logits.float(), -1).flatten(0, 1),
            log_target=True,
            reduction="sum",
        ).item()
        for name, logits in (("dense", dense_logits), ("sparse", sparse_logits)):
            nll[name] += F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), reduction="sum"
            ).item()
    return {
        "top1_agreement": agree / total,
        "kl_nats": kl / total,
        "dense_perplexity": math.exp(nll["dense"] / total),
        "sparse_perplexity": math.exp(nll["sparse"] / total),
    }
