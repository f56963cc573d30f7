"""Dynamic-priority verification against FIFO, under overload, on the fleet emulator.

N emulated edges (`benchmarks/fleet.py`'s recording and replay; lossless, every client
asking for the same `--slo-tpot-ms`) load one verifier started once with
`--schedule fifo` and once with `--schedule slack` (cloud_node/scheduling.py). Pick N
about 1.5x the clients the verifier serves at the SLO (`benchmarks/fleet.py` reports
that; the default is 1.5x what it reported on the demo pair at 20 ms). FIFO lets every
client slip past its target together; slack serves first the rounds closest to
missing theirs, and a client too far behind waits behind the others, so more requests
keep their target. Reported per policy: goodput at the SLO (tokens/s of requests whose
TPOT met it, and requests/s), TPOT p50/p90/p99, rounds served last as beyond hope;
and the slack / FIFO ratios.

    python benchmarks/schedule.py --clients 48 --rtt-ms 20 --duration 15
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import torch
from common import heldout_prompts, machine, print_json
from fleet import DEMO_DIR, TOKEN, VerifierProcess, recordings_for

from lm.checkpoint import load_model
from lm.device import default_device
from lm.tokenizer import Tokenizer
from orchestrator.loadtest.fleet import FleetPlan, LinkProfile, http_metrics, measure_fleet
from orchestrator.loadtest.records import Slo
from protocol.types import Mode, Schedule

POLICIES = ("fifo", "slack")


async def measure(args, verifier: VerifierProcess, recording) -> dict:
    plan = FleetPlan(
        clients=args.clients,
        mode=Mode.LOSSLESS,
        duration_s=args.duration,
        link=LinkProfile(rtt_ms=args.rtt_ms, jitter_ms=args.rtt_ms * args.jitter, loss=args.loss),
        seed=args.seed,
        schedule=Schedule(tpot_slo_ms=args.slo_tpot_ms),
    )
    point = await measure_fleet(
        verifier.address,
        recording,
        plan,
        slo=Slo(tpot_ms=args.slo_tpot_ms),
        metrics=http_metrics(verifier.metrics_address),
        token=TOKEN,
    )
    return point.row()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=Path, default=DEMO_DIR / "target")
    parser.add_argument("--draft", type=Path, default=DEMO_DIR / "draft")
    parser.add_argument("--clients", type=int, default=48, help="emulated edges (48)")
    parser.add_argument("--rtt-ms", type=float, default=20.0, help="round trip (20)")
    parser.add_argument("--jitter", type=float, default=0.1, help="RTT std dev / RTT (0.1)")
    parser.add_argument("--loss", type=float, default=0.002, help="per message (0.002)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (0)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0, help="every client's (50)")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per policy (15)")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=16, help="verifier --max-batch (16)")
    parser.add_argument("--recording", type=Path, help="recording file to reuse and extend")
    parser.add_argument("--device", help="the verifier's (default: CUDA if any)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    # What fleet.recordings_for reads: one recording, of this sampling and link.
    args.temperatures, args.rtts = [args.temperature], [args.rtt_ms]
    args.width, args.depth, args.adapt = 4, 6, True
    started = time.monotonic()
    tokenizer = Tokenizer.from_dir(args.target)
    prompts = heldout_prompts(tokenizer, args.prompts, args.prompt_tokens)
    draft = load_model(args.draft, device="cpu", dtype=torch.float32)
    workdir = Path(tempfile.mkdtemp(prefix="edgecloud-schedule-"))
    args.recording = args.recording or workdir / "recording.json"
    rows = {}
    for policy in POLICIES:
        args.schedule = policy
        verifier = VerifierProcess(args, workdir, max_sessions=args.clients + 4)
        try:

            async def run(verifier=verifier) -> dict:
                (recording,) = (await recordings_for(args, verifier, prompts, draft)).values()
                return await measure(args, verifier, recording)

            rows[policy] = asyncio.run(run())
        finally:
            verifier.stop()
        r = rows[policy]
        print(
            f"{policy:<6} {args.clients} clients: {r['completed']} requests, goodput "
            f"{r['token_goodput'] or 0:.1f} tok/s ({r['request_goodput'] or 0:.2f} req/s) at "
            f"TPOT <= {args.slo_tpot_ms:g} ms; TPOT p50 {r['p50_tpot_ms']:.1f} p90 "
            f"{r['p90_tpot_ms']:.1f} p99 {r['p99_tpot_ms']:.1f} ms; rounds served last "
            f"{r.get('verifier_slo_unreachable_rounds', 0):g}",
            flush=True,
        )
    fifo, slack = rows["fifo"], rows["slack"]
    good = (slack["token_goodput"] or 0) / (fifo["token_goodput"] or float("nan"))
    print(
        f"slack / fifo: goodput {good:.2f}x, p99 TPOT {slack['p99_tpot_ms']:.1f} vs "
        f"{fifo['p99_tpot_ms']:.1f} ms"
    )
    device = torch.device(args.device) if args.device else default_device()
    info = machine(device)
    print(f"machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch']}")
    print_json(
        {
            "benchmark": "schedule",
            "machine": info,
            "clients": args.clients,
            "rtt_ms": args.rtt_ms,
            "temperature": args.temperature,
            "slo_tpot_ms": args.slo_tpot_ms,
            "duration_s": args.duration,
            "results": rows,
            "goodput_ratio": good,
            "wall_s": time.monotonic() - started,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
