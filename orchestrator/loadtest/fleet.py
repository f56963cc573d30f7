"""A fleet of emulated edge devices against one verifier: how many clients it serves.

Each emulated edge is one asyncio task with its own gRPC channel, opening its own
`Verifier.Verify` stream per request, with its own link: every message waits half a round
trip each way, the round trip drawn per exchange from a normal distribution (`rtt_ms`,
`jitter_ms`, clipped at 0), and a lost message (probability `loss`, per message and
direction) waits `rto_ms` more for its retransmission. Two kinds of client:

- lossless: replays a real edge's recorded streams (`orchestrator.loadtest.recording`):
  sends the recorded open, then per recorded round waits the edge's recorded time (its
  drafting, scaled by `edge_scale`), sends the recorded round and reads the reply. The
  verifier does the real work and the acceptance is the real one (verification is
  deterministic given history and tree, greedy or seeded); a reply that differs from the
  recorded one is counted, and the replay goes on with the recorded next round, which is
  still a valid message. No drafting runs on the verifier's machine.
  Or, given a `Shaping` and a draft book (draft_book.py, greedy recordings only), it
  drafts each round in the shape its policy picks (the edge's load-aware shape policy, the
  same policy blind to the load, or a fixed shape): the book holds the real SLM's beam
  search of every shape at every position of the recorded output, and the edge waits the
  SLM's drafting time for that shape. This is how shape policies compare under load.
- cloud_only: the baseline, server-side decoding. Opens the same session, then sends one
  round asking for as many tokens as the recorded generation produced
  (`Round.decode_tokens`), and reads them as the verifier streams them; each token reaches
  the client half a round trip after it was sent (plus a retransmission when lost; a late
  token holds back those behind it, as on one TCP stream).

Clients run a closed loop, like `runner.run_load`'s: each sends its next request when its
last one ends; request i replays recorded request i mod len(recording). Every request
becomes a `RequestRecord` (records.py), timed from before the open to the arrival of its
last token, so TTFT, TPOT, goodput and the draft figures are computed as for any load test.
The verifier's own work (forward passes and busy seconds per generated token, batch sizes)
comes from its Prometheus counters (`cloud_node.metrics`), read before and after a run.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from grpc import aio

from edge_node.drafters import DraftShape
from edge_node.policy import ShapePolicy, VerifierView
from edge_node.verifier_client import round_message
from lm.tree import TokenTree
from orchestrator.loadtest.draft_book import DraftBook, expected_round
from orchestrator.loadtest.recording import RecordedRequest, Recording
from orchestrator.loadtest.records import (
    RequestRecord,
    Slo,
    Summary,
    summarize,
    timeline_record,
)
from protocol.channel import bearer_metadata, open_aio_channel
from protocol.types import Mode, Schedule
from protocol.v1 import verification_pb2 as pb
from protocol.v1 import verification_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from orchestrator.loadtest.report import PlotCaption

FLEET_MODES = (Mode.LOSSLESS, Mode.CLOUD_ONLY)


@dataclass(frozen=True)
class LinkProfile:
    """One emulated edge's network and device speed."""

    rtt_ms: float = 0.0  # mean round trip
    jitter_ms: float = 0.0  # standard deviation of the round trip, drawn per exchange
    loss: float = 0.0  # chance that one message, one way, is lost and retransmitted
    rto_ms: float = 200.0  # what a lost message waits for its retransmission
    # Recorded edge time (drafting) is multiplied by this: > 1 for a slower device.
    edge_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("rtt_ms", "jitter_ms", "rto_ms", "edge_scale"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss: must be in [0, 1), got {self.loss}")

    def draw_rtt_ms(self, draws: random.Random) -> float:
        if not self.jitter_ms:
            return self.rtt_ms
        return max(0.0, draws.gauss(self.rtt_ms, self.jitter_ms))

    def one_way_s(self, rtt_ms: float, draws: random.Random) -> float:
        """Half of `rtt_ms`, plus `rto_ms` when this message is lost."""
        lost = self.loss > 0 and draws.random() < self.loss
        return (rtt_ms / 2 + (self.rto_ms if lost else 0.0)) / 1000


@dataclass(frozen=True)
class Shaping:
    """How a lossless emulated edge shapes the rounds it drafts from a draft book:
    - "load-aware": the edge's shape policy as it runs (edge_node/policy.py), fed each
      reply's round trip, acceptance and verifier load; it starts at width x depth;
    - "latency": the same policy with the load withheld: the shape best for one client;
    - "fixed": width x depth every round.
    `parse` reads "load-aware", "latency" or a fixed "WxD" such as "4x6"."""

    policy: str = "load-aware"
    width: int = 4
    depth: int = 6

    POLICIES = ("load-aware", "latency", "fixed")

    def __post_init__(self) -> None:
        if self.policy not in self.POLICIES:
            raise ValueError(
                f"policy: must be one of {', '.join(self.POLICIES)}, got {self.policy!r}"
            )
        DraftShape(self.width, self.depth)  # validates both

    @classmethod
    def parse(cls, text: str) -> Shaping:
        if text in cls.POLICIES[:2]:
            return cls(text)
        width, x, depth = text.partition("x")
        if not (x and width.isdigit() and depth.isdigit()):
            raise ValueError(f"shaping: load-aware, latency or WxD such as 4x6, got {text!r}")
        return cls("fixed", int(width), int(depth))

    def describe(self) -> str:
        return f"{self.width}x{self.depth}" if self.policy == "fixed" else self.policy

    def policy_for(
        self, book: DraftBook, max_tree_nodes: int, verifier: VerifierView
    ) -> ShapePolicy:
        """A fresh shape policy for one request, within what `book` holds (the adaptive
        ones start at width x depth cut to it), sharing `verifier` with the edge's other
        requests as the edge's generations share it (`EdgeRuntime.verifier`)."""
        width = min(self.width, book.max_width)
        return ShapePolicy(
            DraftShape(width, min(self.depth, book.depth_for(width))),
            max_depth=book.max_depth,
            max_width=book.max_width,
            max_nodes=min(book.max_nodes, max_tree_nodes),
            adapt=self.policy != "fixed",
            verifier=verifier,
        )


@dataclass(frozen=True)
class FleetPlan:
    """How a fleet runs: at least one of `requests` and `duration_s` bounds it."""

    clients: int  # emulated edges, each with one request at a time, in [1, 4096]
    mode: Mode = Mode.LOSSLESS  # lossless (replay) or cloud_only
    requests: int | None = None  # requests over the whole fleet
    duration_s: float | None = None  # seconds after which no request is sent
    link: LinkProfile = LinkProfile()
    seed: int = 0  # seeds each client's link draws
    model: str = ""  # the verifier's model name; "" keeps the recorded one
    reply_timeout_s: float = 120.0  # a reply slower than this fails the request
    # Every client's priority and tpot_slo_ms, sent with its open (the verifier's
    # `--schedule slack` serves the rounds closest to missing their target first).
    schedule: Schedule = Schedule()
    # Lossless edges draft from a draft book in this shaping; None: replay the recording.
    shaping: Shaping | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.clients <= 4096:
            raise ValueError(f"clients: must be in [1, 4096], got {self.clients}")
        if self.mode not in FLEET_MODES:
            raise ValueError(f"mode: must be lossless or cloud_only, got {self.mode!r}")
        object.__setattr__(self, "mode", Mode(self.mode))  # "lossless" -> Mode.LOSSLESS
        if self.requests is None and self.duration_s is None:
            raise ValueError("requests: give requests, duration_s or both")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"requests: must be >= 1, got {self.requests}")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration_s: must be > 0, got {self.duration_s}")


