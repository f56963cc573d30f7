"""Multi-head latent attention against grouped-query attention: KV bytes per token and
batched decode speed, on two models that differ only in their attention.

The MLA model (`lm.model.LatentAttention`, DeepSeek-V2/V3 style: kv_lora_rank-wide latent
plus a shared rotated key, up-projections absorbed) and its GQA twin share dim, layers,
query heads, MLP and vocabulary; the twin's heads are `--heads` / 4 KV heads (4:1) of the
MLA model's value width. Weights are random: speed depends on shapes, not values. Each
cache row is filled with `--context` random entries (untimed, no prefill), then every timed
step decodes one token per row and rolls back, so the context stays fixed. Configurations
are measured in interleaved slices (`--passes`), medians reported.

Printed besides the measurement: KV bytes per token of published shapes (DeepSeek-V2-Lite,
DeepSeek-V3) against their GQA 4:1 twins, computed from `lm.kv_cache.bytes_per_position`.
MLA's cache is (kv_lora_rank + rope) per layer; the twin's 2 x heads / 4 x value width; so
the ratio is (kv_lora_rank + rope) / (heads x value width / 2), about 9 / heads at
DeepSeek's proportions (rank 4 x, rope 0.5 x the value width).

    python benchmarks/mla.py                 # CPU, ~3 min
    python benchmarks/mla.py --quick         # a smoke run
    python benchmarks/mla.py --device cuda --dtype bfloat16 --heads 32 --dim 4096
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import device_flags, machine, print_json, timed

from lm.config import ModelConfig
from lm.device import default_device, default_dtype
from lm.kv_cache import bytes_per_position
from lm.model import Transformer

# Published shapes (config.json), for the bytes table only.
PUBLISHED = {
    "DeepSeek-V2-Lite": dict(dim=2048, n_layers=27, n_heads=16, rank=512, rope=64, nope=128, v=128),
    "DeepSeek-V3": dict(dim=7168, n_layers=61, n_heads=128, rank=512, rope=64, nope=128, v=128),
}


def mla_config(
    *, dim: int, n_layers: int, n_heads: int, rank: int, rope: int, nope: int, v: int, **rest
) -> ModelConfig:
    return ModelConfig(
        architecture="DeepseekV3ForCausalLM",
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=rope,
        kv_lora_rank=rank,
        qk_nope_head_dim=nope,
        v_head_dim=v,
        **{"vocab_size": 32000, "hidden_dim": 4 * dim, "max_seq_len": 8192, **rest},
    )


def gqa_twin(config: ModelConfig) -> ModelConfig:
    """The same model with grouped-query attention at 4:1, heads as wide as MLA's values."""
    return ModelConfig(
        vocab_size=config.vocab_size,
        dim=config.dim,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        n_kv_heads=max(1, config.n_heads // 4),
        head_dim=config.v_head_dim,
        hidden_dim=config.hidden_dim,
        max_seq_len=config.max_seq_len,
    )


def kv_bytes_row(name: str, config: ModelConfig, dtype: torch.dtype) -> dict[str, object]:
    mla, gqa = bytes_per_position(config, dtype), bytes_per_position(gqa_twin(config), dtype)
    return {"shape": name, "mla_bytes": mla, "gqa_4to1_bytes": gqa, "ratio": mla / gqa}


@torch.inference_mode()
def decode_ms(model: Transformer, cache, rows: int, context: int) -> float:
    """One batched decode step (one token per row) after `context` cached tokens."""
    ids = torch.randint(0, model.config.vocab_size, (rows, 1), device=cache.device)
    with timed(cache.device) as t:
        model(ids, cache=cache, rows=range(rows))
    for row in range(rows):
        cache.rollback(row, context)
    return t.ms


def filled_cache(model: Transformer, rows: int, context: int):
    cache = model.new_cache(rows, context + 1)
    for tensor in cache.tensors:
        tensor.normal_()
    for row in range(rows):
        cache.lengths[row] = context
    return cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    device_flags(parser)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--rank", type=int, default=256, help="kv_lora_rank")
    parser.add_argument("--rope", type=int, default=32, help="rotated key width")
    parser.add_argument("--value", type=int, default=64, help="value (and unrotated key) width")
    parser.add_argument("--context", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per slice")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one pass")
    args = parser.parse_args()
    if args.quick:
        args.dim, args.layers, args.context, args.batch, args.passes = 256, 2, [128], [1, 4], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)

    shape = dict(
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        rank=args.rank,
        rope=args.rope,
        nope=args.value,
        v=args.value,
    )
    mla = mla_config(**shape)
    configs = {"mla": mla, "gqa": gqa_twin(mla)}
    torch.manual_seed(0)
    models = {name: Transformer(c).to(device, dtype).eval() for name, c in configs.items()}
    for model in models.values():
        for p in model.parameters():
            torch.nn.init.normal_(p, 0, 0.02)
    table = [kv_bytes_row("measured", mla, dtype)]
    table += [kv_bytes_row(n, mla_config(**s), dtype) for n, s in PUBLISHED.items()]
    print(f"KV bytes per token ({str(dtype).removeprefix('torch.')}), MLA vs GQA 4:1 twin:")
    for row in table:
        print(
            f"  {row['shape']:>18}: {row['mla_bytes']:>8} vs {row['gqa_4to1_bytes']:>8}"
            f"  ratio {row['ratio']:.3f}"
        )

    cases = [(b, c) for c in args.context for b in args.batch]
    samples: dict[tuple[str, int, int], list[float]] = {}
    for _ in range(args.passes):
        for batch, context in cases:
            for name, model in models.items():
                cache = filled_cache(model, batch, context)
                decode_ms(model, cache, batch, context)  # warm-up
                runs = [decode_ms(model, cache, batch, context) for _ in range(args.steps)]
                samples.setdefault((name, batch, context), []).extend(runs)
                del cache
    speed = []
    print(f"\nDecode step, median ms ({device}, {str(dtype).removeprefix('torch.')}):")
    for batch, context in cases:
        ms = {name: statistics.median(samples[(name, batch, context)]) for name in models}
        row = {
            "batch": batch,
            "context": context,
            "mla_ms": ms["mla"],
            "gqa_ms": ms["gqa"],
            "mla_tokens_per_s": batch * 1000 / ms["mla"],
            "gqa_tokens_per_s": batch * 1000 / ms["gqa"],
            "mla_over_gqa_time": ms["mla"] / ms["gqa"],
        }
        speed.append(row)
        print(
            f"  batch {batch:>3} context {context:>5}: MLA {ms['mla']:8.2f} ms, "
            f"GQA {ms['gqa']:8.2f} ms, MLA/GQA {row['mla_over_gqa_time']:.2f}x"
        )
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()}
    print_json(
        {
            "benchmark": "mla",
            "machine": machine(device),
            "dtype": str(dtype).removeprefix("torch."),
            "shape": shape,
            "gqa_twin": {"kv_heads": configs["gqa"].n_kv_heads, "head_dim": args.value},
            "params": params,
            "kv_bytes_per_token": table,
            "decode": speed,
            "passes": args.passes,
            "steps": args.steps,
        }
    )


if __name__ == "__main__":
    main()
