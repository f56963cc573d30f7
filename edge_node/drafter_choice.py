"""Which drafter makes a session's next lossless round: the SLM or the recurrent head.

`slm` and `head` are fixed choices. `auto` measures both within the session and
keeps the one that yields more tokens per unit of time. A round with drafter d
costs its draft time plus its round trip (network plus the verifier's pass, which
grows with the tree) and yields tau_d tokens (the accepted ones plus the bonus), so

    rate_d = tau_d / (draft_ms_d + round_ms_d)

Each estimate is an exponential moving average over the rounds that d drafted. The
first `probe_rounds` rounds go to each drafter in turn (head first: it is cheap),
then the better rate wins; the other one is tried again once every `reprobe_every`
rounds, so a session whose text changes character can switch back.

Example: at a 50 ms round trip the head gives tau 5.0 for 1 ms of drafting and a
52 ms round, 5.0 / 53 = 0.094 tokens/ms; the SLM gives tau 5.5 for 15 ms and 53 ms,
5.5 / 68 = 0.081: the head wins. A head trained on nothing (tau 1.0, 1 / 53 = 0.019)
loses to the same SLM.

The head needs the verifier's hidden state; when the last reply had none (an old
verifier, or no reply yet on a one-token context), `pick` answers `slm`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edge_node.drafters import DrafterKind
from edge_node.types import DrafterSetting


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
    setting: DrafterSetting
    probe_rounds: int = 2
    reprobe_every: int = 16
    smoothing: float = 0.3
    estimates: dict[DrafterKind, _Estimate] = field(
        default_factory=lambda: {"head": _Estimate(), "slm": _Estimate()}
    )
    # Rounds since each drafter last drafted.
    idle: dict[DrafterKind, int] = field(default_factory=lambda: {"head": 0, "slm": 0})

    def pick(self, head_ready: bool) -> DrafterKind:
        """The drafter for the next round; `head_ready`: a hidden state is at hand."""
        if self.setting == "slm" or not head_ready:
            return "slm"
        if self.setting == "head":
            return "head"
        for kind in ("head", "slm"):
            if self.estimates[kind].rounds < self.probe_rounds:
                return kind
        best = self.best()
        other: DrafterKind = "slm" if best == "head" else "head"
        return other if self.idle[other] >= self.reprobe_every else best

    def may_speculate(self) -> bool:
        """Whether the SLM drafts the next round whatever the reply holds, so that it may
        draft it during this round's verification (the head never can: it needs the reply)."""
        if self.setting != "auto":
            return self.setting == "slm"
        probed = all(e.rounds >= self.probe_rounds for e in self.estimates.values())
        return probed and self.best() == "slm" and self.idle["head"] + 1 < self.reprobe_every

    def fall_back_to_slm(self) -> None:
        """No usable hidden state comes from this verifier: the SLM drafts from now on."""
        self.setting = "slm"

    def best(self) -> DrafterKind:
        head, slm = self.estimates["head"], self.estimates["slm"]
        return "head" if head.rate >= slm.rate else "slm"

    def observe(self, kind: DrafterKind, tokens: int, draft_ms: float, round_ms: float) -> None:
        """One round drafted by `kind` yielded `tokens` (accepted plus bonus)."""
        self.estimates[kind].fold(tokens, draft_ms, round_ms, self.smoothing)
        for other in self.idle:
            self.idle[other] = 0 if other == kind else self.idle[other] + 1