@dataclass(frozen=True)
class FleetResult:
    records: tuple[RequestRecord, ...]  # in issue order
    clients: tuple[int, ...]  # the emulated edge of each record
    duration_s: float  # first request sent to last one finished
    rounds: int  # lossless rounds replayed
    mismatched_rounds: int  # of those, replies unlike the recorded ones


class _Timeline:
    """Token arrivals of one request, capped at what the recorded generation produced."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.sent = time.perf_counter()
        self.arrivals: list[tuple[float, int]] = []
        self.tokens = 0

    @property
    def done(self) -> bool:
        return self.tokens >= self.cap

    def arrive(self, tokens: int, at: float | None = None) -> None:
        take = min(tokens, self.cap - self.tokens)
        if take > 0:
            self.arrivals.append((time.perf_counter() if at is None else at, take))
            self.tokens += take


@dataclass
class _Counts:
    """Draft figures of one request, named as RequestRecord names them."""

    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)
    mismatched: int = 0

    def count(self, tree_size: int, accepted: int) -> None:
        self.rounds += 1
        self.draft_tokens += tree_size
        self.accepted_tokens += accepted
        grow = accepted - len(self.accepted_per_position)
        self.accepted_per_position += [0] * max(grow, 0)
        for i in range(accepted):
            self.accepted_per_position[i] += 1

    def fields(self) -> dict[str, object]:
        rounds = self.rounds
        return {
            "rounds": rounds,
            "tau": (self.accepted_tokens + rounds) / rounds if rounds else 0.0,
            "cloud_forward_passes": rounds,
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "accepted_per_position": tuple(self.accepted_per_position),
        }


class EmulatedEdge:
    """One device: its channel, its link draws, and the two ways it generates."""

    def __init__(
        self,
        index: int,
        channel: aio.Channel,
        plan: FleetPlan,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        book: DraftBook | None = None,
    ) -> None:
        self.index = index
        self.book = book
        self.verifier = VerifierView()  # its requests' shared view of the verifier's load
        self.stub = pb_grpc.VerifierStub(channel)
        self.plan, self.link = plan, plan.link
        self.metadata = tuple(metadata)
        self.draws = random.Random(f"{plan.seed}-{index}")
        self.requests = 0

    async def generate(
        self, number: int, recorded: RecordedRequest, timeline: _Timeline, counts: _Counts
    ) -> None:
        """One request in the plan's mode, recorded request `number`, noting its arrivals
        in `timeline` and its rounds in `counts`; AioRpcError, TimeoutError or
        ConnectionError when it fails."""
        self.requests += 1
        call = self.stub.Verify(metadata=self.metadata)
        try:
            opened = (await self._exchange(call, self._open_message(recorded))).opened
            if self.plan.mode is Mode.LOSSLESS and self.plan.shaping is not None:
                await self._shaped(call, number, opened.max_tree_nodes, timeline, counts)
            elif self.plan.mode is Mode.LOSSLESS:
                await self._replay(call, recorded, timeline, counts)
            else:
                await self._decode(call, timeline, counts)
            await call.done_writing()
            await asyncio.wait_for(call.read(), self.plan.reply_timeout_s)  # the end: EOF
        finally:
            if not call.done():
                call.cancel()

    def _open_message(self, recorded: RecordedRequest) -> pb.VerifyRequest:
        """The recorded open, under a session id of its own (many clients replay it)."""
        message = pb.VerifyRequest()
        message.CopyFrom(recorded.open)
        message.open.session_id = f"fleet-{self.plan.seed}-{self.index}-{self.requests}"
        if self.plan.model:
            message.open.model = self.plan.model
        message.open.priority = self.plan.schedule.priority
        message.open.tpot_slo_ms = self.plan.schedule.tpot_slo_ms
        return message

    async def _write(self, call, message: pb.VerifyRequest) -> None:
        try:
            await call.write(message)
        except asyncio.InvalidStateError as error:  # the stream ended before this write
            code, details = await call.code(), await call.details()
            raise ConnectionError(f"verifier stream ended: {code.name}: {details}") from error

    async def _read(self, call) -> pb.VerifyResponse:
        reply = await asyncio.wait_for(call.read(), self.plan.reply_timeout_s)
        if reply is aio.EOF:
            raise ConnectionError("verifier closed the stream without a reply")
        return reply

    async def _exchange(self, call, message: pb.VerifyRequest) -> pb.VerifyResponse:
        """Send after half a round trip, and hear the reply half a round trip later."""
        rtt_ms = self.link.draw_rtt_ms(self.draws)
        await asyncio.sleep(self.link.one_way_s(rtt_ms, self.draws))
        await self._write(call, message)
        reply = await self._read(call)
        await asyncio.sleep(self.link.one_way_s(rtt_ms, self.draws))
        return reply

    async def _replay(
        self, call, recorded: RecordedRequest, timeline: _Timeline, counts: _Counts
    ) -> None:
        for step in recorded.rounds:
            await asyncio.sleep(step.edge_ms * self.link.edge_scale / 1000)
            result = (await self._exchange(call, step.request)).result
            accepted = len(result.accepted_tokens)
            counts.count(len(step.request.round.tree.tokens), accepted)
            counts.mismatched += (tuple(result.accepted_nodes), result.bonus_token) != (
                tuple(step.result.accepted_nodes),
                step.result.bonus_token,
            )
            timeline.arrive(accepted + 1)
            if timeline.done:
                return

    async def _shaped(
        self, call, number: int, max_tree_nodes: int, timeline: _Timeline, counts: _Counts
    ) -> None:
        """Rounds drafted from the book in the shapes the plan's shaping picks, each after
        the SLM's drafting time for that shape, its reply fed back to the policy as the
        edge's own generation feeds it (`Generation.accept`)."""
        book, shaping = self.book, self.plan.shaping
        booked = book.requests[number]
        policy = shaping.policy_for(book, max_tree_nodes, self.verifier)
        position = 0
        while not timeline.done:
            shape = policy.shape()
            draft = None if shape is None else book.draft(number, position, shape)
            tree = TokenTree.chain([]) if draft is None else draft.tree
            draft_ms = book.draft_ms(shape) * self.link.edge_scale
            await asyncio.sleep(draft_ms / 1000)
            sent = time.perf_counter()
            message = pb.VerifyRequest(round=round_message(tree, round_id=counts.rounds))
            result = (await self._exchange(call, message)).result
            round_ms = (time.perf_counter() - sent) * 1000
            accepted = len(result.accepted_tokens)
            counts.count(tree.size, accepted)
            expected = expected_round(tree, booked.output, position)
            counts.mismatched += expected is not None and expected != (
                *result.accepted_nodes,
                result.bonus_token,
            )
            timeline.arrive(accepted + 1)
            position += accepted + 1
            policy.observe_reply(
                tree,
                () if draft is None else draft.main_path,
                result,
                round_ms,
                draft_ms,
                with_load=shaping.policy == "load-aware",
            )

    async def _decode(self, call, timeline: _Timeline, counts: _Counts) -> None:
        want = max(timeline.cap, 1)  # a recording that ended at once still asks for one
        rtt_ms = self.link.draw_rtt_ms(self.draws)
        await asyncio.sleep(self.link.one_way_s(rtt_ms, self.draws))
        await self._write(call, pb.VerifyRequest(round=pb.Round(decode_tokens=want - 1)))
        latest = 0.0
        for _ in range(want):
            await self._read(call)
            counts.count(0, 0)
            # Delivered in order: a retransmitted token holds back the ones behind it.
            latest = max(latest, time.perf_counter() + self.link.one_way_s(rtt_ms, self.draws))
            timeline.arrive(1, at=latest)
        await asyncio.sleep(max(0.0, latest - time.perf_counter()))


