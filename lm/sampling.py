"""From logits to "the distribution the user asked for", and drawing tokens from it.

`probs_from_logits` is the single definition of the target distribution: the cloud verifier
accepts draft tokens against it, cloud-only decoding samples from it, and the lossless guarantee
("same distribution as the cloud model alone") is stated in terms of it.  The order of the
warpers is the one Hugging Face `generate` uses: temperature, then top-k, then top-p, each on
the result of the previous one.

Everything here is vectorised over leading dimensions and issues no GPU-to-host
synchronisation: the parameters are host scalars. Two ways to draw: `sample` races
exponentials (as in gpt-fast; the edge's drafts and local tokens), and `sample_by_inversion`
inverts the CDF at given uniforms, which `position_uniforms` makes a function of a seed and
an absolute position (the verifier's draws: same seed, same text).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to turn the model's logits into a token.

    The defaults are proto3's zero values: an unset request decodes greedily with every filter
    off.  `top_p == 0` therefore means "unset" and is normalised to 1.

    The values are trusted: each service checks them once, where a request enters it, with
    the protocol's rules (`protocol.validation.check_sampling`); the sampling code does not
    check them again on every pass.
    """

    temperature: float = 0.0  # 0 = greedy (argmax); otherwise logits / temperature, in (0, 100]
    top_k: int = 0  # keep the k most likely tokens (ties at the k-th value kept); 0 = off
    top_p: float = 1.0  # keep the smallest set of tokens with mass >= top_p; 1 (or 0) = off
    seed: int | None = None  # seeds the request's generator; None = fresh entropy

    def __post_init__(self) -> None:
        if self.top_p == 0:
            object.__setattr__(self, "top_p", 1.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution the user asked for.

    logits: (..., vocab), any float dtype.  Returns probs: (..., vocab) float32, each row summing
    to 1.  Greedy gives a one-hot row on the argmax (the first one on ties), so that greedy and
    sampled decoding share one code path downstream.

    Top-p keeps the most likely tokens, in order, until their mass reaches `top_p`; the token
    that crosses the threshold is kept, so at least one token always survives.

    Example: logits log(0.5, 0.3, 0.15, 0.05), temperature 1, top_k 3, top_p 0.8 -> top-k drops
    the last token and renormalises to (0.526, 0.316, 0.158, 0); the first two tokens already
    hold 0.842 >= 0.8, so top-p leaves (0.625, 0.375, 0, 0).
    """
    if params.greedy:
        logits = logits.float()
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    weights = warped_weights(logits, params)
    return weights.div_(weights.sum(-1, keepdim=True))


def warped_weights(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`probs_from_logits` of a sampled request up to a positive factor per row (the
    normalisation left out): all that inversion of the CDF needs. float32, (..., vocab).

    One new tensor, then in-place steps: at a verifier's (batch, rows, 152k) on CPU a
    fresh tensor per step cost more than the arithmetic.
    """
    vocab = logits.shape[-1]
    if params.greedy:
        raise ValueError("temperature: warped_weights is for sampling; greedy is the argmax")
    # Subtracting the max first keeps tiny temperatures finite: every scaled logit is <= 0,
    # so exp() is at most 1 and needs no second shift.
    logits = logits.float()
    weights = logits - logits.amax(-1, keepdim=True)
    # A temperature below float32's smallest normal (a double on the wire) would become
    # 0 in the division, and 0 / 0 NaN: clamped, it gives the limit, the argmax(es).
    weights.div_(max(params.temperature, torch.finfo(torch.float32).tiny))
    if 0 < params.top_k < vocab:
        kth = torch.topk(weights, params.top_k, dim=-1).values[..., -1:]
        weights.masked_fill_(weights < kth, float("-inf"))
    weights.exp_()
    if params.top_p < 1:
        probs = weights.div_(weights.sum(-1, keepdim=True))
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop = torch.empty_like(probs, dtype=torch.bool)
        drop.scatter_(-1, order, mass_before >= params.top_p)
        weights = probs.masked_fill_(drop, 0.0)
    return weights


def make_generator(seed: int | None, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on `device` (CPU when None), seeded with `seed` or with fresh entropy."""
    generator = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row: probs (..., vocab) -> LongTensor (...).

    Exponential race: with E_i ~ Exp(1) independent, argmax_i p_i / E_i is distributed as p
    (P(p_i / E_i is largest) = p_i / sum(p)).  Tokens with p_i = 0 never win.  The generator
    must live on probs' device.
    """
    probs = probs.float()
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # Exp(1) can round to exactly 0; the smallest normal float keeps the quotient finite.
    return torch.argmax(probs / race.clamp_min_(torch.finfo(torch.float32).tiny), dim=-1)


def position_uniforms(key: int, positions: Sequence[int]) -> list[float]:
    """One U[0, 1) per absolute sequence position, a pure function of (key, position).

    The verifier decides the token at position n with the uniform for n (by
    `sample_by_inversion`), so a seeded request's text depends on its seed, prompt and
    model alone: not on how many tokens each round verified, which pass they shared,
    the round trip, a failover to another verifier, or that verifier's device (the
    draws are made here, on the host, with blake2b). 53 bits, exact in float64; the
    verifier scales them in float32 (sample_by_inversion's precision note).
    """
    out = []
    for position in positions:
        digest = hashlib.blake2b(f"{key}:{position}".encode(), digest_size=8).digest()
        out.append((int.from_bytes(digest, "little") >> 11) * 2.0**-53)
    return out


# Inversion finds the block of this many tokens that holds the point from the blocks'
# sums, then the token inside that block alone: a sum over the vocabulary and a cumulative
# sum over one block per row, instead of a cumulative sum over the whole vocabulary.
INVERSION_BLOCK = 1024


def sample_by_inversion(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds each uniform: probs (..., vocab), non-negative and
    normalised or not (each row's total is its own scale), uniforms (...) in [0, 1) ->
    LongTensor (...). Never a zero-probability token; -1 for a row without a finite
    positive total.

    Runs on probs' device without synchronising with the host. The CDF is summed in
    float32 by blocks (INVERSION_BLOCK), so a token's interval may be off its probability
    by the sums' rounding (about 1e-7 of the total per position on CPU; kernels differ, so
    a CPU and a CUDA verifier may split a boundary differently).
    """
    probs = probs.float()
    vocab = probs.shape[-1]
    block = min(INVERSION_BLOCK, vocab)
    whole = vocab - vocab % block
    sums = probs[..., :whole].unflatten(-1, (whole // block, block)).sum(-1)
    if whole < vocab:
        sums = torch.cat([sums, probs[..., whole:].sum(-1, keepdim=True)], -1)
    block_cdf = sums.cumsum(-1)  # (..., blocks)
    total = block_cdf[..., -1:]
    # Strictly below the total, so some block's CDF entry lies above the point.
    point = torch.minimum(
        uniforms.to(total.dtype).unsqueeze(-1) * total, torch.nextafter(total, total.new_zeros(()))
    )
    chosen = torch.searchsorted(block_cdf, point, right=True)  # (..., 1): has mass, CDF rises
    before = torch.where(
        chosen > 0, block_cdf.gather(-1, (chosen - 1).clamp_(min=0)), torch.zeros_like(point)
    )
    offsets = chosen * block + torch.arange(block, device=probs.device)
    inside = probs.gather(-1, offsets.clamp(max=vocab - 1)).masked_fill_(offsets >= vocab, 0.0)
    inner = torch.searchsorted(inside.cumsum(-1), point - before, right=True)
    # The block's own sum and its cumulative sum round differently: past its end means
    # its last token with mass.
    last = block - 1 - inside.flip(-1).gt(0).int().argmax(-1, keepdim=True)
    inner = torch.where(inner >= block, last, inner)
    token = (chosen * block + inner).squeeze(-1)
    # No finite positive total (a NaN or +inf logit): no token, -1.
    return token.masked_fill_(~(torch.isfinite(total) & (total > 0)).squeeze(-1), -1)
