"""Which draft source makes a session's next lossless round.

A source name (`slm`, `head`, `ngram`) is a fixed choice. `auto` measures the
sources in `sources.AUTO` (the head and the SLM) within the session and keeps the
one that yields more tokens per unit of time. A round with drafter d
costs its draft time plus its round trip (network plus the verifier's pass, which
grows with the tree) and yields tau_d tokens (the accepted ones plus the bonus), so

    rate_d = tau_d / (draft_ms_d + round_ms_d)

Each estimate is an exponential moving average over the rounds that d drafted. The
first `probe_rounds` rounds go to each drafter in turn (head first: it is cheap),
then the best rate wins; each other one is tried again once every `reprobe_every`
rounds, so a session whose text changes character can switch back.

Example: at a 50 ms round trip the head gives tau 5.0 for 1 ms of drafting and a
52 ms round, 5.0 / 53 = 0.094 tokens/ms; the SLM gives tau 5.5 for 15 ms and 53 ms,
5.5 / 68 = 0.081: the head wins. A head trained on nothing (tau 1.0, 1 / 53 = 0.019)
loses to the same SLM.

A source that cannot draft now (the head when the last reply had no hidden state: an
old verifier, or no reply yet on a one-token context) is passed as `unready`; then
`pick` answers the fallback, the SLM.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from edge_node.drafters.sources import AUTO, FALLBACK, SOURCES


@dataclass
class _Estimate:
    rounds: int = 0
    tau: float = 0.0
    draft_ms: float = 0.0
    round_ms: float = 0.0

    def fold(self, tokens: int, draft_ms: float, round_ms: float, smoothing: float) -> None:
        s = 1.0 if self.rounds == 0 else smoothing
        self.tau += s * (tokens - self.tau)
        self.draft_ms += s * (draft_ms - self.draft_ms)
        self.round_ms += s * (round_ms - self.round_ms)
        self.rounds += 1

    @property
    def rate(self) -> float:
        """Expected tokens per millisecond."""
        return self.tau / max(self.draft_ms + self.round_ms, 1e-6)


@dataclass
class DrafterChoice:
    setting: str  # a source name, or "auto"
    probe_rounds: int = 2
    reprobe_every: int = 16
    smoothing: float = 0.3
    # Sources that may draft a round ahead (`DraftSource.pipelines`).
    pipelined: frozenset[str] = frozenset({FALLBACK})
    estimates: dict[str, _Estimate] = field(init=False)
    # Rounds since each candidate last drafted.
    idle: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        if self.setting != "auto" and self.setting not in SOURCES:
            raise ValueError(f"setting: must be 'auto' or one of {list(SOURCES)}")
        candidates = AUTO if self.setting == "auto" else (self.setting,)
        self.estimates = {name: _Estimate() for name in candidates}
        self.idle = dict.fromkeys(candidates, 0)

    def __contains__(self, name: str) -> bool:
        """Whether `name` may still draft this session's rounds."""
        return name in self.estimates

    def pick(self, unready: Collection[str] = ()) -> str:
        """The source for the next round; `unready`: sources that cannot draft now."""
        if self.setting != "auto":
            return FALLBACK if self.setting in unready else self.setting
        ready = [name for name in self.estimates if name not in unready]
        if len(ready) < len(self.estimates):
            return ready[0] if ready else FALLBACK
        for name in ready:
            if self.estimates[name].rounds < self.probe_rounds:
                return name
        best = self.best()
        due = [name for name in ready if name != best and self.idle[name] >= self.reprobe_every]
        return due[0] if due else best

    def may_speculate(self) -> str | None:
        """The source that drafts the next round whatever the reply holds, when it is a
        pipelined one (so it may draft that round during this one's verification);
        None otherwise."""
        if self.setting != "auto":
            return self.setting if self.setting in self.pipelined else None
        probed = all(e.rounds >= self.probe_rounds for e in self.estimates.values())
        best = self.best()
        if not probed or best not in self.pipelined:
            return None
        others = [n for n in self.idle if n != best]
        return best if all(self.idle[n] + 1 < self.reprobe_every for n in others) else None

    def fall_back(self) -> None:
        """A source cannot draft for this session (no usable hidden state comes from its
        verifier): the fallback drafts from now on."""
        self.setting = FALLBACK
        self.estimates = {FALLBACK: self.estimates.get(FALLBACK, _Estimate())}
        self.idle = {FALLBACK: 0}

    def best(self) -> str:
        return max(self.estimates, key=lambda name: self.estimates[name].rate)

    def observe(self, name: str, tokens: int, draft_ms: float, round_ms: float) -> None:
        """One round drafted by `name` yielded `tokens` (accepted plus bonus)."""
        if name not in self.estimates:  # the fallback, standing in for an unready source
            return
        self.estimates[name].fold(tokens, draft_ms, round_ms, self.smoothing)
        for other in self.idle:
            self.idle[other] = 0 if other == name else self.idle[other] + 1
