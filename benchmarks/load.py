"""Load on a local stack: 64 concurrent streams without errors, and lossless against cloud_only.

The stack is in-process, on loopback: the edge's `Generation` gRPC server (the draft model on
the CPU, as on a device) in front of a verifier gRPC server (the target, on CUDA when present),
started as tests/edge_node start them. No Ray and no Redis: what is measured is the serving
path (SDK -> edge -> verifier and back), not placement. The load comes from the `edgecloud
loadtest` runner (`orchestrator.loadtest`) through `edgecloud.AsyncClient`, in the same
process and event loop as the servers, so client-side latencies include that loop's queueing.

(a) A closed loop of `--streams` (64) requests in flight, greedy `lossless`: every request
    must complete (zero errors) with all 64 in flight at once; reports request and output
    throughput and p99 TTFT.
(b) The same load in `cloud_only` (the cloud decodes token by token): cloud forward passes per
    output token (as each request counts them, and as the verifier ran them, batched), output
    tokens/s and p99 TPOT, with the lossless / cloud_only ratios.

Prompts are text from the demo corpus's held-out split when the models have a tokenizer (the
server tokenizes), else seeded random token ids. Each mode gets one untimed warm-up request.

    python benchmarks/load.py                         # the demo pair, when present
    python benchmarks/load.py --target DIR --draft DIR
    python benchmarks/load.py --quick                 # fewer, shorter requests

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from common import REPO_ROOT, machine, model_summary, print_json

import edgecloud
from cloud_node.config import VerifierConfig
from cloud_node.server import VerifierServer, start_verifier
from edge_node.cloud_link import CloudLink, CloudLinkConfig
from edge_node.picker import FixedListPicker, VerifierEndpoint
from edge_node.runtime import EdgeConfig, EdgeRuntime
from edge_node.server import EdgeServer, start_edge_server
from lm.checkpoint import load_model
from lm.device import default_device
from lm.tokenizer import Tokenizer
from orchestrator.loadtest.prompts import heldout_prompts
from orchestrator.loadtest.records import summarize
from orchestrator.loadtest.report import summary_table
from orchestrator.loadtest.runner import LoadPlan, run_load
from serving.auth import AuthConfig
from serving.server import ServerConfig

DEMO_DIR = REPO_ROOT / "orchestrator" / "demo_models"
MODEL_NAME = "bench-target"
CLIENT_TOKEN = "bench-client-token"
INTERNAL_TOKEN = "bench-internal-token"
STACK = "in-process edge Generation server + verifier on loopback (no Ray, no Redis)"
MODES = ("lossless", "cloud_only")
# Summary keys kept per mode in the JSON line.
KEPT = (
    "completed",
    "failed",
    "errors_by_code",
    "duration_s",
    "peak_in_flight",
    "total_output_tokens",
    "request_throughput",
    "output_throughput",
    "median_ttft_ms",
    "p99_ttft_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "p99_itl_ms",
    "p99_inter_chunk_ms",
    "p99_e2el_ms",
    "num_drafts",
    "mean_acceptance_length",
    "draft_acceptance_rate",
    "cloud_forward_passes",
    "cloud_passes_per_output_token",
)


def model_dirs(args: argparse.Namespace) -> tuple[Path, Path]:
    """--target/--draft, or the bundled demo pair when it is there."""
    if (args.target is None) != (args.draft is None):
        raise SystemExit("--target and --draft: give both or neither")
    if args.target is not None:
        return args.target, args.draft
    target, draft = DEMO_DIR / "target", DEMO_DIR / "draft"
    if not (target / "config.json").exists() or not (draft / "config.json").exists():
        raise SystemExit(f"no demo models under {DEMO_DIR}: pass --target DIR --draft DIR")
    return target, draft


def make_prompts(tokenizer: Tokenizer | None, count: int, vocab: int, seed: int) -> list:
    """Held-out text when the server can tokenize it, else 16-48 random ids from [3, vocab)."""
    if tokenizer is not None:
        return heldout_prompts(count)
    draws = random.Random(seed)
    return [
        tuple(draws.randrange(3, vocab) for _ in range(draws.randint(16, 48))) for _ in range(count)
    ]


async def start_stack(
    target, draft, tokenizer: Tokenizer | None, streams: int, edge_threads: int
) -> tuple[VerifierServer, EdgeServer]:
    verifier = await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_sessions=streams),
        ServerConfig(port=0, auth=AuthConfig(token=INTERNAL_TOKEN)),
    )
    picker = FixedListPicker([VerifierEndpoint(f"127.0.0.1:{verifier.port}", MODEL_NAME)])
    runtime = EdgeRuntime(
        draft,
        EdgeConfig(model_name=MODEL_NAME, max_concurrency=streams, threads=edge_threads),
        tokenizer=tokenizer,
        link=CloudLink(picker, CloudLinkConfig(token=INTERNAL_TOKEN)),
    )
    edge = await start_edge_server(
        runtime, ServerConfig(port=0, auth=AuthConfig(token=CLIENT_TOKEN))
    )
    return verifier, edge


async def measure(args: argparse.Namespace, target, draft, tokenizer, prompts) -> dict:
    verifier, edge = await start_stack(target, draft, tokenizer, args.streams, args.edge_threads)
    results: dict[str, dict] = {}
    try:
        address = f"127.0.0.1:{edge.port}"
        async with edgecloud.AsyncClient(
            address, token=CLIENT_TOKEN, timeout=600, retry=None
        ) as client:
            plan = LoadPlan(concurrency=args.streams, requests=args.requests)
            for mode in MODES:
                options = edgecloud.GenerateOptions(max_tokens=args.max_tokens, mode=mode)
                await client.generate(prompts[0], max_tokens=4, mode=mode)  # warm-up
                passes_before = verifier.engine.forward_passes
                result = await run_load({address: client}, prompts, plan, options)
                batched = verifier.engine.forward_passes - passes_before
                summary = summarize(result.records, result.duration_s)
                print(summary_table(summary, f"{mode}, {args.streams} streams"), flush=True)
                kept = {key: summary.as_dict()[key] for key in KEPT}
                tokens = summary.total_output_tokens
                results[mode] = kept | {
                    "verifier_batched_passes": batched,
                    "verifier_batched_passes_per_output_token": batched / tokens if tokens else 0,
                }
    finally:
        await edge.drain()
        await verifier.drain()
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--target", type=Path, help="target model (default: the demo target)")
    parser.add_argument("--draft", type=Path, help="draft model (default: the demo draft)")
    parser.add_argument("--streams", type=int, default=64, help="requests in flight (64)")
    parser.add_argument("--requests", type=int, help="per mode (default: 2 x streams; quick 1 x)")
    parser.add_argument("--max-tokens", type=int, help="per request (default 64; quick 24)")
    parser.add_argument("--edge-threads", type=int, default=2, help="edge SLM worker threads (2)")
    parser.add_argument("--device", help="verifier device (default: CUDA when present)")
    parser.add_argument("--seed", type=int, default=0, help="random prompts' seed (0)")
    parser.add_argument("--quick", action="store_true", help="one request per stream, 24 tokens")
    args = parser.parse_args(argv)
    args.requests = args.requests or args.streams * (1 if args.quick else 2)
    args.max_tokens = args.max_tokens or (24 if args.quick else 64)

    target_dir, draft_dir = model_dirs(args)
    device = torch.device(args.device) if args.device else default_device()
    target = load_model(target_dir, device=device)
    draft = load_model(draft_dir, device="cpu", dtype=torch.float32)
    tokenizer = Tokenizer.from_dir(target_dir) if Tokenizer.found_in(target_dir) else None
    prompts = make_prompts(tokenizer, args.requests, target.config.vocab_size, args.seed)
    print(
        f"{STACK}; {args.streams} streams, {args.requests} requests x {args.max_tokens} tokens "
        f"per mode, prompts: {'held-out text' if tokenizer else 'random token ids'}",
        file=sys.stderr,
        flush=True,
    )
    results = asyncio.run(measure(args, target, draft, tokenizer, prompts))

    lossless, cloud = results["lossless"], results["cloud_only"]
    sustained = (
        lossless["failed"] == 0
        and lossless["completed"] == args.requests
        and lossless["peak_in_flight"] == args.streams
    )

    def ratio(key: str) -> float:
        return lossless[key] / cloud[key] if cloud[key] else 0.0

    print_json(
        {
            "benchmark": "load",
            "stack": STACK,
            "machine": machine(device),
            "target": model_summary(target, str(target_dir)),
            "draft": model_summary(draft, str(draft_dir)),
            "prompts": "demo corpus held-out text" if tokenizer else "random token ids",
            "streams": args.streams,
            "requests_per_mode": args.requests,
            "max_tokens": args.max_tokens,
            "greedy": True,
            "sustained_zero_errors": sustained,
            "lossless": lossless,
            "cloud_only": cloud,
            "lossless_over_cloud_only": {
                "cloud_passes_per_output_token": ratio("cloud_passes_per_output_token"),
                "verifier_batched_passes_per_output_token": ratio(
                    "verifier_batched_passes_per_output_token"
                ),
                "output_throughput": ratio("output_throughput"),
                "p99_tpot_ms": ratio("p99_tpot_ms"),
            },
        }
    )
    return 0 if sustained else 1


if __name__ == "__main__":
    sys.exit(main())
