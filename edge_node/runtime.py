"""An edge's serving state, shared by its gRPC service and its Ray actor: the SLM,
the optional recurrent draft head, the tokenizer, the verifier link, the worker
threads, and load accounting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import jinja2

from edge_node.cloud_link import CloudLink
from edge_node.drafters.sources import make_sources
from edge_node.generation import Generation
from edge_node.metrics import EdgeMetrics
from edge_node.policy import VerifierView
from edge_node.slm import draft_reserve
from edge_node.types import DraftConfig, GenerationRequest
from lm.draft_head import DraftHead
from lm.model import Transformer
from lm.sampling import SamplingParams
from lm.tokenizer import Tokenizer
from protocol.errors import InvalidRequest, NotFound, ResourceExhausted
from protocol.types import ChatMessage, Chunk, GenerationStats, Mode, Request, Schedule
from protocol.v1 import generation_pb2 as gpb


@dataclass(frozen=True)
class EdgeConfig:
    model_name: str
    # Generations running at once; more get RESOURCE_EXHAUSTED.
    max_concurrency: int = 16
    # Worker threads for SLM forward passes.
    threads: int = 2
    draft: DraftConfig = DraftConfig()
    adaptive_threshold: float = 0.9
    # Largest tree the verifiers take (their --max-tree-nodes).
    max_tree_nodes: int = 64

    def __post_init__(self) -> None:
        if not 1 <= self.max_concurrency <= 4096:
            raise ValueError(f"max_concurrency: must be in [1, 4096], got {self.max_concurrency}")
        if not 1 <= self.threads <= 64:
            raise ValueError(f"threads: must be in [1, 64], got {self.threads}")


@dataclass
class EdgeLoad:
    active: int = 0
    completed: int = 0
    rounds: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    failovers: int = 0
    last: GenerationStats = field(default_factory=GenerationStats)

    @property
    def tokens_per_round(self) -> float:
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0


class EdgeRuntime:
    def __init__(
        self,
        model: Transformer,
        config: EdgeConfig,
        *,
        tokenizer: Tokenizer | None = None,
        link: CloudLink | None = None,
        head: DraftHead | None = None,
    ) -> None:
        """`head`: ReDrafter's draft head for the verifiers' target, needed by
        `config.draft.drafter` "head" and "auto"."""
        if head is not None and head.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"head: its vocabulary has {head.config.vocab_size} tokens, the SLM's "
                f"{model.config.vocab_size}"
            )
        make_sources(config.draft.drafter, tree=config.draft.tree, head=head)  # raises if not
        self.model = model
        self.head = head
        self.config = config
        self.tokenizer = tokenizer
        self.link = link
        self.load = EdgeLoad()
        # The verifier's load as this edge's generations heard it, each starting from it.
        self.verifier = VerifierView()
        self.metrics = EdgeMetrics(model, lambda: self.load.active, config.max_concurrency)
        self.executor = ThreadPoolExecutor(config.threads, thread_name_prefix="edge-slm")

    @property
    def max_context(self) -> int:
        return self.model.config.max_seq_len

    def resolve(
        self, request: Request, timeout_s: float | None, request_id: str = ""
    ) -> GenerationRequest:
        """`request` (checked where it was built) against this model: its vocabulary,
        context and tokenizer, and the drafters and trees this edge offers."""
        options = request.options
        request.check_fits(vocab_size=self.model.config.vocab_size, max_context=self.max_context)
        if options.model and options.model != self.config.model_name:
            # NOT_FOUND (HTTP 404, OpenAI's model_not_found), as the gateway answers a
            # model no node serves: a client does not retry it.
            raise NotFound(
                f"model: this edge serves {self.config.model_name!r}, got {options.model!r}"
            )
        if isinstance(request.prompt, str):
            prompt = tuple(self._tokenizer("prompt").encode(request.prompt))
        elif request.messages:
            prompt = self._chat_prompt(request.messages)
        else:
            prompt = request.prompt_tokens
        if not prompt:
            raise InvalidRequest("prompt: encodes to no tokens")
        # Drafting needs cache room past the history: one round's tree, and the next
        # one's, drafted while the first is verified (the verifier reserves as much).
        reserve = draft_reserve(self.config.max_tree_nodes)
        room = self.max_context - 1 - reserve - len(prompt)
        if room < 1:
            raise InvalidRequest(
                f"prompt: {len(prompt)} tokens leave no room in the "
                f"{self.max_context}-token context, {reserve} of which drafts need"
            )
        default, asked = self.config.draft, options.draft
        try:  # the names: what this edge offers (the SDK only checked they are names)
            draft = replace(
                default,
                tree=asked.tree or default.tree,
                width=asked.width or default.width,
                depth=asked.depth or default.depth,
                drafter=asked.drafter or default.drafter,
                adapt=default.adapt and not (asked.width or asked.depth),
            )
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        mode = Mode(options.mode)
        return GenerationRequest(
            prompt_tokens=prompt,
            # cloud_only never runs the SLM: the verifier's context bounds it (`length`).
            max_tokens=options.max_tokens
            if mode is Mode.CLOUD_ONLY
            else min(options.max_tokens, room),
            sampling=SamplingParams(
                temperature=options.temperature,
                top_k=options.top_k,
                top_p=options.top_p,
                seed=options.seed,
            ),
            mode=mode,
            stop=options.stop,
            ignore_eos=options.ignore_eos,
            draft=draft,
            adaptive_threshold=options.adaptive_threshold or self.config.adaptive_threshold,
            schedule=Schedule(options.priority, options.tpot_slo_ms),
            timeout_s=timeout_s,
            request_id=request_id,
        )

    def _tokenizer(self, field: str) -> Tokenizer:
        if self.tokenizer is None:
            raise InvalidRequest(f"{field}: this model has no tokenizer; send prompt_tokens")
        return self.tokenizer

    def _chat_prompt(self, messages: Sequence[ChatMessage]) -> tuple[int, ...]:
        """The tokenizer's chat template rendered for `messages`; a template's own refusal
        (raise_exception: "roles must alternate", ...) is the client's error."""
        chat = [{"role": m.role, "content": m.content} for m in messages]
        tokenizer = self._tokenizer("messages")
        try:
            return tuple(tokenizer.chat_prompt_ids(chat))
        except jinja2.TemplateError as error:
            raise InvalidRequest(f"messages: the chat template refused them: {error}") from None

    def models(self) -> list[gpb.ModelInfo]:
        """What this edge serves, for ListModels and the HTTP front's /v1/models."""
        roles = ["edge", "cloud"] if self.link is not None else ["edge"]
        info = gpb.ModelInfo(
            name=self.config.model_name,
            vocab_size=self.model.config.vocab_size,
            max_context=self.max_context,
            roles=roles,
        )
        return [info]

    def serve(self, request: Request, timeout_s: float | None) -> AsyncIterator[gpb.GenerateChunk]:
        """The one entry of the gRPC service, the gateway's actor and the HTTP front:
        the client's request in, wire chunks out, measured by `metrics.requests`."""

        async def chunks() -> AsyncGenerator[gpb.GenerateChunk, None]:
            async with contextlib.aclosing(
                self.generate(self.resolve(request, timeout_s))
            ) as generated:
                async for chunk in generated:
                    yield chunk.to_proto()

        return self.metrics.requests.observe(Mode(request.options.mode), chunks())

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self.load.active >= self.config.max_concurrency:
            raise ResourceExhausted(
                f"max_concurrency: all {self.config.max_concurrency} generation slots are busy"
            )
        if request.mode.uses_cloud and self.link is None:
            raise InvalidRequest(f"mode: {request.mode.value} needs a verifier; this edge has none")
        try:
            generation = Generation(
                request,
                self.model,
                link=self.link,
                model_name=self.config.model_name,
                tokenizer=self.tokenizer,
                executor=self.executor,
                max_tree_nodes=self.config.max_tree_nodes,
                head=self.head,
                verifier=self.verifier,
            )
        except ValueError as error:  # a drafter or tree this edge does not offer
            raise InvalidRequest(str(error)) from error
        self.load.active += 1
        try:
            async for chunk in generation.stream():
                if chunk.stats is not None:
                    self._record(chunk.stats)
                yield chunk
        finally:
            self.load.active -= 1

    def _record(self, stats: GenerationStats) -> None:
        self.load.completed += 1
        self.load.rounds += stats.rounds
        self.load.draft_tokens += stats.draft_tokens
        self.load.accepted_tokens += stats.accepted_tokens
        self.load.failovers += stats.failovers
        self.load.last = stats
        self.metrics.speculative.record(stats)

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)
