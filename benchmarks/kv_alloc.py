"""What one edge request's KV cache costs to set up on an 8192-token model, before and
after sizing it to the request, and what the verifier's cache takes with and without a
budget.

Before: two rows of the model's whole context (`EdgeLM`'s old default). After: two rows
of `edge_node.slm.cache_len` (the prompt, max_tokens and two rounds of draft trees).
Both are allocated the way `Transformer.new_cache` does (zero-filled `KVCache`), timed
in one run on one machine; the model's weights are not built, as the cache depends
only on its shape (SmolLM2-135M's by default: 30 layers, 3 KV heads x 64).

    python benchmarks/kv_alloc.py [--prompt 20] [--max-tokens 256] [--repeats 9]
"""

from __future__ import annotations

import argparse
import gc

import common
import torch

from cloud_node.config import VerifierConfig
from edge_node.slm import cache_len
from lm.config import ModelConfig
from lm.kv_cache import KVCache, bytes_per_position

# SmolLM2-135M's shape, at an 8192-token context.
SMOLLM2 = ModelConfig(
    vocab_size=49152,
    dim=576,
    n_layers=30,
    n_heads=9,
    n_kv_heads=3,
    hidden_dim=1536,
    max_seq_len=8192,
)


def setup_ms(config: ModelConfig, positions: int, device: torch.device, dtype, repeats: int):
    """Milliseconds to allocate a 2-row cache of `positions`, one sample per repeat, and
    its bytes."""
    samples, nbytes = [], 0
    for _ in range(repeats):
        gc.collect()
        with common.timed(device) as timing:
            cache = KVCache(config, 2, positions, device=device, dtype=dtype)
        samples.append(timing.ms)
        nbytes = cache.nbytes
        del cache
    return common.summarize_ms(samples), nbytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", type=int, default=20, help="prompt tokens (default: 20)")
    parser.add_argument("--max-tokens", type=int, default=256, help="(default: %(default)s)")
    parser.add_argument("--max-tree-nodes", type=int, default=64, help="(default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=9, help="allocations each (default: 9)")
    parser.add_argument(
        "--kv-cache-gb",
        type=float,
        default=2.0,
        help="a verifier budget to compare, in GB (default: %(default)s)",
    )
    common.device_flags(parser)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype or "float32")
    if args.threads:
        torch.set_num_threads(args.threads)
    config = SMOLLM2
    sized = cache_len(args.prompt, args.max_tokens, args.max_tree_nodes, config.max_seq_len)
    before, before_bytes = setup_ms(config, config.max_seq_len, device, dtype, args.repeats)
    after, after_bytes = setup_ms(config, sized, device, dtype, args.repeats)
    position_bytes = bytes_per_position(config, dtype)
    verifier = {}
    for budget in (None, args.kv_cache_gb):
        resolved = VerifierConfig("smollm2", kv_cache_gb=budget).for_model(
            config.max_seq_len, lambda positions: positions * position_bytes
        )
        rows = resolved.max_context + resolved.round_room
        verifier[f"budget_{budget}"] = {
            "sessions": resolved.max_sessions,
            "gb": resolved.max_sessions * rows * position_bytes / 1e9,
        }
    info = common.machine(device)
    print(f"machine: {info['cpu_model']} ({info['cores']} cores), {device}, {dtype}")
    print(
        f"edge request, prompt {args.prompt}, max_tokens {args.max_tokens}:\n"
        f"  before: {config.max_seq_len} positions, {before_bytes / 1e6:.1f} MB, "
        f"{before['median_ms']:.2f} ms (median of {args.repeats}, p90 {before['p90_ms']:.2f})\n"
        f"  after:  {sized} positions, {after_bytes / 1e6:.2f} MB, "
        f"{after['median_ms']:.3f} ms (median of {args.repeats}, p90 {after['p90_ms']:.3f})"
    )
    for name, figures in verifier.items():
        print(f"verifier {name}: {figures['sessions']} sessions, {figures['gb']:.2f} GB")
    common.print_json(
        {
            "benchmark": "kv_alloc",
            "machine": info,
            "model_shape": "SmolLM2-135M, 8192 context",
            "dtype": str(dtype).removeprefix("torch."),
            "prompt": args.prompt,
            "max_tokens": args.max_tokens,
            "before": {"positions": config.max_seq_len, "bytes": before_bytes, **before},
            "after": {"positions": sized, "bytes": after_bytes, **after},
            "verifier": verifier,
        }
    )


if __name__ == "__main__":
    main()
