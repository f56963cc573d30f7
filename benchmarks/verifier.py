"""Verifier cost per round: draft trees of 1, 4, 16 and 64 nodes, batches of 1, 4 and 16 sessions.

The engine (`cloud_node.engine.VerifierEngine`) is driven directly: B sessions are opened
with a context of `--context` tokens, then each timed round submits one tree per session at
once, so all B land in one forward pass (every outcome's `batch_size` is checked to be B).
A "tree" of 0 nodes is a cloud-only step: the forward pass sees the pending token alone, the
baseline every speculative round is compared against. Trees are up to 4 beams of n/4 random
tokens below the last token, so almost nothing is accepted and the context grows by about one
token a round; sessions are reopened (untimed) before they pass `--context` + 48 tokens.

Reported per (tree, batch): median and p90 wall time of a round as the engine's callers see
it, the forward pass alone (the engine's own `server_ms`), verified tree nodes per second,
and the cost of a 16-node tree against a single-token step. Then the same rounds for one
session through a real gRPC server on loopback (the `Verifier.Verify` stream the edge uses),
so the transport's overhead is visible, and 8 sessions verified in one pass against the same
8 rounds as 8 separate passes (an engine with `max_batch` 1).

Acceptance alone (`--acceptance`, or `--acceptance-only`): the time to turn one pass's
logits into accepted paths and bonus tokens, for vocabularies of 32k and 152k, batches of 1
and 16 sessions, trees of 16 and 64 nodes (4 beams whose first beam is the target's own
choice, so the walk goes deep), greedy and seeded sampling at temperature 0.7. "before" is
the per-session path the engine ran until the batched one (a warped float32 distribution
per session, then `verify_tree`, which copies every visited row to the host in float64);
"after" is `lm.acceptance.accept_batch` (one batched step per warping, one host transfer).

Kernels (`--kernels sdpa flex`; both by default on CUDA, `--kernels-only` to run just this):
the model's forward pass alone on a cache holding `--context` tokens per row, for trees of
16, 64 and 256 nodes against a one-token step, at batches of 1 to 64 (1 and 4 on CPU), with
SDPA and a dense mask against FlexAttention block masks (`lm.flex`). `--shape 7b` makes the
model a random 7B-class one (Llama-2-7B's shape, `--layers` to cut it down) for GPU timing.

Every configuration is measured in `--passes` slices interleaved with the others, so a
neighbour's load on a shared machine spreads over all of them instead of skewing one ratio.

    python benchmarks/verifier.py                  # the demo target, or a random one of its shape
    python benchmarks/verifier.py --model DIR      # any checkpoint lm.checkpoint.load_model reads
    python benchmarks/verifier.py --quick          # a ~30 s smoke run
    python benchmarks/verifier.py --device cuda --dtype bfloat16 --shape 7b --kernels-only
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from common import REPO_ROOT, device_flags, machine, model_summary, print_json, summarize_ms, timed
from grpc import aio

from cloud_node.config import ATTENTION_KERNELS, BATCH_INVARIANT_CHOICES, VerifierConfig
from cloud_node.engine import Session, VerifierEngine
from cloud_node.server import start_verifier
from cloud_node.validation import OpenRequest, RoundRequest
from edge_node.verifier_client import VerifierSession
from lm.acceptance import PendingRound, accept_batch, verify_tree
from lm.checkpoint import load_model
from lm.config import ModelConfig
from lm.device import default_device, default_dtype
from lm.model import Transformer
from lm.sampling import SamplingParams, make_generator, probs_from_logits
from lm.tree import TokenTree
from protocol.channel import open_aio_channel
from serving.server import ServerConfig

DEMO_TARGET = REPO_ROOT / "orchestrator" / "demo_models" / "target"
MODEL_NAME = "bench-target"
TREE_SIZES = (0, 1, 4, 16, 64)  # 0: a cloud-only step
BATCHES = (1, 4, 16)
PAIR_SESSIONS = 8
GREEDY = SamplingParams()
# Sessions are reopened before their context grows past --context + this.
REOPEN_AFTER = 48

# (wall ms of the round, forward-pass ms inside it) per timed round.
Samples = list[tuple[float, float]]


@dataclass(frozen=True)
class Budget:
    """How long one configuration is measured: at least `min_rounds` timed rounds, then more
    until `seconds` have passed or `max_rounds` were timed, spread evenly over the passes;
    each pass's slice starts with `warmup` untimed rounds on freshly opened sessions."""

    warmup: int
    min_rounds: int
    max_rounds: int
    seconds: float


