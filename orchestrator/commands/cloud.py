"""`edgecloud cloud serve`: run a verifier for one target model."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from cloud_node.config import ATTENTION_KERNELS, BATCH_INVARIANT_CHOICES
from orchestrator.commands.flags import add_server_flags, dtype_flag, server_config, torch_dtype
from orchestrator.usage import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    cloud = subparsers.add_parser("cloud", help="cloud verifier commands")
    sub = cloud.add_subparsers(title="cloud commands", metavar="COMMAND", required=True)
    serve = sub.add_parser("serve", help="serve Verifier.Verify for a target model")
    serve.add_argument(
        "--model", required=True, type=Path, help="target checkpoint directory or .bin"
    )
    serve.add_argument("--name", help="model name clients send (default: the directory name)")
    serve.add_argument("--device", help="cuda, cuda:N or cpu (default: CUDA when present)")
    dtype_flag(serve)
    add_server_flags(serve, default_port=50061)
    serve.add_argument(
        "--max-sessions",
        type=int,
        help="concurrent sessions, each holding one preallocated KV-cache row, in [1, 4096] "
        "(default: 32, or as many as --kv-cache-gb holds)",
    )
    serve.add_argument(
        "--kv-cache-gb",
        type=float,
        help="KV-cache budget in GB (10^9 bytes): --max-context stays, and the sessions are "
        "floor(budget / bytes a session takes), at most 4096; a session takes (context + "
        "2 x max-tree-nodes + 2) positions x 2 x layers x KV heads x head dim x dtype size. "
        "Refused when no session fits, or fewer than --max-sessions (default: none; "
        "--max-sessions decides)",
    )
    serve.add_argument(
        "--max-context", type=int, help="tokens per session (default: what the model allows)"
    )
    serve.add_argument(
        "--max-tree-nodes",
        type=int,
        default=64,
        help="most draft nodes in one round, in [1, 4096] (default: %(default)s)",
    )
    serve.add_argument(
        "--session-ttl",
        type=float,
        default=120.0,
        help="seconds idle before a session is freed (default: %(default)s)",
    )
    serve.add_argument(
        "--batch-window-ms",
        type=float,
        default=3.0,
        help="how long a batch's first round waits for other sessions' rounds, in [0, 1000] "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--max-batch",
        type=int,
        default=16,
        help="most sessions verified in one forward pass, in [1, 1024] (default: %(default)s)",
    )
    serve.add_argument(
        "--schedule",
        choices=("slack", "fifo"),
        default="slack",
        help="order of waiting rounds: slack serves first the sessions closest to missing "
        "their tpot_slo_ms (without targets: first come, first served), fifo in arrival "
        "order (default: %(default)s)",
    )
    serve.add_argument(
        "--batch-invariant",
        choices=tuple(BATCH_INVARIANT_CHOICES),
        default="auto",
        help="attention computed per query, so greedy lossless equals cloud_only token for "
        "token in half precision on CPU; auto: on for float16/bfloat16 on CPU "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--attention",
        choices=ATTENTION_KERNELS,
        default="sdpa",
        help="tree passes' attention: sdpa with a dense mask, or flex (FlexAttention block "
        "masks, compiled on CUDA) (default: %(default)s)",
    )
    serve.add_argument(
        "--redis-url", help="register in this registry (a verifier outside Ray joining a fleet)"
    )
    serve.add_argument("--advertise", help="HOST:PORT edges dial (default: --host:--port)")
    serve.add_argument("--node-id", help="registry id (default: verifier-HOST-PORT)")
    serve.add_argument(
        "--heartbeat-ttl",
        type=float,
        default=10.0,
        help="seconds a registration outlives the last heartbeat (default: %(default)s)",
    )
    serve.set_defaults(run=run_serve)


async def register_verifier(args: argparse.Namespace, config, verifier):
    """Keeps this verifier registered as a `cloud` node while it serves; each heartbeat
    carries its acceptance totals (its engine's `VerifierMetrics`), and the node names
    its /metrics endpoint when it serves one."""
    from orchestrator.heartbeat import HeartbeatTask
    from orchestrator.registry import AsyncRegistry, NodeInfo, NodeStats, connect_async

    address = args.advertise or f"{args.host}:{verifier.port}"
    host = address.rsplit(":", 1)[0]
    endpoint = verifier.server.metrics
    metrics = verifier.engine.metrics
    try:
        node = NodeInfo(
            node_id=args.node_id or f"verifier-{address.replace(':', '-')}",
            kind="cloud",
            address=address,
            models=(config.model_name,),
            capacity=config.max_sessions,
            metrics_address="" if endpoint is None else f"{host}:{endpoint.port}",
        )
        heartbeat = HeartbeatTask(
            AsyncRegistry(connect_async(args.redis_url)),
            node,
            ttl_s=args.heartbeat_ttl,
            stats=lambda: NodeStats(**metrics.totals),
        )
    except ValueError as exc:
        raise UsageError(str(exc).replace("ttl_s", "--heartbeat-ttl")) from exc
    await heartbeat.start()
    return heartbeat


def run_serve(args: argparse.Namespace) -> int:
    from cloud_node.config import VerifierConfig
    from cloud_node.engine import resolve_config
    from cloud_node.server import start_verifier
    from lm.checkpoint import load_model

    if not args.model.exists():
        raise UsageError(f"--model: {args.model} does not exist")
    try:
        config = VerifierConfig(
            model_name=args.name or args.model.stem,
            max_sessions=args.max_sessions,
            max_context=args.max_context,
            kv_cache_gb=args.kv_cache_gb,
            max_tree_nodes=args.max_tree_nodes,
            session_ttl_s=args.session_ttl,
            batch_window_ms=args.batch_window_ms,
            max_batch=args.max_batch,
            batch_invariant=BATCH_INVARIANT_CHOICES[args.batch_invariant],
            schedule=args.schedule,
            attention=args.attention,
        )
        server = server_config(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    # Resolved against the model here, so that a context or budget it does not fit is a
    # usage error, and the registered capacity is the sessions the budget gave.
    model = load_model(args.model, device=args.device, dtype=torch_dtype(args.dtype))
    try:
        config = resolve_config(config, model)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    async def main() -> None:
        verifier = await start_verifier(model, config, server)
        verifier.server.drain_on_signals()
        heartbeat = None
        if args.redis_url:
            heartbeat = await register_verifier(args, config, verifier)
        print(
            f"verifier for {config.model_name!r} listening on {server.host}:{verifier.port}",
            flush=True,
        )
        await verifier.server.wait()
        if heartbeat is not None:
            await heartbeat.stop()
        await verifier.engine.stop()

    asyncio.run(main())
    return 0
