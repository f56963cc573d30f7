"""The verifier's load: the share of recent wall time it spent in forward passes.

Every reply carries it (RoundResult.load), so that edges draft smaller trees when the
verifier is saturated and larger ones when it idles (edge_node/policy.py). Passes run one
at a time, so their intervals do not overlap and their durations add up.

Example: window 1 s; a 300 ms pass that ended 0.5 s ago and a 200 ms one ending now:
load 0.5.
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
