"""Fitting the low-rank predictors of activation sparsity (`lm.sparsity`) to a model.

A predictor guesses which neurons of a layer's gated MLP are active from the FFN input x.
Each one is trained on activations recorded from the dense model (`record_ffn`) with a
class-balanced loss (actives are rare), and cut at the logit that keeps a target recall
on the training data (`choose_cut`). SwiGLU models get per-layer magnitude thresholds
first (`activity_thresholds`), at a share chosen per layer for a bounded accuracy cost
(`allocate_sparsity`). `rates` and `accuracy_cost` measure the result on held-out text.

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
from lm.sparsity import LowRankPredictor, active_mask, coefficients, sparsify


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
            gate, up = module.gate_and_up(x)
            active[layer].append(active_mask(gate, up, config.activation, threshold).cpu())

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
def activity_thresholds(
    model: Transformer,
    windows: torch.Tensor,
    sparsity: float | Sequence[float],
    batch_size: int = 8,
) -> list[float]:
    """Per layer, the |silu(gate(x)) * up(x)| (`lm.sparsity.coefficients`) below which a
    `sparsity` share of a SwiGLU model's coefficients fall on `windows` (n, time): one
    share for every layer, or one per layer."""
    shares = layer_shares(sparsity, len(model.layers))
    samples = _coefficient_samples(model, windows, batch_size)
    return [_quantile(sample, share) for sample, share in zip(samples, shares, strict=True)]


def layer_shares(sparsity: float | Sequence[float], layers: int) -> list[float]:
    """`sparsity` as one share per layer: one value for every layer, or one per layer,
    each in [0, 1)."""
    shares = [float(sparsity)] * layers if isinstance(sparsity, float | int) else list(sparsity)
    if len(shares) != layers or not all(0.0 <= s < 1.0 for s in shares):
        raise ValueError(
            f"sparsity: must be in [0, 1), one value or one per layer ({layers}), got {sparsity}"
        )
    return shares


def _coefficient_samples(
    model: Transformer, windows: torch.Tensor, batch_size: int
) -> list[torch.Tensor]:
    """Per layer, up to 2^18 coefficients per batch drawn at random (seeded)."""
    samples: list[list[torch.Tensor]] = [[] for _ in model.layers]
    generator = torch.Generator().manual_seed(0)

    def hook(layer: int):
        def capture(module: FeedForward, args: tuple[torch.Tensor]) -> None:
            values = coefficients(*module.gate_and_up(args[0])).flatten().cpu()
            keep = torch.randperm(len(values), generator=generator)[: 1 << 18]
            samples[layer].append(values[keep])

        return capture

    run_with_ffn_hooks(model, windows, batch_size, hook)
    return [torch.cat(sample) for sample in samples]


def _quantile(sample: torch.Tensor, share: float) -> float:
    """The value below which `share` of `sample` falls; 0.0 (nothing cut) for share 0."""
    return torch.quantile(sample, share).item() if share > 0 else 0.0


# Shares of coefficients `allocate_sparsity` may cut in a layer.
SPARSITY_LEVELS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def allocate_sparsity(
    model: Transformer,
    windows: torch.Tensor,
    min_top1: float,
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> list[float]:
    """Per-layer shares of a SwiGLU model's coefficients to cut, as many as keep the
    model's teacher-forced top-1 agreement with itself dense at >= `min_top1` on
    `windows` (n, time), cutting less in the layers where accuracy needs it.

    Each layer's cost at each of `SPARSITY_LEVELS` is measured alone (KL of the logits,
    dense || one layer cut); layers then rise one level at a time, always the one whose
    next level costs the least more, and bisection finds how many of those rises the
    model (every layer cut as far as it got, oracle masks) can take and keep
    `min_top1`: a heuristic, as it takes the costs of layers alone to add up and the
    agreement to fall as rises are added. 1 + layers x levels + about 8 passes over
    `windows`; keep them small (a few thousand tokens). On SmolLM2-135M it beat one
    share for every layer at the same mean (top-1 0.936 against 0.918 at 40%), by
    cutting the last layers more.
    """
    if not 0.0 < min_top1 <= 1.0:
        raise ValueError(f"min_top1: must be in (0, 1], got {min_top1}")
    samples = _coefficient_samples(model, windows, batch_size)
    thresholds = [[_quantile(sample, level) for level in SPARSITY_LEVELS] for sample in samples]
    sparse = sparsify(model, None, [0.0] * len(model.layers))
    ffns = [block.feed_forward for block in sparse.layers]
    dense = [model(batch) for batch in windows.split(batch_size)]

    def measure(levels: list[int]) -> tuple[float, float]:
        """(top-1 agreement, mean KL) of the model cut to `levels`."""
        for ffn, layer_thresholds, level in zip(ffns, thresholds, levels, strict=True):
            ffn.threshold = layer_thresholds[level]
        agree = kl = 0.0
        for batch, reference in zip(windows.split(batch_size), dense, strict=True):
            batch_agree, batch_kl = _agreement_and_kl(reference, sparse(batch))
            agree, kl = agree + batch_agree, kl + batch_kl
        return agree / windows.numel(), kl / windows.numel()

    layers = len(ffns)
    costs = [[0.0] * len(SPARSITY_LEVELS) for _ in range(layers)]
    for layer in range(layers):
        for level in range(1, len(SPARSITY_LEVELS)):
            levels = [0] * layers
            levels[layer] = level
            costs[layer][level] = measure(levels)[1]
        if progress:
            progress(f"layer {layer}: KL by level {[round(c, 5) for c in costs[layer]]}")
    rises, levels = [], [0] * layers
    while True:
        open_layers = [i for i in range(layers) if levels[i] + 1 < len(SPARSITY_LEVELS)]
        if not open_layers:
            break
        cheapest = min(open_layers, key=lambda i: costs[i][levels[i] + 1] - costs[i][levels[i]])
        levels[cheapest] += 1
        rises.append(cheapest)

    def levels_after(count: int) -> list[int]:
        levels = [0] * layers
        for layer in rises[:count]:
            levels[layer] += 1
        return levels

    low, high = 0, len(rises)  # low keeps min_top1 (no cut at all does)
    while low < high:
        middle = (low + high + 1) // 2
        if measure(levels_after(middle))[0] >= min_top1:
            low = middle
        else:
            high = middle - 1
    return [SPARSITY_LEVELS[level] for level in levels_after(low)]


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
        batch_agree, batch_kl = _agreement_and_kl(dense_logits, sparse_logits)
        agree, kl, total = agree + batch_agree, kl + batch_kl, total + targets.numel()
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


def _agreement_and_kl(dense: torch.Tensor, sparse: torch.Tensor) -> tuple[int, float]:
    """Over logits (..., vocab) of two models at the same positions: how many positions
    share their top-1, and the summed KL(dense || sparse) in nats."""
    agree = int((dense.argmax(-1) == sparse.argmax(-1)).sum().item())
    kl = F.kl_div(
        F.log_softmax(sparse.float(), -1).flatten(0, -2),
        F.log_softmax(dense.float(), -1).flatten(0, -2),
        log_target=True,
        reduction="sum",
    ).item()
    return agree, kl
