"""`edgecloud cloud serve`: run a verifier for one target model."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

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
    serve.add_argument("--max-sessions", type=int, default=32)
    serve.add_argument(
        "--max-context", type=int, help="tokens per session (default: what the model allows)"
    )
    serve.add_argument("--max-tree-nodes", type=int, default=64)
    serve.add_argument(
        "--session-ttl", type=float, default=120.0, help="seconds idle before a session is freed"
    )
    serve.add_argument("--batch-window-ms", type=float, default=3.0)
    serve.add_argument("--max-batch", type=int, default=16)
    serve.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from cloud_node.config import VerifierConfig
    from cloud_node.server import start_verifier

    if not args.model.exists():
        raise UsageError(f"--model: {args.model} does not exist")
    try:
        config = VerifierConfig(
            model_name=args.name or args.model.stem,
            max_sessions=args.max_sessions,
            max_context=args.max_context,
            max_tree_nodes=args.max_tree_nodes,
            session_ttl_s=args.session_ttl,
            batch_window_ms=args.batch_window_ms,
            max_batch=args.max_batch,
        )
        server = server_config(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc

    async def main() -> None:
        verifier = await start_verifier(
            args.model, config, server, device=args.device, dtype=torch_dtype(args.dtype)
        )
        verifier.server.drain_on_signals()
        print(
            f"verifier for {config.model_name!r} listening on {server.host}:{verifier.port}",
            flush=True,
        )
        await verifier.server.wait()
        await verifier.engine.stop()

    asyncio.run(main())
    return 0