async def run_fleet(
    target: str,
    recording: Recording,
    plan: FleetPlan,
    *,
    token: str | None = None,
    tls=None,
    on_record: Callable[[RequestRecord], None] | None = None,
    book: DraftBook | None = None,
) -> FleetResult:
    """Runs `plan`'s emulated edges against the verifier at `target` (its edge credential
    `token`, `tls` a `protocol.channel.TlsOptions`), replaying `recording`, or drafting
    from `book` (made from `recording`) when the plan has a shaping. Channels connect
    before the clock starts. A failed request (a gRPC status, a reply timeout) becomes a
    record with its status name; the client goes on with its next request."""
    if not recording.requests:
        raise ValueError("recording: holds no requests")
    if plan.shaping is not None and plan.mode is Mode.LOSSLESS:
        if book is None or not book.fits(recording):
            raise ValueError("book: a shaped fleet drafts from a draft book of its recording")
        if plan.shaping.policy == "fixed":
            book.check(DraftShape(plan.shaping.width, plan.shaping.depth))
    channels = [open_aio_channel(target, tls=tls) for _ in range(plan.clients)]
    try:
        await asyncio.gather(*(asyncio.wait_for(c.channel_ready(), 30) for c in channels))
        edges = [
            EmulatedEdge(i, c, plan, metadata=bearer_metadata(token), book=book)
            for i, c in enumerate(channels)
        ]
        run = _Run(target, recording, plan, on_record)
        await asyncio.gather(*(run.client(edge) for edge in edges))
    finally:
        for channel in channels:
            await channel.close()
    order = sorted(run.records)
    records = tuple(run.records[i][0] for i in order)
    return FleetResult(
        records=records,
        clients=tuple(run.records[i][1] for i in order),
        duration_s=time.perf_counter() - run.start,
        rounds=run.rounds,
        mismatched_rounds=run.mismatched,
    )


