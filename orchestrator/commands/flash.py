"""`edgecloud flash pack|calibrate|info`: lay a model out for flash and train its predictors.

pack: MODEL_DIR (a Hugging Face directory) -> OUT_DIR with dram.safetensors (embeddings,
attention, norms), ffn.bin (row-column bundles, optionally int8/int4) and manifest.json.
calibrate: trains the per-layer sparsity predictors of a pack on a corpus (default: the
Python standard library, as `edgecloud train`) and prints held-out recall and
false-positive rate per layer (and, for SwiGLU, what the gate thresholding costs: top-1
agreement, KL and perplexity against the dense model). info: what a pack holds and the
smallest budget it runs in. The edge runs a pack with `edgecloud edge serve --model OUT_DIR
--flash-budget-mb N` (`--dtype float16` halves the resident part of the budget), and
`edgecloud up` with `--draft OUT_DIR --draft-flash-budget-mb N`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.commands.flags import corpus_flags
from orchestrator.usage import UsageError

QUANTIZE = {"int8": 8, "int4": 4}


def register(subparsers: argparse._SubParsersAction) -> None:
    flash = subparsers.add_parser("flash", help="flash-offloaded FFN weights for edge models")
    sub = flash.add_subparsers(title="flash commands", metavar="COMMAND", required=True)

    pack = sub.add_parser("pack", help="write a model's flash layout")
    pack.add_argument(
        "model_dir", type=Path, metavar="MODEL_DIR", help="Hugging Face model directory"
    )
    pack.add_argument("out_dir", type=Path, metavar="OUT_DIR", help="pack directory to write")
    pack.add_argument("--quantize", choices=sorted(QUANTIZE), help="FFN codes (default: floats)")
    pack.add_argument(
        "--group-size",
        type=int,
        help="values per scale (default: a whole row for int8, the fused kernels' layout; 64 "
        "for int4)",
    )
    pack.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        help="float storage (default: the checkpoint's torch_dtype)",
    )
    pack.add_argument(
        "--align",
        type=int,
        default=4096,
        help="bundle/layer alignment in bytes (default: %(default)s)",
    )
    pack.set_defaults(run=run_pack)

    calibrate = sub.add_parser("calibrate", help="train a pack's sparsity predictors")
    calibrate.add_argument(
        "pack_dir", type=Path, metavar="OUT_DIR", help="pack directory (flash pack's OUT_DIR)"
    )
    corpus_flags(calibrate)
    calibrate.add_argument(
        "--tokens", type=int, default=32768, help="training tokens (default: %(default)s)"
    )
    calibrate.add_argument(
        "--heldout-tokens",
        type=int,
        default=8192,
        help="held-out tokens measured (default: %(default)s)",
    )
    calibrate.add_argument(
        "--context", type=int, default=256, help="tokens per window (default: %(default)s)"
    )
    calibrate.add_argument(
        "--rank", type=int, default=64, help="predictor rank (default: %(default)s)"
    )
    calibrate.add_argument(
        "--steps", type=int, default=400, help="steps per layer (default: %(default)s)"
    )
    calibrate.add_argument(
        "--batch", type=int, default=1024, help="tokens per step (default: %(default)s)"
    )
    calibrate.add_argument(
        "--lr", type=float, default=3e-3, help="predictor learning rate (default: %(default)s)"
    )
    calibrate.add_argument(
        "--recall",
        type=float,
        default=0.99,
        help="target recall on training tokens (default: %(default)s)",
    )
    shares = calibrate.add_mutually_exclusive_group()
    shares.add_argument(
        "--min-top1",
        type=float,
        help="SwiGLU only: per-layer sparsity that keeps this teacher-forced top-1 agreement "
        "with the dense model on the training text (default: 0.98)",
    )
    shares.add_argument(
        "--sparsity",
        type=float,
        help="SwiGLU only: instead, one share of every layer's |silu(gate) * up| treated as zero",
    )
    calibrate.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the training files' order and the predictors' init (default: %(default)s)",
    )
    calibrate.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    calibrate.add_argument("--json", action="store_true", help="print one JSON object")
    calibrate.set_defaults(run=run_calibrate)

    info = sub.add_parser("info", help="a pack's layout and smallest DRAM budget")
    info.add_argument(
        "pack_dir", type=Path, metavar="OUT_DIR", help="pack directory (flash pack's OUT_DIR)"
    )
    info.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="the resident part's dtype on the edge, as edge serve --dtype (default: %(default)s)",
    )
    info.set_defaults(run=run_info)


def run_pack(args: argparse.Namespace) -> int:
    import torch

    from edge_node.flash.pack import default_quant, pack_model
    from lm.checkpoint import read_hf_config
    from lm.quantize import QuantSpec

    if not args.model_dir.exists():
        raise UsageError(f"MODEL_DIR: {args.model_dir} does not exist")
    try:
        quant = None
        if args.quantize:
            bits = QUANTIZE[args.quantize]
            if args.group_size is None:
                quant = default_quant(bits, read_hf_config(args.model_dir / "config.json").dim)
            else:
                quant = QuantSpec(bits=bits, group_size=args.group_size)
        dtype = getattr(torch, args.dtype) if args.dtype else None
        manifest = pack_model(
            args.model_dir, args.out_dir, quant=quant, dtype=dtype, align=args.align
        )
    except ValueError as exc:  # CheckpointError names the file; others the field
        raise UsageError(_flag_message(str(exc))) from exc
    config = manifest.config
    print(
        f"packed {args.model_dir} -> {args.out_dir}: {config.n_layers} layers x "
        f"{config.hidden_dim} neurons, {manifest.payload}-byte bundles at stride "
        f"{manifest.stride} ({args.quantize or _dtype_name(manifest)}), "
        f"ffn.bin {manifest.ffn.nbytes / 2**20:.1f} MiB, "
        f"dram.safetensors {manifest.dram.nbytes / 2**20:.1f} MiB"
    )
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from edge_node.flash.calibrate import calibrate, text_windows
    from lm.errors import CheckpointError
    from lm.tokenizer import Tokenizer
    from lm.training import corpus
    from lm.training.predictors import PredictorTraining

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for flag in ("tokens", "heldout_tokens", "context"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')}: must be >= 1")
    if args.context > min(args.tokens, args.heldout_tokens):
        raise UsageError(f"--context: {args.context} exceeds --tokens/--heldout-tokens")
    if not (args.pack_dir / "tokenizer.json").is_file():
        raise UsageError(
            f"OUT_DIR: {args.pack_dir / 'tokenizer.json'} missing; calibration reads text "
            "with the model's tokenizer (pack a model directory that has one)"
        )
    try:
        training = PredictorTraining(
            rank=args.rank,
            steps=args.steps,
            batch_size=args.batch,
            lr=args.lr,
            recall=args.recall,
            seed=args.seed,
        )
        tokenizer = Tokenizer.from_dir(args.pack_dir)
        split = corpus.discover(
            args.corpus,
            pattern=args.pattern,
            include_tests=args.include_tests,
            heldout_fraction=args.heldout_fraction,
        )
        if not split.heldout:
            raise UsageError(f"--corpus: no held-out files under {split.root}")
        train = text_windows(tokenizer, split.paths("train"), args.tokens, args.context, args.seed)
        heldout = text_windows(tokenizer, split.paths("heldout"), args.heldout_tokens, args.context)
        report = calibrate(
            args.pack_dir,
            train,
            heldout,
            training,
            sparsity=args.sparsity,
            min_top1=args.min_top1,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    except (ValueError, CheckpointError) as exc:
        raise UsageError(_flag_message(str(exc))) from exc
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"held-out recall / false-positive rate per layer ({report['heldout_tokens']} tokens):")
    for i, layer in enumerate(report["layers"]):
        print(
            f"  layer {i}: recall {layer['recall']:.4f}  FPR {layer['false_positive_rate']:.4f}"
            f"  active {layer['active']:.3f}  predicted {layer['predicted']:.3f}"
        )
    for name in ("threshold_cost", "predicted_cost"):
        if name in report:
            cost = report[name]
            label = name.replace("_", " ")
            if name == "threshold_cost":
                label += f" (mean sparsity {report['mean_sparsity']:.3f})"
            print(
                f"{label}: top-1 agreement {cost['top1_agreement']:.4f}, "
                f"KL {cost['kl_nats']:.5f} nats/token, "
                f"perplexity {cost['dense_perplexity']:.3f} -> {cost['sparse_perplexity']:.3f}"
            )
    return 0


def run_info(args: argparse.Namespace) -> int:
    import torch

    from edge_node.flash.pack import read_manifest
    from edge_node.flash.store import StoreOptions, minimum_budget
    from lm.errors import CheckpointError

    try:
        manifest = read_manifest(args.pack_dir)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc
    config = manifest.config
    # On CPU, predictors left out, default options: the FFN computes in float32
    # (load_flash_model's ffn_dtype), decoding bundles unless they are float32 already.
    itemsize = getattr(torch, args.dtype).itemsize
    resident = sum(torch.Size(shape).numel() * itemsize for shape in manifest.tensors.values())
    in_place = manifest.bundle.quant is None and manifest.bundle.dtype == torch.float32
    decoded_row = 0 if in_place else 3 * config.dim * 4
    minimum = minimum_budget(manifest, resident, StoreOptions(), decoded_row)
    print(
        json.dumps(
            {
                "layers": config.n_layers,
                "dim": config.dim,
                "hidden": config.hidden_dim,
                "activation": config.activation,
                "storage": _dtype_name(manifest),
                "bundle_bytes": manifest.payload,
                "stride": manifest.stride,
                "ffn_bytes": manifest.ffn.nbytes,
                "dram_bytes": manifest.dram.nbytes,
                "dtype": args.dtype,
                "resident_bytes": resident,
                "minimum_budget_bytes": minimum,
                "predictor": (args.pack_dir / "predictor.json").is_file(),
            },
            indent=2,
        )
    )
    return 0


def _dtype_name(manifest) -> str:
    quant = manifest.bundle.quant
    return quant.name if quant else str(manifest.bundle.dtype).removeprefix("torch.")


def _flag_message(message: str) -> str:
    """Library errors name fields (group_size: ...); the CLI names the flag."""
    field, _, rest = message.partition(":")
    flags = {
        "group_size": "--group-size",
        "align": "--align",
        "sparsity": "--sparsity",
        "min_top1": "--min-top1",
        "rank": "--rank",
        "steps": "--steps",
        "batch_size": "--batch",
        "lr": "--lr",
        "recall": "--recall",
    }
    return f"{flags[field]}:{rest}" if field in flags else message
