"""Flash-offloaded FFN weights ("LLM in a Flash") against DRAM, naive reads and mmap.

For each model the benchmark packs the weights (float16, int8, int4 bundles), calibrates the
sparsity predictors on the standard library's training split, and writes the FFN matrices
unbundled (gate, up, down, as Hugging Face stores them) for the mmap baseline. The dense
model then generates greedily from held-out prompts (the first --prompt-tokens tokens of
held-out stdlib files); every method replays exactly those token sequences, teacher-forced,
one token per step, in a fresh process (so peak memory is its own), after the page cache
of every model file has been dropped (POSIX_FADV_DONTNEED):

    dense       the checkpoint in DRAM
    naive       flash pack, every layer's FFN read in full on every token (no predictor,
                no window), through the same budget-limited store
    mmap        the unbundled FFN file memory-mapped; the process's FFN pages are dropped
                after every token (madvise + fadvise DONTNEED): what an LRU page cache
                does to a cyclic scan larger than itself, i.e. a budget below the FFN size
    predictor   ours: predicted neurons only; unbundled reads (gate, up, down apart), unmerged
    +window     ... and neurons used in the last --window tokens stay resident
    +bundle     ... and row-column bundles, neighbours merged into larger reads (full method)
    +int8       ... and int8 bundles (a scale per row: the fused int8 kernels multiply
                the codes as they lie, edge_node.flash.fused) with their own predictors
    +gap        ... and reads merged across up to 32 KiB of unneeded bytes (read, dropped):
                fewer, larger reads for devices where latency costs more than bytes
    int4        +gap with int4 bundles instead (group-wise scales), their own predictors
    int8 tight  +gap, its store cut to keep the float16 rows' FFN/store ratio
    int4 tight  int4, its store cut likewise

All flash methods (and mmap) keep the resident weights (embeddings, attention, norms,
predictors) in --dtype (float16) and run the FFN matmuls in float32 (load_flash_model's
CPU default); dense, the reference for speed and top-1 agreement, runs in float32. They
get the same DRAM budget (but see the tight methods below), which covers every
weight the process holds: resident weights, neuron caches, read buffers and scratch. It
is --budget-fraction (0.5) of the float16 FFN size, so the FFN is at least twice the
budget. A model whose resident weights alone exceed half of that (the demo models: their
embeddings outweigh their small FFNs) gets instead its resident weights plus
--store-fraction (0.4) of the FFN for the store: its FFN is 2.5x the part of the budget
it can be read into. Both ratios are reported. A quantized FFN is smaller, so the same
budget holds more of it (the int4 one whole, on the wide model: FFN/store in the table
says how many times its store each method's FFN is); the tight methods cut their store
in proportion, keeping the float16 rows' FFN/store ratio.

Reported per method: tokens/s (decode steps), FFN bytes read per token (and as % of the
float16 FFN), reads per token and mean read size, cache hit rate, I/O ms per token (reads
in flight) and the part of it the FFN waited for (the rest overlapped the multiplication
of resident neurons), predictor and compute ms per token, the share of predicted neurons
found active and multiplied (ReLU), top-1 agreement with dense on the same sequences,
peak RSS, and bytes the kernel read from storage (/proc/self/io). Per model: predictor
recall and false-positive rate on the benchmark's own decode tokens, and measured
activation sparsity.

The larger model (`--wide-from`) is the demo target with each FFN neuron replaced by
--wide-factor noisy copies (gate rows perturbed by 5% noise, down columns divided by the
factor; copies interleaved so that neighbours are still different neurons): a model of
realistic activation statistics whose FFN is --wide-factor times wider, so that I/O
dominates. Its measured sparsity is printed.

    python benchmarks/flash.py                                  # demo draft, target, wide
    python benchmarks/flash.py --model DIR --quick
    python benchmarks/flash.py --model WORK/wide16 --methods mmap,+gap --repeat 5
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import REPO_ROOT, machine, model_summary, print_json
from torch import nn

from edge_node.flash.calibrate import text_windows
from edge_node.flash.ffn import flash_store, load_flash_model
from edge_node.flash.pack import default_quant, pack_model, read_manifest
from edge_node.flash.predictors import load_predictors
from edge_node.flash.store import StoreOptions
from lm.checkpoint import load_model, read_hf_config, save_model
from lm.kv_cache import KVCache
from lm.model import Transformer
from lm.sparsity import active_mask
from lm.tokenizer import Tokenizer
from lm.training import corpus
from lm.training.predictors import PredictorTraining, rates

DEMO_DIR = REPO_ROOT / "orchestrator" / "demo_models"
METHODS = (
    "dense",
    "naive",
    "mmap",
    "predictor",
    "+window",
    "+bundle",
    "+int8",
    "+gap",
    "int4",
    "int8 tight",
    "int4 tight",
)
# The pack each method reads (the rest read float16).
PACK_OF = {
    "+int8": "int8",
    "+gap": "int8",
    "int4": "int4",
    "int8 tight": "int8",
    "int4 tight": "int4",
}
# Their store shrinks with their pack's FFN: it is as many times the store as float16's.
TIGHT = ("int8 tight", "int4 tight")
GAP_BYTES = 32 * 1024
PAGE = 4096


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, action="append", help="model directory (repeat)")
    parser.add_argument("--wide-from", type=Path, help="build the wide model from this one")
    parser.add_argument("--wide-factor", type=int, default=16)
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgecloud-flash-bench"))
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--budget-fraction", type=float, default=0.5, help="budget / FFN bytes (0.5)"
    )
    parser.add_argument(
        "--store-fraction",
        type=float,
        default=0.4,
        help="store budget / FFN bytes where the resident part is too big for the above (0.4)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float16",
        help="resident weights of the flash and mmap runs (float16)",
    )
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--calibration-tokens", type=int, default=16384)
    parser.add_argument(
        "--min-top1",
        type=float,
        help="SwiGLU: the accuracy calibrate's per-layer sparsity keeps (default: its 0.98)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    parser.add_argument("--quick", action="store_true", help="2 prompts, 8 new tokens")
    parser.add_argument(
        "--methods", help=f"comma-separated subset of {','.join(METHODS[1:])} (dense always runs)"
    )
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per method; the median is reported (1)"
    )
    args = parser.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        torch.set_num_threads(spec["threads"])
        print(json.dumps(run_worker(spec)), flush=True)
        return
    torch.set_num_threads(args.threads)
    if args.quick:
        args.prompts, args.new_tokens, args.calibration_tokens = 2, 8, 4096
    if args.repeat < 1:
        parser.error(f"--repeat: must be >= 1, got {args.repeat}")
    args.methods = args.methods.split(",") if args.methods else list(METHODS[1:])
    unknown = [m for m in args.methods if m not in METHODS[1:]]
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {','.join(METHODS[1:])}")
    models = args.model
    if models is None:
        models = [DEMO_DIR / "draft", DEMO_DIR / "target"]
        args.wide_from = args.wide_from or DEMO_DIR / "target"
    args.work.mkdir(parents=True, exist_ok=True)
    if args.wide_from is not None:
        wide = args.work / f"wide{args.wide_factor}"
        if not (wide / "config.json").exists():
            build_wide(args.wide_from, wide, args.wide_factor)
        models = [*models, wide]
    results = [bench_model(Path(m), args) for m in models]
    print_json(
        {
            "benchmark": "flash",
            "machine": machine(torch.device("cpu")),
            "io_mode": results[0]["io_mode"],
            "settings": {
                k: getattr(args, k)
                for k in (
                    "prompts",
                    "prompt_tokens",
                    "new_tokens",
                    "budget_fraction",
                    "store_fraction",
                    "dtype",
                    "window",
                    "threads",
                    "repeat",
                )
            },
            "models": results,
        }
    )


def bench_model(model_dir: Path, args: argparse.Namespace) -> dict:
    work = args.work / model_dir.name
    packs = {"float16": work / "pack_f16", "int8": work / "pack_int8", "int4": work / "pack_int4"}
    # Only the packs the methods read: calibrating one takes minutes on a real model.
    needed = {"float16"} | {PACK_OF[m] for m in args.methods if m in PACK_OF}
    packs = {name: pack for name, pack in packs.items() if name in needed}
    tokenizer = Tokenizer.from_dir(model_dir)
    dim = read_hf_config(model_dir / "config.json").dim
    quant = {"int8": default_quant(8, dim), "int4": default_quant(4, dim)}
    shares = None  # SwiGLU: the float16 pack's per-layer sparsity, reused by the others
    for name, pack in packs.items():
        meta = current_calibration(pack)
        if meta is None:
            pack_model(model_dir, pack, quant=quant.get(name), dtype=torch.float16)
            shares = calibrate_pack(pack, tokenizer, args.calibration_tokens, args.min_top1, shares)
        elif shares is None:
            shares = meta["report"].get("sparsity")
    unbundled = work / "ffn_unbundled.bin"
    if not unbundled.exists():
        write_unbundled(load_model(model_dir, device="cpu", dtype=torch.float16), unbundled)
    manifest = read_manifest(packs["float16"])
    config = manifest.config
    ffn_bytes = config.n_layers * 3 * config.dim * config.hidden_dim * 2  # float16
    prompts = heldout_prompts(tokenizer, args.prompts, args.prompt_tokens)
    files = [str(p) for p in model_files(model_dir, packs, unbundled)]
    spec = {
        "model_dir": str(model_dir),
        "packs": {k: str(v) for k, v in packs.items()},
        "unbundled": str(unbundled),
        "prompts": prompts,
        "new_tokens": args.new_tokens,
        "window": args.window,
        "threads": args.threads,
        "dtype": args.dtype,
        "files": files,
    }
    dense = repeated(spec, "dense", args.repeat)
    spec["sequences"] = dense["sequences"]
    spec["dense_argmax"] = dense["argmax"]
    itemsize = getattr(torch, args.dtype).itemsize
    resident = (dense["resident_elements"] + dense["predictor_elements"]) * itemsize
    covers_all = resident <= args.budget_fraction * ffn_bytes / 2
    if covers_all:
        spec["budget"] = int(args.budget_fraction * ffn_bytes)
        store_budget = spec["budget"] - resident
    else:
        store_budget = int(args.store_fraction * ffn_bytes)
        spec["budget"] = resident + store_budget
    spec["read_bytes"] = 128 * 1024 if store_budget > 8 * 2**20 else 16 * 1024
    # The tight methods' store shrinks with their pack's smaller FFN: it is as many times
    # their store as the float16 FFN is (with the float16 budget, int4 fits in DRAM whole).
    pack_ffn = {
        name: read_manifest(pack).payload * config.hidden_dim * config.n_layers
        for name, pack in packs.items()
    }
    spec["budgets"] = {method: spec["budget"] for method in METHODS}
    # The tight stores are cut from what each pack's own resident part leaves (int8 packs
    # keep int8 predictors: a smaller resident part than the float16 one).
    dtype = getattr(torch, args.dtype)
    for method in (m for m in TIGHT if m in args.methods):
        shrink = pack_ffn[PACK_OF[method]] / pack_ffn["float16"]
        own = pack_resident(packs[PACK_OF[method]], dtype)
        spec["budgets"][method] = own + int(store_budget * shrink)
    methods = {"dense": dense} | {m: repeated(spec, m, args.repeat) for m in args.methods}
    for result in methods.values():
        for key in ("sequences", "argmax"):
            result.pop(key, None)
        if "bytes_read_per_token" in result:
            result["pct_of_ffn_bytes"] = 100 * result["bytes_read_per_token"] / ffn_bytes
            method = result["method"]
            result["pack_ffn_bytes"] = pack_ffn[PACK_OF.get(method, "float16")]
            result["budget_bytes"] = spec["budgets"][method]
            result["pack_ffn_to_store"] = result["pack_ffn_bytes"] / (
                spec["budgets"][method] - result["plan"]["resident"]
            )
    model_bytes = dense["resident_elements"] * 2 + ffn_bytes
    summary = {
        "model": {**model_summary(meta_model(config), str(model_dir)), "dtype": "float16"},
        "ffn_bytes_float16": ffn_bytes,
        "model_bytes_float16": model_bytes,
        "budget_bytes": spec["budget"],
        "budget_covers": "all weights" if covers_all else "store only",
        "resident_bytes": resident,
        "store_budget_bytes": store_budget,
        "read_bytes": spec["read_bytes"],
        "ffn_to_budget": ffn_bytes / spec["budget"],
        "ffn_to_store_budget": ffn_bytes / store_budget,
        "model_to_budget": model_bytes / spec["budget"],
        "activation_sparsity": dense["sparsity"],
        "predictor": dense["predictor"],
        "calibration": json.loads((packs["float16"] / "predictor.json").read_text())["report"],
        "io_mode": next((r["io_mode"] for r in methods.values() if "io_mode" in r), None),
        "methods": methods,
    }
    print_table(model_dir.name, summary)
    return summary


def meta_model(config) -> Transformer:
    with torch.device("meta"):
        return Transformer(config)


def pack_resident(pack: Path, dtype: torch.dtype) -> int:
    """Bytes of a pack's resident part as the flash model loads it (predictors included)."""
    model = load_flash_model(pack, 1 << 40, device="cpu", dtype=dtype, verify=False)
    return flash_store(model).plan.resident


