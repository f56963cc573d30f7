"""A local fleet whose parts can be broken for real, and a bounded load that records
what every request met: the harness behind tests/chaos and benchmarks/chaos.py.

The fleet is a private Redis, a local Ray with EdgeNode actors and the gateway
(`Stack` with no verifier actors), and verifier *processes* (`edgecloud cloud serve
--redis-url`, as verifiers outside Ray run). Each verifier advertises a `DelayProxy`
in front of it, so it can be killed with SIGKILL, frozen with SIGSTOP (a stall: its
sockets stay open, nothing answers), or slowed on the wire. Every fault is the real
thing; nothing is mocked.

A phase runs `concurrency` clients in a loop for `phase_s` seconds, each sending
greedy lossless requests with a deadline, and injects one or more faults at
`inject_at_s`. A request is *lost* if it completes with output other than its
fault-free output, fails with a status a client cannot retry (anything but
UNAVAILABLE and RESOURCE_EXHAUSTED), is still running past its deadline, or fails
at all without having met a fault: it ended before the injection, or began after the
fleet healed plus the time routing takes to notice (`heartbeat_ttl_s` and
`round_timeout_s`). In a phase without faults every failure is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import ray

import edgecloud
from orchestrator.redis_server import RedisServer, free_port
from orchestrator.registry import AsyncRegistry, connect_async
from orchestrator.stack import Stack, StackConfig
from serving.delay_proxy import DelayProxy
from tests.processes import ServerProcess

FAULTS = (
    "kill_verifier",
    "kill_edge",
    "restart_redis",
    "restart_gateway",
    "stall_verifier",
    "delay_spike",
)


# What the SDK tells callers to retry (see edgecloud/_errors.py).
RETRYABLE = (edgecloud.Unavailable, edgecloud.ResourceExhausted)


@dataclass(frozen=True)
class ChaosConfig:
    target_dir: Path
    draft_dir: Path
    workdir: Path
    verifiers: int = 2
    edges: int = 2
    max_sessions: int = 16
    concurrency: int = 4
    max_tokens: int = 32
    deadline_s: float = 30.0
    phase_s: float = 12.0
    inject_at_s: float = 3.0
    # How long a stall, a delay spike, Redis' downtime or a killed verifier lasts.
    fault_s: float = 3.0
    spike_one_way_ms: float = 250.0
    round_timeout_s: float = 2.0
    # Sent by a verifier's own heartbeat; a stalled or dead one leaves routing after it.
    heartbeat_ttl_s: float = 10.0


@dataclass(frozen=True)
class Outcome:
    prompt: int
    start: float
    end: float
    status: str  # "OK" or the gRPC status name
    retryable: bool  # OK, or an error the SDK tells callers to retry
    tokens: tuple[int, ...]
    failovers: int  # times the edge moved the session to another verifier


@dataclass
class PhaseReport:
    faults: tuple[str, ...]
    injected_at: float
    # When the last fault was healed, plus the time routing takes to notice it.
    calm_from: float = float("inf")
    outcomes: list[Outcome] = field(default_factory=list)

    def met_fault(self, outcome: Outcome) -> bool:
        return (
            bool(self.faults)
            and outcome.start <= self.calm_from
            and (outcome.end >= self.injected_at)
        )

    def summary(self, references: Sequence[tuple[int, ...]], deadline_s: float) -> dict:
        ok = [o for o in self.outcomes if o.status == "OK"]
        wrong = [o for o in ok if o.tokens != references[o.prompt]]
        failed = Counter(o.status for o in self.outcomes if o.status != "OK")
        hung = [o for o in self.outcomes if o.end - o.start > deadline_s + 1.0]
        refused = [o for o in self.outcomes if not o.retryable]
        unprovoked = [o for o in self.outcomes if o.status != "OK" and not self.met_fault(o)]
        lost = len({id(o) for o in wrong + hung + refused + unprovoked})
        later = [o for o in ok if o.start >= self.injected_at and o.tokens == references[o.prompt]]
        recovery = min((o.end for o in later), default=None)
        during = [o.end - o.start for o in self.outcomes if o.end >= self.injected_at]
        return {
            "faults": list(self.faults),
            "sent": len(self.outcomes),
            "completed": len(ok),
            "failed": dict(sorted(failed.items())),
            "lossless_identical": not wrong,
            "mismatched": len(wrong),
            "hung": len(hung),
            "failed_without_fault": len(unprovoked),
            "lost": lost,
            # From the injection to the first correct completion of a request sent after it.
            "recovery_s": None if recovery is None else round(recovery - self.injected_at, 3),
            "failovers": sum(o.failovers for o in self.outcomes),
            "max_latency_after_fault_s": round(max(during, default=0.0), 3),
        }


class VerifierProcess:
    """`edgecloud cloud serve` on a fixed port, registered under the proxy's address."""

    def __init__(self, index: int, config: ChaosConfig, redis_url: str, token_file: Path):
        self.node_id = f"verifier-{index}"
        self.config = config
        self.redis_url = redis_url
        self.token_file = token_file
        self.port = free_port()
        self.proxy = DelayProxy(self.port, 0.0)
        self.process: ServerProcess | None = None
        self.starts = 0

    async def start(self) -> None:
        if self.proxy.port == 0:
            await self.proxy.start()
        args = ["--log-level", "WARNING", "cloud", "serve", "--model", str(self.config.target_dir)]
        args += ["--host", "127.0.0.1", "--port", str(self.port), "--advertise", self.proxy.address]
        args += ["--node-id", self.node_id, "--redis-url", self.redis_url]
        args += ["--auth-token-file", str(self.token_file)]
        args += ["--max-sessions", str(self.config.max_sessions)]
        args += ["--heartbeat-ttl", str(self.config.heartbeat_ttl_s)]
        self.starts += 1  # one log per start: a killed process's log stays for reading
        log = self.config.workdir / f"{self.node_id}.{self.starts}.log"
        self.process = await asyncio.to_thread(ServerProcess, args, log_path=log)

    def kill(self) -> None:
        self.process.kill()
        self.process.stop()  # reaps it and closes its log

    def signal(self, sig: int) -> None:
        os.kill(self.process.proc.pid, sig)

    async def stop(self) -> None:
        if self.process is not None and self.process.proc.poll() is None:
            self.signal(signal.SIGCONT)
            await asyncio.to_thread(self.process.stop)
        await self.proxy.stop()


