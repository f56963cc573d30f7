"""The verifier's engine: sessions, their KV-cache rows, and the batching loop.

One asyncio task owns the model. Its loop is `schedule -> execute -> update`:

- schedule: when both wait, prefill passes and round batches take turns, so sessions
  that open delay the running ones by at most one pass of `prefill_chunk` tokens per
  round. A prefill pass holds the next chunks of as many opening sessions as fit in
  `prefill_chunk` positions padded (rows x the longest chunk; one chunk at least), so a
  burst of opens waits a few passes, not one round batch each. A batch holds up to
  `max_batch` rounds from distinct sessions; its first round waits at most
  `batch_window_ms` for rounds of other live sessions, and not at all when every live
  session already has one queued.
- execute: one forward pass in a worker thread (the event loop keeps serving I/O):
  per session its pending tokens (the last bonus token, plus tokens the edge added)
  followed by its draft tree, padded into one batch with per-row masks and positions.
  Logits are computed for the rows acceptance reads only (none in a prefill).
- update: the target's token at every tree row for the whole batch in one batched
  step on the device and one host transfer (`lm.acceptance.accept_batch`; greedy is
  the argmax, sampling inverts the CDF at a uniform keyed by (seed, position)), then
  per session the walk down its tree (`accept_targets`), commit of the accepted path
  into the cache without recomputation, and the bonus token becomes the session's next
  pending token. Only an unseeded sampled session that sent its draft distribution is
  verified by rejection sampling (`verify_tree`, on the host), where that accepts more.

Session lifecycle: a pass owns the rows of the sessions in it. Closing a session (the
stream ended, a client cancelled, the reaper) marks it and takes it out of the table at
once; its row is reset and freed when no pass holds it, so a row is never emptied or
reused under a running pass. An error in one session's acceptance fails that session
alone; only a failed forward pass fails its whole batch.

Sessions that asked for hidden states (`OpenSession.return_hidden`, for the edge's
recurrent draft head) also get the target's final-norm hidden state at the position
whose distribution gave the bonus token; the rows are gathered in one transfer.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from cloud_node.config import VerifierConfig
from cloud_node.load import BusyMeter, PassCost
from cloud_node.metrics import VerifierMetrics
from cloud_node.scheduling import Pace, make_policy
from cloud_node.validation import OpenRequest, RoundRequest
from lm.acceptance import Acceptance, PendingRound, accept_batch
from lm.hidden_codec import EncodedHidden, HiddenEncoding, encode_hidden
from lm.kv_cache import KVCache, row_bytes
from lm.model import Transformer
from lm.sampling import SamplingParams, make_generator
from lm.tree import TokenTree
from protocol.errors import (
    FailedPrecondition,
    OutOfRange,
    ResourceExhausted,
    ServerError,
    Unavailable,
)
from protocol.types import Schedule

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Session:
    id: str
    row: int
    sampling: SamplingParams
    # Keys the position uniforms: the request's seed, or fresh entropy without one.
    key: int
    # Tokens the session holds that are not in the KV cache yet (at least one).
    pending: list[int]
    last_used: float
    forward_passes: int = 0
    closed_reason: str | None = None
    # True while a forward pass holds the session's row; closing then defers the free.
    in_pass: bool = False
    return_hidden: HiddenEncoding = HiddenEncoding.NONE
    # Set by the prefill when asked: the hidden state at the next-to-last context token.
    opened_hidden: EncodedHidden | None = None
    # Unseeded sampled sessions only: rejection sampling of the draft distributions
    # they send (a seeded one keeps its promise instead, PendingRound).
    generator: torch.Generator | None = None
    # Its target and what it has been given, for the scheduling policy.
    pace: Pace = field(default_factory=lambda: Pace(Schedule()))


@dataclass(frozen=True)
class RoundOutcome:
    acceptance: Acceptance
    nodes_verified: int
    server_ms: float
    batch_size: int
    # At the position that gave the bonus token; None unless the session asked.
    hidden: EncodedHidden | None = None
    # The session is too far behind its tpot_slo_ms: its rounds now go last.
    slo_unreachable: bool = False
    # A step of the verifier's own decoding (`VerifierEngine.decode`), not a round.
    decode_step: bool = False


@dataclass(eq=False)
class _RoundWork:
    session: Session
    request: RoundRequest
    future: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    arrived: float = field(default_factory=time.monotonic)
    slo_unreachable: bool = False  # set by the scheduling policy

    @property
    def pace(self) -> Pace:
        return self.session.pace


@dataclass(eq=False)
class _PrefillWork:
    session: Session
    tokens: list[int]
    # Keep the hidden state of the chunk's last token (the last chunk, when asked).
    keep_hidden: bool = False
    future: asyncio.Future = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


def resolve_config(config: VerifierConfig, model: Transformer) -> VerifierConfig:
    """`config` resolved for `model` (`VerifierConfig.for_model`: its context, and its
    sessions from the bytes a cached position takes in the model's dtype), as the engine
    runs it; the CLI resolves first, so that a misfit is a usage error."""
    dtype = next(model.parameters()).dtype
    slack = window_slack(config)
    return config.for_model(
        model.config.max_seq_len, lambda positions: row_bytes(model.config, dtype, positions, slack)
    )


def window_slack(config: VerifierConfig) -> int:
    """What sliding-window layers keep beyond their window (`lm.kv_cache.ring_length`):
    at least a round's pending entries, which a rejected round discards."""
    return max(256, config.round_room)


class VerifierEngine:
    """Owns the target model and every session's KV-cache row."""

    def __init__(self, model: Transformer, config: VerifierConfig) -> None:
        config = resolve_config(config, model)
        self.model = model
        self.config = config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        invariant = config.batch_invariant
        if invariant is None:  # CUDA GEMMs are not row-invariant anyway (README)
            invariant = self.device.type == "cpu" and self.dtype in (torch.float16, torch.bfloat16)
        model.batch_invariant = invariant
        model.flex_attention = config.attention == "flex"
        if model.flex_attention and (model.config.mla or invariant):
            why = "multi-head latent attention" if model.config.mla else "batch-invariant attention"
            log.warning("attention flex: %s keeps SDPA's dense masks", why)
        self.cache = KVCache(
            model.config,
            config.max_sessions,
            config.max_context + config.round_room,
            device=self.device,
            dtype=self.dtype,
            window_slack=window_slack(config),
        )
        log.info(
            "KV cache: %d sessions x %d positions, %.4g GB (budget: %s GB)",
            config.max_sessions,
            self.cache.max_len,
            self.cache.nbytes / 1e9,
            config.kv_cache_gb,
        )
        self.sessions: dict[str, Session] = {}
        self.forward_passes = 0
        self.busy = BusyMeter()  # the load each reply carries
        self.cost = PassCost()  # the cost of a round pass each reply carries
        self._free_rows = deque(range(config.max_sessions))
        self._prefills: deque[_PrefillWork] = deque()
        self._rounds: deque[_RoundWork] = deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="verifier-forward")
        self._draining = False
        self._tasks: list[asyncio.Task] = []
        self.policy = make_policy(config.schedule)
        self.metrics = VerifierMetrics(
            sessions=lambda: len(self.sessions),
            queued=lambda: len(self._rounds) + len(self._prefills),
            load=lambda: self.busy.load(),
            rows_in_use=lambda: config.max_sessions - len(self._free_rows),
            rows=config.max_sessions,
            cache_bytes=self.cache.nbytes,
        )

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._loop()), asyncio.create_task(self._reap())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def drain(self) -> None:
        """New sessions get UNAVAILABLE from now on; open ones keep running."""
        self._draining = True

    async def open(self, request: OpenRequest) -> Session:
        if self._draining:
            raise Unavailable("verifier is draining: open the session on another verifier")
        if not self._free_rows:
            raise ResourceExhausted(
                f"max_sessions: all {self.config.max_sessions} session slots are in use"
            )
        session_id = request.session_id or uuid.uuid4().hex
        if session_id in self.sessions:
            raise FailedPrecondition(f"open.session_id: session {session_id!r} is already open")
        seed = request.sampling.seed
        session = Session(
            id=session_id,
            row=self._free_rows.popleft(),
            sampling=request.sampling,
            key=secrets.randbits(64) if seed is None else seed,
            pending=[request.context[-1]],
            last_used=time.monotonic(),
            return_hidden=request.return_hidden,
            pace=Pace(request.schedule),
            generator=None
            if request.sampling.greedy or seed is not None
            else make_generator(None, self.device),
        )
        self.cache.reset(session.row)
        self.sessions[session.id] = session
        try:
            prefix = list(request.context[:-1])
            chunk = self.config.prefill_chunk
            for start in range(0, len(prefix), chunk):
                work = _PrefillWork(
                    session,
                    prefix[start : start + chunk],
                    keep_hidden=bool(session.return_hidden) and start + chunk >= len(prefix),
                )
                self._enqueue(self._prefills, work)
                await work.future
        except BaseException:
            self.close(session, "prefill failed")
            raise
        return session

    async def verify(self, session: Session, request: RoundRequest) -> RoundOutcome:
        self._check_open(session)
        committed = self.cache.lengths[session.row]
        needed = committed + len(session.pending) + len(request.new_tokens) + _depth(request) + 1
        if needed > self.config.max_context:
            raise OutOfRange(
                f"max_context: this round would take the session to {needed} tokens; "
                f"the limit is {self.config.max_context}"
            )
        session.pending.extend(request.new_tokens)
        work = _RoundWork(session, request)
        self._enqueue(self._rounds, work)
        outcome = await work.future
        session.last_used = time.monotonic()
        # The client has the round's tokens and the unverified ones it sent (adaptive).
        given = len(request.new_tokens) + len(outcome.acceptance.nodes) + 1
        session.pace.record(given, session.last_used)
        return outcome

    async def decode(self, session: Session, count: int) -> AsyncIterator[RoundOutcome]:
        """Server-side decoding: `count` one-token steps, each queued like a round so
        that it shares the next pass with whatever else is waiting (continuous batching).
        A step past the context raises OutOfRange, as a round would; the client ends it
        sooner by cancelling its stream."""
        step = RoundRequest(
            new_tokens=(), tree=TokenTree((), ()), draft={}, round_id=0, decode_step=True
        )
        for _ in range(count):
            yield await self.verify(session, step)

    def close(self, session: Session, reason: str = "closed") -> None:
        """Takes the session out of service; its row is freed now, or by the pass that
        holds it when that pass ends. Idempotent."""
        if session.closed_reason is not None:
            return
        session.closed_reason = reason
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            if not session.in_pass:
                self._free(session)

    def _free(self, session: Session) -> None:
        self.cache.reset(session.row)
        self._free_rows.append(session.row)

    def _enqueue(self, queue: deque, work: _RoundWork | _PrefillWork) -> None:
        work.session.last_used = time.monotonic()
        queue.append(work)
        self._wakeup.set()

    def _check_open(self, session: Session) -> None:
        if session.closed_reason is not None:
            raise FailedPrecondition(f"session {session.id!r} is gone: {session.closed_reason}")

    async def _reap(self) -> None:
        ttl = self.config.session_ttl_s
        while True:
            await asyncio.sleep(min(ttl / 4, 5.0))
            now = time.monotonic()
            busy = {w.session for w in itertools.chain(self._rounds, self._prefills)}
            for session in list(self.sessions.values()):
                idle = now - session.last_used > ttl
                if idle and not session.in_pass and session not in busy:
                    log.info("session expired", extra={"session": session.id})
                    self.close(session, f"expired after {ttl:g} s idle (--session-ttl)")

    async def _loop(self) -> None:
        prefill_next = True  # when both wait, prefill chunks and round batches alternate
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._prefills or self._rounds:
                if self._prefills and (prefill_next or not self._rounds):
                    prefill_next = False
                    chunks = self._prefill_batch()
                    if chunks:
                        await self._run(chunks, self._prefill)
                    continue
                prefill_next = True
                batch = await self._schedule()
                if batch:
                    await self._run(batch, self._execute)

    def _prefill_batch(self) -> list[_PrefillWork]:
        """The waiting prefill chunks, in order, that share one pass (`_shares_pass`; the
        first always goes); chunks of closed sessions are failed and skipped."""
        chunks: list[_PrefillWork] = []
        while self._prefills:
            work = self._prefills[0]
            if chunks and not self._shares_pass([*chunks, work]):
                break
            self._prefills.popleft()
            if not self._fail_if_closed(work):
                chunks.append(work)
        return chunks

    def _shares_pass(self, chunks: list[_PrefillWork]) -> bool:
        """Whether `chunks`, each row padded to the longest, fit one prefill pass: at most
        `prefill_chunk` positions computed (rows x longest, so running sessions wait one
        chunk's pass at most), inside every row's cache, and no row padded by more than
        the window layers' slack (padding is written into the ring before it is dropped;
        more would push out entries still inside the window)."""
        longest = max(len(work.tokens) for work in chunks)
        shortest = min(len(work.tokens) for work in chunks)
        furthest = max(self.cache.lengths[work.session.row] for work in chunks)
        return (
            len(chunks) * longest <= self.config.prefill_chunk
            and furthest + longest <= self.cache.max_len
            and longest - shortest <= window_slack(self.config)
        )

    async def _schedule(self) -> list[_RoundWork]:
        """Waits up to the batch window for rounds of other live sessions."""
        deadline = time.monotonic() + self.config.batch_window_ms / 1000
        while len(self._rounds) < min(len(self.sessions), self.config.max_batch):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                break
        batch: list[_RoundWork] = []
        seen: set[Session] = set()
        for work in self.policy.order(list(self._rounds), time.monotonic()):
            if len(batch) == self.config.max_batch:
                break
            if work.session in seen:
                continue
            seen.add(work.session)
            batch.append(work)
            self._rounds.remove(work)
        return [w for w in batch if not self._fail_if_closed(w)]

    def _fail_if_closed(self, work: _RoundWork | _PrefillWork) -> bool:
        if work.session.closed_reason is None:
            return False
        if not work.future.done():
            work.future.set_exception(
                FailedPrecondition(
                    f"session {work.session.id!r} is gone: {work.session.closed_reason}"
                )
            )
        return True

    async def _run(self, items: list, execute) -> None:
        """Runs `execute(items)` in the worker thread while it holds the items' rows;
        resolves each item's future with its result or its own error, or all of them
        with the pass's error. Rows of sessions closed meanwhile are freed after."""
        sessions = [item.session for item in items]
        for session in sessions:
            session.in_pass = True
        start = time.perf_counter()
        began = time.monotonic()
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, execute, items
            )
        except Exception as exc:  # a failed pass fails its callers, not the loop
            log.exception("forward pass failed")
            results = [exc] * len(items)
        finally:
            now = time.monotonic()
            self.busy.add(began, now)
            for session in sessions:
                session.in_pass = False
                session.last_used = now  # the reaper counts idleness from here
                if session.closed_reason is not None:  # closed while the pass held it
                    self._free(session)
        kind = "prefill" if execute == self._prefill else "round"
        try:
            self.metrics.pass_done(kind, time.perf_counter() - start, results)
        except Exception:  # counting must never fail the pass's callers
            log.exception("counting a pass failed")
        for item, result in zip(items, results, strict=True):
            if isinstance(result, BaseException):
                self.close(item.session, "its round failed")
                if not item.future.done():
                    item.future.set_exception(result)
            elif not item.future.done():
                item.future.set_result(result)

    @torch.inference_mode()
    def _prefill(self, items: list[_PrefillWork]) -> list[None]:
        """One pass over the chunks of several opening sessions, each in its own row
        (padded to the longest, causal within its row, after what its row committed)."""
        rows = [work.session.row for work in items]
        empty = TokenTree((), ())
        packed = pack_rounds(
            [
                (work.tokens, empty, self.cache.lengths[row])
                for work, row in zip(items, rows, strict=True)
            ]
        )
        hidden = self.model.hidden(
            packed.input_ids.to(self.device),
            cache=self.cache,
            rows=rows,
            positions=packed.positions.to(self.device),
            mask=packed.mask.to(self.device),
        )
        for b, work in enumerate(items):
            session = work.session
            if work.keep_hidden:
                last = hidden[b, len(work.tokens) - 1]
                session.opened_hidden = encode_hidden(last, session.return_hidden)
            self.cache.commit(session.row, range(len(work.tokens)))
            session.forward_passes += 1
        self.forward_passes += 1
        return [None] * len(items)

    @torch.inference_mode()
    def _execute(self, batch: list[_RoundWork]) -> list[RoundOutcome | Exception]:
        start = time.perf_counter()
        committed = [self.cache.lengths[w.session.row] for w in batch]
        packed = pack_rounds(
            [(w.session.pending, w.request.tree, c) for w, c in zip(batch, committed, strict=True)]
        )
        hidden = self.model.hidden(
            packed.input_ids.to(self.device),
            cache=self.cache,
            rows=[w.session.row for w in batch],
            positions=packed.positions.to(self.device),
            mask=packed.mask.to(self.device),
        )
        self.forward_passes += 1
        # Row r of session b's logits: its target after pending token n - 1 + r, i.e.
        # after its last pending token (r = 0) and after tree node r - 1.
        first = [len(w.session.pending) - 1 for w in batch]
        rows = max(w.request.tree.size for w in batch) + 1
        index = (torch.tensor(first)[:, None] + torch.arange(rows)).clamp_(max=hidden.shape[1] - 1)
        index = index.to(self.device)[..., None].expand(-1, -1, hidden.shape[-1])
        logits = self.model.logits(hidden.gather(1, index))  # (batch, rows, vocab)
        results = accept_batch(
            logits,
            [
                PendingRound(
                    tree=w.request.tree,
                    sampling=w.session.sampling,
                    key=w.session.key,
                    first=c + len(w.session.pending),
                    draft=w.request.draft,
                    generator=w.session.generator,
                )
                for w, c in zip(batch, committed, strict=True)
            ],
        )
        outcomes: list[Acceptance | Exception] = []
        bonus_rows = []  # per batch row: the input position whose logits gave the bonus
        for b, (work, acceptance) in enumerate(zip(batch, results, strict=True)):
            session, n_pending = work.session, len(work.session.pending)
            # This session's fault: it fails alone (_run closes it, which resets its row).
            if isinstance(acceptance, Exception):
                log.error("round failed: %r", acceptance, extra={"session": session.id})
                outcomes.append(ServerError(f"round failed: {acceptance}"))
                bonus_rows.append(first[b])
                continue
            self.cache.commit(
                session.row, [*range(n_pending), *(n_pending + node for node in acceptance.nodes)]
            )
            nodes = acceptance.nodes
            bonus_rows.append(n_pending + nodes[-1] if nodes else n_pending - 1)
            session.pending = [acceptance.bonus]
            session.forward_passes += 1
            outcomes.append(acceptance)
        encoded = self._encode_hidden(batch, hidden, bonus_rows)
        server_ms = (time.perf_counter() - start) * 1000
        self.cost.add(len(batch), packed.input_ids.numel(), server_ms)
        return [
            a
            if isinstance(a, Exception)
            else RoundOutcome(
                a,
                w.request.tree.size,
                server_ms,
                len(batch),
                h,
                slo_unreachable=w.slo_unreachable,
                decode_step=w.request.decode_step,
            )
            for a, w, h in zip(outcomes, batch, encoded, strict=True)
        ]

    def _encode_hidden(
        self, batch: list[_RoundWork], hidden: torch.Tensor, bonus_rows: list[int]
    ) -> list[EncodedHidden | None]:
        """hidden: (batch, time, dim); bonus_rows[b]: the position to send for row b.

        Position n_pending - 1 of a row is its last pending token (sent when nothing was
        accepted), n_pending + i is tree node i; padding follows both and is never read.
        """
        if not any(w.session.return_hidden for w in batch):
            return [None] * len(batch)
        index = torch.tensor(bonus_rows, device=hidden.device)
        picked = hidden[torch.arange(len(batch), device=hidden.device), index].float().cpu()
        return [
            encode_hidden(picked[b], w.session.return_hidden) if w.session.return_hidden else None
            for b, w in enumerate(batch)
        ]


