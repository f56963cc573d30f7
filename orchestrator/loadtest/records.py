"""What one request measured, and the run's metrics computed from all of them.

The metric names and definitions are those of `vllm bench serve`, so figures from the two
tools read the same way:

- TTFT (time to first token): from sending the request to the first chunk that carries tokens.
- ITL (inter-token latency), per token: a chunk of k tokens that arrives g after the
  previous token-carrying chunk counts k latencies of g / k; the first chunk's tokens after
  the first count 0 (they came at the first token's instant). So a request of n tokens
  counts n - 1, whatever its chunking. `serving.metrics.token_gaps` is the definition, the
  one the servers' inter_token_latency histogram uses too.
- inter-chunk latency (ours): the gap between two successive chunks that carry tokens. With
  speculative decoding one chunk carries a whole verified round (several tokens), so this
  is the time per round as the client sees it; ITL spreads it over the round's tokens.
- TPOT (time per output token, first excluded): (e2el - ttft) / (output_tokens - 1), for
  requests with more than one output token.
- E2EL (end-to-end latency): from sending the request to the end of its stream.
- request_throughput / output_throughput: completed requests / output tokens of completed
  requests, per second of the whole run (first request sent to last one finished).
- request_goodput: completed requests per second that met every SLO given (vLLM counts the
  TPOT of a single-token output as 0).
- Percentiles interpolate linearly between the closest ranks (numpy's default, which vLLM uses).

Draft metrics follow vLLM's speculative-decoding counters: num_drafts (verification rounds),
num_draft_tokens, num_accepted_tokens, draft_acceptance_rate = accepted / drafted,
mean_acceptance_length = 1 + accepted / num_drafts (the literature's tau: tokens per round,
bonus included), and acceptance_rate_per_position[i] = rounds whose (i+1)-th draft token was
accepted / num_drafts.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from serving.metrics import token_gaps

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "inter_chunk", "e2el")


@dataclass(frozen=True)
class RequestRecord:
    """One request of a load test. Times are milliseconds, offsets seconds from the run's
    start. A failed request has `error_code` set and keeps what it measured before failing."""

    index: int  # issue order, from 0
    target: str  # the server address it went to
    prompt_index: int  # which prompt of the list (prompts are reused in a cycle)
    # Open loop: the planned arrival offset; None in a closed loop.
    scheduled_s: float | None
    # When it was sent (in an open loop with --max-concurrency, after waiting for a slot).
    start_s: float
    in_flight: int  # requests in flight once this one was sent, itself included
    ttft_ms: float | None  # None when no token arrived
    # One gap per token-carrying chunk after the first.
    inter_chunk_ms: tuple[float, ...]
    # Tokens each token-carrying chunk brought, the first included: one more than
    # inter_chunk_ms (none when no token arrived).
    chunk_tokens: tuple[int, ...]
    e2el_ms: float
    output_tokens: int  # tokens of the final output (rollbacks applied)
    prompt_tokens: int = 0  # as the server counted them (0 when it never said)
    # From the server's final GenerationStats; zeros on error.
    rounds: int = 0
    tau: float = 0.0
    cloud_forward_passes: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: tuple[int, ...] = ()
    degraded: bool = False
    failovers: int = 0
    rollbacks: int = 0
    finish_reason: str | None = None
    # gRPC status name ("INVALID_ARGUMENT", ...) and message, when the request failed.
    error_code: str | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if len(self.inter_chunk_ms) != max(len(self.chunk_tokens) - 1, 0):
            raise ValueError(
                f"chunk_tokens: one count per chunk, one more than inter_chunk_ms, got "
                f"{len(self.chunk_tokens)} and {len(self.inter_chunk_ms)}"
            )
        if any(tokens < 1 for tokens in self.chunk_tokens):
            raise ValueError(f"chunk_tokens: each must be >= 1, got {self.chunk_tokens}")

    @property
    def success(self) -> bool:
        return self.error_code is None

    @property
    def itl_ms(self) -> tuple[float, ...]:
        """Per-token inter-token latencies (`token_gaps` of each chunk): one fewer than the
        tokens the chunks brought."""
        if not self.chunk_tokens:
            return ()
        gaps = (None, *self.inter_chunk_ms)
        return tuple(
            latency
            for gap, tokens in zip(gaps, self.chunk_tokens, strict=True)
            for latency in token_gaps(gap, tokens)
        )

    @property
    def tpot_ms(self) -> float | None:
        """(e2el - ttft) / (tokens - 1); None with fewer than two tokens or no first token."""
        if self.ttft_ms is None or self.output_tokens < 2:
            return None
        return (self.e2el_ms - self.ttft_ms) / (self.output_tokens - 1)

    def as_dict(self) -> dict[str, object]:
        return asdict(self) | {"tpot_ms": self.tpot_ms, "success": self.success}


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (q in [0, 100]), interpolating linearly between the closest ranks.

    Example: percentile([10, 20, 30, 40], 50) == 25.0 (halfway between ranks 1 and 2, from
    0); percentile([10, 20, 30, 40], 90) == 37.0 (rank 2.7: 30 + 0.7 * 10).
    """
    if not values:
        raise ValueError("values: must be non-empty")
    if not 0 <= q <= 100:
        raise ValueError(f"q: must be in [0, 100], got {q}")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds; all zero when there are no samples (as vLLM reports them)."""

    mean: float
    median: float
    std: float  # population standard deviation, as numpy's default
    percentiles: dict[int, float]  # PERCENTILES -> value
    count: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencyStats:
        if not samples:
            return cls(0.0, 0.0, 0.0, {q: 0.0 for q in PERCENTILES}, 0)
        return cls(
            mean=statistics.fmean(samples),
            median=statistics.median(samples),
            std=statistics.pstdev(samples),
            percentiles={q: percentile(samples, q) for q in PERCENTILES},
            count=len(samples),
        )

    def named(self, metric: str) -> dict[str, float]:
        """vLLM's keys: mean_ttft_ms, median_ttft_ms, std_ttft_ms, p50_ttft_ms, ..."""
        out = {
            f"mean_{metric}_ms": self.mean,
            f"median_{metric}_ms": self.median,
            f"std_{metric}_ms": self.std,
        }
        out.update({f"p{q}_{metric}_ms": v for q, v in self.percentiles.items()})
        return out


