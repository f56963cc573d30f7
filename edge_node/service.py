"""The `Generation` service served by an edge directly (`edgecloud edge serve`), for
an on-device app that talks to localhost, and reused by the orchestrator's gateway."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from grpc import aio

from edge_node.runtime import EdgeRuntime
from edge_node.types import Chunk, GenerationStats
from edgecloud.v1 import generation_pb2 as gpb
from edgecloud.v1 import generation_pb2_grpc as gpb_grpc
from serving.errors import Internal, ServingError, abort_with

log = logging.getLogger(__name__)

FINISH = {
    None: gpb.FINISH_REASON_UNSPECIFIED,
    "length": gpb.FINISH_REASON_LENGTH,
    "stop": gpb.FINISH_REASON_STOP,
}


def stats_to_proto(stats: GenerationStats) -> gpb.GenerationStats:
    return gpb.GenerationStats(
        rounds=stats.rounds,
        tokens_per_round=stats.tokens_per_round,
        cloud_forward_passes=stats.cloud_forward_passes,
        generated_tokens=stats.generated_tokens,
        prompt_tokens=stats.prompt_tokens,
        bytes_to_cloud=stats.bytes_to_cloud,
        bytes_from_cloud=stats.bytes_from_cloud,
        time_to_first_token_ms=stats.time_to_first_token_ms,
        total_ms=stats.total_ms,
        degraded=stats.degraded,
        failovers=stats.failovers,
        draft_tokens=stats.draft_tokens,
        accepted_tokens=stats.accepted_tokens,
        accepted_per_position=stats.accepted_per_position,
        rollbacks=stats.rollbacks,
        head_rounds=stats.head_rounds,
    )


def chunk_to_proto(chunk: Chunk) -> gpb.GenerateChunk:
    msg = gpb.GenerateChunk(
        text=chunk.text,
        tokens=chunk.tokens,
        verified=chunk.verified,
        finish_reason=FINISH[chunk.finish_reason],
    )
    if chunk.rollback is not None:
        msg.rollback.keep_tokens = chunk.rollback.keep_tokens
        msg.rollback.keep_chars = chunk.rollback.keep_chars
    if chunk.stats is not None:
        msg.stats.CopyFrom(stats_to_proto(chunk.stats))
    return msg


class GenerationService(gpb_grpc.GenerationServicer):
    def __init__(self, runtime: EdgeRuntime) -> None:
        self.runtime = runtime

    async def Generate(
        self, request: gpb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[gpb.GenerateChunk]:
        try:
            remaining = context.time_remaining()
            generation = self.runtime.request_from_proto(request, remaining)
            async for chunk in self.runtime.generate(generation):
                yield chunk_to_proto(chunk)
        except ServingError as error:
            await abort_with(context, error)
        except Exception:
            log.exception("generation failed")
            await abort_with(context, Internal("internal error"))

    async def ListModels(
        self, request: gpb.ListModelsRequest, context: aio.ServicerContext
    ) -> gpb.ListModelsResponse:
        roles = ["edge", "cloud"] if self.runtime.link is not None else ["edge"]
        return gpb.ListModelsResponse(
            models=[
                gpb.ModelInfo(
                    name=self.runtime.config.model_name,
                    vocab_size=self.runtime.model.config.vocab_size,
                    max_context=self.runtime.max_context,
                    roles=roles,
                )
            ]
        )
