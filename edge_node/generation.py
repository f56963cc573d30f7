"""One generation on the edge, in any of the four modes.

`Generation.stream()` yields `Chunk`s as tokens become final, then one last chunk
with the statistics. The verified loop (lossless) per round:

    draft a tree (SLM, in a worker thread) -> send it -> accept path + bonus
    -> keep the accepted path's cache entries -> stream the tokens

Lossless rounds are drafted by the SLM or, when the edge has one, by the recurrent
draft head from the hidden state the verifier sends with each reply
(`DraftOptions.drafter`; `auto` chooses per session, edge_node/drafter_choice.py).
Both feed the same verifier, so the output is the same either way. The SLM keeps
the whole history regardless: head rounds leave the accepted tokens pending in it
and the SLM forwards them only when it is needed again (an `auto` switch, a
failover to adaptive).

Faults: a failed round (stream broken, verifier stalled past `round_timeout_s`,
session expired) reopens a session on another verifier with the full history
and resends the same draft, so the output does not change. With no verifier at
all, `lossless` keeps trying until just before its deadline and then fails with
UNAVAILABLE; `adaptive` continues on the edge with `verified=False` tokens, and
when a verifier answers again the unverified span is checked in catch-up rounds;
where the cloud disagrees, a rollback chunk replaces the tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import grpc
import torch

from edge_node.cloud_link import CloudLink, NoVerifier, Verdict, verdict
from edge_node.drafter_choice import DrafterChoice
from edge_node.drafters import Draft, DrafterKind, DraftShape, get_drafter
from edge_node.drafters.head import HeadDrafter
from edge_node.output import Output
from edge_node.picker import VerifierEndpoint
from edge_node.policy import ShapePolicy
from edge_node.slm import EdgeLM
from edge_node.types import Chunk, GenerationRequest, GenerationStats, Mode
from edge_node.verifier_client import VerifierSession, hidden_from_message
from edgecloud.v1 import verification_pb2 as pb
from lm.draft_head import DraftHead
from lm.hidden_codec import HiddenEncoding, decode_hidden
from lm.model import Transformer
from lm.sampling import make_generator, probs_from_logits, sample
from lm.tokenizer import Tokenizer
from lm.tree import TokenTree
from serving.errors import DeadlineExceeded, Internal, ServingError, Unavailable

log = logging.getLogger(__name__)

EMPTY_TREE = TokenTree((), ())
# How long before its deadline a lossless request gives up waiting for a verifier,
# so the client hears UNAVAILABLE (retryable) rather than DEADLINE_EXCEEDED.
DEADLINE_MARGIN_S = 0.25
# Adaptive mode without a verifier: try to reconnect after this many local tokens.
RECONNECT_EVERY_TOKENS = 8


class _ContextFull(Exception):
    """The verifier's context has no room for another round: the generation ends with
    finish_reason "length"."""


@dataclass(frozen=True)
class _Speculation:
    """The next round drafted ahead, valid if the verifier accepts `path` then `bonus`."""

    path: tuple[int, ...]
    bonus: int
    draft: Draft
    previous: EdgeLM  # the view it was forked from: the next spare if adopted
    draft_ms: float  # what drafting it took, hidden behind the verification

    def matches(self, result: pb.RoundResult) -> bool:
        return tuple(result.accepted_nodes) == self.path and result.bonus_token == self.bonus


@dataclass
class _Counters:
    rounds: int = 0
    passes: int = 0
    bytes_to: int = 0
    bytes_from: int = 0
    failovers: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    dedup_saved: int = 0
    rollbacks: int = 0
    degraded: bool = False
    draft_ms: float = 0.0
    pipelined: int = 0
    head_rounds: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def count_round(self, draft: Draft | None, result: pb.RoundResult) -> None:
        self.rounds += 1
        self.passes += 1
        accepted = len(result.accepted_tokens)
        self.accepted_tokens += accepted
        if draft is not None:
            self.draft_tokens += draft.tree.size
            self.dedup_saved += draft.undeduplicated - draft.tree.size
            self.head_rounds += draft.drafter == "head"
        grow = accepted - len(self.accepted_per_position)
        self.accepted_per_position += [0] * max(grow, 0)
        for i in range(accepted):
            self.accepted_per_position[i] += 1


class Generation:
    def __init__(
        self,
        request: GenerationRequest,
        model: Transformer,
        *,
        link: CloudLink | None,
        model_name: str,
        tokenizer: Tokenizer | None,
        executor: Executor,
        max_tree_nodes: int = 64,
        head: DraftHead | None = None,
    ) -> None:
        self.request = request
        self.lm = EdgeLM(model)
        self.link = link
        self.model_name = model_name
        self.executor = executor
        self.session_id = request.request_id or uuid.uuid4().hex
        self.out = Output(
            request.prompt_tokens,
            request.max_tokens,
            request.stop,
            model.config.eos_token_id,
            tokenizer,
        )
        # One shape policy per drafter: their acceptance and cost per level differ.
        self.policies = {
            kind: ShapePolicy(
                DraftShape(request.draft.width, request.draft.depth),
                adapt=request.draft.adapt,
                max_nodes=max_tree_nodes,
            )
            for kind in ("slm", "head")
        }
        self.drafter = get_drafter(request.draft.tree)
        self.head_drafter = None if head is None else HeadDrafter(head)
        uses_head = request.mode is Mode.LOSSLESS and head is not None
        self.choice = DrafterChoice(request.draft.drafter if uses_head else "slm")
        # The target's hidden state before the history's last token, from the last reply.
        self._hidden: torch.Tensor | None = None
        self.generator = (
            None if request.sampling.greedy else make_generator(request.sampling.seed, "cpu")
        )
        # This edge's limit; max_tree_nodes also honours the open session's verifier.
        self.edge_max_tree_nodes = self.max_tree_nodes = max_tree_nodes
        self.counters = _Counters()
        self._session: VerifierSession | None = None
        self._endpoint: VerifierEndpoint | None = None
        self._start = time.monotonic()
        self._deadline = None if request.timeout_s is None else self._start + request.timeout_s
        self._first_token_ms: float | None = None
        # The open (or last) session's verifier context (SessionOpened.max_context).
        self._max_context: int | None = None
        self._last_draft_ms = 0.0
        self._last_round_ms = 0.0

    async def stream(self) -> AsyncIterator[Chunk]:
        self.lm.reset(self.request.prompt_tokens)
        modes: dict[Mode, Callable[[], AsyncIterator[Chunk]]] = {
            Mode.LOSSLESS: self._lossless,
            Mode.CLOUD_ONLY: self._cloud_only,
            Mode.EDGE_ONLY: self._edge_only,
            Mode.ADAPTIVE: self._adaptive,
        }
        try:
            try:
                # aclosing: a mode's cleanup (cancelling the verifier's decoding) runs
                # when the output is done, not whenever the generator is collected.
                async with contextlib.aclosing(modes[self.request.mode]()) as chunks:
                    async for chunk in chunks:
                        if chunk.tokens or chunk.text or chunk.rollback:
                            if self._first_token_ms is None:
                                self._first_token_ms = (time.monotonic() - self._start) * 1000
                            yield chunk
                        if self.out.done:
                            break
            except _ContextFull:
                self.out.finish("length")
            yield Chunk(verified=True, finish_reason=self.out.finish_reason, stats=self.stats())
        finally:
            await self._close_session()

    def stats(self) -> GenerationStats:
        c = self.counters
        return GenerationStats(
            rounds=c.rounds,
            tokens_per_round=(c.accepted_tokens + c.rounds) / c.rounds if c.rounds else 0.0,
            cloud_forward_passes=c.passes,
            generated_tokens=len(self.out.tokens),
            prompt_tokens=len(self.request.prompt_tokens),
            bytes_to_cloud=c.bytes_to + (self._session.bytes_sent if self._session else 0),
            bytes_from_cloud=c.bytes_from + (self._session.bytes_received if self._session else 0),
            time_to_first_token_ms=self._first_token_ms or 0.0,
            total_ms=(time.monotonic() - self._start) * 1000,
            degraded=c.degraded,
            failovers=c.failovers,
            draft_tokens=c.draft_tokens,
            accepted_tokens=c.accepted_tokens,
            accepted_per_position=tuple(c.accepted_per_position),
            rollbacks=c.rollbacks,
            dedup_saved_tokens=c.dedup_saved,
            draft_ms=c.draft_ms,
            pipelined_rounds=c.pipelined,
            head_rounds=c.head_rounds,
        )

    # ---- modes -------------------------------------------------------------------

    async def _lossless(self) -> AsyncIterator[Chunk]:
        pipeline = self.generator is None and self.request.draft.pipeline
        spare = self.lm.spare() if pipeline else None
        # Open before drafting: the verifier's max_tree_nodes bounds round one too, and the
        # head drafts round one from the hidden state the opening returns.
        await self._open(self.lm.tokens, wait=True)
        draft = await self._draft(self._pick())
        while not self.out.done:
            draft = self._fit(draft)
            verify = asyncio.ensure_future(self._verify(draft))
            speculation = None
            if (
                spare is not None
                and self.choice.may_speculate()
                and self._last_draft_ms < self._last_round_ms
            ):
                # The thread owns the SLM until it returns, so wait for it before `verify`.
                speculation = await self._in_thread(self._speculate, draft, spare)
            sent, result = await verify
            # A failover may have cut the draft to another verifier's limits: a
            # speculation made from the uncut one no longer applies.
            if speculation is not None and sent is draft and speculation.matches(result):
                yield self._accept(draft, result, adopt=spare)
                spare = speculation.previous
                kind = self._pick()  # this reply may have made `auto` prefer the head
                if kind == "slm":
                    draft, self._last_draft_ms = speculation.draft, speculation.draft_ms
                    self.counters.pipelined += 1
                elif not self.out.done:
                    draft = await self._draft(kind)
                continue
            yield self._accept(sent, result)
            if not self.out.done:
                draft = await self._draft(self._pick())

    def _pick(self) -> DrafterKind:
        return self.choice.pick(head_ready=self._hidden is not None)

    def _speculate(self, draft: Draft, spare: EdgeLM) -> _Speculation:
        """Drafts the round after `draft` in `spare`, assuming its main path is accepted
        and followed by the SLM's own next token."""
        path = draft.main_path
        self.lm.fork(spare, [draft.tree.tokens[i] for i in path], [draft.node_ids[i] for i in path])
        bonus = int(spare.next_logits().argmax())
        spare.append([bonus])
        start = time.perf_counter()
        shape = self.policies["slm"].shape()
        following = self.drafter.draft(spare, shape, self.request.sampling, None)
        draft_ms = (time.perf_counter() - start) * 1000
        self.counters.draft_ms += draft_ms
        return _Speculation(tuple(path), bonus, following, previous=self.lm, draft_ms=draft_ms)

    async def _cloud_only(self) -> AsyncIterator[Chunk]:
        """The verifier decodes and streams (server-side, `VerifierSession.decode`): one
        request, the round trip paid once, not per token. A failover reopens with the
        history and asks for the rest; stopping early cancels the verifier's decoding."""
        retried = False
        while not self.out.done:
            if self._session is None:
                await self._open(self.lm.tokens, wait=True)
            want = self.out.max_tokens - len(self.out.tokens)
            room = self._room()
            if room is not None:
                want = min(want, room + 1)  # tokens the verifier's context still takes
            stream = self._session.decode(want)
            received = 0
            try:
                while received < want and not self.out.done:
                    timeout = self._remaining(self.link.config.round_timeout_s)
                    result = await asyncio.wait_for(anext(stream), timeout)
                    received += 1
                    self.counters.count_round(None, result)
                    self.lm.append([result.bonus_token])
                    yield self.out.emit([result.bonus_token], verified=True)
            except ServingError:
                raise
            except Exception as error:
                retried = await self._recover(error, retried)  # closes the session
            finally:
                await stream.aclose()
                # Done early (end of sequence, a stop string; the caller may close this
                # generator at the yield): cancel what the verifier is still decoding.
                if received < want and self._session is not None:
                    await self._close_session(failed=True)

    async def _edge_only(self) -> AsyncIterator[Chunk]:
        while not self.out.done:
            token, _ = await self._local_token()
            self.lm.append([token])
            yield self.out.emit([token], verified=False)

    async def _adaptive(self) -> AsyncIterator[Chunk]:
        """Confident edge tokens go out unverified and reach the verifier as `new_tokens`
        with the next escalated round; the rest is drafted and verified."""
        unseen: list[int] = []  # tokens the open session has not been sent yet
        offline_from: int | None = None  # history index where the outage began
        since_retry = 0
        while not self.out.done:
            if offline_from is not None and since_retry >= RECONNECT_EVERY_TOKENS:
                since_retry = 0
                async for chunk in self._catch_up(offline_from):
                    yield chunk
                if self._session is not None:
                    offline_from, unseen = None, []
                continue
            token, confidence = await self._local_token()
            if offline_from is not None or confidence >= self.request.adaptive_threshold:
                self.lm.append([token])
                unseen.append(token)
                since_retry += 1
                yield self.out.emit([token], verified=False)
                continue
            draft = self._fit(await self._draft())
            try:
                draft, result = await self._verify(draft, new_tokens=unseen, wait=False)
            except NoVerifier:
                self.counters.degraded = True
                offline_from = len(self.lm.tokens) - len(unseen)
                continue
            unseen = []
            yield self._accept(draft, result)

    def _room(self, history: int | None = None) -> int | None:
        """Tree levels the verifier's context leaves the next round after `history`
        tokens (default: all of them), its bonus token included; None when unknown.
        Raises _ContextFull when not even the bonus fits: the generation ends there."""
        if not self._max_context:
            return None
        room = self._max_context - (len(self.lm.tokens) if history is None else history) - 1
        if room < 0:
            raise _ContextFull
        return room

    def _fit(self, draft: Draft) -> Draft:
        """The draft cut to the levels the verifier's context leaves and to the verifier's
        max_tree_nodes (another verifier's, after a failover, may be smaller)."""
        levels = max(draft.tree.depths(), default=-1) + 1
        room = self._room()
        if room is not None:
            levels = min(levels, room)
        cut = draft.within_depth(levels)
        while cut.tree.size > self.max_tree_nodes:
            levels -= 1
            cut = draft.within_depth(levels)
        return cut

    def _fit_trees(self, verifier_max: int) -> None:
        """Drafts no larger than the session's verifier takes (SessionOpened.max_tree_nodes,
        0 when it does not say) nor this edge's own limit."""
        limit = self.edge_max_tree_nodes
        if verifier_max > 0:
            limit = min(limit, verifier_max)
        self.max_tree_nodes = limit
        for policy in self.policies.values():
            policy.max_nodes = limit

    async def _catch_up(self, start: int) -> AsyncIterator[Chunk]:
        """Verifies history[start:] (made while offline) in chain rounds; on the first
        disagreement rolls the output back and continues from the cloud's token."""
        try:
            await self._open(self.lm.tokens[:start], wait=False)
        except NoVerifier:
            return
        pos = start
        while pos < len(self.lm.tokens):
            room = self._room(history=pos)
            size = self.max_tree_nodes if room is None else min(self.max_tree_nodes, room)
            piece = self.lm.tokens[pos : pos + size]  # none when room is 0: the bonus checks one
            try:
                result = await self._verify_on_session(TokenTree.chain(piece), {})
            except ServingError:
                raise
            except Exception as error:  # the same policy as a round, with no resend
                if verdict(error) is Verdict.LENGTH:
                    raise _ContextFull from error
                log.warning("catch-up failed; still offline", extra={"session": self.session_id})
                await self._close_session(failed=True)
                return
            self.counters.count_round(None, result)
            pos += len(result.accepted_tokens)
            if pos < len(self.lm.tokens) and self.lm.tokens[pos] == result.bonus_token:
                pos += 1
                continue
            if pos < len(self.lm.tokens):
                self.counters.rollbacks += 1
                rollback = self.out.rollback(pos - len(self.request.prompt_tokens))
                self.lm.truncate(pos)
                self.lm.append([result.bonus_token])
                yield self.out.emit([result.bonus_token], verified=True, rollback=rollback)
                return
            self.lm.append([result.bonus_token])
            yield self.out.emit([result.bonus_token], verified=True)
            return

    # ---- pieces ------------------------------------------------------------------

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _draft(self, kind: DrafterKind = "slm") -> Draft:
        start = time.perf_counter()
        shape = self.policies[kind].shape()
        if kind == "head":
            draft = await self._in_thread(
                self.head_drafter.draft, self._hidden, self.lm.tokens[-1], shape
            )
        else:
            draft = await self._in_thread(
                self.drafter.draft, self.lm, shape, self.request.sampling, self.generator
            )
        self._last_draft_ms = (time.perf_counter() - start) * 1000
        self.counters.draft_ms += self._last_draft_ms
        return draft

    async def _local_token(self) -> tuple[int, float]:
        """The edge's own next token and the SLM's probability of it."""
        logits = await self._in_thread(self.lm.next_logits)
        probs = probs_from_logits(logits.float(), self.request.sampling)
        if self.generator is None:  # greedy: the point mass says nothing; the raw softmax does
            token = int(probs.argmax())
            return token, float(torch.softmax(logits.float(), -1)[token])
        token = int(sample(probs, self.generator))
        return token, float(probs[token])  # the distribution the token was drawn from

    def _accept(self, draft: Draft, result: pb.RoundResult, adopt: EdgeLM | None = None) -> Chunk:
        """Applies a round's result; `adopt` is a view that already holds it (pipelining)."""
        tokens = [*result.accepted_tokens, result.bonus_token]
        if adopt is None:
            self.lm.accept(tokens, [draft.node_ids[i] for i in result.accepted_nodes])
        else:
            self.lm = adopt
        self.counters.count_round(draft, result)
        self._take_hidden(result.hidden if result.HasField("hidden") else None)
        self.choice.observe(draft.drafter, len(tokens), self._last_draft_ms, self._last_round_ms)
        main = draft.main_path[: len(result.accepted_nodes)]
        self.policies[draft.drafter].observe(
            depth=max(draft.tree.depths(), default=-1) + 1,
            accepted=len(result.accepted_nodes),
            off_main_path=tuple(result.accepted_nodes) != main,
            round_trip_ms=self._last_round_ms,
            draft_ms=self._last_draft_ms,
        )
        return self.out.emit(tokens, verified=True)

    def _take_hidden(self, message: pb.HiddenState | None) -> None:
        """Keeps a reply's hidden state for the head's next draft; without a usable one
        (an old verifier, a head made for another target) the SLM drafts, said once."""
        if self.choice.setting == "slm":
            return
        self._hidden = None
        try:
            encoded = hidden_from_message(message)
        except ValueError as error:
            problem = f"verifier sent a malformed hidden state ({error})"
        else:
            expected = self.head_drafter.head.config.hidden_size
            if encoded is None:
                problem = "verifier sent no hidden state (an older verifier?)"
            elif encoded.dim != expected:
                problem = f"hidden state has {encoded.dim} elements, the head expects {expected}"
            else:
                self._hidden = decode_hidden(encoded)
                return
        # The rest of the session drafts with the SLM (pipelined like any SLM session), so
        # this is said once.
        self.choice.fall_back_to_slm()
        log.warning("%s; drafting with the SLM", problem, extra={"session": self.session_id})

    async def _verify(
        self, draft: Draft | None, new_tokens: list[int] | None = None, wait: bool = True
    ) -> tuple[Draft | None, pb.RoundResult]:
        """One round, with failover: a failed round reopens and resends the draft, cut to
        the new verifier's limits. Returns the draft as sent (`draft` itself unless a
        failover cut it) and the result, whose node indices refer to it. `draft` must
        already fit the open session (`_fit`)."""
        new_tokens = list(new_tokens or [])
        retried = False  # a SUSPECT error gets one fresh session
        while True:
            self._room()  # raises once the verifier's context is full
            if self._session is None:
                # The history already holds any unseen tokens: the new session gets them.
                await self._open(self.lm.tokens, wait=wait)
                new_tokens = []
                draft = None if draft is None else self._fit(draft)
            tree, dists = (EMPTY_TREE, {}) if draft is None else (draft.tree, draft.dists)
            try:
                return draft, await self._verify_on_session(tree, dists, new_tokens)
            except ServingError:
                raise
            except Exception as error:
                retried = await self._recover(error, retried)

    async def _recover(self, error: Exception, retried: bool) -> bool:
        """The retry policy (`cloud_link.verdict`) applied to a failed call on the open
        session: closes it, then raises when the generation ends here, or returns whether
        the one retry a SUSPECT error gets is now spent (the caller reopens)."""
        kind = verdict(error)
        if kind is Verdict.LENGTH:
            await self._close_session()
            raise _ContextFull from error
        if kind is Verdict.SUSPECT and not retried:
            retried = True
        elif kind is not Verdict.FAILOVER:
            await self._close_session(failed=True)
            raise Internal(f"verifier rejected a round: {_describe(error)}") from error
        log.warning("verifier failed; failing over", extra={"session": self.session_id})
        self.counters.failovers += 1
        await self._close_session(failed=True)
        return retried

    async def _verify_on_session(self, tree, dists, new_tokens=()) -> pb.RoundResult:
        start = time.perf_counter()
        timeout = self._remaining(self.link.config.round_timeout_s)
        result = await asyncio.wait_for(
            self._session.verify(tree, new_tokens=new_tokens, draft=dists), timeout
        )
        self._last_round_ms = (time.perf_counter() - start) * 1000
        return result

    async def _open(self, context: list[int], wait: bool) -> None:
        """Opens a session; with `wait`, retries until just before the deadline."""
        if self.link is None:
            raise Unavailable("no verifier configured on this edge")
        delay = 0.05
        failed = frozenset({self._endpoint.address}) if self._endpoint else frozenset()
        give_up = time.monotonic() + self.link.config.wait_for_verifier_s
        while True:
            try:
                self._session, self._endpoint = await self.link.open(
                    self.session_id,
                    context,
                    self.request.sampling,
                    exclude=failed,
                    return_hidden=self._hidden_encoding(),
                )
                opened = self._session.opened
                self._fit_trees(opened.max_tree_nodes)
                self._max_context = opened.max_context or None
                if len(context) > 1:  # one token has nothing before it to send
                    self._take_hidden(opened.hidden if opened.HasField("hidden") else None)
                return
            except NoVerifier as error:
                failed = frozenset()  # next time, try the failed one again too
                if not wait:
                    raise
                remaining = self._remaining(give_up - time.monotonic())
                if remaining <= DEADLINE_MARGIN_S + delay:
                    raise Unavailable(f"{error} before the request's deadline") from error
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _hidden_encoding(self) -> HiddenEncoding:
        if self.choice.setting == "slm":
            return HiddenEncoding.NONE
        return HiddenEncoding[self.request.draft.hidden_encoding.upper()]

    def _remaining(self, cap: float | None) -> float | None:
        if self._deadline is None:
            return cap
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("request deadline passed")
        return remaining if cap is None else min(cap, remaining)

    async def _close_session(self, failed: bool = False) -> None:
        session, endpoint = self._session, self._endpoint
        self._session = None
        if session is None:
            return
        self.counters.bytes_to += session.bytes_sent
        self.counters.bytes_from += session.bytes_received
        if failed:
            session.abort()
        else:
            await session.close()
        if endpoint is not None:
            await self.link.picker.release(self.session_id, endpoint)


def _describe(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    return repr(error)
