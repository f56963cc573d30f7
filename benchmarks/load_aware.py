"""Load-aware drafting against fixed draft shapes, on the fleet emulator.

N emulated edges (`orchestrator.loadtest.fleet`, lossless, greedy) load one verifier (an
`edgecloud cloud serve` subprocess, as in `benchmarks/fleet.py`). Each edge drafts its
rounds from a draft book (`orchestrator.loadtest.draft_book`): the real draft SLM's beam
search of every width (1..8) and depth (up to 64 nodes) at every position of the recorded
greedy generations, made once before the sweep, so any shape an edge asks for is the real
drafter's tree and gets the real acceptance, and the edge waits the SLM's measured drafting
time for it. Shapings compared at each N:

- `load-aware`: the edge's shape policy as it runs (`edge_node/policy.py`): latency-optimal
  shapes from the measured round trip and acceptance, shrinking to width 1 and to plain
  rounds as the verifier's reported load (shared with other sessions) rises;
- `latency`: the same policy with the load withheld (the edge before load-aware drafting);
- fixed shapes, e.g. `1x2`, `1x4`, `2x4`, `4x6` (width x depth, beam search).

Each point runs --repeats times (link seeds differ); reported per (RTT, N, shaping), medians
of the runs: goodput (tokens/s of requests whose TPOT met the SLO),
TPOT p50 and p90, output tokens/s, verified tree nodes per round, tau, and the verifier's
busy ms per token; then per (RTT, N) load-aware against the best fixed shape (the issue's
target: never more than 10% worse, in goodput or in p50 TPOT).

    python benchmarks/load_aware.py                        # demo pair, RTT 20 and 80 ms
    python benchmarks/load_aware.py --quick                # N 1 and 16, RTT 20 ms, 3 shapes, once
    python benchmarks/load_aware.py --book book.json       # keep the draft book for next time
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import heldout_prompts, machine, print_json
from fleet import DEMO_DIR, TOKEN, VerifierProcess, recordings_for

from lm.checkpoint import load_model
from lm.device import default_device
from lm.tokenizer import Tokenizer
from orchestrator.loadtest.draft_book import load_book, make_book, save_book
from orchestrator.loadtest.fleet import FleetPlan, LinkProfile, Shaping, http_metrics, measure_fleet
from orchestrator.loadtest.records import Slo
from protocol.types import Mode

SHAPINGS = "load-aware,latency,1x2,1x4,2x4,4x6"


async def sweep(args, verifier: VerifierProcess, recording, book) -> list[dict]:
    rows = []
    for rtt in args.rtts:
        link = LinkProfile(rtt_ms=rtt, jitter_ms=rtt * args.jitter, loss=args.loss)
        for clients in args.clients:
            for shaping in args.shapings:
                runs = [
                    await measure(args, verifier, recording, book, link, clients, shaping, r)
                    for r in range(args.repeats)
                ]
                row = median_row(runs)
                rows.append(row)
                print(
                    f"  rtt {rtt:>3g} ms  {clients:>3} clients  {shaping:<10} "
                    f"{row['completed']:>5g} requests  goodput {row['token_goodput'] or 0:6.1f} "
                    f"({', '.join(f'{g:.0f}' for g in row['token_goodput_runs'])})  "
                    f"p50 TPOT {row['p50_tpot_ms']:6.1f} ms  nodes/round "
                    f"{row['nodes_per_round']:5.1f}  mismatched {row['mismatched_rounds']:g}  "
                    f"failed {row['failed']:g}",
                    flush=True,
                )
    return rows


async def measure(args, verifier, recording, book, link, clients, shaping, repeat) -> dict:
    """One point: `clients` edges drafting in `shaping` for --duration seconds."""
    plan = FleetPlan(
        clients=clients,
        mode=Mode.LOSSLESS,
        duration_s=args.duration,
        link=link,
        seed=args.seed + repeat,
        shaping=Shaping.parse(shaping),
    )
    point = await measure_fleet(
        verifier.address,
        recording,
        plan,
        slo=Slo(tpot_ms=args.slo_tpot_ms),
        metrics=http_metrics(verifier.metrics_address),
        token=TOKEN,
        book=book,
    )
    records = point.result.records
    rounds = sum(r.rounds or 0 for r in records)
    nodes = sum(r.draft_tokens or 0 for r in records)
    return point.row() | {"nodes_per_round": nodes / max(rounds, 1)}


def median_row(runs: Sequence[dict]) -> dict:
    """The runs of one point as one row: the median of every number, the rest from the
    first run; the goodput of each run kept as `token_goodput_runs`."""
    row = {}
    for key, value in runs[0].items():
        values = [run[key] for run in runs]
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        row[key] = statistics.median(values) if numbers else value
    return row | {"token_goodput_runs": [run["token_goodput"] or 0.0 for run in runs]}


def report(rows: Sequence[dict], args: argparse.Namespace) -> list[dict]:
    """Prints the table and load-aware against the best fixed shape; returns the latter."""
    print()
    print(
        f"{'rtt':>4} {'N':>3} {'shaping':<10} {'good t/s':>8} {'TPOT p50':>8} {'p90':>6} "
        f"{'tok/s':>7} {'nodes/rd':>8} {'tau':>5} {'busy/tok':>8}"
    )
    for r in rows:
        print(
            f"{r['rtt_ms']:>4g} {r['clients']:>3} {r['shaping']:<10} "
            f"{r['token_goodput'] or 0:>8.1f} "
            f"{r['p50_tpot_ms']:>8.1f} {r['p90_tpot_ms']:>6.1f} {r['output_throughput']:>7.1f} "
            f"{r['nodes_per_round']:>8.1f} {r['tau']:>5.2f} "
            f"{r.get('verifier_busy_ms_per_token', 0):>8.2f}"
        )
    print(
        f"good t/s: output tokens/s of requests with TPOT <= {args.slo_tpot_ms:g} ms; nodes/rd: "
        "tree nodes per round (0 for a plain round); busy/tok: the verifier's busy ms per token"
    )
    print()
    print("load-aware against the best fixed shape at each point:")
    comparison = []
    for rtt in args.rtts:
        for clients in args.clients:
            here = [r for r in rows if (r["rtt_ms"], r["clients"]) == (rtt, clients)]
            aware = next(r for r in here if r["shaping"] == "load-aware")
            fixed = [r for r in here if "x" in r["shaping"]]
            if not fixed:
                continue
            good = max(fixed, key=lambda r: r["token_goodput"] or 0)
            fast = min(fixed, key=lambda r: r["p50_tpot_ms"])
            goodput_ratio = (
                (aware["token_goodput"] or 0) / good["token_goodput"]
                if good["token_goodput"]
                else None
            )
            tpot_ratio = aware["p50_tpot_ms"] / fast["p50_tpot_ms"]
            within = (goodput_ratio is None or goodput_ratio >= 0.9) and tpot_ratio <= 1.1
            comparison.append(
                {
                    "rtt_ms": rtt,
                    "clients": clients,
                    "best_goodput_shape": good["shaping"],
                    "goodput_ratio": goodput_ratio,
                    "best_tpot_shape": fast["shaping"],
                    "p50_tpot_ratio": tpot_ratio,
                    "within_10_percent": within,
                }
            )
            ratio = "-" if goodput_ratio is None else f"{goodput_ratio:.2f}x"
            print(
                f"  RTT {rtt:>3g} ms, {clients:>3} clients: goodput {ratio} of "
                f"{good['shaping']}'s, "
                f"p50 TPOT {tpot_ratio:.2f}x {fast['shaping']}'s"
                f"{'' if within else '  <- more than 10% worse'}"
            )
    return comparison


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=Path, default=DEMO_DIR / "target")
    parser.add_argument("--draft", type=Path, default=DEMO_DIR / "draft")
    parser.add_argument("--clients", help="fleet sizes, comma-separated (1,4,8,16,24,32)")
    parser.add_argument("--rtt-ms", help="round trips, comma-separated (20,80)")
    parser.add_argument("--shapings", help=f"comma-separated ({SHAPINGS})")
    parser.add_argument("--jitter", type=float, default=0.1, help="RTT std dev / RTT (0.1)")
    parser.add_argument("--loss", type=float, default=0.002, help="per message (0.002)")
    parser.add_argument("--seed", type=int, default=1, help="link seed (1; + repeat)")
    parser.add_argument(
        "--repeats", type=int, help="runs per point; medians reported (3; --quick 1)"
    )
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0, help="TPOT SLO (50 ms)")
    parser.add_argument("--duration", type=float, help="seconds per point, closed loop (6)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="verifier --max-batch (16)")
    parser.add_argument("--recording", type=Path, help="recording file to reuse and extend")
    parser.add_argument("--book", type=Path, help="draft book file to reuse (made if absent)")
    parser.add_argument("--device", help="the verifier's (default: CUDA if any)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, help="torch threads of the verifier and the book")
    parser.add_argument("--quick", action="store_true", help="N 1 and 16, RTT 20 ms, 3 shapings")
    args = parser.parse_args(argv)
    q = args.quick
    args.clients = [
        int(x) for x in (args.clients or ("1,16" if q else "1,4,8,16,24,32")).split(",")
    ]
    args.rtts = [float(x) for x in (args.rtt_ms or ("20" if q else "20,80")).split(",")]
    args.shapings = (args.shapings or ("load-aware,1x4,4x6" if q else SHAPINGS)).split(",")
    for shaping in args.shapings:
        try:
            Shaping.parse(shaping)
        except ValueError as error:
            parser.error(f"--shapings: {error}")
    if "load-aware" not in args.shapings:
        parser.error("--shapings: must include load-aware, which the others are compared with")
    args.duration = args.duration or (4.0 if q else 6.0)
    args.repeats = args.repeats or (1 if q else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    # What fleet.recordings_for reads: one greedy recording (the book needs only its output).
    recorded = argparse.Namespace(
        **vars(args) | {"temperatures": [0.0], "rtts": args.rtts[:1], "width": 4, "depth": 6}
    )
    recorded.adapt = True

    started = time.monotonic()
    tokenizer = Tokenizer.from_dir(args.target)
    prompts = heldout_prompts(tokenizer, args.prompts, args.prompt_tokens)
    draft = load_model(args.draft, device="cpu", dtype=torch.float32)
    workdir = Path(tempfile.mkdtemp(prefix="edgecloud-load-aware-"))
    args.recording = args.recording or workdir / "recording.json"
    args.book = args.book or workdir / "book.json"
    recorded.recording = args.recording
    verifier = VerifierProcess(args, workdir, max_sessions=max(args.clients) + 4)
    try:

        async def run():
            (recording,) = (await recordings_for(recorded, verifier, prompts, draft)).values()
            book = load_book(args.book)
            if book is None or not book.fits(recording):
                print("booking the draft's trees at every position (once) ...", flush=True)
                begun = time.monotonic()
                book = make_book(draft, recording, source=f"draft {args.draft}")
                print(f"  booked in {time.monotonic() - begun:.0f} s; {args.book}", flush=True)
                save_book(args.book, book)
            return recording, book, await sweep(args, verifier, recording, book)

        recording, book, rows = asyncio.run(run())
    finally:
        verifier.stop()
    comparison = report(rows, args)
    device = torch.device(args.device) if args.device else default_device()
    info = machine(device)
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch']}")
    print_json(
        {
            "benchmark": "load_aware",
            "machine": info,
            "verifier_command": verifier.command,
            "draft": str(args.draft),
            "recording_tau": recording.tau,
            "book_level_ms": book.level_ms,
            "slo_tpot_ms": args.slo_tpot_ms,
            "duration_s_per_point": args.duration,
            "results": rows,
            "comparison": comparison,
            "wall_s": time.monotonic() - started,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