FULL = Budget(warmup=2, min_rounds=12, max_rounds=200, seconds=4.0)
QUICK = Budget(warmup=1, min_rounds=3, max_rounds=30, seconds=0.6)


def demo_shaped_model(seed: int, device: torch.device, dtype: torch.dtype) -> Transformer:
    """A random model of the demo target's shape (what `edgecloud train` makes by default):
    the cost of a round depends on the shape, not on what the weights learnt."""
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=4096,
        dim=256,
        n_layers=6,
        n_heads=8,
        n_kv_heads=4,
        hidden_dim=768,
        max_seq_len=512,
        activation="relu",
        tie_embeddings=True,
    )
    return Transformer(config).to(device=device, dtype=dtype).eval()


def random_tokens(count: int, vocab: int, generator: torch.Generator) -> tuple[int, ...]:
    return tuple(torch.randint(vocab, (count,), generator=generator).tolist())


def beams_tree(size: int, vocab: int, generator: torch.Generator) -> TokenTree:
    """`size` random tokens as up to 4 beams of equal length below the last token.

    Example: size 8 gives parents (-1, 0, -1, 2, -1, 4, -1, 6): four chains of two nodes.
    """
    width = min(4, size)
    parents: list[int] = []
    for beam in range(width):
        length = size // width + (beam < size % width)
        start = len(parents)
        parents += [-1] + [start + i for i in range(length - 1)]
    return TokenTree(random_tokens(size, vocab, generator), tuple(parents))


async def repeat(budget: Budget, one_round: Callable[[int], Awaitable[tuple[float, float]]]):
    """Runs `budget.warmup` untimed rounds, then returns the samples of the timed ones."""
    for step in range(budget.warmup):
        await one_round(step)
    samples: Samples = []
    started = time.monotonic()
    while len(samples) < budget.max_rounds and (
        len(samples) < budget.min_rounds or time.monotonic() - started < budget.seconds
    ):
        samples.append(await one_round(budget.warmup + len(samples)))
    return samples


class EngineBench:
    """Opens sessions on one engine and times rounds submitted to all of them at once."""

    def __init__(self, engine: VerifierEngine, context: int, seed: int) -> None:
        self.engine = engine
        self.context = context
        self.generator = torch.Generator().manual_seed(seed)
        self.sessions: list[Session] = []
        self._opened = 0

    async def reopen(self, count: int) -> None:
        for session in self.sessions:
            self.engine.close(session)
        self.sessions = []
        for _ in range(count):
            self._opened += 1
            context = random_tokens(self.context, self.engine.vocab_size, self.generator)
            request = OpenRequest(f"bench-{self._opened}", context, GREEDY)
            self.sessions.append(await self.engine.open(request))

    async def samples(self, batch: int, tree_size: int, budget: Budget) -> Samples:
        """Rounds of `tree_size`-node trees for `batch` sessions submitted together."""
        expected_batch = min(batch, self.engine.config.max_batch)
        lengths = self.engine.cache.lengths

        async def one_round(step: int) -> tuple[float, float]:
            if any(lengths[s.row] > self.context + REOPEN_AFTER for s in self.sessions):
                await self.reopen(batch)
            tree = beams_tree(tree_size, self.engine.vocab_size, self.generator)
            request = RoundRequest(new_tokens=(), tree=tree, draft={}, round_id=step)
            with timed(self.engine.device) as t:
                outcomes = await asyncio.gather(
                    *(self.engine.verify(s, request) for s in self.sessions)
                )
            sizes = {o.batch_size for o in outcomes}
            if sizes != {expected_batch}:
                raise RuntimeError(f"batch_size: expected {expected_batch} for all, got {sizes}")
            # Each outcome carries its pass's server_ms, shared by the pass's sessions.
            return t.ms, sum(o.server_ms for o in outcomes) / expected_batch

        await self.reopen(batch)
        try:
            return await repeat(budget, one_round)
        finally:
            await self.reopen(0)


