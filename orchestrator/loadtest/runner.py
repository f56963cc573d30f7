"""Sending load through `edgecloud.AsyncClient` and timing every request.

Two ways to send it, as in `vllm bench serve`:

- closed loop (`concurrency=N`): N virtual users, each sending its next request as soon as
  its last one ends, so the server's pace sets the arrival rate;
- open loop (`rate=R`): requests arrive as a Poisson process of R per second whatever the
  server's pace, optionally capped at `max_concurrency` in flight (later arrivals wait).

Either stops after `requests` requests, or sends nothing new after `duration_s` seconds
(requests in flight then run to their end), whichever comes first. Request i uses prompt
i mod len(prompts) and the client of target i mod len(clients).

A request refused for its credentials (UNAUTHENTICATED, PERMISSION_DENIED) ends the run at
once, requests in flight cancelled: every other request carries the same token, so the rest
of the run would only measure refusals.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from edgecloud import AsyncClient, EdgecloudError, GenerateOptions
from orchestrator.loadtest.prompts import Prompt
from orchestrator.loadtest.records import RequestRecord, timeline_record

SEED_LIMIT = 2**64
# gRPC statuses refusing the client's credentials.
CREDENTIAL_CODES = frozenset({"UNAUTHENTICATED", "PERMISSION_DENIED"})


class CredentialsRefused(Exception):
    """A target refused a request's credentials, which stopped the run; `record` is that
    request's."""

    def __init__(self, record: RequestRecord) -> None:
        super().__init__(f"{record.target}: {record.error_code}: {record.error}")
        self.record = record


