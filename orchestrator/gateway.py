"""The client-facing gateway: `Generation` over gRPC, routed to EdgeNode Ray actors.

Each request takes a slot on an edge serving its model (power of two choices on
load, from Redis), streams that edge's chunks back, and releases the slot. The
remaining deadline goes on to the edge, which passes it to its verifier calls. An
edge that dies before the first chunk is retried on another one; after that the
client gets UNAVAILABLE (its SDK retries only before the first token, too).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

import ray
from grpc import aio
from prometheus_client import CollectorRegistry, Counter
from ray.exceptions import RayActorError, RayError, RayTaskError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from orchestrator.placement import AsyncPlacement, RegistryUnavailable
from orchestrator.registry import AsyncRegistry, check_model
from protocol.errors import (
    EdgecloudError,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    ServerError,
    Unavailable,
)
from protocol.types import Mode, Request
from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import generation_pb2_grpc as gpb_grpc
from serving.errors import abort_with
from serving.metrics import RequestMetrics

log = logging.getLogger(__name__)

EDGE_ATTEMPTS = 3
# How long ListModels waits for an edge to report a model's vocabulary and context.
EDGE_MODELS_TIMEOUT_S = 2.0


def edge_actor_name(node_id: str) -> str:
    return f"edgecloud-edge-{node_id}"


class Gateway(gpb_grpc.GenerationServicer):
    def __init__(
        self,
        placement: AsyncPlacement,
        registry: AsyncRegistry,
        default_model: str,
        namespace: str,
    ) -> None:
        self.placement = placement
        self.registry = registry
        self.default_model = default_model
        self.namespace = namespace
        # Each model's ModelInfo as an edge serving it reported it (vocabulary, context).
        self._served: dict[str, gpb.ModelInfo] = {}
        self.metrics = CollectorRegistry()
        self.requests = RequestMetrics(self.metrics)
        self.edge_retries = Counter(
            "edgecloud_gateway_edge_retries",
            "Requests sent to another edge after one failed before its first chunk",
            registry=self.metrics,
        )

    async def Generate(
        self, request: gpb.GenerateRequest, context: aio.ServicerContext
    ) -> AsyncIterator[gpb.GenerateChunk]:
        try:
            parsed = self.requests.admit(request)
            async for chunk in self.route(parsed, context.time_remaining()):
                yield chunk
        except EdgecloudError as error:
            await abort_with(context, error)
        except Exception:
            log.exception("gateway failed")
            await abort_with(context, ServerError("internal error"))

    def route(self, request: Request, timeout_s: float | None) -> AsyncIterator[gpb.GenerateChunk]:
        """Streams the chunks of one request from an edge actor; raises EdgecloudError.

        Shared by the gRPC service and the OpenAI-compatible HTTP front, and measured
        for both (`metrics`). The edge gets `request` as it is: checked once, here or
        where the HTTP front built it, and resolved against the model there.
        """
        return self.requests.observe(Mode(request.options.mode), self._route(request, timeout_s))

    async def _route(
        self, request: Request, timeout_s: float | None
    ) -> AsyncGenerator[gpb.GenerateChunk, None]:
        model = request.options.model or self.default_model
        try:
            check_model("model", model)
        except ValueError as error:
            raise InvalidRequest(str(error)) from None
        tried: list[str] = []
        for _ in range(EDGE_ATTEMPTS):
            try:
                lease = await self.placement.pick("edge", model, exclude=tried)
                if lease is None:
                    raise await self._no_edge(model, tried)
            except (RegistryUnavailable, RedisConnectionError, RedisTimeoutError) as error:
                raise Unavailable("registry: unreachable, retry shortly") from error
            streamed, stream = False, None
            try:
                actor = ray.get_actor(edge_actor_name(lease.node_id), self.namespace)
                stream = actor.serve.remote(request, timeout_s)
                async for ref in stream:
                    yield await ref
                    streamed = True
                stream = None
                return
            except RayTaskError as error:  # the edge raised: pass its own error on
                if isinstance(error.cause, EdgecloudError):
                    raise error.cause from None
                raise
            except (RayActorError, ValueError) as error:  # dead or unknown actor
                if streamed:
                    raise Unavailable(f"edge {lease.node_id} failed mid-stream") from error
                log.warning("edge unavailable; trying another", extra={"edge": lease.node_id})
                self.edge_retries.inc()
                tried.append(lease.node_id)
            finally:
                if stream is not None:  # the client went away: stop the edge's work
                    ray.cancel(stream)
                await self.placement.release(lease)
        raise Unavailable(f"edges {', '.join(tried)} failed")

    async def _no_edge(self, model: str, tried: list[str]) -> EdgecloudError:
        edges = await self.registry.list_nodes(kind="edge", model=model)
        if not edges:
            # A model this stack serves whose edges are all away (restarting) is worth a
            # retry (503); one nothing serves is not (404: clients do not retry it).
            if model == self.default_model or await self.registry.list_nodes(model=model):
                return Unavailable(f"model: no edge node serves {model!r} right now")
            return NotFound(f"model: no node serves {model!r}")
        if tried:
            return Unavailable(f"edges {', '.join(tried)} failed and no other is free")
        return ResourceExhausted(f"every edge serving {model!r} is at capacity")

    async def ListModels(
        self, request: gpb.ListModelsRequest, context: aio.ServicerContext
    ) -> gpb.ListModelsResponse:
        return gpb.ListModelsResponse(models=await self.models())

    async def models(self) -> list[gpb.ModelInfo]:
        """Every model some live node serves, with the roles serving it, and its
        vocabulary and context as an edge serving it reports them (asked once per model;
        0 while no edge answers: the registry holds names only)."""
        roles: dict[str, set[str]] = {}
        edges: dict[str, list[str]] = {}
        for node in await self.registry.list_nodes():
            for model in node.info.models:
                roles.setdefault(model, set()).add(node.info.kind)
                if node.info.kind == "edge":
                    edges.setdefault(model, []).append(node.info.node_id)
        for model, node_ids in edges.items():
            for node_id in node_ids:
                if model in self._served:
                    break
                for info in await self._edge_models(node_id):
                    self._served[info.name] = info
        infos = []
        for name, kinds in sorted(roles.items()):
            info = gpb.ModelInfo(name=name, roles=sorted(kinds))
            if name in self._served:
                info.vocab_size = self._served[name].vocab_size
                info.max_context = self._served[name].max_context
            infos.append(info)
        return infos

    async def _edge_models(self, node_id: str) -> list[gpb.ModelInfo]:
        """What an edge actor serves (`EdgeNode.models`); [] if it does not answer."""
        try:
            actor = ray.get_actor(edge_actor_name(node_id), self.namespace)
            return await asyncio.wait_for(actor.models.remote(), EDGE_MODELS_TIMEOUT_S)
        except (RayError, ValueError, TimeoutError) as error:  # dead, unknown or slow
            log.info("edge did not list its models", extra={"edge": node_id, "error": str(error)})
            return []
