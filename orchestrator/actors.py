"""The Ray actors `edgecloud up` starts, each registered in Redis by a heartbeat.

- `VerifierActor` runs a verifier's gRPC server inside the actor (on a GPU when the
  cluster has one) and registers it as a `cloud` node with its address.
- `EdgeActor` is the `EdgeNode` actor plus registration as an `edge` node, with the
  Redis-backed verifier picker.

Both are async actors: their gRPC servers, heartbeats and generations share the
actor's event loop. Each starts serving and registering from `__init__`, so when Ray
restarts a dead actor (`max_restarts`), the new one is back in rotation by itself.
Nothing heavier than paths and small dataclasses crosses Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ray

from cloud_node.config import VerifierConfig
from edge_node.actor import EdgeNode
from edge_node.cloud_link import CloudLinkConfig
from edge_node.runtime import EdgeConfig
from orchestrator.heartbeat import HeartbeatTask
from orchestrator.registry import (
    AsyncRegistry,
    NodeInfo,
    NodeStats,
    check_labels,
    connect_async,
)
from protocol.types import Request
from protocol.v1 import generation_pb2 as gpb
from serving.metrics import MetricsEndpoint, serve_metrics
from serving.server import ServerConfig

log = logging.getLogger(__name__)


def node_labels(configured: Mapping[str, str]) -> dict[str, str]:
    """The labels this node registers: those `edgecloud up --label` gave every node,
    overridden by this Ray node's own (a node type's `labels` in the cluster YAML,
    `ray start --labels`), so the router can filter on the node's region and tier.
    Ray's own labels (`ray.io/...`) and names the registry cannot hold are left out."""
    labels = dict(configured)
    for key, value in ray.get_runtime_context().get_node_labels().items():
        if key.startswith("ray.io/"):
            continue
        try:
            labels |= check_labels("labels", {key: value})
        except ValueError as error:
            log.info("node label skipped", extra={"reason": str(error)})
    return labels


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    redis_url: str
    labels: dict[str, str] = field(default_factory=dict)
    heartbeat_ttl_s: float = 10.0


class VerifierActor:
    def __init__(
        self,
        spec: NodeSpec,
        model_dir: str,
        config: VerifierConfig,
        server: ServerConfig,
        advertise_host: str | None,
    ) -> None:
        """`advertise_host`: the address edges dial; None means this Ray node's IP."""
        self.spec, self.model_dir, self.config, self.server_config = spec, model_dir, config, server
        self.advertise_host = advertise_host
        self.verifier = None
        self.heartbeat: HeartbeatTask | None = None
        self._started = asyncio.get_running_loop().create_task(self._start())

    async def ready(self) -> str:
        """The address this verifier is reached at, once it serves and is registered."""
        return await self._started

    async def _start(self) -> str:
        from cloud_node.server import start_verifier

        self.verifier = await start_verifier(Path(self.model_dir), self.config, self.server_config)
        host = self.advertise_host or ray.util.get_node_ip_address()
        address = f"{host}:{self.verifier.port}"
        endpoint = self.verifier.server.metrics
        node = NodeInfo(
            node_id=self.spec.node_id,
            kind="cloud",
            address=address,
            models=(self.config.model_name,),
            capacity=self.verifier.engine.config.max_sessions,  # resolved: a budget sets it
            labels=node_labels(self.spec.labels),
            metrics_address="" if endpoint is None else f"{host}:{endpoint.port}",
        )
        metrics = self.verifier.engine.metrics
        self.heartbeat = HeartbeatTask(
            AsyncRegistry(connect_async(self.spec.redis_url)),
            node,
            ttl_s=self.spec.heartbeat_ttl_s,
            stats=lambda: NodeStats(**metrics.totals),
        )
        await self.heartbeat.start()
        return address

    async def forward_passes(self) -> int:
        return self.verifier.engine.forward_passes

    async def stop(self) -> None:
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self.verifier is not None:
            await self.verifier.drain()


def _registry_picker(redis_url: str, model: str):
    from orchestrator.verifier_picker import RegistryPicker

    return RegistryPicker(redis_url, model)


class EdgeActor(EdgeNode):
    def __init__(
        self,
        spec: NodeSpec,
        model_dir: str,
        config: EdgeConfig,
        link_config: CloudLinkConfig,
        verifier_model: str,
        head_dir: str | None = None,
        flash_budget_mb: float | None = None,
        dtype: str | None = None,
        quantize: str | None = None,
        metrics_host: str | None = None,
        advertise_host: str | None = None,
    ) -> None:
        """`metrics_host`: serve Prometheus /metrics on a free port of this address and
        register it (None: no endpoint); `advertise_host` as the verifier's."""
        super().__init__(
            spec.node_id,
            model_dir,
            config,
            lambda: _registry_picker(spec.redis_url, verifier_model),
            link_config,
            head_dir=head_dir,
            flash_budget_mb=flash_budget_mb,
            dtype=dtype,
            quantize=quantize,
        )
        self.spec = spec
        self.heartbeat: HeartbeatTask | None = None
        self.metrics: MetricsEndpoint | None = None
        if metrics_host is not None:
            self.metrics = serve_metrics(self.runtime.metrics.registry, metrics_host, 0)
        self.advertise_host = advertise_host
        self._started = asyncio.get_running_loop().create_task(self._start())

    async def ready(self) -> str:
        return await self._started

    async def _start(self) -> str:
        metrics_address = ""
        if self.metrics is not None:
            host = self.advertise_host or ray.util.get_node_ip_address()
            metrics_address = f"{host}:{self.metrics.port}"
        node = NodeInfo(
            node_id=self.spec.node_id,
            kind="edge",
            address=f"ray:{self.spec.node_id}",
            models=(self.runtime.config.model_name,),
            capacity=self.runtime.config.max_concurrency,
            labels=node_labels(self.spec.labels),
            metrics_address=metrics_address,
        )
        load = self.runtime.load
        self.heartbeat = HeartbeatTask(
            AsyncRegistry(connect_async(self.spec.redis_url)),
            node,
            ttl_s=self.spec.heartbeat_ttl_s,
            stats=lambda: NodeStats(
                rounds=load.rounds,
                proposed_tokens=load.draft_tokens,
                accepted_tokens=load.accepted_tokens,
            ),
        )
        await self.heartbeat.start()
        return self.spec.node_id

    async def serve(
        self, request: Request, timeout_s: float | None
    ) -> AsyncIterator[gpb.GenerateChunk]:
        """The gateway's entry: the request it parsed in, wire chunks out (resolved here,
        where the model's vocabulary and tokenizer are)."""
        async for chunk in self.runtime.serve(request, timeout_s):
            yield chunk

    async def stop(self) -> None:
        if self.heartbeat is not None:
            await self.heartbeat.stop()
        if self.metrics is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.metrics.stop)
        await self.runtime.close()