class GrpcBench:
    """One session through a real `Verifier` server: the edge's view of a round."""

    def __init__(self, channel: aio.Channel, context: int, vocab: int, seed: int) -> None:
        self.channel = channel
        self.context = context
        self.vocab = vocab
        self.generator = torch.Generator().manual_seed(seed)
        self.session: VerifierSession | None = None
        self.length = 0  # tokens the session holds, the pending bonus included

    async def reopen(self) -> VerifierSession:
        await self.close()
        self.session = VerifierSession(self.channel)
        context = random_tokens(self.context, self.vocab, self.generator)
        await self.session.open(MODEL_NAME, context, GREEDY)
        self.length = self.context
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def samples(self, tree_size: int, budget: Budget) -> Samples:
        async def one_round(step: int) -> tuple[float, float]:
            session = self.session
            if session is None or self.length > self.context + REOPEN_AFTER:
                session = await self.reopen()
            tree = beams_tree(tree_size, self.vocab, self.generator)
            with timed() as t:
                result = await session.verify(tree, round_id=step)
            self.length += 1 + len(result.accepted_tokens)
            return t.ms, result.server_ms

        return await repeat(budget, one_round)


def row(kind: str, batch: int, tree: int, samples: Samples, passes: int = 1) -> dict[str, object]:
    round_ms = summarize_ms([wall for wall, _ in samples])
    seconds = round_ms["median_ms"] / 1000
    return {
        "kind": kind,
        "tree": tree,
        "batch": batch,
        "passes_per_round": passes,
        "round": round_ms,
        "forward": summarize_ms([forward for _, forward in samples]),
        "nodes_per_s": batch * tree / seconds,
        # Tokens through the model: each session's pending token plus its tree.
        "tokens_per_s": batch * (tree + 1) / seconds,
    }


def max_context(model: Transformer) -> int:
    """The most context a verifier taking 64-node rounds allows for this model."""
    return model.config.max_seq_len - VerifierConfig(model_name=MODEL_NAME).round_room


async def run(model: Transformer, args: argparse.Namespace, budget: Budget) -> dict[str, object]:
    limit = max_context(model)
    most = limit - REOPEN_AFTER - 2 * max(TREE_SIZES) - 2
    if not 2 <= args.context <= most:
        raise SystemExit(
            f"--context: must be in [2, {most}] for this model "
            f"(max_seq_len {model.config.max_seq_len}), got {args.context}"
        )

    def engine(max_batch: int) -> VerifierEngine:
        config = VerifierConfig(
            model_name=MODEL_NAME,
            max_sessions=max(BATCHES),
            max_context=limit,
            max_batch=max_batch,
            batch_invariant=BATCH_INVARIANT_CHOICES[args.batch_invariant],
            # Generous: the window closes as soon as every open session has a round queued.
            batch_window_ms=1000.0,
        )
        return VerifierEngine(model, config)

    batched, single = engine(max(BATCHES)), engine(1)
    batched.start()
    single.start()
    server = await start_verifier(
        model,
        VerifierConfig(
            model_name=MODEL_NAME,
            max_sessions=1,
            max_context=limit,
            batch_invariant=BATCH_INVARIANT_CHOICES[args.batch_invariant],
        ),
        ServerConfig(port=0),
    )
    channel = open_aio_channel(f"127.0.0.1:{server.port}")
    together = EngineBench(batched, args.context, args.seed)
    separate = EngineBench(single, args.context, args.seed)
    transport = GrpcBench(channel, args.context, model.config.vocab_size, args.seed)
    jobs: dict[tuple[str, int, int], Callable[[Budget], Awaitable[Samples]]] = {}
    for batch in BATCHES:
        for tree in TREE_SIZES:
            jobs["engine", batch, tree] = lambda b, n=batch, t=tree: together.samples(n, t, b)
    pair = args.pair_tree
    jobs["together", PAIR_SESSIONS, pair] = lambda b: together.samples(PAIR_SESSIONS, pair, b)
    jobs["separate", PAIR_SESSIONS, pair] = lambda b: separate.samples(PAIR_SESSIONS, pair, b)
    for tree in TREE_SIZES:
        jobs["grpc", 1, tree] = lambda b, t=tree: transport.samples(t, b)
    collected: dict[tuple[str, int, int], Samples] = {key: [] for key in jobs}
    per_pass = replace(
        budget,
        min_rounds=math.ceil(budget.min_rounds / args.passes),
        max_rounds=math.ceil(budget.max_rounds / args.passes),
        seconds=budget.seconds / args.passes,
    )
    started = time.monotonic()
    try:
        for done in range(1, args.passes + 1):
            for key, job in jobs.items():
                collected[key] += await job(per_pass)
            print(
                f"  pass {done}/{args.passes} done, {time.monotonic() - started:.0f} s", flush=True
            )
    finally:
        await transport.close()
        await channel.close()
        await server.drain()
        await batched.stop()
        await single.stop()
    return {
        "engine": [
            row("engine", b, t, collected["engine", b, t]) for b in BATCHES for t in TREE_SIZES
        ],
        "pair": {
            "sessions": PAIR_SESSIONS,
            "tree": pair,
            "together": row(
                "together", PAIR_SESSIONS, pair, collected["together", PAIR_SESSIONS, pair]
            ),
            "separate": row(
                "separate",
                PAIR_SESSIONS,
                pair,
                collected["separate", PAIR_SESSIONS, pair],
                PAIR_SESSIONS,
            ),
        },
        "grpc": [row("grpc", 1, t, collected["grpc", 1, t]) for t in TREE_SIZES],
    }


