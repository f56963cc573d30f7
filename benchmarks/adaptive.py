"""What adaptive mode costs in quality, and what it saves, against lossless.

In adaptive mode the edge keeps its own token, unverified, whenever the SLM gives it
at least `--threshold` probability, and sends only the rest to the cloud. This runs
the demo pair greedily on held-out prompts in lossless mode (the reference: exactly
the target's output) and in adaptive mode at several thresholds, and reports per
threshold:

- agreement: the share of positions where the adaptive output equals the lossless
  output, and the mean length of the common prefix (after the first difference the
  two texts drift apart, so both figures matter);
- unverified share: output tokens the cloud never checked;
- cloud rounds per output token, against lossless.

Verifier and edge run in one process on loopback (no injected delay: rounds and
tokens, not time, are the point here). Last line: one JSON object.

    python benchmarks/adaptive.py [--prompts 8] [--max-tokens 64] [--thresholds 0.5,0.7,0.9]
"""

from __future__ import annotations

import argparse
import asyncio

import torch
from common import REPO_ROOT, heldout_prompts, machine, print_json

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.cloud_link import CloudLink
from edge_node.picker import FixedListPicker, VerifierEndpoint
from edge_node.runtime import EdgeConfig, EdgeRuntime
from edge_node.types import GenerationRequest
from lm.checkpoint import load_model
from lm.tokenizer import Tokenizer
from protocol.types import Mode
from serving.server import ServerConfig

MODEL_NAME = "target"


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


async def main(args: argparse.Namespace) -> dict:
    demo = REPO_ROOT / "orchestrator" / "demo_models"
    target = load_model(args.target or demo / "target", device="cpu")
    draft = load_model(args.draft or demo / "draft", device="cpu")
    tokenizer = Tokenizer.from_dir(args.target or demo / "target")
    prompts = heldout_prompts(tokenizer, args.prompts, args.prompt_tokens)
    verifier = await start_verifier(
        target, VerifierConfig(model_name=MODEL_NAME), ServerConfig(port=0)
    )
    picker = FixedListPicker([VerifierEndpoint(f"127.0.0.1:{verifier.port}", MODEL_NAME)])
    runtime = EdgeRuntime(
        draft,
        EdgeConfig(model_name=MODEL_NAME, threads=1),
        tokenizer=tokenizer,
        link=CloudLink(picker),
    )

    async def run(prompt, mode: Mode, threshold: float = 0.9):
        request = GenerationRequest(
            prompt_tokens=prompt.tokens,
            max_tokens=args.max_tokens,
            mode=mode,
            adaptive_threshold=threshold,
        )
        chunks = [c async for c in runtime.generate(request)]
        tokens = [t for c in chunks for t in c.tokens]
        unverified = sum(len(c.tokens) for c in chunks if not c.verified)
        return tokens, unverified, chunks[-1].stats

    rows = []
    try:
        lossless = [await run(p, Mode.LOSSLESS) for p in prompts]
        base_rounds = sum(s.rounds for _, _, s in lossless)
        base_tokens = sum(len(t) for t, _, _ in lossless)
        for threshold in args.thresholds:
            same = total = prefix = unverified = rounds = 0
            for prompt, (reference, _, _) in zip(prompts, lossless, strict=True):
                tokens, kept, stats = await run(prompt, Mode.ADAPTIVE, threshold)
                same += sum(a == b for a, b in zip(tokens, reference, strict=False))
                total += max(len(tokens), len(reference))
                prefix += common_prefix(tokens, reference)
                unverified += kept
                rounds += stats.rounds
            produced = max(base_tokens, 1)
            rows.append(
                {
                    "threshold": threshold,
                    "agreement": same / max(total, 1),
                    "mean_common_prefix": prefix / len(prompts),
                    "unverified_share": unverified / produced,
                    "rounds_per_token": rounds / produced,
                    "rounds_vs_lossless": rounds / max(base_rounds, 1),
                }
            )
    finally:
        await runtime.close()
        await verifier.drain()
    print(f"lossless: {base_rounds / max(base_tokens, 1):.3f} cloud rounds per token")
    header = ("threshold", 9), ("agree", 7), ("prefix", 7), ("unverif", 8), ("rnd/tok", 8)
    print(" ".join(f"{name:>{width}}" for name, width in header), f"{'vs lossless':>12}")
    for r in rows:
        print(
            f"{r['threshold']:>9.2f} {r['agreement']:>7.1%} {r['mean_common_prefix']:>7.1f} "
            f"{r['unverified_share']:>8.1%} {r['rounds_per_token']:>8.3f} "
            f"{r['rounds_vs_lossless']:>11.2f}x"
        )
    return {
        "benchmark": "adaptive",
        "machine": machine(torch.device("cpu")),
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "lossless_rounds_per_token": base_rounds / max(base_tokens, 1),
        "thresholds": rows,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", help="target model directory (default: the demo target)")
    parser.add_argument("--draft", help="draft model directory (default: the demo draft)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--thresholds",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.5, 0.7, 0.9, 0.97],
    )
    args = parser.parse_args()
    if any(not 0 < t <= 1 for t in args.thresholds):
        parser.error("--thresholds: each must be in (0, 1]")
    return args


if __name__ == "__main__":
    torch.set_num_threads(1)
    print_json(asyncio.run(main(parse_args())))
