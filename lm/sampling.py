"""From logits to "the distribution the user asked for", and drawing tokens from it.

`probs_from_logits` is the single definition of the target distribution: the cloud verifier
accepts draft tokens against it, cloud-only decoding samples from it, and the lossless guarantee
("same distribution as the cloud model alone") is stated in terms of it.  The order of the
warpers is the one Hugging Face `generate` uses: temperature, then top-k, then top-p, each on
the result of the previous one.

Everything here is vectorised over leading dimensions and issues no GPU-to-host
synchronisation: the parameters are host scalars, and sampling uses the exponential-race trick
(as in gpt-fast) instead of `torch.multinomial`, which validates its input on the host.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

MAX_TEMPERATURE = 100.0
SEED_LIMIT = 2**64


@dataclass(frozen=True)
class SamplingParams:
    """How to turn the model's logits into a token.

    The defaults are proto3's zero values: an unset request decodes greedily with every filter
    off.  `top_p == 0` therefore means "unset" and is normalised to 1.
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

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first bad field and its allowed range."""
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size: must be an integer >= 1, got {vocab_size!r}")
        if not _is_number(self.temperature) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature: must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}"
            )
        if not _is_int(self.top_k) or not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k: must be an integer in [0, {vocab_size}], got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p: must be in [0, 1], got {self.top_p!r}")
        if self.seed is not None:
            _check_seed(self.seed)


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
    vocab = logits.shape[-1]
    params.validate(vocab)
    logits = logits.float()
    if params.greedy:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    # Subtracting the max first keeps tiny temperatures finite: every scaled logit is <= 0.
    scaled = (logits - logits.amax(-1, keepdim=True)) / params.temperature
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop = torch.empty_like(probs, dtype=torch.bool)
        drop.scatter_(-1, order, mass_before >= params.top_p)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def make_generator(seed: int | None, device: torch.device | str | None = None) -> torch.Generator:
    """A generator on `device` (CPU when None), seeded with `seed` or with fresh entropy."""
    generator = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    if seed is None:
        generator.seed()
    else:
        _check_seed(seed)
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
    draws are made here, on the host, with blake2b). 53 bits: exact in float64.
    """
    out = []
    for position in positions:
        digest = hashlib.blake2b(f"{key}:{position}".encode(), digest_size=8).digest()
        out.append((int.from_bytes(digest, "little") >> 11) * 2.0**-53)
    return out


def sample_by_inversion(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The token whose CDF interval holds each uniform: probs (..., vocab), uniforms (...)
    in [0, 1) -> LongTensor (...). Never a zero-probability token.

    Runs on probs' device without synchronising with the host. The CDF is a float32
    cumulative sum, so a token's interval may be off its probability by the sum's
    rounding (about 1e-7 of the total per position on CPU; kernels differ, so a CPU and
    a CUDA verifier may split a boundary differently).
    """
    probs = probs.float()
    cdf = probs.cumsum(-1)
    point = uniforms.to(cdf.dtype).clamp(max=1 - 2**-24).unsqueeze(-1) * cdf[..., -1:]
    token = torch.searchsorted(cdf, point, right=True).squeeze(-1)
    # u * total rounded up to the total: the last token with mass.
    vocab = probs.shape[-1]
    last = vocab - 1 - probs.flip(-1).gt(0).int().argmax(-1)
    return torch.where(token >= vocab, last, token)


def _check_seed(seed: int) -> None:
    if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed: must be an integer in [0, 2**64), got {seed!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