KERNEL_TREES = (0, 16, 64, 256)  # 0: a one-token step
SEVEN_B = dict(vocab_size=32000, dim=4096, n_heads=32, n_kv_heads=8, hidden_dim=11008)


@torch.no_grad()
def kernel_costs(
    model: Transformer, kernels: Sequence[str], batches: Sequence[int], context: int, repeats: int
) -> list[dict[str, object]]:
    """Median ms of one forward pass per (kernel, batch, tree), every row holding `context`
    cached tokens (random entries: the cost depends on shapes), interleaved `repeats` times."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    cache = model.new_cache(max(batches), context + max(KERNEL_TREES) + 1)
    for tensor in cache.tensors + cache.rings:
        tensor.normal_()
    samples: dict[tuple[str, int, int], list[float]] = {}
    for _ in range(repeats):
        for kernel in kernels:
            model.flex_attention = kernel == "flex"
            for batch in batches:
                for size in KERNEL_TREES:
                    tree = beams_tree(max(size, 1), model.config.vocab_size, generator)
                    if size == 0:
                        tree = TokenTree.chain([tree.tokens[0]])
                    for row in range(batch):
                        cache.rollback(row, 0)
                        cache.lengths[row] = context
                    ids = torch.tensor([tree.tokens] * batch, device=device)
                    positions = tree.positions(context)[None].expand(batch, -1).to(device)
                    mask = tree.attention_mask(device)[None].expand(batch, -1, -1)
                    inputs = dict(cache=cache, rows=range(batch), positions=positions, mask=mask)
                    model(ids, **inputs)  # warm-up (and on CUDA, compiling a new shape)
                    with timed(device) as t:
                        model(ids, **inputs)
                    samples.setdefault((kernel, batch, size), []).append(t.ms)
    model.flex_attention = False
    rows = []
    print()
    print(f"Forward pass by kernel, {context} cached tokens a row (median of {repeats}):")
    print(f"{'kernel':>6} {'batch':>6} {'tree':>5} {'ms':>9} {'vs 1 token':>11}")
    for (kernel, batch, size), runs in samples.items():
        ms = statistics.median(runs)
        base = statistics.median(samples[kernel, batch, 0])
        rows.append(dict(kernel=kernel, batch=batch, tree=size, ms=ms, vs_one_token=ms / base))
        print(f"{kernel:>6} {batch:>6} {size:>5} {ms:>9.2f} {ms / base:>10.2f}x")
    return rows


def median_ms(rows: Sequence[dict], tree: int, batch: int) -> float:
    return next(r for r in rows if r["tree"] == tree and r["batch"] == batch)["round"]["median_ms"]


def report(results: dict[str, object]) -> dict[str, object]:
    """Prints the tables; returns the derived ratios for the JSON line."""
    grid = results["engine"]
    print()
    print("Engine, one forward pass per round (all sessions' rounds batched):")
    print(
        f"{'tree':>5} {'batch':>6} {'round p50':>10} {'p90':>9} {'forward p50':>12} "
        f"{'nodes/s':>9} {'vs cloud step':>14}"
    )
    for r in grid:
        base = median_ms(grid, 0, r["batch"])
        print(
            f"{r['tree']:>5} {r['batch']:>6} {r['round']['median_ms']:>8.2f}ms "
            f"{r['round']['p90_ms']:>7.2f}ms {r['forward']['median_ms']:>10.2f}ms "
            f"{r['nodes_per_s']:>9.0f} {r['round']['median_ms'] / base:>13.2f}x"
        )
    ratios = {
        str(batch): {
            "vs_cloud_step": median_ms(grid, 16, batch) / median_ms(grid, 0, batch),
            "vs_one_node_tree": median_ms(grid, 16, batch) / median_ms(grid, 1, batch),
        }
        for batch in BATCHES
    }
    print()
    print("Cost of a 16-node tree against a single-token step (median round time):")
    for batch, r in ratios.items():
        print(
            f"  batch {batch:>2}: {r['vs_cloud_step']:.2f}x a cloud-only step (1 token), "
            f"{r['vs_one_node_tree']:.2f}x a 1-node tree (2 tokens: pending + node)"
        )

    pair = results["pair"]
    together = pair["together"]["round"]["median_ms"]
    separate = pair["separate"]["round"]["median_ms"]
    print()
    print(f"{pair['sessions']} sessions, {pair['tree']}-node trees each:")
    print(f"  verified together (1 pass):  {together:8.2f} ms")
    print(
        f"  {pair['sessions']} separate passes:           {separate:8.2f} ms  "
        f"({separate / together:.2f}x)"
    )

    print()
    print("One session through gRPC on loopback (Verifier.Verify stream) against the engine:")
    print(f"{'tree':>5} {'round trip p50':>15} {'p90':>9} {'engine p50':>11} {'transport':>10}")
    overhead = {}
    for r in results["grpc"]:
        engine_ms = median_ms(grid, r["tree"], 1)
        rtt = r["round"]["median_ms"]
        overhead[str(r["tree"])] = rtt - engine_ms
        print(
            f"{r['tree']:>5} {rtt:>13.2f}ms {r['round']['p90_ms']:>7.2f}ms "
            f"{engine_ms:>9.2f}ms {rtt - engine_ms:>8.2f}ms"
        )
    return {
        "tree16_cost_ratio": ratios,
        "batch8_separate_over_together": separate / together,
        "grpc_overhead_ms": overhead,
        "grpc_overhead_median_ms": statistics.median(overhead.values()),
    }


ACCEPT_VOCABS = (32_000, 152_064)
ACCEPT_BATCHES = (1, 16)
ACCEPT_TREES = (16, 64)
ACCEPT_SAMPLING = {"greedy": GREEDY, "sampled": SamplingParams(temperature=0.7, seed=1)}


def acceptance_inputs(
    vocab: int, batch: int, size: int, device: torch.device, seed: int
) -> tuple[torch.Tensor, list[TokenTree]]:
    """Logits (batch, size + 1, vocab) with each tree's first beam boosted to be the
    target's choice (+20), so greedy and sampling walk down about size / 4 nodes."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, size + 1, vocab, generator=generator)
    trees = [beams_tree(size, vocab, generator) for _ in range(batch)]
    for b, tree in enumerate(trees):
        node = -1
        while children := tree.children(node):
            logits[b, node + 1, tree.tokens[children[0]]] += 20.0
            node = children[0]
    return logits.to(device), trees