class _Run:
    """One fleet run's clock, request counter, in-flight count and records."""

    def __init__(self, target, recording, plan, on_record) -> None:
        self.target, self.recording, self.plan = target, recording, plan
        self.on_record = on_record
        self.indices = itertools.count()
        self.records: dict[int, tuple[RequestRecord, int]] = {}
        self.in_flight = self.rounds = self.mismatched = 0
        self.start = time.perf_counter()

    def expired(self) -> bool:
        duration = self.plan.duration_s
        return duration is not None and time.perf_counter() - self.start >= duration

    async def client(self, edge: EmulatedEdge) -> None:
        while not self.expired():
            index = next(self.indices)
            if self.plan.requests is not None and index >= self.plan.requests:
                return
            record = await self.measure(edge, index)
            self.records[index] = (record, edge.index)
            if self.on_record is not None:
                self.on_record(record)

    async def measure(self, edge: EmulatedEdge, index: int) -> RequestRecord:
        requests = self.recording.requests
        number = index % len(requests)
        recorded = requests[number]
        self.in_flight += 1
        fields = dict(
            index=index,
            target=self.target,
            prompt_index=recorded.prompt_index,
            scheduled_s=None,
            start_s=time.perf_counter() - self.start,
            in_flight=self.in_flight,
            prompt_tokens=recorded.prompt_tokens,
        )
        timeline, counts = _Timeline(recorded.output_tokens), _Counts()
        try:
            await edge.generate(number, recorded, timeline, counts)
        except (aio.AioRpcError, TimeoutError, ConnectionError) as error:
            code, message = _status(error)
            return timeline_record(
                sent=timeline.sent,
                arrivals=timeline.arrivals,
                ended=time.perf_counter(),
                error_code=code,
                error=message,
                **fields,
            )
        finally:
            self.in_flight -= 1
        self.rounds += counts.rounds if self.plan.mode is Mode.LOSSLESS else 0
        self.mismatched += counts.mismatched
        finish = "length" if timeline.tokens >= self.recording.key.max_tokens else "stop"
        stats = counts.fields()
        if self.plan.mode is Mode.CLOUD_ONLY:  # as the edge counts server-side decoding
            stats |= {"draft_tokens": 0, "accepted_per_position": (), "tau": 1.0}
        return timeline_record(
            sent=timeline.sent,
            arrivals=timeline.arrivals,
            ended=time.perf_counter(),
            finish_reason=finish,
            **fields,
            **stats,
        )


