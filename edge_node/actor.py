"""`EdgeNode`: the edge as an async Ray actor.

Ray places it on a node labelled or resourced as edge and restarts it when it dies
(`max_restarts` is set by whoever creates it, see `orchestrator`). `generate` is an
async generator, so Ray streams each `Chunk` back as soon as it is yielded. The
actor loads its own model from disk: nothing heavier than a path crosses Ray.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from edge_node.cloud_link import CloudLink, CloudLinkConfig
from edge_node.picker import VerifierPicker
from edge_node.runtime import EdgeConfig, EdgeRuntime
from edge_node.types import GenerationRequest
from protocol.types import Chunk
from protocol.v1 import generation_pb2 as gpb


@dataclass(frozen=True)
class EdgeLoadReport:
    node_id: str
    active: int
    completed: int
    tokens_per_round: float
    failovers: int
    rounds: int
    draft_tokens: int
    accepted_tokens: int


class EdgeNode:
    def __init__(
        self,
        node_id: str,
        model_dir: str,
        config: EdgeConfig,
        picker_factory: Callable[[], VerifierPicker] | None,
        link_config: CloudLinkConfig = CloudLinkConfig(),
        device: str = "cpu",
        flash_budget_mb: float | None = None,
        head_dir: str | None = None,
        dtype: str | None = None,
        quantize: str | None = None,
    ) -> None:
        """`head_dir`: a draft head for the verifiers' target (DraftConfig.drafter).
        `flash_budget_mb`: `model_dir` is a flash pack run within this much DRAM.
        `dtype`: the SLM's float32/float16/bfloat16 (None: the device's default).
        `quantize`: int4/int8 weights for the SLM (`load_edge_models`)."""
        import torch

        from edge_node.models import load_edge_models

        models = load_edge_models(
            model_dir,
            device=device,
            dtype=None if dtype is None else getattr(torch, dtype),
            flash_budget_mb=flash_budget_mb,
            head_dir=head_dir,
            quantize=quantize,
        )
        link = None if picker_factory is None else CloudLink(picker_factory(), link_config)
        self.node_id = node_id
        self.runtime = EdgeRuntime(
            models.slm, config, tokenizer=models.tokenizer, link=link, head=models.head
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Chunk]:
        async for chunk in self.runtime.generate(request):
            yield chunk

    async def models(self) -> list[gpb.ModelInfo]:
        """What this edge serves, with its vocabulary and context: the gateway's
        ListModels and /v1/models ask one edge per model (the registry has names only)."""
        return self.runtime.models()

    async def load(self) -> EdgeLoadReport:
        load = self.runtime.load
        return EdgeLoadReport(
            node_id=self.node_id,
            active=load.active,
            completed=load.completed,
            tokens_per_round=load.tokens_per_round,
            failovers=load.failovers,
            rounds=load.rounds,
            draft_tokens=load.draft_tokens,
            accepted_tokens=load.accepted_tokens,
        )