def repeated(spec: dict, method: str, repeat: int) -> dict:
    """The median run (by tokens/s; the upper middle one for an even count) of `repeat`
    fresh-process runs, with every run's tokens/s when there are several: this machine's
    I/O varies from run to run."""
    runs = sorted((worker(spec, method) for _ in range(repeat)), key=lambda r: r["tokens_per_s"])
    result = runs[len(runs) // 2]
    if repeat > 1:
        result["tokens_per_s_runs"] = [r["tokens_per_s"] for r in runs]
    return result


def worker(spec: dict, method: str) -> dict:
    """Runs one method in a fresh process; its last stdout line is a JSON object."""
    drop_page_cache(spec["files"])
    spec = {**spec, "method": method}
    done = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise SystemExit(f"{method} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_worker(spec: dict) -> dict:
    method = spec["method"]
    base_rss = peak_rss()
    result: dict = {"method": method}
    model, after_token = load_method(spec, method, result)
    result["load_s"] = time.perf_counter() - result.pop("_start")
    io_before = proc_read_bytes()
    sequences = spec.get("sequences")
    argmax, times, new_sequences = [], [], []
    store = flash_store(model) if method not in ("dense", "mmap") else None
    recorder = SparsityRecorder(model, spec) if method == "dense" else None
    for i, prompt in enumerate(spec["prompts"]):
        forced = None if sequences is None else sequences[i]
        tokens, steps, step_times = decode(
            model, prompt, spec["new_tokens"], forced, recorder, after_token
        )
        new_sequences.append(tokens)
        argmax.append(steps)
        times.extend(step_times)
    result["tokens"] = len(times)
    result["tokens_per_s"] = len(times) / sum(times)
    result["ms_per_token"] = 1000 * sum(times) / len(times)
    if method == "dense":
        result["sequences"], result["argmax"] = new_sequences, argmax
        result.update(recorder.summary())
    else:
        flat = [a for seq in argmax for a in seq]
        ref = [a for seq in spec["dense_argmax"] for a in seq]
        result["top1_agreement"] = float(np.mean(np.array(flat) == np.array(ref)))
    if store is not None:
        result.update(store_metrics(store, spec["new_tokens"]))
    result["kernel_read_bytes_per_token"] = (proc_read_bytes() - io_before) / len(times)
    result["peak_rss_mb"] = peak_rss() / 2**20
    result["rss_before_load_mb"] = base_rss / 2**20
    return result


def load_method(spec: dict, method: str, result: dict) -> tuple[nn.Module, Callable | None]:
    """The model a method runs, and what to call after each token (mmap drops its pages)."""
    result["_start"] = time.perf_counter()
    if method == "dense":
        model = load_model(spec["model_dir"], device="cpu", dtype=torch.float32)
        state = {n: t for n, t in model.state_dict().items() if "feed_forward" not in n}
        unique = {t.data_ptr(): t for t in state.values()}
        result["resident_elements"] = sum(t.numel() for t in unique.values())
        manifest = read_manifest(spec["packs"]["float16"])
        predictors = load_predictors(
            spec["packs"]["float16"], manifest, torch.device("cpu"), torch.float32
        )
        result["predictor_elements"] = sum(
            t.numel() for p in predictors.predictors for t in p.state_dict().values()
        )
        return model, None
    dtype = getattr(torch, spec["dtype"])
    if method == "mmap":
        model = load_model(spec["model_dir"], device="cpu", dtype=dtype)
        return model, attach_mmap(model, Path(spec["unbundled"]))
    window = spec["window"]
    # Read buffers come out of the budget: small ones for the small models.
    base = StoreOptions(read_bytes=spec["read_bytes"])
    options = {
        "naive": replace(base, window=0),
        "predictor": replace(base, window=0, bundled_reads=False, merge_reads=False),
        "+window": replace(base, window=window, bundled_reads=False, merge_reads=False),
        "+bundle": replace(base, window=window),
        "+int8": replace(base, window=window),
    }.get(method, replace(base, window=window, merge_gap=GAP_BYTES))
    model = load_flash_model(
        spec["packs"][PACK_OF.get(method, "float16")],
        spec["budgets"][method],
        device="cpu",
        dtype=dtype,
        options=options,
        use_predictor=method != "naive",
        verify=False,  # hashing would read (and cache) every byte before the run
    )
    plan = flash_store(model).plan
    result["plan"] = {
        k: getattr(plan, k)
        for k in ("budget", "resident", "rows", "chunk_rows", "cache", "buffers", "scratch")
    }
    result["cache_rows_fraction"] = [rows / model.config.hidden_dim for rows in plan.rows]
    return model, None


@torch.inference_mode()
def decode(model, prompt, new_tokens, forced, recorder, after_token):
    """Prefill `prompt`, then `new_tokens` single-token steps feeding `forced` (or greedy)."""
    dtype = model.tok_embeddings.weight.dtype
    cache = KVCache(model.config, 1, len(prompt) + new_tokens + 1, dtype=dtype)
    logits = model(torch.tensor([prompt]), cache=cache)[0, -1]
    cache.commit(0, range(len(prompt)))
    tokens, argmax, times = [], [int(logits.argmax())], []
    if recorder is not None:
        recorder.active = True
    for i in range(new_tokens):
        token = forced[i] if forced is not None else argmax[-1]
        tokens.append(token)
        start = time.perf_counter()
        logits = model(torch.tensor([[token]]), cache=cache)[0, -1]
        times.append(time.perf_counter() - start)
        cache.commit(0, [0])
        argmax.append(int(logits.argmax()))
        if after_token is not None:
            after_token()
    if recorder is not None:
        recorder.active = False
    return tokens, argmax, times


class SparsityRecorder:
    """In the dense run: each layer's true active neurons on decode tokens, and what the
    float16 pack's predictors predict for them."""

    def __init__(self, model: Transformer, spec: dict) -> None:
        pack = spec["packs"]["float16"]
        loaded = load_predictors(pack, read_manifest(pack), torch.device("cpu"), torch.float32)
        thresholds = loaded.meta.get("thresholds") or [0.0] * len(model.layers)
        self.active = False
        self.true: list[list[torch.Tensor]] = [[] for _ in model.layers]
        self.predicted: list[list[torch.Tensor]] = [[] for _ in model.layers]
        for i, block in enumerate(model.layers):
            block.feed_forward.register_forward_pre_hook(
                self._hook(i, loaded.predictors[i], thresholds[i], model.config.activation)
            )

    def _hook(self, layer, predictor, threshold, activation):
        def capture(module, args):
            if self.active:
                x = args[0].reshape(-1, args[0].shape[-1])
                gate, up = module.gate_and_up(x)
                self.true[layer].append(active_mask(gate, up, activation, threshold))
                self.predicted[layer].append(predictor.predict(x))

        return capture

    def summary(self) -> dict:
        per_layer = [
            rates(torch.cat(p), torch.cat(t))
            for p, t in zip(self.predicted, self.true, strict=True)
        ]
        return {
            "sparsity": {
                "per_layer": [round(1 - r.active, 4) for r in per_layer],
                "mean": float(np.mean([1 - r.active for r in per_layer])),
            },
            "predictor": {
                "recall": [round(r.recall, 4) for r in per_layer],
                "false_positive_rate": [round(r.false_positive_rate, 4) for r in per_layer],
                "predicted_fraction": [round(r.predicted, 4) for r in per_layer],
                "mean_recall": float(np.mean([r.recall for r in per_layer])),
            },
        }


def store_metrics(store, new_tokens: int) -> dict:
    """Per decode token (prefill steps excluded: one in every new_tokens + 1 steps)."""
    steps = [m for i, m in enumerate(store.history) if i % (new_tokens + 1)]
    n = len(steps)
    total = lambda name: sum(getattr(m, name) for m in steps)  # noqa: E731
    reads = total("reads")
    return {
        "io_mode": store.io_mode,
        "bytes_read_per_token": total("bytes_read") / n,
        "reads_per_token": reads / n,
        "mean_read_bytes": total("bytes_read") / reads if reads else 0.0,
        "hit_rate": total("hits") / max(1, total("needed")),
        "neurons_per_token": total("needed") / n,
        "io_ms_per_token": 1000 * total("io_s") / n,
        "io_wait_ms_per_token": 1000 * total("io_wait_s") / n,
        "computed_fraction": total("computed") / max(1, total("needed")),
        "predictor_ms_per_token": 1000 * total("predictor_s") / n,
        "ffn_compute_ms_per_token": 1000 * total("compute_s") / n,
        "accounted_bytes": store.plan.resident + store.allocated_bytes(),
    }


class MmapFeedForward(nn.Module):
    """A dense FFN whose float16 matrices are views of one memory-mapped file; it
    multiplies in float32, as the flash FFN does on CPU."""

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act) -> None:
        super().__init__()
        self.gate, self.up, self.down, self.act = gate, up, down, act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        gate = F.linear(h, self.gate.float())
        y = F.linear(self.act(gate) * F.linear(h, self.up.float()), self.down.float())
        return y.to(x.dtype)


def attach_mmap(model: Transformer, path: Path) -> Callable[[], None]:
    """Replaces every FFN by views of `path`; returns what drops the FFN pages."""
    config = model.config
    fd = os.open(path, os.O_RDONLY)
    mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    array = np.frombuffer(mapping, dtype=np.float16)
    matrix = config.hidden_dim * config.dim
    layer_elems = -(-3 * matrix * 2 // PAGE) * PAGE // 2
    for i, block in enumerate(model.layers):
        base = i * layer_elems
        views = [
            torch.from_numpy(array[base + k * matrix : base + (k + 1) * matrix]) for k in range(3)
        ]
        block.feed_forward = MmapFeedForward(
            views[0].view(config.hidden_dim, config.dim),
            views[1].view(config.hidden_dim, config.dim),
            views[2].view(config.dim, config.hidden_dim),
            getattr(F, config.activation),
        )

    def after_token() -> None:
        mapping.madvise(mmap.MADV_DONTNEED)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    return after_token


def write_unbundled(model: Transformer, path: Path) -> None:
    """Each layer's gate (hidden, dim), up (hidden, dim), down (dim, hidden) in float16,
    layers page-aligned: the Hugging Face layout, for the mmap baseline."""
    with path.open("wb") as f:
        for block in model.layers:
            ffn = block.feed_forward
            data = b"".join(
                w.weight.detach().half().contiguous().numpy().tobytes()
                for w in (ffn.gate, ffn.up, ffn.down)
            )
            f.write(data + bytes(-len(data) % PAGE))
        f.flush()
        os.fsync(f.fileno())


def build_wide(source: Path, out: Path, factor: int, noise: float = 0.05) -> None:
    """`source` with every FFN neuron replaced by `factor` noisy copies (see module doc)."""
    model = load_model(source, device="cpu", dtype=torch.float32)
    config = replace(model.config, hidden_dim=model.config.hidden_dim * factor)
    generator = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        wide = Transformer(config)
    state = model.state_dict()
    for i in range(config.n_layers):
        prefix = f"layers.{i}.feed_forward."
        gate, up, down = (state.pop(prefix + n + ".weight") for n in ("gate", "up", "down"))
        scale = gate.norm(dim=1, keepdim=True) / gate.shape[1] ** 0.5
        copies = gate.repeat(factor, 1)  # copy j of neuron n at j * hidden + n
        copies += noise * scale.repeat(factor, 1) * torch.randn(copies.shape, generator=generator)
        state[prefix + "gate.weight"] = copies
        state[prefix + "up.weight"] = up.repeat(factor, 1)
        state[prefix + "down.weight"] = down.repeat(1, factor) / factor
    if config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    wide.load_state_dict(state, assign=True)
    if config.tie_embeddings:
        wide.output.weight = wide.tok_embeddings.weight
    save_model(wide.half(), out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, out / name)


def current_calibration(pack: Path) -> dict | None:
    """`pack`'s predictor.json when the pack is in this version's format and calibrated
    under this version's rule (SwiGLU thresholds on |silu(gate) * up|, "thresholds" in
    it); None for packs from an older one, which are rewritten."""
    try:
        read_manifest(pack)
        meta = json.loads((pack / "predictor.json").read_text())
    except (ValueError, OSError):
        return None
    return meta if "thresholds" in meta else None


def calibrate_pack(
    pack: Path,
    tokenizer: Tokenizer,
    tokens: int,
    min_top1: float | None,
    shares: list[float] | None,
) -> list[float] | None:
    """Calibrates `pack`: at `shares` (per-layer sparsity) when given, else at the shares
    that keep `min_top1`; returns the shares (None for ReLU)."""
    from edge_node.flash.calibrate import calibrate

    split = corpus.discover()
    train = text_windows(tokenizer, split.paths("train"), tokens, 256)
    heldout = text_windows(tokenizer, split.paths("heldout"), max(1024, tokens // 4), 256)
    report = calibrate(
        pack,
        train,
        heldout,
        PredictorTraining(steps=300),
        sparsity=shares,
        min_top1=min_top1
        if shares is None and read_manifest(pack).config.activation == "silu"
        else None,
        progress=lambda s: None,
    )
    recall = [layer["recall"] for layer in report["layers"]]
    print(f"calibrated {pack}: held-out recall {recall}", flush=True)
    for name in ("threshold_cost", "predicted_cost"):
        if name in report:
            print(f"  {name}: {report[name]}", flush=True)
    if "sparsity" in report:
        print(f"  sparsity per layer {report['sparsity']}", flush=True)
    return report.get("sparsity")


def heldout_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """The first `length` tokens (BOS first) of the first `count` long-enough held-out files."""
    split = corpus.discover()
    bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    prompts = []
    for path in split.paths("heldout"):
        try:
            ids = bos + tokenizer.encode(path.read_text(encoding="utf-8"), add_special_tokens=False)
        except UnicodeDecodeError:
            continue
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise SystemExit(f"--prompts: only {len(prompts)} held-out files have {length} tokens")


def model_files(model_dir: Path, packs: dict, unbundled: Path) -> list[Path]:
    files = [unbundled, *model_dir.glob("*.safetensors")]
    for pack in packs.values():
        files += [pack / "ffn.bin", pack / "dram.safetensors", pack / "predictor.safetensors"]
    return files


def drop_page_cache(files: list[str]) -> None:
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from
    the parent that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def proc_read_bytes() -> int:
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def print_table(name: str, summary: dict) -> None:
    print(
        f"\n{name}: FFN {summary['ffn_bytes_float16'] / 2**20:.1f} MiB (float16), budget "
        f"{summary['budget_bytes'] / 2**20:.1f} MiB ({summary['budget_covers']}; store "
        f"{summary['store_budget_bytes'] / 2**20:.1f} MiB), FFN/budget "
        f"{summary['ffn_to_budget']:.2f}, FFN/store {summary['ffn_to_store_budget']:.2f}, "
        f"model/budget {summary['model_to_budget']:.2f}, sparsity "
        f"{summary['activation_sparsity']['mean']:.3f}, predictor recall "
        f"{summary['predictor']['mean_recall']:.4f}, reads: {summary['io_mode']}"
    )
    print(
        f"{'method':>10} {'tok/s':>8} {'%FFN/tok':>9} {'reads/tok':>10} {'KiB/read':>9} "
        f"{'FFN/store':>9} {'hit':>6} {'io ms':>7} {'wait ms':>8} {'pred ms':>8} {'top-1':>6} "
        f"{'peak MiB':>9} "
        f"{'kernel MiB/tok':>15}"
    )
    for method, r in summary["methods"].items():
        print(
            f"{method:>10} {r['tokens_per_s']:8.1f} {r.get('pct_of_ffn_bytes', 0):9.1f} "
            f"{r.get('reads_per_token', 0):10.1f} {r.get('mean_read_bytes', 0) / 1024:9.1f} "
            f"{r.get('pack_ffn_to_store', 0):9.2f} "
            f"{r.get('hit_rate', 0):6.3f} {r.get('io_ms_per_token', 0):7.2f} "
            f"{r.get('io_wait_ms_per_token', 0):8.2f} "
            f"{r.get('predictor_ms_per_token', 0):8.2f} {r.get('top1_agreement', 1.0):6.3f} "
            f"{r['peak_rss_mb']:9.1f} {r['kernel_read_bytes_per_token'] / 2**20:15.2f}",
            flush=True,
        )
    for method, r in summary["methods"].items():
        if "tokens_per_s_runs" in r:
            runs = ", ".join(f"{t:.1f}" for t in r["tokens_per_s_runs"])
            print(f"{method:>10} tokens/s over {len(r['tokens_per_s_runs'])} runs: {runs}")


if __name__ == "__main__":
    main()
