"""`edgecloud edge serve`: an edge serving `Generation` directly, drafting with its SLM
and verifying on the verifiers it is given (no Ray, no Redis)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from orchestrator.commands.flags import (
    add_server_flags,
    drafter_setting,
    dtype_flag,
    existing_file,
    server_config,
    torch_dtype,
)
from orchestrator.usage import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    edge = subparsers.add_parser("edge", help="edge node commands")
    sub = edge.add_subparsers(title="edge commands", metavar="COMMAND", required=True)
    serve = sub.add_parser("serve", help="serve Generation with a local SLM and remote verifiers")
    serve.add_argument("--model", required=True, type=Path, help="SLM checkpoint directory")
    serve.add_argument(
        "--name", help="model name clients and verifiers use (default: --verifier-model)"
    )
    serve.add_argument(
        "--verifier",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a verifier to use; repeat for failover",
    )
    serve.add_argument("--verifier-model", help="model name the verifiers serve")
    serve.add_argument("--verifier-token", help="credential for the verifiers (not the clients')")
    serve.add_argument("--verifier-token-file", help="file holding --verifier-token")
    serve.add_argument(
        "--verifier-ca",
        type=Path,
        help="PEM roots that sign the verifiers' certificates; enables TLS to them "
        "(the system roots when only --verifier-cert/--verifier-key are given)",
    )
    serve.add_argument(
        "--verifier-cert", type=Path, help="PEM client certificate for mutual TLS to verifiers"
    )
    serve.add_argument("--verifier-key", type=Path, help="PEM private key for --verifier-cert")
    serve.add_argument("--device", default="cpu", help="device for the SLM (default: cpu)")
    serve.add_argument(
        "--flash-budget-mb",
        type=float,
        help="--model is a flash pack (edgecloud flash pack): keep its weights within this "
        "much DRAM, reading FFN neurons from flash as needed",
    )
    dtype_flag(serve)
    serve.add_argument(
        "--quantize",
        choices=["int4", "int8"],
        help="the SLM's weights as int4 or int8 codes, multiplied as they lie (a GGUF "
        "file's Q4_0/Q4_1 blocks kept for int4); --dtype then applies to --head only "
        "(default: none)",
    )
    add_server_flags(serve, default_port=50051)
    serve.add_argument(
        "--http-port",
        type=int,
        help="also serve the OpenAI-compatible HTTP API on this port (same host, token, TLS)",
    )
    serve.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="generations in flight; more get RESOURCE_EXHAUSTED, in [1, 4096] "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--draft-tree",
        choices=["beam", "topk", "chain"],
        default="beam",
        help="draft tree shape when a request names none (default: %(default)s)",
    )
    serve.add_argument(
        "--draft-width",
        type=int,
        default=4,
        help="beams (beam) or branching factor (topk), in [1, 16] (default: %(default)s)",
    )
    serve.add_argument(
        "--draft-depth",
        type=int,
        default=6,
        help="draft tokens along each beam, or tree levels, in [1, 32] (default: %(default)s)",
    )
    serve.add_argument(
        "--drafter",
        type=drafter_setting,
        default="slm",
        help="who drafts lossless rounds: the SLM, the recurrent draft head (--head) on the "
        "verifier's hidden state, n-gram lookup in the history (ngram), or auto (per "
        "session, the head or the SLM, whichever yields more tokens per second); edge_only "
        "and adaptive always use the SLM (default: %(default)s)",
    )
    serve.add_argument(
        "--head",
        type=Path,
        metavar="DIR",
        help="draft head trained for the verifiers' target (head_config.json + head.safetensors)",
    )
    serve.add_argument(
        "--hidden-encoding",
        choices=["float16", "int8"],
        default="float16",
        help="how verifiers send hidden states for the head: 2 or 1 bytes an element "
        "(default: %(default)s)",
    )
    serve.set_defaults(run=run_serve)


def verifier_token(args: argparse.Namespace) -> str | None:
    if args.verifier_token and args.verifier_token_file:
        raise UsageError("--verifier-token and --verifier-token-file: give only one")
    if args.verifier_token_file:
        try:
            return Path(args.verifier_token_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"--verifier-token-file: cannot read: {exc.strerror}") from exc
    return args.verifier_token


def verifier_tls(args: argparse.Namespace):
    """TLS to the verifiers (`TlsOptions`), or None when no --verifier-* TLS flag is given.
    The name checked is the host of each --verifier address."""
    from protocol.channel import TlsOptions

    if bool(args.verifier_cert) != bool(args.verifier_key):
        raise UsageError("--verifier-cert and --verifier-key: give both or neither")
    if not (args.verifier_ca or args.verifier_cert):
        return None
    if not args.verifier:
        flag = "--verifier-ca" if args.verifier_ca else "--verifier-cert"
        raise UsageError(f"{flag}: needs --verifier")
    try:
        return TlsOptions(
            ca=existing_file("--verifier-ca", args.verifier_ca),
            cert=existing_file("--verifier-cert", args.verifier_cert),
            key=existing_file("--verifier-key", args.verifier_key),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def run_serve(args: argparse.Namespace) -> int:
    from edge_node.cloud_link import CloudLink, CloudLinkConfig
    from edge_node.drafters.sources import needs_head
    from edge_node.flash.store import BudgetError
    from edge_node.models import load_edge_models
    from edge_node.picker import FixedListPicker, VerifierEndpoint
    from edge_node.runtime import EdgeConfig, EdgeRuntime
    from edge_node.server import start_edge_server
    from edge_node.types import DraftConfig
    from lm.errors import CheckpointError

    if not args.model.exists():
        raise UsageError(f"--model: {args.model} does not exist")
    for address in args.verifier:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise UsageError(f"--verifier: expected HOST:PORT, got {address!r}")
    if args.verifier and not args.verifier_model:
        raise UsageError("--verifier-model: needed with --verifier")
    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise UsageError(f"--http-port: must be in [0, 65535], got {args.http_port}")
    if args.flash_budget_mb is not None and args.flash_budget_mb <= 0:
        raise UsageError(f"--flash-budget-mb: must be > 0, got {args.flash_budget_mb}")
    if needs_head(args.drafter) and args.head is None:
        raise UsageError(f"--head: needed with --drafter {args.drafter}")
    tls = verifier_tls(args)
    link = None
    if args.verifier:
        picker = FixedListPicker([VerifierEndpoint(a, args.verifier_model) for a in args.verifier])
        link = CloudLink(picker, CloudLinkConfig(token=verifier_token(args), tls=tls))
    try:
        models = load_edge_models(
            args.model,
            device=args.device,
            dtype=torch_dtype(args.dtype),
            flash_budget_mb=args.flash_budget_mb,
            head_dir=args.head,
            quantize=args.quantize,
        )
        config = EdgeConfig(
            model_name=args.name or args.verifier_model or args.model.stem,
            max_concurrency=args.max_concurrency,
            draft=DraftConfig(
                args.draft_tree,
                args.draft_width,
                args.draft_depth,
                drafter=args.drafter,
                hidden_encoding=args.hidden_encoding,
            ),
        )
        server = server_config(args)
        runtime = EdgeRuntime(
            models.slm, config, tokenizer=models.tokenizer, link=link, head=models.head
        )
    except BudgetError as exc:
        raise UsageError(f"--flash-budget-mb: {exc}") from exc
    except (ValueError, CheckpointError) as exc:
        raise UsageError(str(exc)) from exc

    async def main() -> None:
        edge = await start_edge_server(runtime, server)
        edge.server.drain_on_signals()
        print(f"edge {config.model_name!r} listening on {server.host}:{edge.port}", flush=True)
        http = None
        if args.http_port is not None:
            from edge_node.http import start_edge_http

            http = await start_edge_http(runtime, server, args.http_port)
            print(f"OpenAI-compatible HTTP on {http.url}/v1", flush=True)
        await edge.server.wait()
        if http is not None:
            await http.stop()
        await runtime.close()

    asyncio.run(main())
    return 0
