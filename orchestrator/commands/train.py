"""`edgecloud train`, `edgecloud distill` and `edgecloud eval`: make and measure a model pair.

train: byte-level BPE + a Llama-family model with a ReLU MLP on a corpus of source files (default:
the running interpreter's standard library).  distill: a smaller draft from a trained target by
knowledge distillation (ReDrafter's recipe).  eval: held-out perplexity and speed of a model, and
with --draft the pair's greedy agreement, per-position chain acceptance and expected tau.
A target (distill --target, eval --model) is a model directory or a `.gguf` file; corpus text
is tokenized and framed with its own tokenizer (`lm.training.corpus.document_frame`).

Progress goes to stderr; the final summary to stdout.  Both commands resume from
OUT/checkpoint/ when run again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.commands.flags import corpus_flags
from orchestrator.usage import UsageError

SAVE_DTYPES = ("float32", "bfloat16", "float16")


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser("train", help="train a tokenizer and a target model on a corpus")
    train.add_argument("--out", required=True, type=Path, help="output model directory")
    train.add_argument(
        "--vocab-size", type=int, default=4096, help="BPE vocabulary (default: %(default)s)"
    )
    _shape_flags(train, dim=256, layers=6, heads=8, kv_heads=4, hidden=768)
    _run_flags(train, steps=1000, batch=8, lr=1e-3)
    train.set_defaults(run=run_train)

    distill = subparsers.add_parser(
        "distill", help="distill a smaller draft model from a trained target"
    )
    distill.add_argument(
        "--target", required=True, type=Path, help="target model directory or .gguf file"
    )
    distill.add_argument("--out", required=True, type=Path, help="output draft directory")
    _shape_flags(distill, dim=128, layers=3, heads=4, kv_heads=2, hidden=352)
    _run_flags(distill, steps=1000, batch=16, lr=2e-3)
    distill.add_argument(
        "--generated-fraction",
        type=float,
        default=0.5,
        help="share of each batch taken from target-generated sequences (default: %(default)s)",
    )
    distill.add_argument(
        "--pool-size",
        type=int,
        default=512,
        help="target-generated sequences (default: %(default)s)",
    )
    distill.add_argument(
        "--prompt-len",
        type=int,
        default=32,
        help="corpus tokens before each generation (default: %(default)s)",
    )
    distill.add_argument(
        "--gen-temperature",
        type=float,
        default=1.0,
        help="target sampling temperature (default: %(default)s)",
    )
    distill.add_argument(
        "--head",
        action="store_true",
        help="train a recurrent draft head (ReDrafter) instead of a draft model; OUT gets "
        "head_config.json + head.safetensors and the --dim .. --untied flags are unused",
    )
    distill.add_argument(
        "--state-size",
        type=int,
        default=256,
        help="--head: recurrent state width (default: %(default)s)",
    )
    distill.add_argument(
        "--blocks",
        type=int,
        default=2,
        help="--head: residual SiLU blocks over [h ; s] (default: %(default)s)",
    )
    distill.add_argument(
        "--lookahead",
        type=int,
        default=6,
        help="--head: tokens matched ahead per start (default: %(default)s)",
    )
    distill.add_argument(
        "--start-stride",
        type=int,
        default=4,
        help="--head: every Nth position starts (default: %(default)s)",
    )
    distill.set_defaults(run=run_distill)

    evaluate = subparsers.add_parser(
        "eval", help="held-out perplexity and speed of a model (and a draft against it)"
    )
    evaluate.add_argument(
        "--model", type=Path, help="model directory or .gguf file (default: bundled target)"
    )
    evaluate.add_argument("--draft", type=Path, help="draft directory: also report agreement/tau")
    corpus_flags(evaluate)
    evaluate.add_argument("--context", type=int, help="window length (default: model max)")
    evaluate.add_argument("--windows", type=int, help="at most this many held-out windows")
    evaluate.add_argument(
        "--chains",
        type=int,
        default=256,
        help="prompts for chain acceptance (default: %(default)s)",
    )
    evaluate.add_argument(
        "--prompt-len", type=int, default=64, help="tokens per chain prompt (default: %(default)s)"
    )
    evaluate.add_argument(
        "--max-len", type=int, default=8, help="longest chain measured (default: %(default)s)"
    )
    evaluate.add_argument(
        "--decode-tokens",
        type=int,
        default=64,
        help="tokens decoded one at a time for the decode speed (default: %(default)s)",
    )
    evaluate.add_argument(
        "--head", type=Path, help="draft head directory: also report its acceptance per position"
    )
    evaluate.add_argument(
        "--depth", type=int, default=6, help="--head: draft depth (default: %(default)s)"
    )
    evaluate.add_argument(
        "--width", type=int, default=4, help="--head: beams per tree (default: %(default)s)"
    )
    _device_flags(evaluate)
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(run=run_eval)


def _device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: CUDA when present)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")


def _shape_flags(
    parser: argparse.ArgumentParser,
    *,
    dim: int,
    layers: int,
    heads: int,
    kv_heads: int,
    hidden: int,
) -> None:
    parser.add_argument("--dim", type=int, default=dim, help="model width (default: %(default)s)")
    parser.add_argument(
        "--layers", type=int, default=layers, help="transformer layers (default: %(default)s)"
    )
    parser.add_argument(
        "--heads", type=int, default=heads, help="query heads (default: %(default)s)"
    )
    parser.add_argument(
        "--kv-heads",
        type=int,
        default=kv_heads,
        help="key/value heads, dividing --heads (default: %(default)s)",
    )
    parser.add_argument(
        "--hidden", type=int, default=hidden, help="MLP width (default: %(default)s)"
    )
    parser.add_argument("--untied", action="store_true", help="separate output matrix")


def _run_flags(parser: argparse.ArgumentParser, *, steps: int, batch: int, lr: float) -> None:
    corpus_flags(parser)
    parser.add_argument(
        "--context", type=int, default=512, help="tokens per window (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=int, default=steps, help="optimizer steps (default: %(default)s)"
    )
    parser.add_argument(
        "--batch", type=int, default=batch, help="windows per step (default: %(default)s)"
    )
    parser.add_argument(
        "--lr", type=float, default=lr, help="peak learning rate (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=int, default=50, help="linear warmup steps (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="init and batch seed (default: %(default)s)"
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=100,
        help="steps between checkpoints (default: %(default)s)",
    )
    parser.add_argument(
        "--log-every", type=int, default=10, help="steps per progress line (default: %(default)s)"
    )
    parser.add_argument(
        "--save-dtype",
        choices=SAVE_DTYPES,
        default="float32",
        help="weights on disk (default: %(default)s)",
    )
    _device_flags(parser)


def _setup(args: argparse.Namespace):
    """Device, threads and the corpus split, shared by the three commands."""
    import torch

    from lm.device import default_device
    from lm.training import corpus

    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads: must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    try:
        device = torch.device(args.device) if args.device else default_device()
    except RuntimeError as exc:
        raise UsageError(f"--device: {exc}") from exc
    try:
        split = corpus.discover(
            args.corpus,
            pattern=args.pattern,
            include_tests=args.include_tests,
            heldout_fraction=args.heldout_fraction,
        )
    except ValueError as exc:  # CorpusError names the path, a bad fraction the field
        raise UsageError(str(exc)) from exc
    return device, split


def _shape(args: argparse.Namespace):
    from lm.training.train import ModelShape

    return ModelShape(
        dim=args.dim,
        n_layers=args.layers,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        hidden_dim=args.hidden,
        tie_embeddings=not args.untied,
    )


def _train_config(args: argparse.Namespace):
    from lm.training.train import TrainConfig

    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        context=args.context,
        lr=args.lr,
        warmup_steps=args.warmup,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
    )


def _print_progress(progress) -> None:
    print(progress.line(), file=sys.stderr, flush=True)


def run_train(args: argparse.Namespace) -> int:
    import torch

    from lm.training.train import train_language_model

    device, split = _setup(args)
    try:
        summary = train_language_model(
            split,
            args.out,
            _shape(args),
            _train_config(args),
            vocab_size=args.vocab_size,
            device=device,
            save_dtype=getattr(torch, args.save_dtype),
            progress=_print_progress,
        )
    except ValueError as exc:  # CorpusError, CheckpointError and config errors name the field
        raise UsageError(str(exc)) from exc
    print(
        f"saved {args.out}: {summary['parameters']:,} parameters, loss "
        f"{summary['first_loss']:.3f} -> {summary['final_loss']:.3f}, "
        f"{summary['tokens_per_s']:,.0f} tok/s"
        + (
            f", held-out perplexity {summary['heldout_perplexity']:.2f}"
            if "heldout_perplexity" in summary
            else ""
        )
    )
    return 0


def run_distill(args: argparse.Namespace) -> int:
    import torch

    from lm.training.distill import DistillConfig, distill_draft
    from lm.training.head_distill import distill_head

    device, split = _setup(args)
    try:
        config = _train_config(args)
        distill = DistillConfig(
            generated_fraction=args.generated_fraction,
            pool_size=args.pool_size,
            prompt_len=args.prompt_len,
            temperature=args.gen_temperature,
        )
        if args.head:
            return _print_head_summary(
                args,
                distill_head(
                    args.target,
                    split,
                    args.out,
                    _head_shape(args),
                    config,
                    distill,
                    device=device,
                    save_dtype=getattr(torch, args.save_dtype),
                    progress=_print_progress,
                ),
            )
        summary = distill_draft(
            args.target,
            split,
            args.out,
            _shape(args),
            config,
            distill,
            device=device,
            save_dtype=getattr(torch, args.save_dtype),
            progress=_print_progress,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    print(
        f"saved {args.out}: {summary['parameters']:,} parameters "
        f"(target {summary['target_parameters']:,}), KL {summary['first_loss']:.3f} -> "
        f"{summary['final_loss']:.3f}, {summary['tokens_per_s']:,.0f} tok/s"
    )
    if "greedy_agreement" in summary:
        print(_pair_lines(summary))
    return 0


def _head_shape(args: argparse.Namespace):
    """HeadShape from --state-size/--blocks/--lookahead; a bad value names its flag."""
    from lm.training.head_distill import HeadShape

    for flag, value, low in (
        ("--state-size", args.state_size, 1),
        ("--blocks", args.blocks, 0),
        ("--lookahead", args.lookahead, 1),
        ("--start-stride", args.start_stride, 1),
    ):
        if value < low:
            raise UsageError(f"{flag}: must be >= {low}, got {value}")
    return HeadShape(
        state_size=args.state_size,
        n_blocks=args.blocks,
        lookahead=args.lookahead,
        start_stride=args.start_stride,
    )


def _print_head_summary(args: argparse.Namespace, summary: dict) -> int:
    print(
        f"saved {args.out}: head with {summary['parameters']:,} parameters "
        f"({summary['trained_parameters']:,} trained), KL {summary['first_loss']:.3f} -> "
        f"{summary['final_loss']:.3f}, {summary['tokens_per_s']:,.0f} tok/s"
    )
    if "head_chain_tau" in summary:
        print(_head_lines(summary))
    return 0


def _head_lines(report: dict) -> str:
    """The head's per-position figures, with the SLM draft's beside them when present."""

    def row(values) -> str:
        return " ".join(f"{v:.3f}" for v in values)

    width = report["head_width"]
    lines = [
        f"head lookahead agreement k=1..{len(report['head_lookahead_agreement'])}: "
        + row(report["head_lookahead_agreement"]),
        "head chain acceptance: " + row(report["head_chain_acceptance"]),
        "head chain tau: " + row(report["head_chain_tau"]),
        f"head tree ({width} beams) acceptance: " + row(report["head_tree_acceptance"]),
        f"head tree ({width} beams) tau: " + row(report["head_tree_tau"]),
    ]
    if "slm_chain_acceptance" in report:
        lines += [
            "SLM draft, same prompts: chain acceptance " + row(report["slm_chain_acceptance"]),
            "SLM draft, same prompts: chain tau " + row(report["slm_chain_tau"]),
            f"SLM draft, same prompts: tree ({width} beams) acceptance "
            + row(report["slm_tree_acceptance"]),
            f"SLM draft, same prompts: tree ({width} beams) tau " + row(report["slm_tree_tau"]),
        ]
    return "\n".join(lines)


def _pair_lines(report: dict) -> str:
    taus = " ".join(f"{t:.2f}" for t in report["expected_tau"])
    rates = " ".join(f"{a:.3f}" for a in report["chain_acceptance"])
    return (
        f"held-out perplexity: target {report['target_perplexity']:.2f}, "
        f"draft {report['draft_perplexity']:.2f}\n"
        f"greedy agreement: {report['greedy_agreement']:.1%}\n"
        f"chain acceptance a_1..a_{len(report['chain_acceptance'])}: {rates}\n"
        f"expected tau(1..{len(report['expected_tau'])}): {taus}"
    )


def _load_matching_head(path: Path, target, device):
    """The head at `path` in the target's dtype; CheckpointError when it was made for another
    target (its head_config.json names a different vocab_size or hidden_size)."""
    from lm.draft_head import CONFIG_FILE, load_head
    from lm.errors import CheckpointError

    head = load_head(path, device=device, dtype=next(target.parameters()).dtype)
    for field, want in (
        ("vocab_size", target.config.vocab_size),
        ("hidden_size", target.config.dim),
    ):
        got = getattr(head.config, field)
        if got != want:
            raise CheckpointError(
                f"{Path(path) / CONFIG_FILE}: {field} {got} differs from the target's {want}"
            )
    return head


def run_eval(args: argparse.Namespace) -> int:
    from lm.checkpoint import load_model
    from lm.training import corpus
    from lm.training.corpus import sequential_windows
    from lm.training.distill import load_target
    from lm.training.evaluate import (
        check_pair,
        decode_tokens_per_s,
        evaluate_head,
        evaluate_pair,
        perplexity,
    )
    from lm.training.train import load_split_streams

    if args.decode_tokens < 1:
        raise UsageError(f"--decode-tokens: must be >= 1, got {args.decode_tokens}")
    if args.model is None:
        from orchestrator.demo_models import TARGET_DIR

        args.model = TARGET_DIR
    device, split = _setup(args)
    try:
        model, tokenizer = load_target(args.model, device)
        draft = None
        if args.draft is not None:
            draft = load_model(args.draft, device=device, dtype=next(model.parameters()).dtype)
            check_pair(args.model, args.draft, model.config.vocab_size, draft.config.vocab_size)
        head = None if args.head is None else _load_matching_head(args.head, model, device)
        context = args.context or model.config.max_seq_len
        frame = corpus.document_frame(tokenizer, args.model)
        _, stream = load_split_streams(split, tokenizer, frame)
        if stream is None:
            raise UsageError(f"--corpus: no held-out files under {split.root}")
        if draft is None:
            target = perplexity(model, sequential_windows(stream, context, limit=args.windows))
            report = {"target_perplexity": target.perplexity}
        else:
            pair = evaluate_pair(
                model,
                draft,
                stream,
                context,
                windows=args.windows,
                chains=args.chains,
                prompt_len=args.prompt_len,
                max_len=args.max_len,
            )
            target = pair.target
            report = pair.as_dict()
        if head is not None:
            report.update(
                evaluate_head(
                    model,
                    head,
                    stream,
                    context,
                    draft=draft,
                    windows=args.windows,
                    chains=args.chains,
                    prompt_len=args.prompt_len,
                    depth=args.depth,
                    width=args.width,
                ).as_dict()
            )
    except ValueError as exc:  # CorpusError and CheckpointError name the path or field
        raise UsageError(str(exc)) from exc
    prompt = stream[None, : args.prompt_len]
    report["heldout_sha256"] = corpus.heldout_digest(split)
    report["heldout_tokens"] = target.tokens
    report["target_forward_tokens_per_s"] = target.tokens_per_s
    report["target_decode_tokens_per_s"] = decode_tokens_per_s(model, prompt, args.decode_tokens)
    if draft is not None:
        report["draft_forward_tokens_per_s"] = pair.draft.tokens_per_s
        report["draft_decode_tokens_per_s"] = decode_tokens_per_s(draft, prompt, args.decode_tokens)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {args.model}" + (f", draft {args.draft}" if draft is not None else ""))
    print(f"held-out split sha256 {report['heldout_sha256']}, {target.tokens:,} tokens")
    if draft is None:
        print(f"held-out perplexity: {report['target_perplexity']:.2f}")
    else:
        print(_pair_lines(report))
    if args.head is not None:
        print(f"head {args.head}")
        print(_head_lines(report))
    for kind, how in (("forward", "teacher-forced batches"), ("decode", "batch 1, KV cache")):
        speeds = [
            f"{who} {report[f'{who}_{kind}_tokens_per_s']:,.0f}"
            for who in ("target", "draft")
            if f"{who}_{kind}_tokens_per_s" in report
        ]
        print(f"{kind} tokens/s ({how}): " + ", ".join(speeds))
    return 0
