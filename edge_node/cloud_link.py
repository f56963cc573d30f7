"""The edge's connections to verifiers: one channel per address, shared by every
generation on this edge, and sessions opened through the picker with failover."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from grpc import aio

from edge_node.picker import VerifierEndpoint, VerifierPicker
from edge_node.verifier_client import VerifierSession
from lm.hidden_codec import HiddenEncoding
from lm.sampling import SamplingParams
from protocol.channel import TlsOptions, bearer_metadata, open_aio_channel
from protocol.errors import InvalidRequest, ServerError
from protocol.types import Schedule

log = logging.getLogger(__name__)


class Verdict(enum.Enum):
    """What the edge does after a call to a verifier failed: the one retry policy."""

    # The verifier or the link failed (gone, draining, stalled, session expired, every
    # session slot taken): reopen, on another verifier if one is free, and resend;
    # until the deadline.
    FAILOVER = "failover"
    # The verifier answered with an error that a fresh session may not repeat (a bug):
    # one retry on a fresh session (at open: the other verifiers), then the client.
    SUSPECT = "suspect"
    # The session reached the verifier's context limit: the generation ends, "length".
    LENGTH = "length"
    # The request cannot succeed on any verifier: the client hears it, no retry.
    FAIL = "fail"


_VERDICTS = {
    grpc.StatusCode.UNAVAILABLE: Verdict.FAILOVER,
    grpc.StatusCode.CANCELLED: Verdict.FAILOVER,
    grpc.StatusCode.DEADLINE_EXCEEDED: Verdict.FAILOVER,
    grpc.StatusCode.FAILED_PRECONDITION: Verdict.FAILOVER,
    grpc.StatusCode.INTERNAL: Verdict.SUSPECT,
    grpc.StatusCode.UNKNOWN: Verdict.SUSPECT,
    grpc.StatusCode.ABORTED: Verdict.SUSPECT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Verdict.FAILOVER,
    grpc.StatusCode.OUT_OF_RANGE: Verdict.LENGTH,
}


def verdict(error: BaseException) -> Verdict:
    if isinstance(error, aio.AioRpcError):
        return _VERDICTS.get(error.code(), Verdict.FAIL)
    if isinstance(error, (ConnectionError, asyncio.TimeoutError, OSError)):
        return Verdict.FAILOVER
    return Verdict.FAIL


def refusal(error: BaseException) -> BaseException:
    """A verifier's final refusal to open a session, as the edge's client should see it:
    a request the verifier finds invalid (a context beyond its --max-context) is the
    client's INVALID_ARGUMENT; anything else (e.g. a wrong edge credential) is this
    edge's fault, INTERNAL, with the verifier's status named but no details."""
    if not isinstance(error, aio.AioRpcError):
        return error
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequest(f"verifier: {error.details()}")
    log.error("verifier refused the session", extra={"code": error.code().name})
    return ServerError(f"verifier refused the session: {error.code().name}")


class NoVerifier(Exception):
    """No verifier could be reached; the message says what was tried."""


@dataclass(frozen=True)
class CloudLinkConfig:
    # The edge-to-verifier credential (distinct from the clients' tokens).
    token: str | None = None
    tls: TlsOptions | None = None
    # Opening a session (connect plus prefill) must finish within this.
    open_timeout_s: float = 10.0
    # A round with no reply within this is treated as a failed verifier.
    round_timeout_s: float = 10.0
    # Lossless requests without a deadline wait this long for a verifier to appear.
    wait_for_verifier_s: float = 30.0
    # Added to every verifier round trip, to show a WAN link on one machine (demo and
    # benchmarks only; 0 in production).
    simulated_rtt_ms: float = 0.0

    def __repr__(self) -> str:
        return f"CloudLinkConfig(token={'<set>' if self.token else None}, tls={self.tls})"


class CloudLink:
    def __init__(self, picker: VerifierPicker, config: CloudLinkConfig = CloudLinkConfig()) -> None:
        self.picker = picker
        self.config = config
        self._channels: dict[str, aio.Channel] = {}

    def channel(self, address: str) -> aio.Channel:
        if address not in self._channels:
            self._channels[address] = open_aio_channel(address, tls=self.config.tls)
        return self._channels[address]

    async def open(
        self,
        session_id: str,
        context: Sequence[int],
        sampling: SamplingParams,
        exclude: frozenset[str] = frozenset(),
        return_hidden: HiddenEncoding = HiddenEncoding.NONE,
        schedule: Schedule = Schedule(),
    ) -> tuple[VerifierSession, VerifierEndpoint]:
        """Opens a session on the first verifier that accepts it. Raises NoVerifier, or
        the refusal when every verifier tried answered with an error (`refusal`)."""
        tried: list[str] = []
        # An error answer from every verifier tried (not one gone or full): the client
        # hears it, instead of waiting for verifiers that would answer the same.
        answers: list[BaseException] = []
        while True:
            endpoint = await self.picker.pick(session_id, exclude | frozenset(tried))
            if endpoint is None:
                if not tried:
                    raise NoVerifier("no verifier free: all busy, failed or unregistered")
                if len(answers) == len(tried):
                    raise refusal(answers[-1]) from answers[-1]
                raise NoVerifier(f"no verifier reachable (tried {', '.join(tried)})")
            session = VerifierSession(
                self.channel(endpoint.address),
                metadata=bearer_metadata(self.config.token),
                simulated_rtt_ms=self.config.simulated_rtt_ms,
            )
            try:
                await asyncio.wait_for(
                    session.open(
                        endpoint.model, context, sampling, session_id, return_hidden, schedule
                    ),
                    self.config.open_timeout_s,
                )
                return session, endpoint
            except Exception as error:
                await session.close()
                await self.picker.release(session_id, endpoint)
                kind = verdict(error)
                if kind not in (Verdict.FAILOVER, Verdict.SUSPECT):
                    raise refusal(error) from error
                if kind is Verdict.SUSPECT:
                    answers.append(error)
                log.info("verifier refused session", extra={"address": endpoint.address})
                tried.append(endpoint.address)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await self.picker.close()