@dataclass(frozen=True)
class Slo:
    """Service-level objectives in milliseconds; a request meets them when it completed and
    every given bound holds. Parsed from "ttft=200,tpot=50" (keys ttft, tpot, e2el)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @classmethod
    def parse(cls, text: str) -> Slo:
        """Raises ValueError naming the bad part, e.g. "slo: unknown key 'itl'"."""
        values: dict[str, float] = {}
        for part in text.split(","):
            match = re.fullmatch(r"\s*(\w+)\s*[=:]\s*([^\s,]+)\s*", part)
            if match is None:
                raise ValueError(f"slo: expected KEY=MS pairs like ttft=200,tpot=50, got {part!r}")
            key, raw = match.groups()
            if key not in ("ttft", "tpot", "e2el"):
                raise ValueError(f"slo: unknown key {key!r} (allowed: ttft, tpot, e2el)")
            try:
                value = float(raw)
            except ValueError:
                value = math.nan
            if not 0 < value < math.inf:
                raise ValueError(f"slo: {key} must be a number of milliseconds > 0, got {raw!r}")
            values[f"{key}_ms"] = value
        return cls(**values)

    def met_by(self, record: RequestRecord) -> bool:
        if not record.success:
            return False
        measured = {
            "ttft_ms": record.ttft_ms if record.ttft_ms is not None else record.e2el_ms,
            "tpot_ms": record.tpot_ms or 0.0,  # vLLM: a single-token output's TPOT is 0
            "e2el_ms": record.e2el_ms,
        }
        return all(
            getattr(self, name) is None or measured[name] <= getattr(self, name)
            for name in measured
        )

    def describe(self) -> str:
        return ",".join(
            f"{key}={getattr(self, f'{key}_ms'):g}"
            for key in ("ttft", "tpot", "e2el")
            if getattr(self, f"{key}_ms") is not None
        )


@dataclass(frozen=True)
class DraftMetrics:
    """Totals over completed requests; see the module docstring for the definitions."""

    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    acceptance_per_position: tuple[int, ...]  # summed accepted_per_position
    cloud_forward_passes: int

    @classmethod
    def of(cls, records: Sequence[RequestRecord]) -> DraftMetrics:
        width = max((len(r.accepted_per_position) for r in records), default=0)
        per_position = [0] * width
        for r in records:
            for i, n in enumerate(r.accepted_per_position):
                per_position[i] += n
        return cls(
            num_drafts=sum(r.rounds for r in records),
            num_draft_tokens=sum(r.draft_tokens for r in records),
            num_accepted_tokens=sum(r.accepted_tokens for r in records),
            acceptance_per_position=tuple(per_position),
            cloud_forward_passes=sum(r.cloud_forward_passes for r in records),
        )

    def named(self, output_tokens: int) -> dict[str, object]:
        drafts = self.num_drafts
        return {
            "num_drafts": drafts,
            "num_draft_tokens": self.num_draft_tokens,
            "num_accepted_tokens": self.num_accepted_tokens,
            "draft_acceptance_rate": _ratio(self.num_accepted_tokens, self.num_draft_tokens),
            "mean_acceptance_length": (
                1 + _ratio(self.num_accepted_tokens, drafts) if drafts else 0.0
            ),
            "acceptance_rate_per_position": [
                _ratio(n, drafts) for n in self.acceptance_per_position
            ],
            "cloud_forward_passes": self.cloud_forward_passes,
            "cloud_passes_per_output_token": _ratio(self.cloud_forward_passes, output_tokens),
        }


@dataclass(frozen=True)
class Summary:
    """The run's metrics; `as_dict()` gives them under vLLM's names."""

    completed: int
    failed: int
    errors_by_code: dict[str, int]
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    good_requests: int | None  # None without an SLO
    peak_in_flight: int
    degraded_requests: int
    failovers: int
    latency: dict[str, LatencyStats]  # LATENCY_METRICS -> stats
    draft: DraftMetrics

    @property
    def request_throughput(self) -> float:
        return _ratio(self.completed, self.duration_s)

    @property
    def output_throughput(self) -> float:
        return _ratio(self.total_output_tokens, self.duration_s)

    @property
    def total_token_throughput(self) -> float:
        return _ratio(self.total_input_tokens + self.total_output_tokens, self.duration_s)

    @property
    def request_goodput(self) -> float | None:
        return None if self.good_requests is None else _ratio(self.good_requests, self.duration_s)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "completed": self.completed,
            "failed": self.failed,
            "errors_by_code": dict(self.errors_by_code),
            "duration_s": self.duration_s,
            "total_input_tokens": self.total_input_tokens,
            "total_output_tokens": self.total_output_tokens,
            "request_throughput": self.request_throughput,
            "request_goodput": self.request_goodput,
            "output_throughput": self.output_throughput,
            "total_token_throughput": self.total_token_throughput,
            "peak_in_flight": self.peak_in_flight,
            "degraded_requests": self.degraded_requests,
            "failovers": self.failovers,
        }
        for metric in LATENCY_METRICS:
            out.update(self.latency[metric].named(metric))
        out.update(self.draft.named(self.total_output_tokens))
        return out


def summarize(
    records: Sequence[RequestRecord], duration_s: float, slo: Slo | None = None
) -> Summary:
    """The metrics of a run that lasted `duration_s` seconds; latencies and token counts
    come from completed requests only, as in vLLM."""
    done = [r for r in records if r.success]
    return Summary(
        completed=len(done),
        failed=len(records) - len(done),
        errors_by_code=dict(Counter(r.error_code for r in records if not r.success)),
        duration_s=duration_s,
        total_input_tokens=sum(r.prompt_tokens for r in done),
        total_output_tokens=sum(r.output_tokens for r in done),
        good_requests=None if slo is None else sum(slo.met_by(r) for r in done),
        peak_in_flight=max((r.in_flight for r in records), default=0),
        degraded_requests=sum(r.degraded for r in done),
        failovers=sum(r.failovers for r in records),
        latency={name: LatencyStats.of(v) for name, v in latency_samples(records).items()},
        draft=DraftMetrics.of(done),
    )


def latency_samples(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """LATENCY_METRICS -> milliseconds over the completed requests: one TTFT, TPOT and E2EL
    per request (TTFT and TPOT where defined), every per-token ITL and every inter-chunk
    gap."""
    done = [r for r in records if r.success]
    return {
        "ttft": [r.ttft_ms for r in done if r.ttft_ms is not None],
        "tpot": [r.tpot_ms for r in done if r.tpot_ms is not None],
        "itl": [latency for r in done for latency in r.itl_ms],
        "inter_chunk": [gap for r in done for gap in r.inter_chunk_ms],
        "e2el": [r.e2el_ms for r in done],
    }


def timeline_record(
    *,
    sent: float,
    arrivals: Sequence[tuple[float, int]],
    ended: float,
    **fields: object,
) -> RequestRecord:
    """A request's record from its timeline: sent at `sent` (seconds), then `(time, tokens)`
    for each chunk that brought tokens, ended at `ended`; `fields` are RequestRecord's other
    fields (`output_tokens`, when not among them, is the tokens that arrived). TTFT is the
    first arrival, inter-chunk latencies the gaps between arrivals.

    Example: sent at 0.0, chunks at 0.100 s (3 tokens), 0.150 (2) and 0.230 (4), ended at
    0.230: TTFT 100 ms, inter-chunk (50, 80) ms, per-token ITL (0, 0, 25, 25, 20, 20, 20,
    20) ms, E2EL 230 ms, 9 tokens, TPOT 130 / 8 = 16.25 ms.
    """
    times = [at for at, _ in arrivals]
    return RequestRecord(
        ttft_ms=(times[0] - sent) * 1000 if times else None,
        inter_chunk_ms=tuple((b - a) * 1000 for a, b in itertools.pairwise(times)),
        chunk_tokens=tuple(tokens for _, tokens in arrivals),
        e2el_ms=(ended - sent) * 1000,
        **({"output_tokens": sum(tokens for _, tokens in arrivals)} | fields),
    )


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0
