"""Which waiting rounds the next pass verifies: the engine's `schedule` step, one class
per policy, chosen by `VerifierConfig.schedule`.

`fifo` takes rounds in arrival order. `slack` (dynamic priority) serves first the
rounds whose clients are closest to missing their time-per-output-token target:

    due(round) = paced_from + (tokens + 1) * tpot_slo_ms

where `paced_from` is when the session's first round came back and `tokens` what it
has been given since: by `due` the client needs its next token. Rounds are taken by
(priority class, due), lowest first. A session that set no target is due
`BEST_EFFORT_S` after its round arrived, so best-effort work ages and is never
starved by targeted work that is comfortably ahead. A session more than
`hopeless_tokens` tokens' worth behind its target cannot make it: its rounds are due
as best-effort rounds are (`BEST_EFFORT_S` after they arrive), behind the sessions that
can still make theirs but never starved, and the reply says so
(`RoundResult.slo_unreachable`), rather than letting one lost cause push every other
session past its own target.

Example: a and b target 50 ms per token; a was paced from t = 0 and has had 10 tokens,
b from t = 0 with 4 (drafts accepted less often). At t = 0.3 s a is due at 0.55 s (slack
+250 ms), b at 0.25 s (slack -50 ms): b goes first. With b at 2 tokens instead, its due
time 0.15 s is 150 ms late: three tokens' worth, still within `hopeless_tokens` = 8.

Prefills do not go through here: the engine alternates one prefill chunk
(`prefill_chunk` tokens) with one batch of rounds, so a long prompt delays waiting
rounds by at most one chunk's pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from protocol.types import Schedule

# A round of a session without a target is due this long after it arrived.
BEST_EFFORT_S = 1.0


@dataclass
class Pace:
    """A session's delivery so far, against which its target is measured."""

    schedule: Schedule
    paced_from: float | None = None  # when its first round came back
    tokens: int = 0  # tokens given since then

    def record(self, tokens: int, now: float) -> None:
        """A round came back with `tokens` tokens (accepted plus bonus)."""
        if self.paced_from is None:
            self.paced_from = now
        else:
            self.tokens += tokens

    def due(self, arrived: float) -> float:
        """When the client needs its next token; `arrived`: when the round came in."""
        target_s = self.schedule.tpot_slo_ms / 1000
        if not target_s:
            return arrived + BEST_EFFORT_S
        if self.paced_from is None:  # the first round: time to first token has no target
            return arrived
        return self.paced_from + (self.tokens + 1) * target_s


class Waiting(Protocol):
    """What a policy sees of a waiting round."""

    pace: Pace
    arrived: float
    slo_unreachable: bool


class Fifo:
    name = "fifo"

    def order(self, waiting: Sequence[Waiting], now: float) -> list[Waiting]:
        return list(waiting)


class Slack:
    name = "slack"

    def __init__(self, hopeless_tokens: float = 8.0) -> None:
        self.hopeless_tokens = hopeless_tokens

    def order(self, waiting: Sequence[Waiting], now: float) -> list[Waiting]:
        """By (priority class, due time); marks the rounds beyond hope, which are due
        as best effort is (so they still age, and run within `BEST_EFFORT_S`)."""
        for work in waiting:
            target_s = work.pace.schedule.tpot_slo_ms / 1000
            late = now - work.pace.due(work.arrived)
            work.slo_unreachable = bool(target_s) and late > self.hopeless_tokens * target_s
        return sorted(waiting, key=lambda w: (w.pace.schedule.priority, self.due(w)))

    @staticmethod
    def due(work: Waiting) -> float:
        if work.slo_unreachable:
            return work.arrived + BEST_EFFORT_S
        return work.pace.due(work.arrived)


POLICIES = {policy.name: policy for policy in (Fifo, Slack)}


def make_policy(name: str) -> Fifo | Slack:
    if name not in POLICIES:
        raise ValueError(f"schedule: must be one of {list(POLICIES)}, got {name!r}")
    return POLICIES[name]()