def _depth(request: RoundRequest) -> int:
    return max(request.tree.depths(), default=-1) + 1


@dataclass(frozen=True)
class PackedRounds:
    """Several sessions' rounds as one padded batch.

    input_ids, positions: (batch, time); mask: (batch, time, time). Row b holds its
    pending tokens (causal among themselves), then its tree nodes (each sees every
    pending token and its own ancestors), then padding that sees only itself.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor


def pack_rounds(rounds: list[tuple[list[int], object, int]]) -> PackedRounds:
    """`rounds`: (pending tokens, TokenTree, committed length) per session.

    Example: pending [7], tree tokens (4, 5, 6) with parents (-1, 0, 0), committed 10
    gives ids [7, 4, 5, 6], positions [10, 11, 12, 12]; node 2 (token 6) sees
    token 7, token 4 and itself, not its sibling 5.
    """
    width = max(len(pending) + tree.size for pending, tree, _ in rounds)
    batch = len(rounds)
    input_ids = torch.zeros(batch, width, dtype=torch.long)
    positions = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.eye(width, dtype=torch.bool).expand(batch, width, width).clone()
    for b, (pending, tree, committed) in enumerate(rounds):
        n = len(pending)
        end = n + tree.size
        input_ids[b, :n] = torch.tensor(pending)
        input_ids[b, n:end] = torch.tensor(tree.tokens, dtype=torch.long)
        positions[b, :n] = committed + torch.arange(n)
        positions[b, n:end] = tree.positions(committed + n)
        positions[b, end:] = committed
        mask[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        mask[b, n:end, :n] = True
        mask[b, n:end, n:end] = tree.attention_mask()
    return PackedRounds(input_ids, positions, mask)