@dataclass(frozen=True)
class LoadPlan:
    """How requests are sent; exactly one of `concurrency` and `rate`, and at least one of
    `requests` and `duration_s`."""

    # Closed loop: requests kept in flight, in [1, 100000].
    concurrency: int | None = None
    # Open loop: mean arrivals per second, > 0; math.inf sends every request at once.
    rate: float | None = None
    # Open loop only: most requests in flight, in [1, 100000]; None = no cap.
    max_concurrency: int | None = None
    # Requests to send, in [1, 10**7].
    requests: int | None = None
    # Seconds after which no new request is sent, > 0.
    duration_s: float | None = None
    # Seeds the arrival schedule, in [0, 2**64).
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("concurrency: give exactly one of concurrency and rate")
        if self.requests is None and self.duration_s is None:
            raise ValueError("requests: give requests, duration_s or both")
        _check_range("concurrency", self.concurrency, 1, 100_000)
        _check_range("max_concurrency", self.max_concurrency, 1, 100_000)
        _check_range("requests", self.requests, 1, 10**7)
        if self.max_concurrency is not None and self.rate is None:
            raise ValueError("max_concurrency: only with rate (an open loop)")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate: must be > 0, got {self.rate}")
        if self.rate == math.inf and self.requests is None:
            raise ValueError("rate: an infinite rate needs requests (it sends them all at once)")
        if self.duration_s is not None and not 0 < self.duration_s < math.inf:
            raise ValueError(f"duration_s: must be > 0, got {self.duration_s}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ValueError(f"seed: must be in [0, 2**64), got {self.seed}")

    def describe(self) -> dict[str, object]:
        """The plan for a JSON file (an infinite rate as the string "inf")."""
        plan = dataclasses.asdict(self)
        if self.rate == math.inf:
            plan["rate"] = "inf"
        return plan | {"loop": "closed" if self.concurrency is not None else "open"}


@dataclass(frozen=True)
class LoadResult:
    records: tuple[RequestRecord, ...]  # in issue order
    duration_s: float  # first request sent to last one finished


def arrival_offsets(
    rate: float, seed: int, *, count: int | None = None, duration_s: float | None = None
) -> list[float]:
    """Planned send times, in seconds from the start, of a Poisson process of `rate` arrivals
    per second: the first at 0, then gaps drawn independently from an exponential
    distribution of mean 1/rate by `random.Random(seed)`. Stops after `count` arrivals or
    before the first at or past `duration_s`; an infinite rate puts all `count` at 0.

    Example: arrival_offsets(2.0, seed=0, count=3) == [0.0, 0.9303..., 1.6396...]: the gaps
    are -ln(1 - u) / 2 = 0.9303, 0.7093 for random.Random(0)'s first draws u = 0.8444, 0.7580.
    """
    if count is None and duration_s is None:
        raise ValueError("count: give count, duration_s or both")
    if rate == math.inf:
        if count is None:
            raise ValueError("count: needed with an infinite rate")
        return [0.0] * count
    draws = random.Random(seed)
    offsets: list[float] = []
    offset = 0.0
    while (count is None or len(offsets) < count) and (duration_s is None or offset < duration_s):
        offsets.append(offset)
        offset += draws.expovariate(rate)
    return offsets


async def run_load(
    clients: Mapping[str, AsyncClient],
    prompts: Sequence[Prompt],
    plan: LoadPlan,
    options: GenerateOptions = GenerateOptions.default,
    *,
    on_record: Callable[[RequestRecord], None] | None = None,
) -> LoadResult:
    """Sends the load of `plan` and returns a record per request sent. `clients` maps each
    target address to its client; requests go round robin over them.

    Every request uses `options`; when `options.seed` is set, request i is seeded with
    seed + i (mod 2**64), so repeated prompts still sample differently yet reproducibly.
    Failures the SDK reports (`EdgecloudError`) become records with their status code,
    except a refusal of the credentials, which stops the run with `CredentialsRefused`;
    anything else is a bug and propagates. `on_record` is called as each request ends.
    """
    if not clients or not prompts:
        raise ValueError("clients and prompts: must be non-empty")
    run = _Run(clients, prompts, options, on_record)
    try:
        if plan.concurrency is not None:
            await run.closed_loop(plan)
        else:
            await run.open_loop(plan)
    except* CredentialsRefused as refused:
        raise refused.exceptions[0] from None
    duration_s = time.perf_counter() - run.start
    return LoadResult(tuple(run.records[i] for i in sorted(run.records)), duration_s)


class _Run:
    """One run's clock, in-flight count and records."""

    def __init__(
        self,
        clients: Mapping[str, AsyncClient],
        prompts: Sequence[Prompt],
        options: GenerateOptions,
        on_record: Callable[[RequestRecord], None] | None,
    ) -> None:
        self.targets = list(clients.items())
        self.prompts, self.options = prompts, options
        self.on_record = on_record
        self.in_flight = 0
        self.records: dict[int, RequestRecord] = {}
        self.start = time.perf_counter()

    def expired(self, plan: LoadPlan) -> bool:
        return plan.duration_s is not None and self.elapsed() >= plan.duration_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    async def closed_loop(self, plan: LoadPlan) -> None:
        indices = itertools.count()

        async def user() -> None:
            while not self.expired(plan):
                index = next(indices)
                if plan.requests is not None and index >= plan.requests:
                    return
                await self.issue(index, None)

        async with asyncio.TaskGroup() as users:  # one failing cancels the others
            for _ in range(plan.concurrency):
                users.create_task(user())

    async def open_loop(self, plan: LoadPlan) -> None:
        offsets = arrival_offsets(
            plan.rate, plan.seed, count=plan.requests, duration_s=plan.duration_s
        )
        slots = asyncio.Semaphore(plan.max_concurrency) if plan.max_concurrency else None
        async with asyncio.TaskGroup() as requests:  # one failing ends the schedule too
            for index, offset in enumerate(offsets):
                delay = offset - self.elapsed()
                if delay > 0:
                    await asyncio.sleep(delay)
                requests.create_task(self.issue(index, offset, slots))

    async def issue(
        self, index: int, scheduled_s: float | None, slots: asyncio.Semaphore | None = None
    ) -> None:
        async with slots or contextlib.nullcontext():
            self.in_flight += 1
            try:
                record = await self.measure(index, scheduled_s, self.in_flight)
            finally:
                self.in_flight -= 1
        self.records[index] = record
        if self.on_record is not None:
            self.on_record(record)
        if record.error_code in CREDENTIAL_CODES:
            raise CredentialsRefused(record)

    async def measure(self, index: int, scheduled_s: float | None, in_flight: int) -> RequestRecord:
        target, client = self.targets[index % len(self.targets)]
        prompt_index = index % len(self.prompts)
        kwargs = {f.name: getattr(self.options, f.name) for f in dataclasses.fields(self.options)}
        if self.options.seed is not None:
            kwargs["seed"] = (self.options.seed + index) % SEED_LIMIT
        sent = time.perf_counter()
        arrivals: list[tuple[float, int]] = []  # (when, tokens) of each token-carrying chunk
        stream, error = None, None
        try:
            stream = client.stream(self.prompts[prompt_index], **kwargs)
            async with stream:
                async for chunk in stream:
                    if chunk.tokens:
                        arrivals.append((time.perf_counter(), len(chunk.tokens)))
        except EdgecloudError as exc:
            error = exc
        ended = time.perf_counter()
        stats = stream.stats if stream is not None and error is None else None
        measured = dict(
            sent=sent,
            arrivals=arrivals,
            ended=ended,
            index=index,
            target=target,
            prompt_index=prompt_index,
            scheduled_s=scheduled_s,
            start_s=sent - self.start,
            in_flight=in_flight,
            output_tokens=len(stream.tokens) if stream is not None else 0,  # rollbacks applied
        )
        if error is not None:
            return timeline_record(**measured, error_code=error.code.name, error=error.message)
        return timeline_record(
            **measured,
            prompt_tokens=stats.prompt_tokens,
            rounds=stats.rounds,
            tau=stats.tau,
            cloud_forward_passes=stats.cloud_forward_passes,
            draft_tokens=stats.draft_tokens,
            accepted_tokens=stats.accepted_tokens,
            accepted_per_position=stats.accepted_per_position,
            degraded=stats.degraded,
            failovers=stats.failovers,
            rollbacks=stats.rollbacks,
            finish_reason=stream.finish_reason.value if stream.finish_reason else None,
        )


def _check_range(name: str, value: int | None, low: int, high: int) -> None:
    if value is not None and not low <= value <= high:
        raise ValueError(f"{name}: must be in [{low}, {high}], got {value}")
