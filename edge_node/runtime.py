"""An edge's serving state, shared by its gRPC service and its Ray actor: the SLM,
the optional recurrent draft head, the tokenizer, the verifier link, the worker
threads, and load accounting."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from edge_node.cloud_link import CloudLink
from edge_node.generation import Generation
from edge_node.types import Chunk, DraftOptions, GenerationRequest, GenerationStats, Mode
from edgecloud._errors import InvalidRequest
from edgecloud._validation import validate_generate_request
from edgecloud.v1 import generation_pb2 as gpb
from lm.draft_head import DraftHead
from lm.model import Transformer
from lm.sampling import SamplingParams
from lm.tokenizer import Tokenizer
from serving.errors import InvalidArgument, ResourceExhausted

MODES = {
    gpb.MODE_UNSPECIFIED: Mode.LOSSLESS,
    gpb.MODE_LOSSLESS: Mode.LOSSLESS,
    gpb.MODE_ADAPTIVE: Mode.ADAPTIVE,
    gpb.MODE_EDGE_ONLY: Mode.EDGE_ONLY,
    gpb.MODE_CLOUD_ONLY: Mode.CLOUD_ONLY,
}


@dataclass(frozen=True)
class EdgeConfig:
    model_name: str
    # Generations running at once; more get RESOURCE_EXHAUSTED.
    max_concurrency: int = 16
    # Worker threads for SLM forward passes.
    threads: int = 2
    draft: DraftOptions = DraftOptions()
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
        check_drafter(config.draft.drafter, head)
        self.model = model
        self.head = head
        self.config = config
        self.tokenizer = tokenizer
        self.link = link
        self.load = EdgeLoad()
        self.executor = ThreadPoolExecutor(config.threads, thread_name_prefix="edge-slm")

    @property
    def max_context(self) -> int:
        return self.model.config.max_seq_len

    def request_from_proto(
        self, msg: gpb.GenerateRequest, timeout_s: float | None, request_id: str = ""
    ) -> GenerationRequest:
        """Checks `msg` with the SDK's rules plus this model's limits."""
        vocab = self.model.config.vocab_size
        try:
            validate_generate_request(msg, vocab_size=vocab, max_context=self.max_context)
        except InvalidRequest as error:
            raise InvalidArgument(str(error)) from error
        if msg.model and msg.model != self.config.model_name:
            raise InvalidArgument(
                f"model: this edge serves {self.config.model_name!r}, got {msg.model!r}"
            )
        if msg.prompt and self.tokenizer is None:
            raise InvalidArgument("prompt: this model has no tokenizer; send prompt_tokens")
        prompt = tuple(self.tokenizer.encode(msg.prompt) if msg.prompt else msg.prompt_tokens)
        if not prompt:
            raise InvalidArgument("prompt: encodes to no tokens")
        # Drafting needs cache room past the history: one round's tree, and the next
        # one's, drafted while the first is verified (the verifier reserves as much).
        reserve = 2 * (self.config.max_tree_nodes + 1)
        room = self.max_context - 1 - reserve - len(prompt)
        if room < 1:
            raise InvalidArgument(
                f"prompt: {len(prompt)} tokens leave no room in the "
                f"{self.max_context}-token context, {reserve} of which drafts need"
            )
        default = self.config.draft
        draft = replace(
            default,
            tree=msg.draft.tree or default.tree,
            width=msg.draft.width or default.width,
            depth=msg.draft.depth or default.depth,
            adapt=default.adapt and not (msg.draft.width or msg.draft.depth),
        )
        return GenerationRequest(
            prompt_tokens=prompt,
            # cloud_only never runs the SLM: the verifier's context bounds it (`length`).
            max_tokens=msg.max_tokens
            if MODES[msg.mode] is Mode.CLOUD_ONLY
            else min(msg.max_tokens, room),
            sampling=SamplingParams(
                temperature=msg.temperature,
                top_k=msg.top_k,
                top_p=msg.top_p,
                seed=msg.seed if msg.HasField("seed") else None,
            ),
            mode=MODES[msg.mode],
            stop=tuple(msg.stop),
            draft=draft,
            adaptive_threshold=msg.adaptive_threshold or self.config.adaptive_threshold,
            timeout_s=timeout_s,
            request_id=request_id,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        if self.load.active >= self.config.max_concurrency:
            raise ResourceExhausted(
                f"max_concurrency: all {self.config.max_concurrency} generation slots are busy"
            )
        if request.mode.uses_cloud and self.link is None:
            raise InvalidArgument(
                f"mode: {request.mode.value} needs a verifier; this edge has none"
            )
        try:
            check_drafter(request.draft.drafter, self.head)
        except ValueError as error:
            raise InvalidArgument(str(error)) from error
        generation = Generation(
            request,
            self.model,
            link=self.link,
            model_name=self.config.model_name,
            tokenizer=self.tokenizer,
            executor=self.executor,
            max_tree_nodes=self.config.max_tree_nodes,
            head=self.head,
        )
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
        self.load.accepted_tokens += stats.accepted_tokens
        self.load.failovers += stats.failovers
        self.load.last = stats

    async def close(self) -> None:
        if self.link is not None:
            await self.link.close()
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown)


def check_drafter(drafter: str, head: DraftHead | None) -> None:
    if drafter != "slm" and head is None:
        raise ValueError(f"draft.drafter: {drafter!r} needs a draft head on this edge (--head DIR)")
