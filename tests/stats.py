"""Goodness-of-fit helpers for the lossless-sampling tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def chi_square_pvalue(
    counts: Sequence[int], probs: Sequence[float], min_expected: float = 5.0
) -> float:
    """Pearson's chi-square test of observed `counts` against expected `probs`.

    Cells expected to hold fewer than `min_expected` samples are pooled into one, as
    the test's approximation needs. Returns P(chi2_dof >= statistic).
    """
    counts_t = torch.tensor(counts, dtype=torch.float64)
    probs_t = torch.tensor(probs, dtype=torch.float64)
    expected = probs_t / probs_t.sum() * counts_t.sum()
    small = expected < min_expected
    obs = torch.cat([counts_t[~small], counts_t[small].sum().reshape(1)])
    exp = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = exp > 0
    if (obs[~keep] > 0).any():
        return 0.0
    obs, exp = obs[keep], exp[keep]
    statistic = ((obs - exp) ** 2 / exp).sum()
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), statistic / 2))
