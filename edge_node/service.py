"""The `Generation` service served by an edge directly (`edgecloud edge serve`), for
an on-device app that talks to localhost, and reused by the orchestrator's gateway."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from grpc import aio

from edge_node.runtime import EdgeRuntime
from protocol.errors import EdgecloudError, ServerError
from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import generation_pb2_grpc as gpb_grpc
from serving.errors import abort_with

log = logging.getLogger(__name__)


class GenerationService(gpb_grpc.GenerationServicer):
    def __init__(self, runtime: EdgeRuntime) -> None:
        self.runtime = runtime

    async def Generate(
        self, request: gpb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[gpb.GenerateChunk]:
        try:
            parsed = self.runtime.metrics.requests.admit(request)
            async for chunk in self.runtime.serve(parsed, context.time_remaining()):
                yield chunk
        except EdgecloudError as error:
            await abort_with(context, error)
        except Exception:
            log.exception("generation failed")
            await abort_with(context, ServerError("internal error"))

    async def ListModels(
        self, request: gpb.ListModelsRequest, context: aio.ServicerContext
    ) -> gpb.ListModelsResponse:
        return gpb.ListModelsResponse(models=self.runtime.models())
