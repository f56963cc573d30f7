"""A generation's connection to the verifiers: opening a session (waiting for a
verifier until just before the request's deadline), one round with failover, the
limits of the verifier it is on, the deadline, and closing.

Failover: a failed round (stream broken, verifier stalled past `round_timeout_s`,
session expired) reopens a session on another verifier with the full history and
resends the same draft, cut to the new verifier's limits, so the output does not
change. What counts as which failure is `cloud_link.verdict`, the one retry policy.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from edge_node.cloud_link import CloudLink, NoVerifier, Verdict, verdict
from edge_node.drafters import Draft
from edge_node.picker import VerifierEndpoint
from edge_node.verifier_client import VerifierSession
from lm.hidden_codec import HiddenEncoding
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from protocol.errors import DeadlineExceeded, EdgecloudError, ServerError, Unavailable
from protocol.types import Schedule
from protocol.v1 import verification_pb2 as pb

log = logging.getLogger(__name__)

EMPTY_TREE = TokenTree((), ())
# How long before its deadline a lossless request gives up waiting for a verifier,
# so the client hears UNAVAILABLE (retryable) rather than DEADLINE_EXCEEDED.
DEADLINE_MARGIN_S = 0.25


class ContextFull(Exception):
    """The verifier's context has no room for another round: the generation ends with
    finish_reason "length"."""


class LinkCounters(Protocol):
    """Where the connection counts what it costs (the generation's statistics)."""

    failovers: int
    bytes_to_cloud: int
    bytes_from_cloud: int


class VerifierConnection:
    def __init__(
        self,
        link: CloudLink | None,
        *,
        session_id: str,
        sampling: SamplingParams,
        schedule: Schedule,
        deadline: float | None,
        history: Callable[[], Sequence[int]],
        counters: LinkCounters,
        max_tree_nodes: int,
        return_hidden: Callable[[], HiddenEncoding],
        on_open: Callable[[pb.SessionOpened, int], None],
    ) -> None:
        """`history()`: the generation's tokens now. `deadline`: time.monotonic() by which
        the request must end, None for none. `return_hidden()`: what to ask of a new
        session. `on_open(opened, context_length)` runs after each (re)opening, before
        anything is sent on it."""
        self.link = link
        self.session_id = session_id
        self.sampling = sampling
        self.schedule = schedule
        self.deadline = deadline
        self.history = history
        self.counters = counters
        self.return_hidden = return_hidden
        self.on_open = on_open
        # This edge's limit; max_tree_nodes also honours the open session's verifier.
        self.edge_max_tree_nodes = self.max_tree_nodes = max_tree_nodes
        # The open (or last) session's verifier context (SessionOpened.max_context).
        self.max_context: int | None = None
        self.session: VerifierSession | None = None
        self.endpoint: VerifierEndpoint | None = None
        self.last_round_ms = 0.0

    @property
    def round_timeout_s(self) -> float:
        return self.link.config.round_timeout_s

    def room(self, history: int | None = None) -> int | None:
        """Tree levels the verifier's context leaves the next round after `history`
        tokens (default: all of them), its bonus token included; None when unknown.
        Raises ContextFull when not even the bonus fits: the generation ends there."""
        if not self.max_context:
            return None
        used = len(self.history()) if history is None else history
        room = self.max_context - used - 1
        if room < 0:
            raise ContextFull
        return room

    def fit(self, draft: Draft) -> Draft:
        """The draft cut to the levels the verifier's context leaves and to the verifier's
        max_tree_nodes (another verifier's, after a failover, may be smaller)."""
        levels = max(draft.tree.depths(), default=-1) + 1
        room = self.room()
        if room is not None:
            levels = min(levels, room)
        cut = draft.within_depth(levels)
        while cut.tree.size > self.max_tree_nodes:
            levels -= 1
            cut = draft.within_depth(levels)
        return cut

    async def round(
        self, draft: Draft | None, new_tokens: Sequence[int] = (), wait: bool = True
    ) -> tuple[Draft | None, pb.RoundResult]:
        """One round, with failover: a failed round reopens and resends the draft, cut to
        the new verifier's limits. Returns the draft as sent (`draft` itself unless a
        failover cut it) and the result, whose node indices refer to it. `draft` must
        already fit the open session (`fit`)."""
        new_tokens = list(new_tokens)
        retried = False  # a SUSPECT error gets one fresh session
        while True:
            self.room()  # raises once the verifier's context is full
            if self.session is None:
                # The history already holds any unseen tokens: the new session gets them.
                await self.open(self.history(), wait=wait)
                new_tokens = []
                draft = None if draft is None else self.fit(draft)
            tree, dists = (EMPTY_TREE, {}) if draft is None else (draft.tree, draft.dists)
            try:
                return draft, await self.verify(tree, dists, new_tokens)
            except EdgecloudError:
                raise
            except Exception as error:
                retried = await self.recover(error, retried)

    async def recover(self, error: Exception, retried: bool) -> bool:
        """The retry policy applied to a failed call on the open session: closes it, then
        raises when the generation ends here, or returns whether the one retry a SUSPECT
        error gets is now spent (the caller reopens)."""
        kind = verdict(error)
        if kind is Verdict.LENGTH:
            await self.close()
            raise ContextFull from error
        if kind is Verdict.SUSPECT and not retried:
            retried = True
        elif kind is not Verdict.FAILOVER:
            await self.close(failed=True)
            raise ServerError(f"verifier rejected a round: {_describe(error)}") from error
        log.warning("verifier failed; failing over", extra={"session": self.session_id})
        self.counters.failovers += 1
        await self.close(failed=True)
        return retried

    async def verify(self, tree: TokenTree, dists, new_tokens: Sequence[int] = ()):
        """One round on the open session, no failover; `last_round_ms` is its time."""
        start = time.perf_counter()
        timeout = self.remaining(self.round_timeout_s)
        result = await asyncio.wait_for(
            self.session.verify(tree, new_tokens=new_tokens, draft=dists), timeout
        )
        self.last_round_ms = (time.perf_counter() - start) * 1000
        return result

    async def open(self, context: Sequence[int], wait: bool) -> None:
        """Opens a session; with `wait`, retries until just before the deadline."""
        if self.link is None:
            raise Unavailable("no verifier configured on this edge")
        delay = 0.05
        failed = frozenset({self.endpoint.address}) if self.endpoint else frozenset()
        give_up = time.monotonic() + self.link.config.wait_for_verifier_s
        while True:
            try:
                self.session, self.endpoint = await self.link.open(
                    self.session_id,
                    list(context),
                    self.sampling,
                    exclude=failed,
                    return_hidden=self.return_hidden(),
                    schedule=self.schedule,
                )
                opened = self.session.opened
                limit = self.edge_max_tree_nodes
                if opened.max_tree_nodes > 0:  # 0: an older verifier that does not say
                    limit = min(limit, opened.max_tree_nodes)
                self.max_tree_nodes = limit
                self.max_context = opened.max_context or None
                self.on_open(opened, len(context))
                return
            except NoVerifier as error:
                failed = frozenset()  # next time, try the failed one again too
                if not wait:
                    raise
                remaining = self.remaining(give_up - time.monotonic())
                if remaining <= DEADLINE_MARGIN_S + delay:
                    raise Unavailable(f"{error} before the request's deadline") from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def remaining(self, cap: float | None) -> float | None:
        """Seconds until the deadline, at most `cap`; DeadlineExceeded once it passed."""
        if self.deadline is None:
            return cap
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("request deadline passed")
        return remaining if cap is None else min(cap, remaining)

    async def close(self, failed: bool = False) -> None:
        """Ends the session: half-closes it, or with `failed` cancels it at once."""
        session, endpoint = self.session, self.endpoint
        self.session = None
        if session is None:
            return
        self.counters.bytes_to_cloud += session.bytes_sent
        self.counters.bytes_from_cloud += session.bytes_received
        if failed:
            session.abort()
        else:
            await session.close()
        if endpoint is not None:
            await self.link.picker.release(self.session_id, endpoint)

    @property
    def bytes_in_flight(self) -> tuple[int, int]:
        """(sent, received) on the open session, not yet in the counters."""
        if self.session is None:
            return 0, 0
        return self.session.bytes_sent, self.session.bytes_received


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error)
