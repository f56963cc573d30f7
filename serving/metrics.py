"""Prometheus metrics: what every server exposes, and the `/metrics` endpoint.

Each server owns a `CollectorRegistry` (not the process-wide default, so that several
servers in one process, as in the tests and `edgecloud demo`, count separately).
`RequestMetrics` is what the edge and the gateway both measure of the generations they
stream: requests by outcome, TTFT, TPOT, per-token inter-token latency and end-to-end
time, observed on the proto chunk stream so that every front (gRPC, HTTP, the gateway's
actors) is measured by the same code.

The endpoint needs no token, so it listens on its own port, chosen by the operator
(`--metrics-port`), on the server's host; the HTTP front serves the same text at
`/metrics` behind its bearer token.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    start_http_server,
)

from protocol.errors import EdgecloudError
from protocol.types import FinishReason, GenerationStats, Mode, Request
from protocol.v1 import generation_pb2 as gpb

# Seconds: 1 ms to about 80 s, doubling.
LATENCY_BUCKETS = tuple(0.001 * 2**i for i in range(17))
CONTENT_TYPE = CONTENT_TYPE_LATEST


def token_gaps(gap: float | None, tokens: int) -> list[float]:
    """The inter-token latencies, per token, of one stream chunk carrying `tokens` (>= 1)
    tokens that arrived `gap` after the previous token-carrying chunk: `tokens` values of
    gap / tokens (ITL per token, as vLLM and guidellm count it, not per chunk). The first
    chunk (`gap` None) adds tokens - 1 zeros: its tokens after the first came at the first
    one's instant. So a stream of n tokens adds n - 1 values whatever its chunking. The
    one definition of the servers' histogram and of `edgecloud loadtest`'s ITL.

    Example: chunks of 3, 2 and 4 tokens at 100, 150 and 230 ms give [0, 0], then
    token_gaps(50, 2) == [25.0, 25.0], then token_gaps(80, 4) == [20.0] * 4.
    """
    if gap is None:
        return [0.0] * (tokens - 1)
    return [gap / tokens] * tokens


class RequestMetrics:
    """Per generation request, labelled by mode: how it ended and how fast it streamed.

    TPOT is (end - first token) / (tokens - 1) per request, as vLLM and guidellm define
    it; inter-token latency is per token after the first (`token_gaps`), so each request
    adds tokens - 1 observations.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "edgecloud_requests",
            "Generation requests, by mode and outcome (a finish reason or a gRPC status)",
            ["mode", "outcome"],
            registry=registry,
        )
        self.ttft = _histogram(registry, "time_to_first_token", "Time to the first token")
        self.tpot = _histogram(
            registry, "time_per_output_token", "Time per output token after the first"
        )
        self.itl = _histogram(registry, "inter_token_latency", "Time between output tokens")
        self.e2e = _histogram(registry, "e2e_request_latency", "Time from request to last chunk")
        self.prompt_tokens = Counter(
            "edgecloud_prompt_tokens", "Prompt tokens", ["mode"], registry=registry
        )
        self.generation_tokens = Counter(
            "edgecloud_generation_tokens", "Output tokens", ["mode"], registry=registry
        )

    def admit(self, msg: gpb.GenerateRequest) -> Request:
        """The wire request parsed (`Request.from_proto`); one it refuses is counted as a
        request with that outcome, so bad input shows in `requests_total` too."""
        try:
            return Request.from_proto(msg)
        except EdgecloudError as error:
            label = Mode.from_proto(msg.mode).value if msg.mode in gpb.Mode.values() else "unknown"
            self.requests.labels(label, error.code.name.lower()).inc()
            raise

    async def observe(
        self, mode: Mode, chunks: AsyncGenerator[gpb.GenerateChunk, None]
    ) -> AsyncIterator[gpb.GenerateChunk]:
        """Yields `chunks` unchanged while timing them, and closes them when closed;
        `mode` is the request's."""
        label = mode.value
        itl = self.itl.labels(label)  # once, not per token: labels() locks and looks up
        start = last = time.perf_counter()
        first: float | None = None
        tokens = 0
        outcome = "cancelled"  # the caller stopped reading
        try:
            async with contextlib.aclosing(chunks):
                async for chunk in chunks:
                    now = time.perf_counter()
                    if count := len(chunk.tokens):
                        gap = None if first is None else now - last
                        if first is None:
                            first = now
                            self.ttft.labels(label).observe(now - start)
                        for value in token_gaps(gap, count):
                            itl.observe(value)
                        last = now
                    tokens += len(chunk.tokens)
                    if chunk.HasField("stats"):
                        outcome = (
                            FinishReason.from_proto(chunk.finish_reason) or "unknown"
                        ).lower()
                        self.prompt_tokens.labels(label).inc(chunk.stats.prompt_tokens)
                    yield chunk
        except EdgecloudError as error:
            outcome = error.code.name.lower()
            raise
        except Exception:
            outcome = "internal"
            raise
        finally:
            end = time.perf_counter()
            self.requests.labels(label, outcome).inc()
            self.generation_tokens.labels(label).inc(tokens)
            self.e2e.labels(label).observe(end - start)
            if first is not None and tokens > 1:
                self.tpot.labels(label).observe((end - first) / (tokens - 1))


class SpeculativeMetrics:
    """Speculative decoding, counted from each finished generation's statistics; the
    names follow vLLM's (`spec_decode_num_drafts`, `..._num_draft_tokens`,
    `..._num_accepted_tokens`, `..._num_accepted_tokens_per_pos`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"edgecloud_{name}", doc, list(labels), registry=registry)

        self.drafts = counter("spec_decode_num_drafts", "Drafts sent for verification")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens proposed")
        self.accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self.per_position = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Rounds whose draft token at this position (0 = first) was accepted",
            ("position",),
        )
        self.forward_passes = counter("cloud_forward_passes", "Verifier forward passes used")
        self.failovers = counter("failovers", "Sessions reopened on another verifier")
        self.rollbacks = counter("rollbacks", "Rollbacks of unverified output (adaptive mode)")
        self.degraded = counter("degraded_requests", "Generations with unverified tokens")
        self.draft_seconds = counter("draft_seconds", "Time spent drafting")

    def record(self, stats: GenerationStats) -> None:
        self.drafts.inc(stats.rounds)
        self.draft_tokens.inc(stats.draft_tokens)
        self.accepted.inc(stats.accepted_tokens)
        for position, count in enumerate(stats.accepted_per_position):
            self.per_position.labels(str(position)).inc(count)
        self.forward_passes.inc(stats.cloud_forward_passes)
        self.failovers.inc(stats.failovers)
        self.rollbacks.inc(stats.rollbacks)
        self.degraded.inc(stats.degraded)
        self.draft_seconds.inc(stats.draft_ms / 1000)


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)


@dataclass
class MetricsEndpoint:
    """`/metrics` served from a thread (prometheus_client's WSGI server)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> MetricsEndpoint:
    """Starts the endpoint on `host:port` (0 picks a free port)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsEndpoint(server, thread)


def _histogram(registry: CollectorRegistry, name: str, doc: str) -> Histogram:
    return Histogram(
        f"edgecloud_{name}_seconds", doc, ["mode"], buckets=LATENCY_BUCKETS, registry=registry
    )