def _status(error: BaseException) -> tuple[str, str]:
    if isinstance(error, aio.AioRpcError):
        return error.code().name, error.details() or ""
    if isinstance(error, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED.name, "no reply within the reply timeout"
    return grpc.StatusCode.UNAVAILABLE.name, str(error)


# ---- the verifier's side -------------------------------------------------------------


@dataclass(frozen=True)
class VerifierWork:
    """A verifier's running totals, from its `/metrics` text (cloud_node/metrics.py);
    subtract the totals before a run from those after it to get the run's work."""

    round_passes: float = 0.0  # forward passes over batches of rounds and decoding steps
    prefill_passes: float = 0.0  # forward passes over prompt chunks
    round_busy_s: float = 0.0
    prefill_busy_s: float = 0.0
    batches: float = 0.0  # = round_passes: the batch-size histogram's count
    batched: float = 0.0  # rounds and decoding steps in those batches (its sum)
    slo_unreachable_rounds: float = 0.0  # rounds served last: their session was too late

    @classmethod
    def parse(cls, text: str) -> VerifierWork:
        from prometheus_client.parser import text_string_to_metric_families

        values = {
            (sample.name, sample.labels.get("kind", "")): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

        def value(name: str, kind: str = "") -> float:
            return values.get((f"edgecloud_verifier_{name}", kind), 0.0)

        return cls(
            round_passes=value("forward_passes_total", "round"),
            prefill_passes=value("forward_passes_total", "prefill"),
            round_busy_s=value("busy_seconds_total", "round"),
            prefill_busy_s=value("busy_seconds_total", "prefill"),
            batches=value("batch_size_count"),
            batched=value("batch_size_sum"),
            slo_unreachable_rounds=value("slo_unreachable_rounds_total"),
        )

    def __sub__(self, other: VerifierWork) -> VerifierWork:
        return VerifierWork(
            **{
                f.name: getattr(self, f.name) - getattr(other, f.name)
                for f in dataclasses.fields(self)
            }
        )

    def per_token(self, tokens: int) -> dict[str, float]:
        """Per generated token: forward passes (all, and rounds alone) and busy ms; and the
        mean rounds per batched pass."""
        per = 1 / tokens if tokens else 0.0
        return {
            "verifier_passes_per_token": (self.round_passes + self.prefill_passes) * per,
            "verifier_round_passes_per_token": self.round_passes * per,
            "verifier_busy_ms_per_token": (self.round_busy_s + self.prefill_busy_s) * 1000 * per,
            "verifier_mean_batch": self.batched / self.batches if self.batches else 0.0,
        }


def http_metrics(address: str, timeout_s: float = 10.0) -> Callable[[], str]:
    """Reads `/metrics` from a verifier's metrics port, HOST:PORT (`--metrics-port`)."""

    def scrape() -> str:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout_s) as reply:
            return reply.read().decode()

    return scrape


@dataclass(frozen=True)
class FleetPoint:
    """One fleet run and what it measured."""

    plan: FleetPlan
    result: FleetResult
    summary: Summary  # the load-test metrics of its records
    work: VerifierWork | None  # None without the verifier's metrics
    slo: Slo | None

    def row(self) -> dict[str, object]:
        """The figures a sweep compares, flat: latencies in ms, goodput at the SLO as
        requests and as tokens of requests meeting it per second, verifier work per token."""
        s = self.summary.as_dict()
        good_tokens = sum(
            r.output_tokens for r in self.result.records if self.slo and self.slo.met_by(r)
        )
        shaping = self.plan.shaping
        row = {
            "clients": self.plan.clients,
            "mode": self.plan.mode.value,
            "shaping": "recorded" if shaping is None else shaping.describe(),
            "rtt_ms": self.plan.link.rtt_ms,
            "completed": s["completed"],
            "failed": s["failed"],
            "errors_by_code": s["errors_by_code"],
            "duration_s": s["duration_s"],
            "output_tokens": s["total_output_tokens"],
            "output_throughput": s["output_throughput"],
            "tau": s["mean_acceptance_length"],
            "rounds_per_token": s["cloud_passes_per_output_token"],
            "request_goodput": s["request_goodput"],
            "token_goodput": (
                good_tokens / s["duration_s"] if self.slo and s["duration_s"] else None
            ),
            "mismatched_rounds": self.result.mismatched_rounds,
            "replayed_rounds": self.result.rounds,
        }
        for metric in ("tpot", "ttft", "e2el"):
            for q in ("p50", "p90", "p99"):
                row[f"{q}_{metric}_ms"] = s[f"{q}_{metric}_ms"]
        if self.work is not None:
            row |= self.work.per_token(s["total_output_tokens"])
            row["verifier_slo_unreachable_rounds"] = self.work.slo_unreachable_rounds
        return row


async def measure_fleet(
    target: str,
    recording: Recording,
    plan: FleetPlan,
    *,
    slo: Slo | None = None,
    metrics: Callable[[], str] | None = None,
    token: str | None = None,
    tls=None,
    on_record: Callable[[RequestRecord], None] | None = None,
    book: DraftBook | None = None,
) -> FleetPoint:
    """`run_fleet`, with the verifier's work over the run read from `metrics` (a callable
    returning its `/metrics` text, e.g. `http_metrics(...)`) when given."""
    before = None if metrics is None else VerifierWork.parse(await asyncio.to_thread(metrics))
    result = await run_fleet(
        target, recording, plan, token=token, tls=tls, on_record=on_record, book=book
    )
    work = None
    if metrics is not None:
        work = VerifierWork.parse(await asyncio.to_thread(metrics)) - before
    summary = summarize(result.records, result.duration_s, slo)
    return FleetPoint(plan, result, summary, work, slo)


def fleet_lines(point: FleetPoint) -> str:
    """What a load test's summary table lacks: the replay's fidelity and the verifier's work."""
    row = point.row()
    lines = []
    if point.plan.mode is Mode.LOSSLESS:
        lines.append(
            f"{'Replayed rounds unlike the recording:':<40} "
            f"{row['mismatched_rounds']:>4} of {row['replayed_rounds']}"
        )
    if point.work is not None:
        lines += [
            f"{'Verifier forward passes per token:':<40} {row['verifier_passes_per_token']:>9.3f}",
            f"{'  of them round passes per token:':<40} "
            f"{row['verifier_round_passes_per_token']:>9.3f}",
            f"{'Verifier busy ms per token:':<40} {row['verifier_busy_ms_per_token']:>9.3f}",
            f"{'Verifier mean batch (rounds per pass):':<40} {row['verifier_mean_batch']:>9.2f}",
        ]
    if row["token_goodput"] is not None:
        lines.append(f"{'Token goodput (tok/s):':<40} {row['token_goodput']:>9.1f}")
    return "\n".join(lines)


def fleet_sweep_table(points: Sequence[FleetPoint]) -> str:
    """One line per fleet size: latencies, throughput, goodput, verifier work per token."""
    lines = [
        f"{'clients':>7} {'p50 TPOT':>9} {'p99 TPOT':>9} {'p50 TTFT':>9} {'tok/s':>8} "
        f"{'good tok/s':>10} {'pass/tok':>8} {'busy ms/tok':>11} {'failed':>6}"
    ]
    for point in points:
        r = point.row()
        good = "-" if r["token_goodput"] is None else f"{r['token_goodput']:.1f}"
        passes = r.get("verifier_passes_per_token")
        busy = r.get("verifier_busy_ms_per_token")
        lines.append(
            f"{r['clients']:>7} {r['p50_tpot_ms']:>9.1f} {r['p99_tpot_ms']:>9.1f} "
            f"{r['p50_ttft_ms']:>9.1f} {r['output_throughput']:>8.1f} {good:>10} "
            f"{'-' if passes is None else f'{passes:.3f}':>8} "
            f"{'-' if busy is None else f'{busy:.2f}':>11} {r['failed']:>6}"
        )
    return "\n".join(lines)


def clients_served(points: Sequence[tuple[int, float]], slo_ms: float) -> int:
    """The most clients at which the fleet still met the SLO: the largest N such that every
    (clients, tpot_ms) point with clients <= N has tpot_ms <= slo_ms; 0 when the smallest
    fleet missed it.

    Example: points (1, 20), (2, 30), (4, 45), (8, 70), (16, 40) with an SLO of 50 give 4:
    8 missed it, so 16's lucky figure does not count."""
    served = 0
    for clients, tpot in sorted(points):
        if tpot > slo_ms:
            break
        served = clients
    return served


def plot_clients(
    panels: dict[str, dict[str, Sequence[tuple[int, float, float]]]],
    path,
    slo_ms: float | None = None,
    caption: PlotCaption | None = None,
) -> None:
    """TPOT p50 (solid) and p99 (dashed) against clients: one panel per title of `panels`
    (e.g. "greedy, RTT 20 ms"), in it one colour per series (e.g. "lossless"), each a list
    of (clients, p50 ms, p99 ms), under a title and `caption` when given. Needs matplotlib
    (an optional import)."""
    from matplotlib.figure import Figure

    columns = min(len(panels), 2)
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(6.5 * columns, 4.2 * rows), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False).flat
    for axes, (title, series) in zip(grid, panels.items(), strict=False):
        for number, (label, points) in enumerate(series.items()):
            points = sorted(points)
            clients = [p[0] for p in points]
            color = f"C{number}"
            axes.plot(clients, [p[1] for p in points], "o-", color=color, label=f"{label} p50")
            axes.plot(clients, [p[2] for p in points], "s--", color=color, label=f"{label} p99")
        if slo_ms is not None:
            axes.axhline(slo_ms, color="gray", linestyle=":", label=f"SLO {slo_ms:g} ms")
        axes.set_xscale("log", base=2)
        ticks = sorted({p[0] for points in series.values() for p in points})
        axes.set_xticks(ticks, [str(t) for t in ticks])
        axes.set_xlabel("clients (emulated edges)")
        axes.set_ylabel("TPOT (ms)")
        axes.set_title(title, fontsize=10)
        axes.legend(fontsize=7)
    if caption is not None:
        caption.put_on(figure, "edgecloud loadtest: TPOT against emulated edges")
    figure.savefig(path, dpi=120)
