"""Bringing the whole system up: Redis, Ray, verifiers, edges and the gateway.

`Stack.start()` is what `edgecloud up` and `edgecloud demo` run. On one machine it
starts a private Redis and a local Ray whose node offers both `edge` and `cloud`
resources; with `ray_address` it attaches to a cluster whose nodes advertise those
resources (see deploy/cluster.yaml). Two credentials are in play, never logged: the
clients' token for the gateway, and a separate one for edge-to-verifier calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import ray

from cloud_node.config import VerifierConfig
from edge_node.cloud_link import CloudLinkConfig
from edge_node.drafters.sources import needs_head
from edge_node.runtime import EdgeConfig
from edge_node.types import DraftConfig
from lm.quantized import SCHEMES as QUANT_SCHEMES
from orchestrator.actors import EdgeActor, NodeSpec, VerifierActor
from orchestrator.gateway import Gateway, edge_actor_name
from orchestrator.placement import AsyncPlacement
from orchestrator.redis_server import RedisServer
from orchestrator.registry import AsyncRegistry, check_labels, connect_async, redact_url
from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import generation_pb2_grpc as gpb_grpc
from serving.auth import AuthConfig
from serving.http.app import create_app
from serving.http.schema import HttpConfig
from serving.http.server import HttpServer, start_http_server
from serving.server import RunningServer, ServerConfig, TlsConfig, start_server

log = logging.getLogger(__name__)

GATEWAY_SERVICE = gpb.DESCRIPTOR.services_by_name["Generation"].full_name


@dataclass(frozen=True)
class StackConfig:
    target_dir: Path
    draft_dir: Path
    # Name clients and verifiers use for the target (default: its directory name).
    model_name: str = ""
    edges: int = 2
    # Verifier actors to start; 0 when every verifier runs outside Ray (`edgecloud cloud
    # serve --redis-url`, authenticating with `Stack.internal_token`) and registers itself.
    verifiers: int = 1
    # None: start a private Redis. Otherwise redis://[user:password@]host:port/db.
    redis_url: str | None = None
    # None: a local Ray. "auto" or an address: attach to that cluster.
    ray_address: str | None = None
    namespace: str = "edgecloud"
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 50051
    # Also serve the OpenAI-compatible HTTP API (serving/http/) on
    # gateway_host at this port, with the same client token; 0 picks a free port.
    http_port: int | None = None
    # The gateway's Prometheus /metrics on gateway_host at this port, without a token;
    # the HTTP API serves it too, with one. When set, each verifier and edge actor also
    # serves its own on a free port of its node, registered as its metrics_address.
    metrics_port: int | None = None
    # TLS for the gateway and the HTTP API; with tls.client_ca, clients must present a
    # certificate that CA signed (mutual TLS). None: plaintext.
    tls: TlsConfig | None = None
    # The clients' bearer token; None with insecure_no_auth False generates one.
    client_token: str | None = None
    # The token edges present to verifiers; None generates one per run. Give one to let
    # verifiers started outside Ray (`edgecloud cloud serve --redis-url`) join the fleet.
    verifier_token: str | None = None
    insecure_no_auth: bool = False
    # Sessions per verifier actor; None: 32, or as many as `verifier_kv_cache_gb` holds.
    max_sessions: int | None = None
    # Each verifier's KV-cache budget in GB (`edgecloud cloud serve --kv-cache-gb`).
    verifier_kv_cache_gb: float | None = None
    max_tree_nodes: int = 64
    edge_concurrency: int = 16
    draft: DraftConfig = DraftConfig()
    # A draft head for the target, loaded by every edge; needed by draft.drafter head/auto.
    head_dir: Path | None = None
    # draft_dir is a flash pack (`edgecloud flash pack`): each edge keeps the SLM's weights
    # within this much DRAM, reading FFN neurons from flash as it needs them.
    draft_flash_budget_mb: float | None = None
    # The edges' SLM dtype (float32/float16/bfloat16); None: the device's default. float16
    # halves the resident part of a flash pack's budget.
    draft_dtype: str | None = None
    # The edges' SLM weights as int4 or int8 codes (lm.quantized), or None for draft_dtype.
    draft_quantize: str | None = None
    # Labels every node registers (region, tier, ...); a Ray node's own labels override
    # them for the actors on it (orchestrator/actors.py `node_labels`).
    labels: dict[str, str] = field(default_factory=dict)
    # GPUs each verifier actor asks Ray for. None: 1 on a cluster (`ray_address`; the
    # autoscaler adds a GPU node for a verifier waiting for one), and on one machine 1
    # when it has a GPU, else 0.
    verifier_gpus: float | None = None
    # Extra delay on every edge-to-verifier round trip, to show a WAN on one machine.
    simulated_rtt_ms: float = 0.0
    # A verifier that leaves a round unanswered this long is treated as failed: the
    # edge reopens the session on another one.
    round_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not 1 <= self.edges <= 256:
            raise ValueError(f"edges: must be in [1, 256], got {self.edges}")
        if not 0 <= self.verifiers <= 256:
            raise ValueError(f"verifiers: must be in [0, 256], got {self.verifiers}")
        if self.verifier_gpus is not None and not 0 <= self.verifier_gpus <= 8:
            raise ValueError(f"verifier_gpus: must be in [0, 8], got {self.verifier_gpus}")
        if self.ray_address is not None and self.redis_url is None:
            raise ValueError(
                "redis_url: needed with ray_address: one Redis every node reaches "
                "(deploy/cluster.yaml starts one on the head)"
            )
        check_labels("labels", self.labels)
        if not 0 < self.round_timeout_s <= 600:
            raise ValueError(f"round_timeout_s: must be in (0, 600], got {self.round_timeout_s}")
        for name in ("http_port", "metrics_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name}: must be in [0, 65535], got {value}")
        for name in ("target_dir", "draft_dir"):
            if not Path(getattr(self, name)).exists():
                raise ValueError(f"{name}: {getattr(self, name)} does not exist")
        if self.tls is not None:
            for name in ("cert", "key", "client_ca"):
                path = getattr(self.tls, name)
                if path is not None and not Path(path).is_file():
                    raise ValueError(f"tls.{name}: {path} is not a file")
        if self.head_dir is not None and not Path(self.head_dir).exists():
            raise ValueError(f"head_dir: {self.head_dir} does not exist")
        if needs_head(self.draft.drafter) and self.head_dir is None:
            raise ValueError(f"head_dir: needed with draft.drafter {self.draft.drafter!r}")
        flash_pack = (Path(self.draft_dir) / "manifest.json").is_file()
        if self.draft_flash_budget_mb is not None:
            if not self.draft_flash_budget_mb > 0:
                raise ValueError(
                    f"draft_flash_budget_mb: must be > 0, got {self.draft_flash_budget_mb}"
                )
            if not flash_pack:
                raise ValueError(
                    f"draft_dir: {self.draft_dir} is not a flash pack (no manifest.json), "
                    "as draft_flash_budget_mb needs"
                )
        if self.draft_dtype not in (None, "float32", "float16", "bfloat16"):
            raise ValueError(
                f"draft_dtype: must be float32, float16 or bfloat16, got {self.draft_dtype!r}"
            )
        if self.draft_quantize is not None:
            if self.draft_quantize not in QUANT_SCHEMES:
                raise ValueError(
                    f"draft_quantize: must be one of {', '.join(QUANT_SCHEMES)}, "
                    f"got {self.draft_quantize!r}"
                )
            if self.draft_flash_budget_mb is not None or self.draft_dtype is not None:
                raise ValueError(
                    "draft_quantize: not with draft_flash_budget_mb or draft_dtype "
                    "(a quantized SLM computes in float32 from its codes)"
                )
            if flash_pack:
                raise ValueError(
                    f"draft_quantize: not with a flash pack draft_dir ({self.draft_dir} holds "
                    "manifest.json); quantize a checkpoint (a model directory or a .gguf file)"
                )

    @property
    def served_name(self) -> str:
        return self.model_name or Path(self.target_dir).name


def actor_redis_url(url: str, head_ip: str) -> str:
    """`url` with a loopback host replaced by `head_ip`; other URLs unchanged."""
    parts = urlsplit(url)
    if parts.hostname not in ("localhost", "127.0.0.1", "::1"):
        return url
    host = f"[{head_ip}]" if ":" in head_ip else head_ip
    credentials = parts.netloc.rpartition("@")[0]
    netloc = f"{credentials}@{host}" if credentials else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def driver_node_ip() -> str:
    """The address of the Ray node this process (`up`, on the head) is attached to, as
    the cluster knows it: what actors on other nodes dial to reach this machine."""
    node_id = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)


async def cluster_redis_url(url: str, head_ip: str) -> str:
    """The Redis URL as actors on other nodes dial it (`actor_redis_url`), checked from
    here first, so a Redis listening on loopback only fails with a message, not a hang."""
    resolved = actor_redis_url(url, head_ip)
    if resolved == url:
        return url
    client = connect_async(resolved)
    try:
        await asyncio.wait_for(client.ping(), 10)
    except Exception as error:
        raise RuntimeError(
            f"redis_url: Redis is not reachable at {redact_url(resolved)} (the head's "
            f"address, for actors on other nodes): {type(error).__name__}; start it with "
            "--bind 0.0.0.0 and a password, or give a URL every node reaches"
        ) from None
    finally:
        await client.aclose()
    return resolved


class Stack:
    def __init__(self, config: StackConfig, progress: Callable[[str], None] = lambda _: None):
        self.config = config
        self.progress = progress
        self.redis: RedisServer | None = None
        self.redis_url = config.redis_url
        self.gateway: RunningServer | None = None
        self.http: HttpServer | None = None
        self.client_token = config.client_token
        if self.client_token is None and not config.insecure_no_auth:
            self.client_token = secrets.token_urlsafe(24)
        self.internal_token = config.verifier_token or secrets.token_urlsafe(24)
        self.verifier_actors: list = []
        self.edge_actors: list = []
        self._started_ray = False
        self._gateway_redis = None  # the gateway's Redis client, closed with it

    @property
    def gateway_address(self) -> str:
        return f"{self.config.gateway_host}:{self.gateway.port}"

    @property
    def gateway_metrics_address(self) -> str | None:
        endpoint = self.gateway.metrics
        return None if endpoint is None else f"{self.config.gateway_host}:{endpoint.port}"

    @property
    def http_address(self) -> str:
        return f"{self.config.gateway_host}:{self.http.port}"

    async def start(self) -> Stack:
        config = self.config
        if self.redis_url is None:
            self.progress("starting a private Redis")
            self.redis = RedisServer().start()
            self.redis_url = self.redis.url
        self.progress("starting Ray" if config.ray_address is None else "attaching to Ray")
        self._start_ray()
        local = config.ray_address is None
        bind = "127.0.0.1" if local else "0.0.0.0"
        if not local:
            actors_redis = await cluster_redis_url(self.redis_url, driver_node_ip())
        else:
            actors_redis = self.redis_url
        gpus = config.verifier_gpus
        if gpus is None:
            gpus = 1 if not local or ray.cluster_resources().get("GPU", 0) > 0 else 0
        self.progress(f"starting {config.verifiers} verifier(s) for {config.served_name!r}")
        verifier = ray.remote(VerifierActor).options(
            resources={"cloud": 1}, num_cpus=0, num_gpus=gpus, max_restarts=3
        )
        # With a gateway metrics port, every actor serves its own /metrics on a free
        # port of its node (registered as its metrics_address; `edgecloud status`).
        metrics_host = None if config.metrics_port is None else bind
        advertise = "127.0.0.1" if local else None
        internal = ServerConfig(
            host=bind,
            port=0,
            auth=AuthConfig(token=self.internal_token),
            metrics_port=None if metrics_host is None else 0,
        )
        for i in range(config.verifiers):
            spec = NodeSpec(f"verifier-{i}", actors_redis, config.labels)
            vconfig = VerifierConfig(
                model_name=config.served_name,
                max_sessions=config.max_sessions,
                kv_cache_gb=config.verifier_kv_cache_gb,
                max_tree_nodes=config.max_tree_nodes,
            )
            self.verifier_actors.append(
                verifier.remote(spec, str(config.target_dir), vconfig, internal, advertise)
            )
        self.progress(f"starting {config.edges} edge actor(s)")
        for i in range(config.edges):
            spec = NodeSpec(f"edge-{i}", actors_redis, config.labels)
            edge = ray.remote(EdgeActor).options(
                name=edge_actor_name(spec.node_id),
                namespace=config.namespace,
                resources={"edge": 1},
                num_cpus=0,
                max_restarts=3,
                max_task_retries=0,
            )
            self.edge_actors.append(
                edge.remote(
                    spec,
                    str(config.draft_dir),
                    EdgeConfig(
                        model_name=config.served_name,
                        max_concurrency=config.edge_concurrency,
                        draft=config.draft,
                        max_tree_nodes=config.max_tree_nodes,
                    ),
                    CloudLinkConfig(
                        token=self.internal_token,
                        simulated_rtt_ms=config.simulated_rtt_ms,
                        round_timeout_s=config.round_timeout_s,
                    ),
                    config.served_name,
                    None if config.head_dir is None else str(config.head_dir),
                    config.draft_flash_budget_mb,
                    config.draft_dtype,
                    config.draft_quantize,
                    metrics_host,
                    advertise,
                )
            )
        if not local:
            self.progress("waiting for the actors' nodes (the autoscaler may be adding some)")
        await asyncio.gather(*(a.ready.remote() for a in self.verifier_actors + self.edge_actors))
        self.progress("starting the gateway")
        await self._start_gateway()
        return self

    def _start_ray(self) -> None:
        if ray.is_initialized():
            return
        kwargs = {"namespace": self.config.namespace, "logging_level": "ERROR"}
        if self.config.ray_address is None:
            kwargs |= {
                "include_dashboard": False,
                "resources": {"edge": 1024, "cloud": 1024},
                "log_to_driver": False,
            }
        else:
            kwargs["address"] = self.config.ray_address
        ray.init(**kwargs)
        self._started_ray = True

    async def restart_gateway(self) -> None:
        """Drops the gateway (and its HTTP front) with every open stream, as a crash would,
        and starts new ones on the same ports that know nothing but what Redis holds."""
        port, http_port = self.gateway.port, None
        await self.gateway.server.stop(grace=0)
        self.gateway = None
        if self.http is not None:
            http_port = self.http.port
            await self.http.stop()
            self.http = None
        await self._close_gateway_redis()
        await self._start_gateway(port, http_port)

    async def _close_gateway_redis(self) -> None:
        if self._gateway_redis is not None:
            await self._gateway_redis.aclose()
            self._gateway_redis = None

    async def _start_gateway(self, port: int | None = None, http_port: int | None = None) -> None:
        client = self._gateway_redis = connect_async(self.redis_url)
        gateway = Gateway(
            AsyncPlacement(client),
            AsyncRegistry(client),
            self.config.served_name,
            self.config.namespace,
        )

        def add(server) -> list[str]:
            gpb_grpc.add_GenerationServicer_to_server(gateway, server)
            return [GATEWAY_SERVICE]

        auth = AuthConfig(token=self.client_token, insecure_no_auth=self.client_token is None)
        self.gateway = await start_server(
            ServerConfig(
                host=self.config.gateway_host,
                port=self.config.gateway_port if port is None else port,
                auth=auth,
                tls=self.config.tls,
                metrics_port=self.config.metrics_port,
            ),
            add,
            gateway.metrics,
        )
        if self.config.http_port is not None:
            http = HttpConfig(auth=auth, default_model=self.config.served_name)
            self.http = await start_http_server(
                create_app(gateway.route, gateway.models, http, gateway.metrics),
                self.config.gateway_host,
                self.config.http_port if http_port is None else http_port,
                tls=self.config.tls,
            )

    async def stop(self) -> None:
        """Stops everything this stack started; safe to call more than once."""
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.gateway is not None:
            await self.gateway.drain()
            self.gateway = None
        await self._close_gateway_redis()
        for actor in self.edge_actors + self.verifier_actors:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(actor.stop.remote(), 10)
            with contextlib.suppress(Exception):
                ray.kill(actor)
        self.edge_actors, self.verifier_actors = [], []
        if self._started_ray:
            ray.shutdown()
            self._started_ray = False
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
