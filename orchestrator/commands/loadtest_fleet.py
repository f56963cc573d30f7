"""`edgecloud loadtest --emulate-edges N`: emulated edge devices against one verifier.

The flags are `edgecloud loadtest`'s (orchestrator/commands/loadtest.py), which hands over
here when --emulate-edges is given; the work is `orchestrator.loadtest.fleet`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
from pathlib import Path

from orchestrator.commands.loadtest import (
    _float,
    _int,
    check_outputs,
    checked_targets,
    client_token,
    flag_error,
    load_prompts,
    run_bounds,
    tls_options,
)
from orchestrator.usage import UsageError

# Prompts --record-with records (the first of --prompts, or held-out ones): emulated edges
# replay them in a cycle.
RECORDED_PROMPTS = 16


def run_fleet_loadtest(args: argparse.Namespace, started_at: str) -> int:
    from orchestrator.loadtest.fleet import FleetPlan, LinkProfile, Shaping
    from orchestrator.loadtest.records import Slo
    from protocol.types import Mode

    for flag, value in (("--rate", args.rate), ("--concurrency", args.concurrency)):
        if value is not None:
            raise UsageError(f"{flag}: not with --emulate-edges (it is the number of clients)")
    if args.recording is None:
        raise UsageError("--emulate-edges: needs --recording FILE")
    if args.mode not in (Mode.LOSSLESS, Mode.CLOUD_ONLY):
        raise UsageError(f"--mode: with --emulate-edges, lossless or cloud_only, got {args.mode}")
    targets = checked_targets(args.target or ["127.0.0.1:50061"], args.allow_remote)
    if len(targets) != 1:
        raise UsageError("--target: --emulate-edges loads one verifier; give one --target")
    clients = [_int("--emulate-edges", n) for n in args.emulate_edges.split(",")]
    if len(set(clients)) != len(clients):
        raise UsageError(f"--emulate-edges: each count once, got {args.emulate_edges}")
    requests, duration = run_bounds(args)
    if args.book is not None and args.shaping is None:
        raise UsageError("--book: only with --shaping")
    if args.shaping is not None and args.mode != Mode.LOSSLESS:
        raise UsageError(f"--shaping: lossless edges only (they draft), got --mode {args.mode}")
    if args.book is not None and not args.book.parent.is_dir():
        raise UsageError(f"--book: directory {args.book.parent} does not exist")
    try:
        shaping = None if args.shaping is None else Shaping.parse(args.shaping)
    except ValueError as exc:
        raise UsageError(f"--shaping: {exc}") from None
    try:
        link = LinkProfile(
            rtt_ms=_float("--rtt-ms", args.rtt_ms),
            jitter_ms=_float("--rtt-jitter-ms", args.rtt_jitter_ms),
            loss=_float("--loss", args.loss),
            rto_ms=_float("--rto-ms", args.rto_ms),
            edge_scale=_float("--edge-scale", args.edge_scale),
        )
        plans = [
            FleetPlan(
                clients=n,
                mode=Mode(args.mode),
                requests=requests,
                duration_s=duration,
                link=link,
                seed=0 if args.seed is None else _int("--seed", args.seed),
                model=args.model,
                shaping=shaping,
            )
            for n in clients
        ]
        slo = None if args.slo is None else Slo.parse(args.slo)
    except ValueError as exc:
        raise flag_error(exc) from None
    check_outputs(args)
    token, tls = client_token(args), tls_options(args)
    recording = find_or_record(args, targets[0], token, tls, link.rtt_ms)
    book = None
    if shaping is not None:
        book = find_or_make_book(args, recording, shaping)
        print(
            f"drafting {shaping.describe()} from the draft book of "
            f"{len(recording.requests)} recorded requests: {recording.key.describe()}"
        )
    else:
        print(f"replaying {len(recording.requests)} recorded requests: {recording.key.describe()}")
    points = asyncio.run(run_points(args, targets[0], token, tls, recording, plans, slo, book))
    if args.out:
        config = {
            "started_at": started_at,
            "target": targets[0],
            "recording": str(args.recording),
            "recording_key": dataclasses.asdict(recording.key),
            "recorded_tau": recording.tau,
            "shaping": None if shaping is None else shaping.describe(),
            "slo": None if slo is None else slo.describe(),
        }
        write_fleet_results(args.out, config, points)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        from orchestrator.loadtest.fleet import plot_clients
        from orchestrator.loadtest.report import PlotCaption, plot_distributions

        caption = PlotCaption(
            targets=(targets[0],),
            mode=args.mode,
            load=", ".join(f"{p.plan.clients} emulated edges" for p in points),
            max_tokens=recording.key.max_tokens,
            temperature=recording.key.temperature,
            requests=sum(len(p.result.records) for p in points),
            started_at=started_at,
        )
        if len(points) > 1:
            series = [(p.plan.clients, *_tpot(p)) for p in points]
            title = f"{recording.key.describe()}, RTT {plans[0].link.rtt_ms:g} ms"
            slo_ms = slo.tpot_ms if slo else None
            plot_clients({title: {args.mode: series}}, args.plot, slo_ms, caption)
        else:
            plot_distributions(points[0].result.records, args.plot, caption)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(p.summary.completed for p in points) else 1


def _tpot(point) -> tuple[float, float]:
    percentiles = point.summary.latency["tpot"].percentiles
    return percentiles[50], percentiles[99]


def find_or_record(args: argparse.Namespace, target: str, token, tls, rtt_ms: float):
    """The recording in --recording for these settings, recorded first with --record-with
    when there is none."""
    from orchestrator.loadtest.recording import (
        RecordingKey,
        find_recording,
        load_recordings,
        save_recordings,
    )

    temperature = _float("--temperature", args.temperature)
    seed = None if args.seed is None else _int("--seed", args.seed)
    wanted = {
        "temperature": temperature,
        "top_k": _int("--top-k", args.top_k),
        "top_p": _float("--top-p", args.top_p),
        "max_tokens": _int("--max-tokens", args.max_tokens),
    }
    if temperature > 0:
        wanted["seed"] = seed
    try:
        recordings = load_recordings(args.recording)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--recording: {exc}") from None
    found = find_recording(recordings, **wanted, rtt_ms=rtt_ms)
    if found is not None:
        return found
    if args.record_with is None:
        have = "; ".join(r.key.describe() for r in recordings) or "nothing"
        raise UsageError(
            f"--recording: {args.recording} holds no recording for these --temperature, "
            f"--top-k, --top-p, --seed, --max-tokens (it holds: {have}); add --record-with "
            "DRAFT_DIR to record one"
        )
    if not args.model:
        raise UsageError("--record-with: needs --model, the verifier's model name")
    try:
        key = RecordingKey(**(wanted | {"seed": seed}), rtt_ms=rtt_ms)
    except ValueError as exc:
        raise flag_error(exc) from None
    recording = asyncio.run(record_with(args, target, token, tls, key))
    save_recordings(args.recording, [recording])
    print(f"recorded {len(recording.requests)} requests into {args.recording}", file=sys.stderr)
    return recording


def find_or_make_book(args: argparse.Namespace, recording, shaping):
    """The draft book in --book when it was made from `recording`, else made now with
    --record-with's draft and saved there; UsageError when `shaping` asks for a fixed
    shape it does not hold."""
    book = _book(args, recording)
    if shaping.policy == "fixed":
        from edge_node.drafters import DraftShape

        try:
            book.check(DraftShape(shaping.width, shaping.depth))
        except ValueError as exc:
            raise UsageError(f"--shaping: {exc}") from None
    return book


def _book(args: argparse.Namespace, recording):
    from lm.checkpoint import load_model
    from orchestrator.loadtest.draft_book import load_book, make_book, save_book

    if args.book is None:
        raise UsageError("--shaping: needs --book FILE (the draft book to draft from)")
    try:
        book = load_book(args.book)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--book: {exc}") from None
    if book is not None and book.fits(recording):
        return book
    if args.record_with is None:
        have = "nothing" if book is None else "a book of other generations"
        raise UsageError(
            f"--book: {args.book} holds {have}; add --record-with DRAFT_DIR to make one"
        )
    if not args.record_with.exists():
        raise UsageError(f"--record-with: {args.record_with} does not exist")
    try:
        draft = load_model(args.record_with, device="cpu")
    except (OSError, ValueError) as exc:
        raise UsageError(f"--record-with: {exc}") from None
    try:
        book = make_book(draft, recording, source=str(args.record_with))
    except ValueError as exc:
        raise UsageError(f"--shaping: {exc}") from None
    save_book(args.book, book)
    print(f"booked the draft's trees into {args.book}", file=sys.stderr)
    return book


async def record_with(args: argparse.Namespace, target: str, token, tls, key):
    from lm.checkpoint import load_model
    from lm.tokenizer import Tokenizer
    from orchestrator.loadtest.recording import record

    if not args.record_with.exists():
        raise UsageError(f"--record-with: {args.record_with} does not exist")
    draft = load_model(args.record_with, device="cpu")  # an edge drafts on its own CPU
    prompts, source = load_prompts(args, RECORDED_PROMPTS)
    prompts = prompts[:RECORDED_PROMPTS]
    if any(isinstance(p, str) for p in prompts):
        if not Tokenizer.found_in(args.record_with):
            raise UsageError("--record-with: the draft has no tokenizer; give token-id --prompts")
        tokenizer = Tokenizer.from_dir(args.record_with)
        prompts = [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
    return await record(
        draft,
        target,
        args.model,
        prompts,
        key,
        token=token,
        tls=tls,
        source=f"draft {args.record_with}; prompts: {source}",
    )


async def run_points(args, target, token, tls, recording, plans, slo, book=None):
    """Runs each plan in turn, printing each one's summary as it ends, the sweep after."""
    from orchestrator.loadtest.fleet import fleet_lines, http_metrics, measure_fleet
    from orchestrator.loadtest.report import Progress, summary_table

    metrics = None if args.verifier_metrics is None else http_metrics(args.verifier_metrics)
    points = []
    for plan in plans:
        label = f"{plan.clients} emulated edges, {plan.mode}"
        bar = Progress(plan.requests, label, enabled=not args.no_progress)
        try:
            point = await measure_fleet(
                target,
                recording,
                plan,
                slo=slo,
                metrics=metrics,
                token=token,
                tls=tls,
                on_record=bar,
                book=book,
            )
        finally:
            bar.close()
        points.append(point)
        print(summary_table(point.summary, f"Serving Benchmark Result ({label})"))
        print(fleet_lines(point), flush=True)
    if len(points) > 1:
        from orchestrator.loadtest.fleet import fleet_sweep_table

        print(fleet_sweep_table(points))
    return points


def write_fleet_results(path: Path, config: dict[str, object], points) -> None:
    """{"config", "runs": [{"plan", "fleet" (the point's row), "summary", "records"}]}, each
    record with the emulated edge ("client") that sent it."""
    document = {
        "config": config,
        "runs": [
            {
                "plan": dataclasses.asdict(p.plan),
                "fleet": p.row(),
                "summary": p.summary.as_dict(),
                "records": [
                    r.as_dict() | {"client": c}
                    for r, c in zip(p.result.records, p.result.clients, strict=True)
                ],
            }
            for p in points
        ],
    }
    Path(path).write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")
