"""One generation on the edge: the state every mode shares, and its stream.

`Generation.stream()` runs the request's mode (`edge_node/modes/`: lossless, adaptive,
edge_only, cloud_only) and yields `Chunk`s as tokens become final, then one last
chunk with the statistics. What the modes share lives here: the SLM's view of the
history (`lm`), the draft sources and the per-session choice among them (`draft`,
`pick`), the verifier connection with its failover and deadline
(`edge_node/connection.py`), the output (`out`) and the counters.

Lossless rounds are drafted by the source the edge's `DraftConfig.drafter` names (the
SLM, the recurrent head fed the hidden state the verifier sends with each reply, an
n-gram lookup) or, with `auto`, the one `edge_node/drafter_choice.py` measures faster
per session. Every source feeds the same verifier, so the output is the same either
way. The SLM keeps the whole history regardless: rounds another source drafted leave
the accepted tokens pending in it, and it forwards them only when it is needed again
(an `auto` switch, a failover to adaptive).

Faults: see `edge_node/connection.py` (failover) and `edge_node/modes/adaptive.py`
(carrying on without a verifier). With no verifier at all, `lossless` keeps trying
until just before its deadline and then fails with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch

from edge_node.cloud_link import CloudLink
from edge_node.connection import ContextFull, VerifierConnection
from edge_node.drafter_choice import DrafterChoice
from edge_node.drafters import Draft, DraftContext, DraftShape
from edge_node.drafters.head import HeadSource
from edge_node.drafters.sources import FALLBACK, make_sources
from edge_node.modes import MODES
from edge_node.output import Output, stop_ids
from edge_node.policy import ShapePolicy, VerifierView
from edge_node.slm import EdgeLM, cache_len
from edge_node.types import GenerationRequest
from edge_node.verifier_client import hidden_from_message
from lm.draft_head import DraftHead
from lm.hidden_codec import HiddenEncoding, decode_hidden
from lm.model import Transformer
from lm.sampling import make_generator, probs_from_logits, sample
from lm.tokenizer import Tokenizer
from lm.tree import TokenTree
from protocol.types import Chunk, FinishReason, GenerationStats, Mode
from protocol.v1 import verification_pb2 as pb

log = logging.getLogger(__name__)


@dataclass
class _Counters:
    """The statistics counted while generating, named as `GenerationStats` names them;
    `Generation.stats` adds the ones derived at the end."""

    rounds: int = 0
    cloud_forward_passes: int = 0
    bytes_to_cloud: int = 0  # of closed sessions; the open one adds its own
    bytes_from_cloud: int = 0
    failovers: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    dedup_saved_tokens: int = 0
    rollbacks: int = 0
    degraded: bool = False
    draft_ms: float = 0.0
    pipelined_rounds: int = 0
    head_rounds: int = 0
    slo_unreachable_rounds: int = 0
    verifier_load: float = 0.0
    accepted_per_position: list[int] = field(default_factory=list)

    def count_round(self, draft: Draft | None, result: pb.RoundResult) -> None:
        self.rounds += 1
        self.cloud_forward_passes += 1
        self.slo_unreachable_rounds += result.slo_unreachable
        self.verifier_load = result.load
        accepted = len(result.accepted_tokens)
        self.accepted_tokens += accepted
        if draft is not None:
            self.draft_tokens += draft.tree.size
            self.dedup_saved_tokens += draft.undeduplicated - draft.tree.size
            self.head_rounds += draft.drafter == HeadSource.name
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
        verifier: VerifierView | None = None,
    ) -> None:
        """verifier: what the edge has heard of its verifier's load, shared with its other
        generations (a fresh view when None)."""
        self.request = request
        # Sized to what this request can use (prompt, max_tokens, the draft reserve), not
        # the model's whole context: 755 MB for an 8192-token SmolLM2-135M in float32.
        self.lm = EdgeLM(
            model,
            cache_len(
                len(request.prompt_tokens),
                request.max_tokens,
                max_tree_nodes,
                model.config.max_seq_len,
            ),
        )
        self.model_name = model_name
        self.executor = executor
        self.session_id = request.request_id or uuid.uuid4().hex
        self.out = Output(
            request.prompt_tokens,
            request.max_tokens,
            request.stop,
            () if request.ignore_eos else stop_ids(model.config.eos_token_id, tokenizer),
            tokenizer,
        )
        # Built (and so checked against what this edge offers) in every mode; lossless
        # rounds use them, every other mode drafts with the SLM.
        self.sources = make_sources(request.draft.drafter, tree=request.draft.tree, head=head)
        self.choice = DrafterChoice(
            request.draft.drafter if request.mode is Mode.LOSSLESS else FALLBACK,
            pipelined=frozenset(n for n, s in self.sources.items() if s.pipelines),
        )
        # One shape policy per source: their acceptance and cost per level differ; the
        # verifier's load is the same for all.
        verifier = VerifierView() if verifier is None else verifier
        self.policies = {
            name: ShapePolicy(
                DraftShape(request.draft.width, request.draft.depth),
                adapt=request.draft.adapt,
                max_nodes=max_tree_nodes,
                verifier=verifier,
            )
            for name in self.sources
        }
        # The target's hidden state before the history's last token, from the last reply.
        self.hidden: torch.Tensor | None = None
        self.generator = (
            None if request.sampling.greedy else make_generator(request.sampling.seed, "cpu")
        )
        self.counters = _Counters()
        self._start = time.monotonic()
        self.connection = VerifierConnection(
            link,
            session_id=self.session_id,
            sampling=request.sampling,
            schedule=request.schedule,
            deadline=None if request.timeout_s is None else self._start + request.timeout_s,
            history=lambda: self.lm.tokens,
            counters=self.counters,
            max_tree_nodes=max_tree_nodes,
            return_hidden=self._hidden_encoding,
            on_open=self._opened,
        )
        self._first_token_ms: float | None = None
        self.last_draft_ms = 0.0

    async def stream(self) -> AsyncIterator[Chunk]:
        self.lm.reset(self.request.prompt_tokens)
        try:
            try:
                # aclosing: a mode's cleanup (cancelling the verifier's decoding) runs
                # when the output is done, not whenever the generator is collected.
                async with contextlib.aclosing(MODES[self.request.mode](self)) as chunks:
                    async for chunk in chunks:
                        if chunk.tokens or chunk.text or chunk.rollback:
                            if self._first_token_ms is None:
                                self._first_token_ms = (time.monotonic() - self._start) * 1000
                            yield chunk
                        if self.out.done:
                            break
            except ContextFull:
                self.out.finish(FinishReason.LENGTH)
            yield Chunk(
                text=self.out.release(final=True),
                verified=True,
                finish_reason=self.out.finish_reason,
                stats=self.stats(),
            )
        finally:
            await self.connection.close()

    def stats(self) -> GenerationStats:
        c = self.counters
        sent, received = self.connection.bytes_in_flight
        derived = dict(
            tokens_per_round=(c.accepted_tokens + c.rounds) / c.rounds if c.rounds else 0.0,
            generated_tokens=len(self.out.tokens),
            prompt_tokens=len(self.request.prompt_tokens),
            bytes_to_cloud=c.bytes_to_cloud + sent,
            bytes_from_cloud=c.bytes_from_cloud + received,
            time_to_first_token_ms=self._first_token_ms or 0.0,
            total_ms=(time.monotonic() - self._start) * 1000,
            accepted_per_position=tuple(c.accepted_per_position),
        )
        return GenerationStats(**dataclasses.asdict(c) | derived)

    # ---- what the modes share ----------------------------------------------------

    def pick(self) -> str:
        """The source for the next round."""
        unready = [n for n, s in self.sources.items() if s.needs_hidden and self.hidden is None]
        return self.choice.pick(unready)

    async def in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def draft(self, name: str = FALLBACK) -> Draft:
        """A draft for the round after the history, by source `name`."""
        start = time.perf_counter()
        context = DraftContext(self.lm, self.hidden, self.request.sampling, self.generator)
        draft = await self.in_thread(self.draft_with, name, context)
        self.last_draft_ms = (time.perf_counter() - start) * 1000
        self.counters.draft_ms += self.last_draft_ms
        return draft

    def draft_with(self, name: str, context: DraftContext) -> Draft:
        """Source `name`'s draft in the shape its policy asks for: an empty tree (a plain
        round, the pending token alone) when the policy asks for none."""
        shape = self.policies[name].shape()
        if shape is None:
            return Draft(TokenTree.chain([]), {}, (), 0, (), drafter=name)
        return self.sources[name].draft(context, shape)

    async def local_token(self) -> tuple[int, float]:
        """The edge's own next token and the SLM's probability of it."""
        logits = await self.in_thread(self.lm.next_logits)
        probs = probs_from_logits(logits.float(), self.request.sampling)
        if self.generator is None:  # greedy: the point mass says nothing; the raw softmax does
            token = int(probs.argmax())
            return token, float(torch.softmax(logits.float(), -1)[token])
        token = int(sample(probs, self.generator))
        return token, float(probs[token])  # the distribution the token was drawn from

    def accept(self, draft: Draft, result: pb.RoundResult, adopt: EdgeLM | None = None) -> Chunk:
        """Applies a round's result; `adopt` is a view that already holds it (pipelining)."""
        tokens = [*result.accepted_tokens, result.bonus_token]
        if adopt is None:
            self.lm.accept(tokens, [draft.node_ids[i] for i in result.accepted_nodes])
        else:
            self.lm = adopt
        self.counters.count_round(draft, result)
        self._take_hidden(result.hidden if result.HasField("hidden") else None)
        round_ms = self.connection.last_round_ms
        self.choice.observe(draft.drafter, len(tokens), self.last_draft_ms, round_ms)
        self.policies[draft.drafter].observe_reply(
            draft.tree, draft.main_path, result, round_ms, self.last_draft_ms
        )
        return self.out.emit(tokens, verified=True)

    def _take_hidden(self, message: pb.HiddenState | None) -> None:
        """Keeps a reply's hidden state for the head's next draft; without a usable one
        (an old verifier, a head made for another target) the SLM drafts, said once."""
        readers = [s for n, s in self.sources.items() if s.needs_hidden and n in self.choice]
        if not readers:
            return
        self.hidden = None
        try:
            encoded = hidden_from_message(message)
        except ValueError as error:
            problem = f"verifier sent a malformed hidden state ({error})"
        else:
            expected = readers[0].hidden_size
            if encoded is None:
                problem = "verifier sent no hidden state (an older verifier?)"
            elif encoded.dim != expected:
                problem = f"hidden state has {encoded.dim} elements, the head expects {expected}"
            else:
                self.hidden = decode_hidden(encoded)
                return
        # The rest of the session drafts with the SLM (pipelined like any SLM session), so
        # this is said once.
        self.choice.fall_back()
        log.warning("%s; drafting with the SLM", problem, extra={"session": self.session_id})

    def _opened(self, opened: pb.SessionOpened, context_length: int) -> None:
        """A session opened: the policies honour its verifier's tree limit, and the head
        drafts the first round from the hidden state it returned."""
        for policy in self.policies.values():
            policy.max_nodes = self.connection.max_tree_nodes
        if context_length > 1:  # one token has nothing before it to send
            self._take_hidden(opened.hidden if opened.HasField("hidden") else None)

    def _hidden_encoding(self) -> HiddenEncoding:
        if not any(s.needs_hidden for n, s in self.sources.items() if n in self.choice):
            return HiddenEncoding.NONE
        return HiddenEncoding[self.request.draft.hidden_encoding.upper()]
