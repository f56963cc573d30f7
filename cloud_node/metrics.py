"""What a verifier measures of itself: forward passes and how full they were, busy
time, the rounds and draft tokens it verified, and its sessions, queue, KV rows and
KV-cache bytes.

The engine reports each finished pass (`pass_done`); gauges are read when scraped.
The same counts feed the node's heartbeat (`totals`), so `edgecloud status` and a
Prometheus scrape show one set of numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from cloud_node.engine import RoundOutcome

# Rounds per batched pass: 1 to 256, doubling.
BATCH_BUCKETS = tuple(float(2**i) for i in range(9))


class VerifierMetrics:
    def __init__(
        self,
        *,
        sessions: Callable[[], int],
        queued: Callable[[], int],
        load: Callable[[], float],
        rows_in_use: Callable[[], int],
        rows: int,
        cache_bytes: int,
    ) -> None:
        """`rows`, `cache_bytes`: the KV cache's sessions and its preallocated size."""
        self.registry = registry = CollectorRegistry()
        self.passes = Counter(
            "edgecloud_verifier_forward_passes",
            "Target forward passes, by kind (prefill chunk, or a batch of rounds)",
            ["kind"],
            registry=registry,
        )
        self.busy = Counter(
            "edgecloud_verifier_busy_seconds",
            "Time the target model spent in forward passes",
            ["kind"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "edgecloud_verifier_batch_size",
            "Rounds (and decoding steps) per batched pass",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.rounds = Counter(
            "edgecloud_verifier_rounds", "Draft trees verified", registry=registry
        )
        self.decode_steps = Counter(
            "edgecloud_verifier_decode_steps",
            "Tokens decoded by the verifier itself (cloud_only)",
            registry=registry,
        )
        self.draft_tokens = Counter(
            "edgecloud_verifier_draft_tokens", "Draft tree nodes verified", registry=registry
        )
        self.accepted_tokens = Counter(
            "edgecloud_verifier_accepted_tokens", "Draft tokens accepted", registry=registry
        )
        self.slo_unreachable = Counter(
            "edgecloud_verifier_slo_unreachable_rounds",
            "Rounds of sessions too far behind their tpot_slo_ms, served after the others",
            registry=registry,
        )
        gauges = {
            "sessions": ("Open sessions", sessions),
            "queue_depth": ("Prefill chunks and rounds waiting for a pass", queued),
            "load": ("Share of the last second spent in forward passes (RoundResult.load)", load),
            "kv_rows_in_use": ("KV-cache rows held by sessions", rows_in_use),
            "kv_rows": (
                "KV-cache rows in all (--max-sessions, or what --kv-cache-gb holds)",
                lambda: rows,
            ),
            "kv_cache_bytes": ("Bytes preallocated for the KV cache", lambda: cache_bytes),
        }
        for name, (doc, read) in gauges.items():
            Gauge(f"edgecloud_verifier_{name}", doc, registry=registry).set_function(read)
        # Plain totals of the three counters above, for the heartbeat.
        self.totals = {"rounds": 0, "proposed_tokens": 0, "accepted_tokens": 0}

    def pass_done(self, kind: str, seconds: float, outcomes: Sequence[object]) -> None:
        """One forward pass ended, or failed; `outcomes` are its items' results (a
        `RoundOutcome`, or an exception for an item that failed; a prefill chunk's is
        None)."""
        self.passes.labels(kind).inc()
        self.busy.labels(kind).inc(seconds)
        if kind != "round":
            return
        self.batch_size.observe(len(outcomes))
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                continue
            self._count(outcome)

    def _count(self, outcome: RoundOutcome) -> None:
        self.slo_unreachable.inc(outcome.slo_unreachable)
        if outcome.decode_step:
            self.decode_steps.inc()
            return
        accepted = len(outcome.acceptance.nodes)
        self.rounds.inc()
        self.draft_tokens.inc(outcome.nodes_verified)
        self.accepted_tokens.inc(accepted)
        self.totals["rounds"] += 1
        self.totals["proposed_tokens"] += outcome.nodes_verified
        self.totals["accepted_tokens"] += accepted