def accept_before(logits: torch.Tensor, trees: list[TokenTree], params: SamplingParams) -> None:
    """The engine's acceptance until the batched path: per session, a warped distribution,
    a generator reseeded for the round, then `verify_tree`."""
    for b, tree in enumerate(trees):
        generator = None if params.greedy else make_generator(params.seed, logits.device)
        target = probs_from_logits(logits[b, : tree.size + 1], params)
        verify_tree(tree, target, None, generator, params.greedy)


def accept_after(logits: torch.Tensor, trees: list[TokenTree], params: SamplingParams) -> None:
    accept_batch(logits, [PendingRound(tree, params, 1, 100, {}) for tree in trees])


def acceptance_costs(device: torch.device, repeats: int, seed: int) -> list[dict[str, object]]:
    rows = []
    for vocab in ACCEPT_VOCABS:
        for batch in ACCEPT_BATCHES:
            for size in ACCEPT_TREES:
                logits, trees = acceptance_inputs(vocab, batch, size, device, seed)
                for name, params in ACCEPT_SAMPLING.items():
                    times = {}
                    for label, fn in (("before", accept_before), ("after", accept_after)):
                        fn(logits, trees, params)  # warm-up
                        samples = []
                        for _ in range(repeats):
                            with timed(device) as t:
                                fn(logits, trees, params)
                            samples.append(t.ms)
                        times[label] = statistics.median(samples)
                    rows.append(
                        {
                            "vocab": vocab,
                            "batch": batch,
                            "tree": size,
                            "sampling": name,
                            "before_ms": times["before"],
                            "after_ms": times["after"],
                            "speedup": times["before"] / times["after"],
                        }
                    )
                del logits
    print()
    print(f"Acceptance per pass (median of {repeats}), before -> after:")
    print(f"{'vocab':>7} {'batch':>6} {'tree':>5} {'sampling':>8} {'before':>10} {'after':>10}")
    for r in rows:
        print(
            f"{r['vocab']:>7} {r['batch']:>6} {r['tree']:>5} {r['sampling']:>8} "
            f"{r['before_ms']:>8.2f}ms {r['after_ms']:>8.2f}ms  {r['speedup']:.1f}x"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model",
        type=Path,
        help="target checkpoint (default: the demo target if bundled, else a random model "
        "of its shape)",
    )
    parser.add_argument("--context", type=int, default=128, help="tokens per session (128)")
    parser.add_argument(
        "--pair-tree", type=int, default=16, help="tree size for 8 together vs separate (16)"
    )
    parser.add_argument("--passes", type=int, default=3, help="interleaved slices (3)")
    device_flags(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument(
        "--batch-invariant",
        choices=tuple(BATCH_INVARIANT_CHOICES),
        default="auto",
        help="the verifier's per-query attention (auto: on for half precision on CPU)",
    )
    parser.add_argument(
        "--kernels",
        nargs="+",
        choices=ATTENTION_KERNELS,
        help="attention kernels to time tree passes with (default: sdpa and flex on CUDA, "
        "sdpa elsewhere)",
    )
    parser.add_argument(
        "--kernels-only", action="store_true", help="time the kernels' passes and stop"
    )
    parser.add_argument(
        "--shape", choices=("7b",), help="a random model of this shape instead of --model"
    )
    parser.add_argument("--layers", type=int, help="with --shape: this many layers")
    parser.add_argument(
        "--acceptance", action="store_true", help="also time acceptance alone, before/after"
    )
    parser.add_argument(
        "--acceptance-only", action="store_true", help="time acceptance alone and stop"
    )
    args = parser.parse_args(argv)
    if not 1 <= args.pair_tree <= max(TREE_SIZES):
        parser.error(f"--pair-tree: must be in [1, {max(TREE_SIZES)}], got {args.pair_tree}")
    if not 1 <= args.passes <= 20:
        parser.error(f"--passes: must be in [1, 20], got {args.passes}")

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
    path = args.model or (DEMO_TARGET if (DEMO_TARGET / "config.json").exists() else None)
    if args.shape == "7b":
        torch.manual_seed(args.seed)
        layers = args.layers or 32
        config = ModelConfig(**SEVEN_B, n_layers=layers, max_seq_len=4096)
        with torch.device(device):
            model = Transformer(config).to(dtype=dtype).eval()
        source = f"random, Llama-2-7B's shape with {layers} layers (seed {args.seed})"
    elif path is None:
        model = demo_shaped_model(args.seed, device, dtype)
        source = f"random, the demo target's shape (seed {args.seed}); none at {DEMO_TARGET}"
    else:
        model = load_model(path, device=device, dtype=dtype)
        source = str(path)
    budget = QUICK if args.quick else FULL
    description = model_summary(model, source)
    print(
        f"target: {source}: {description['params'] / 1e6:.1f}M params, "
        f"{description['dtype']} on {device}; context {args.context} tokens"
    )

    started = time.monotonic()
    kernels = args.kernels or (["sdpa", "flex"] if device.type == "cuda" else ["sdpa"])
    batches = (1, 4, 16, 64) if device.type == "cuda" else (1, 4)
    kernel_rows = kernel_costs(model, kernels, batches, args.context, 3 if args.quick else 7)
    if args.kernels_only:
        print_json(
            {
                "benchmark": "verifier-kernels",
                "machine": machine(device),
                "model": description,
                "context": args.context,
                "kernels": kernel_rows,
            }
        )
        return 0
    if args.acceptance or args.acceptance_only:
        accept_rows = acceptance_costs(device, 3 if args.quick else 9, args.seed)
        if args.acceptance_only:
            print_json(
                {
                    "benchmark": "verifier-acceptance",
                    "machine": machine(device),
                    "rows": accept_rows,
                }
            )
            return 0
    results = asyncio.run(run(model, args, budget))
    derived = report(results)
    print_json(
        {
            "benchmark": "verifier",
            "machine": machine(device),
            "model": description,
            "context": args.context,
            "quick": args.quick,
            "batch_invariant": args.batch_invariant,
            "passes": args.passes,
            "budget": vars(budget),
            "tree_note": "0 = cloud-only step; n > 0 = up to 4 beams of n/4 random tokens",
            **results,
            **derived,
            "kernels": kernel_rows,
            **({"acceptance": accept_rows} if args.acceptance else {}),
            "wall_s": time.monotonic() - started,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