class Fleet:
    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.redis = RedisServer()
        self.stack: Stack | None = None
        self.verifiers: list[VerifierProcess] = []

    async def start(self) -> Fleet:
        config = self.config
        self.redis.start()
        self.stack = Stack(
            StackConfig(
                target_dir=config.target_dir,
                draft_dir=config.draft_dir,
                edges=config.edges,
                verifiers=0,
                redis_url=self.redis.url,
                gateway_port=0,
                round_timeout_s=config.round_timeout_s,
            )
        )
        token_file = config.workdir / "internal.token"
        token_file.write_text(self.stack.internal_token + "\n")
        token_file.chmod(0o600)
        self.verifiers = [
            VerifierProcess(i, config, self.redis.url, token_file) for i in range(config.verifiers)
        ]
        await asyncio.gather(*(v.start() for v in self.verifiers))
        await self.stack.start()
        return self

    async def stop(self) -> None:
        for verifier in self.verifiers:
            with contextlib.suppress(Exception):
                await verifier.stop()
        if self.stack is not None:
            await self.stack.stop()
        self.redis.stop()

    def client(self) -> edgecloud.AsyncClient:
        return edgecloud.AsyncClient(self.stack.gateway_address, token=self.stack.client_token)

    async def inject(self, fault: str) -> None:
        """Breaks one part, then (after `fault_s` where the fault lasts) heals it the way
        production would: a supervisor restarts a dead process, Ray restarts an actor."""
        seconds = self.config.fault_s
        if fault == "kill_verifier":
            self.verifiers[0].kill()
            await asyncio.sleep(seconds)
            await self.verifiers[0].start()
        elif fault == "kill_edge":
            ray.kill(self.stack.edge_actors[0], no_restart=False)
        elif fault == "restart_redis":
            self.redis.stop()
            await asyncio.sleep(seconds)
            self.redis.start()
        elif fault == "restart_gateway":
            await self.stack.restart_gateway()
        elif fault == "stall_verifier":
            target = self.verifiers[-1]
            target.signal(signal.SIGSTOP)
            await asyncio.sleep(seconds)
            target.signal(signal.SIGCONT)
        elif fault == "delay_spike":
            for verifier in self.verifiers:
                verifier.proxy.one_way_ms = self.config.spike_one_way_ms
            await asyncio.sleep(seconds)
            for verifier in self.verifiers:
                verifier.proxy.one_way_ms = 0.0
        else:
            raise ValueError(f"fault: must be one of {FAULTS}, got {fault!r}")

    async def references(self, prompts: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
        """Fault-free outputs: cloud-only decoding of each prompt."""
        async with self.client() as client:
            results = [
                await client.generate(
                    p, max_tokens=self.config.max_tokens, mode="cloud_only", timeout=60
                )
                for p in prompts
            ]
        return [tuple(r.tokens) for r in results]

    async def phase(self, prompts: Sequence[Sequence[int]], faults: Sequence[str]) -> PhaseReport:
        config = self.config
        loop = asyncio.get_running_loop()
        start = loop.time()
        report = PhaseReport(tuple(faults), start + config.inject_at_s)
        count = iter(range(1 << 30))

        async def worker(client: edgecloud.AsyncClient) -> None:
            while loop.time() - start < config.phase_s:
                n = next(count)
                began = loop.time()
                status, tokens, failovers, retryable = "OK", (), 0, True
                try:
                    result = await client.generate(
                        prompts[n % len(prompts)],
                        max_tokens=config.max_tokens,
                        timeout=config.deadline_s,
                    )
                    tokens, failovers = tuple(result.tokens), result.stats.failovers
                except edgecloud.EdgecloudError as error:
                    status = error.code.name
                    retryable = isinstance(error, RETRYABLE)
                    await asyncio.sleep(0.2)  # a client backs off before retrying
                report.outcomes.append(
                    Outcome(
                        n % len(prompts), began, loop.time(), status, retryable, tokens, failovers
                    )
                )

        async def inject_all() -> None:
            await asyncio.sleep(config.inject_at_s)
            await asyncio.gather(*(self.inject(f) for f in faults))
            report.calm_from = loop.time() + config.heartbeat_ttl_s + config.round_timeout_s

        async with self.client() as client:
            await asyncio.gather(inject_all(), *(worker(client) for _ in range(config.concurrency)))
        await self.settle()
        return report

    async def settle(self, timeout_s: float = 60.0) -> None:
        """Waits until every edge and verifier is registered again, so that the next
        phase starts from a whole fleet."""
        expected = self.config.edges + self.config.verifiers
        client = connect_async(self.redis.url)
        try:
            registry = AsyncRegistry(client)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                with contextlib.suppress(Exception):
                    if len(await registry.list_nodes()) == expected:
                        return
                await asyncio.sleep(0.25)
            raise RuntimeError(f"the fleet did not come back within {timeout_s} s")
        finally:
            await client.aclose()


async def run(
    config: ChaosConfig,
    prompts: Sequence[Sequence[int]],
    plan: Sequence[Sequence[str]],
    on_phase: Callable[[dict], Awaitable[None] | None] = lambda _: None,
) -> list[dict]:
    """Starts a fleet, takes fault-free references, runs one phase per entry of `plan`
    (each a list of faults injected together) and returns each phase's summary."""
    fleet = await Fleet(config).start()
    try:
        references = await fleet.references(prompts)
        summaries = []
        for faults in plan:
            report = await fleet.phase(prompts, faults)
            summary = report.summary(references, config.deadline_s)
            summaries.append(summary)
            if asyncio.iscoroutine(pending := on_phase(summary)):
                await pending
        return summaries
    finally:
        await fleet.stop()
