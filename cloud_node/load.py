"""The verifier's load, and what a round costs it: what edges shape their drafts by.

Every reply carries both (RoundResult.load, .pass_ms_per_round, .pass_ms_per_position), so
that edges draft smaller trees when the verifier is saturated and larger ones when it
idles, and, when it is busy, the shapes that cost it the least time per token
(edge_node/policy.py).

`BusyMeter`: the share of recent wall time spent in forward passes. Passes run one at a
time, so their intervals do not overlap and their durations add up. Example: window 1 s;
a 300 ms pass that ended 0.5 s ago and a 200 ms one ending now: load 0.5.

`PassCost`: pass_ms ~ per_round_ms * rounds + per_position_ms * positions over recent round
passes, positions counted padded (rows x the widest row), which is what a pass computes.
"""

from __future__ import annotations

import time
from collections import deque


class BusyMeter:
    """Forward-pass intervals of the last `window_s` seconds, and the share they fill."""

    def __init__(self, window_s: float = 1.0) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s: must be > 0, got {window_s}")
        self.window_s = window_s
        self._passes: deque[tuple[float, float]] = deque()  # (start, end), monotonic s

    def add(self, start: float, end: float) -> None:
        """One pass from `start` to `end` (time.monotonic() seconds)."""
        self._passes.append((start, end))
        self._forget(end)

    def load(self, now: float | None = None) -> float:
        """Busy share of the window ending `now` (default: time.monotonic()), in [0, 1]."""
        now = time.monotonic() if now is None else now
        self._forget(now)
        since = now - self.window_s
        busy = sum(min(end, now) - max(start, since) for start, end in self._passes)
        return min(1.0, max(0.0, busy / self.window_s))

    def _forget(self, now: float) -> None:
        while self._passes and self._passes[0][1] <= now - self.window_s:
            self._passes.popleft()


class PassCost:
    """Least squares of round-pass times on (rounds, padded positions), each pass weighing
    `decay` times the one after it, so the fit follows the verifier's mix of work.

    Example: passes of (1 round, 5 positions, 3.25 ms) and (4 rounds, 40 positions,
    19.6 ms) give per_round_ms 1.6 and per_position_ms 0.33 (the two equations solved).
    """

    def __init__(self, decay: float = 0.98) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay: must be in (0, 1), got {decay}")
        self.decay = decay
        # Weighted sums: rounds^2, rounds*positions, positions^2, rounds*ms, positions*ms.
        self._sums = [0.0] * 5

    def add(self, rounds: int, positions: int, ms: float) -> None:
        r, p, d = float(rounds), float(positions), self.decay
        terms = (r * r, r * p, p * p, r * ms, p * ms)
        self._sums = [d * old + new for old, new in zip(self._sums, terms, strict=True)]

    def estimate(self) -> tuple[float, float]:
        """(per_round_ms, per_position_ms), neither negative: where the best fit makes one
        negative (a verifier whose passes cost the same however wide, give or take noise)
        it is 0 and the other fits alone. (0, 0), "unknown", before any pass and while the
        passes cannot tell the two apart (every row as wide in every pass)."""
        rr, rp, pp, ry, py = self._sums
        det = rr * pp - rp * rp
        if det <= 1e-6 * rr * pp:
            return 0.0, 0.0
        per_round = (ry * pp - py * rp) / det
        per_position = (py * rr - ry * rp) / det
        if per_round >= 0 and per_position >= 0:
            return per_round, per_position
        # On the boundary: the one-term fit that explains more (ry^2/rr or py^2/pp).
        if ry * ry / rr >= py * py / pp:
            return max(ry / rr, 0.0), 0.0
        return 0.0, max(py / pp, 0.0)
