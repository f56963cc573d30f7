"""Capacity: clients one verifier serves at a TPOT SLO, lossless edges against cloud_only.

N emulated edge devices (`orchestrator.loadtest.fleet`) load one verifier, each with its own
`Verify` stream per request, its own round trip (`--rtt-ms`, jitter `--jitter` of it, loss
`--loss` with a `--rto-ms` resend), its own drafting time and drafts, in a closed loop for
`--duration` seconds per point. The drafting does not run here: the real edge (the demo draft,
or `--draft`, on this CPU, pipelining off) first generates from every prompt once against the
verifier, and its `Verify` streams are recorded at the wire with its time before each round
(`orchestrator.loadtest.recording`); the emulated edges replay those rounds, waiting the
recorded drafting time. So the acceptance is the real drafter's and the verifier's work is
the only model work measured. The baseline, `cloud_only`, is server-side decoding: each
client opens the same session and the verifier decodes and streams as many tokens as the
recorded generation produced.

Topology: the verifier is an `edgecloud cloud serve` subprocess (the demo target, or
`--target`; `--device cuda` puts it on a GPU), so the emulated clients' Python does not share
its interpreter lock. Its forward passes and busy time come from its Prometheus `/metrics`,
read before and after each point.

Reported per (sampling, RTT, clients), for lossless and cloud_only side by side: per-request
TPOT p50 and p99 (each request is one client's), TTFT p50, goodput (tokens/s of requests
whose TPOT met `--slo-tpot-ms`), verifier forward passes and busy ms per generated token,
and the lossless / cloud_only ratios. The headline: clients served at the SLO, the largest N
of the sweep up to which every point's p90 TPOT (`--slo-percentile`) met the SLO, at each
RTT, greedy and at temperature 0.7 (seeded: only seeded verification replays the same
acceptance).

    python benchmarks/fleet.py                     # demo pair, N 1..32, RTT 20 and 80 ms
    python benchmarks/fleet.py --quick             # N 1 and 4, RTT 80 ms, greedy: ~1 min
    python benchmarks/fleet.py --plot fleet.png    # TPOT against clients, both modes
    python benchmarks/fleet.py --recording r.json  # keep the recordings; reused next time
    python benchmarks/fleet.py --target SmolLM2.gguf --draft SmolLM2.gguf \
        --draft-quantize int4 --chat 8 --slo-tpot-ms 200  # the real model, chat prompts
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from common import (
    REPO_ROOT,
    chat_prompts,
    check_pair_paths,
    heldout_prompts,
    machine,
    model_summary,
    pair_flags,
    print_json,
)

from lm.checkpoint import load_model
from lm.device import default_device
from lm.quantized import QuantScheme, load_quantized
from lm.tokenizer import Tokenizer
from lm.training import corpus
from orchestrator.loadtest.fleet import (
    FleetPlan,
    LinkProfile,
    clients_served,
    http_metrics,
    measure_fleet,
    plot_clients,
)
from orchestrator.loadtest.recording import (
    RecordingKey,
    find_recording,
    load_recordings,
    record,
    save_recordings,
)
from orchestrator.loadtest.records import Slo, percentile
from orchestrator.redis_server import free_port
from protocol.types import Mode

DEMO_DIR = REPO_ROOT / "orchestrator" / "demo_models"
MODEL_NAME = "bench-target"
TOKEN = "bench-fleet-edge-token"
TOPOLOGY = (
    "verifier: an `edgecloud cloud serve` subprocess; clients: emulated edges (asyncio tasks "
    "in this process, one gRPC channel each) replaying the real edge's recorded rounds; the "
    "real edge ran here only while recording"
)
MODES = (Mode.LOSSLESS, Mode.CLOUD_ONLY)


class VerifierProcess:
    """`edgecloud cloud serve` in a subprocess, its output in a log file."""

    def __init__(self, args: argparse.Namespace, workdir: Path, max_sessions: int) -> None:
        token_file = workdir / "token"
        token_file.write_text(TOKEN)
        self.metrics_address = f"127.0.0.1:{free_port()}"
        command = [
            *("cloud", "serve", "--model", str(args.target), "--name", MODEL_NAME),
            *("--port", "0", "--metrics-port", self.metrics_address.rpartition(":")[2]),
            *("--auth-token-file", str(token_file), "--max-sessions", str(max_sessions)),
            *("--max-batch", str(args.max_batch), "--session-ttl", "600"),
        ]
        for flag in ("device", "dtype", "schedule"):  # schedule: benchmarks/schedule.py's
            if getattr(args, flag, None):
                command += [f"--{flag}", getattr(args, flag)]
        self.command = ["edgecloud", *command]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if args.threads:
            env["OMP_NUM_THREADS"] = str(args.threads)
        self.log = workdir / "verifier.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchestrator.cli", *command],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO_ROOT,
                env=env,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and self.proc.poll() is None:
            if match := re.search(r"listening on [\w.\-]+:(\d+)", self.log.read_text()):
                self.address = f"127.0.0.1:{match.group(1)}"
                return
            time.sleep(0.1)
        self.stop()
        raise SystemExit(f"verifier did not start:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _die_with_parent() -> None:
    """In the verifier's process before it starts: the kernel sends it SIGTERM when the
    benchmark dies, so a benchmark killed by a signal (which skips `stop`) leaves no
    verifier holding the cores (prctl PR_SET_PDEATHSIG, Linux)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


def keys(args: argparse.Namespace) -> list[RecordingKey]:
    """A recording per (sampling, RTT): the adaptive shape policy drafts for its link."""
    return [
        RecordingKey(
            temperature=t,
            seed=None if t == 0 else args.seed,
            max_tokens=args.max_tokens,
            width=args.width,
            depth=args.depth,
            adapt=args.adapt,
            rtt_ms=rtt,
        )
        for t in args.temperatures
        for rtt in args.rtts
    ]


async def recordings_for(args, verifier: VerifierProcess, prompts, draft) -> dict:
    """The recording of each key: from --recording when it holds it for these prompts,
    else recorded now (and saved there)."""
    have = load_recordings(args.recording)
    found, made = {}, []
    for key in keys(args):
        fields = {f: getattr(key, f) for f in key.__dataclass_fields__}
        recording = find_recording(have, **fields)
        if recording is None or len(recording.requests) != len(prompts):
            print(f"recording the real edge: {key.describe()}", flush=True)
            recording = await record(
                draft, verifier.address, MODEL_NAME, [p.tokens for p in prompts], key, token=TOKEN
            )
            made.append(recording)
        found[key] = recording
    if made:
        save_recordings(args.recording, made)
    return found


async def sweep(args, verifier: VerifierProcess, recordings: dict) -> list[dict]:
    slo = Slo(tpot_ms=args.slo_tpot_ms)
    metrics = http_metrics(verifier.metrics_address)
    rows = []
    for key, recording in recordings.items():
        link = LinkProfile(
            rtt_ms=key.rtt_ms,
            jitter_ms=key.rtt_ms * args.jitter,
            loss=args.loss,
            rto_ms=args.rto_ms,
            edge_scale=args.edge_scale,
        )
        for clients in args.clients:
            for mode in MODES:
                plan = FleetPlan(
                    clients=clients,
                    mode=mode,
                    duration_s=args.duration,
                    link=link,
                    seed=args.seed,
                )
                point = await measure_fleet(
                    verifier.address, recording, plan, slo=slo, metrics=metrics, token=TOKEN
                )
                tpots = [r.tpot_ms for r in point.result.records if r.tpot_ms is not None]
                row = point.row() | {
                    "sampling": sampling_label(key),
                    "slo_percentile_tpot_ms": percentile(tpots, args.slo_percentile)
                    if tpots
                    else None,
                }
                rows.append(row)
                print(
                    f"  {row['sampling']:<14} rtt {key.rtt_ms:>3g} ms  {clients:>3} clients  "
                    f"{mode.value:<10} {row['completed']:>4} requests  "
                    f"p50 TPOT {row['p50_tpot_ms']:6.1f} ms  failed {row['failed']}",
                    flush=True,
                )
    return rows


def sampling_label(key: RecordingKey) -> str:
    return "greedy" if key.temperature == 0 else f"T={key.temperature:g} seeded"


def report(rows: Sequence[dict], args: argparse.Namespace) -> list[dict]:
    """Prints the side-by-side table and the headline; returns the headline rows."""
    by = {(r["sampling"], r["rtt_ms"], r["clients"], r["mode"]): r for r in rows}
    print()
    head = (
        f"{'TPOT p50':>8} {'p99':>6} {'TTFT p50':>8} {'good t/s':>8} {'pass/tok':>8} "
        f"{'busy/tok':>8}"
    )
    print(
        f"{'':<14} {'':>4} {'':>3}   {'lossless':<{len(head)}}   {'cloud_only':<{len(head)}}   "
        "lossless / cloud_only"
    )
    print(
        f"{'sampling':<14} {'rtt':>4} {'N':>3} | {head} | {head} | "
        f"{'p99 TPOT':>8} {'pass/tok':>8} {'busy/tok':>8}"
    )
    for sampling, rtt, clients, mode in by:
        if mode != Mode.LOSSLESS.value:
            continue
        lossless, cloud = (
            by[(sampling, rtt, clients, "lossless")],
            by[(sampling, rtt, clients, "cloud_only")],
        )
        print(
            f"{sampling:<14} {rtt:>4g} {clients:>3} | {_cells(lossless)} | {_cells(cloud)} | "
            + " ".join(
                f"{_ratio(lossless[k], cloud[k]):>8}"
                for k in ("p99_tpot_ms", "verifier_passes_per_token", "verifier_busy_ms_per_token")
            )
        )
    print(
        "TPOT, TTFT: ms per request (each is one client's); good t/s: output tokens/s of "
        f"requests with TPOT <= {args.slo_tpot_ms:g} ms; pass/tok, busy/tok: the verifier's "
        "forward passes and busy ms per generated token (prefill included)"
    )
    headline = []
    print()
    print(
        f"Clients served at TPOT p{args.slo_percentile:g} <= {args.slo_tpot_ms:g} ms "
        f"(the largest N of {', '.join(map(str, args.clients))} up to which every point met it):"
    )
    for sampling in dict.fromkeys(r["sampling"] for r in rows):
        for rtt in dict.fromkeys(r["rtt_ms"] for r in rows):
            served = {}
            for mode in MODES:
                points = [
                    (r["clients"], r["slo_percentile_tpot_ms"])
                    for r in rows
                    if (r["sampling"], r["rtt_ms"], r["mode"]) == (sampling, rtt, mode.value)
                    and r["slo_percentile_tpot_ms"] is not None
                ]
                served[mode.value] = clients_served(points, args.slo_tpot_ms)
            ratio = _ratio(served["lossless"], served["cloud_only"])
            top = max(args.clients)
            note = " (the sweep's largest N: more may be served)" if top in served.values() else ""
            print(
                f"  {sampling:<14} RTT {rtt:>3g} ms: lossless {served['lossless']:>3}, "
                f"cloud_only {served['cloud_only']:>3}, ratio {ratio}{note}"
            )
            headline.append({"sampling": sampling, "rtt_ms": rtt, "served": served})
    return headline


def _cells(row: dict) -> str:
    good = row["token_goodput"] or 0.0
    return (
        f"{row['p50_tpot_ms']:>8.1f} {row['p99_tpot_ms']:>6.1f} {row['p50_ttft_ms']:>8.1f} "
        f"{good:>8.1f} {row['verifier_passes_per_token']:>8.3f} "
        f"{row['verifier_busy_ms_per_token']:>8.2f}"
    )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def plot(rows: Sequence[dict], path: Path, slo_ms: float) -> None:
    panels: dict[str, dict[str, list]] = {}
    for r in rows:
        title = f"{r['sampling']}, RTT {r['rtt_ms']:g} ms"
        series = panels.setdefault(title, {}).setdefault(r["mode"], [])
        series.append((r["clients"], r["p50_tpot_ms"], r["p99_tpot_ms"]))
    plot_clients(panels, path, slo_ms)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    pair_flags(parser, DEMO_DIR)
    parser.add_argument("--prompts", type=int, help="held-out prompts, replayed in a cycle (8)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (128)")
    parser.add_argument("--max-tokens", type=int, help="tokens per request (64)")
    parser.add_argument("--clients", help="fleet sizes, comma-separated (1,2,4,8,16,32)")
    parser.add_argument("--rtt-ms", help="round trips, comma-separated (20,80)")
    parser.add_argument("--temperatures", help="comma-separated; 0 is greedy (0,0.7)")
    parser.add_argument("--seed", type=int, default=1, help="sampling and link seed (1)")
    parser.add_argument("--jitter", type=float, default=0.1, help="RTT std dev / RTT (0.1)")
    parser.add_argument("--loss", type=float, default=0.002, help="per message, one way (0.002)")
    parser.add_argument("--rto-ms", type=float, default=200.0, help="resend timeout (200)")
    parser.add_argument(
        "--edge-scale", type=float, default=1.0, help="x recorded drafting time (1)"
    )
    parser.add_argument("--duration", type=float, help="seconds per point, closed loop (8)")
    parser.add_argument("--slo-tpot-ms", type=float, default=50.0, help="TPOT SLO (50 ms)")
    parser.add_argument(
        "--slo-percentile", type=float, default=90.0, help="of per-request TPOT (90)"
    )
    parser.add_argument("--width", type=int, default=4, help="beam width (4)")
    parser.add_argument("--depth", type=int, default=6, help="draft depth (6)")
    parser.add_argument(
        "--adapt",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="adaptive draft shape while recording (the edge's default: on)",
    )
    parser.add_argument("--max-batch", type=int, default=16, help="verifier --max-batch (16)")
    parser.add_argument(
        "--recording", type=Path, help="recording file to reuse and extend (default: a temp file)"
    )
    parser.add_argument("--plot", type=Path, help="PNG: TPOT p50/p99 against clients")
    parser.add_argument("--device", help="the verifier's: cpu, cuda, ... (default: CUDA if any)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument(
        "--threads", type=int, help="torch threads of the verifier and of the recording edge"
    )
    parser.add_argument(
        "--quick", action="store_true", help="N 1 and 4, RTT 80 ms, greedy, 4 prompts, 5 s"
    )
    args = parser.parse_args(argv)
    q = args.quick
    args.clients = [int(x) for x in (args.clients or ("1,4" if q else "1,2,4,8,16,32")).split(",")]
    args.rtts = [float(x) for x in (args.rtt_ms or ("80" if q else "20,80")).split(",")]
    args.temperatures = [
        float(x) for x in (args.temperatures or ("0" if q else "0,0.7")).split(",")
    ]
    prompts_n = args.prompts or (4 if q else 8)
    args.max_tokens = args.max_tokens or (48 if q else 64)
    args.duration = args.duration or (5.0 if q else 8.0)
    if args.plot is not None:
        from orchestrator.loadtest.report import plotting_available

        if not plotting_available():
            parser.error("--plot: needs matplotlib")
    check_pair_paths(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.monotonic()
    tokenizer = Tokenizer.from_dir(args.target)
    if args.chat:
        prompts = chat_prompts(tokenizer, args.chat)
    else:
        prompts = heldout_prompts(tokenizer, prompts_n, args.prompt_tokens)
    if args.draft_quantize:  # the edge's own CPU
        draft = load_quantized(args.draft, QuantScheme.named(args.draft_quantize))
    else:
        draft = load_model(args.draft, device="cpu", dtype=torch.float32)
    workdir = Path(tempfile.mkdtemp(prefix="edgecloud-fleet-"))
    args.recording = args.recording or workdir / "recording.json"
    verifier = VerifierProcess(args, workdir, max_sessions=max(args.clients) + 4)
    device = torch.device(args.device) if args.device else default_device()
    print(
        f"verifier {args.target} on {args.device or 'its default device'} "
        f"(subprocess, {verifier.address}); edges replay draft {args.draft}; "
        f"{len(prompts)} prompts x {max(len(p.tokens) for p in prompts)} tokens at most, "
        f"{args.max_tokens} new; "
        f"clients {args.clients}; RTT {args.rtts} ms, jitter {args.jitter:.0%}, loss "
        f"{args.loss:g}; {args.duration:g} s per point"
    )
    print(f"topology: {TOPOLOGY}")
    try:

        async def run() -> tuple[dict, list[dict]]:
            recordings = await recordings_for(args, verifier, prompts, draft)
            return recordings, await sweep(args, verifier, recordings)

        recordings, rows = asyncio.run(run())
    finally:
        verifier.stop()
    headline = report(rows, args)
    if args.plot is not None:
        plot(rows, args.plot, args.slo_tpot_ms)
        print(f"wrote {args.plot}")
    target = load_model(args.target, device="cpu")
    print()
    print(f"recording: {args.recording}")
    info = machine(device)
    print(
        f"machine: {info['cpu_model']}, {info['cores']} cores, torch {info['torch']}, "
        f"verifier device {args.device or 'default (CUDA if present)'}"
    )
    print_json(
        {
            "benchmark": "fleet",
            "machine": info,
            "topology": TOPOLOGY,
            "verifier_command": verifier.command,
            "target": model_summary(target, str(args.target)),
            "draft": model_summary(draft, str(args.draft)),
            "draft_quantize": args.draft_quantize,
            "prompts": {
                "count": len(prompts),
                "tokens": max(len(p.tokens) for p in prompts),
                "source": "chat questions" if args.chat else "held-out corpus files",
                "heldout_digest": None if args.chat else corpus.heldout_digest(corpus.discover()),
                "files": [p.file for p in prompts],
            },
            "max_tokens": args.max_tokens,
            "recordings": [
                {
                    "key": {f: getattr(k, f) for f in k.__dataclass_fields__},
                    "tau": r.tau,
                    "edge_ms_per_round": r.edge_ms_per_round(),
                    "rounds": sum(len(q.rounds) for q in r.requests),
                }
                for k, r in recordings.items()
            ],
            "link": {
                "jitter_fraction": args.jitter,
                "loss": args.loss,
                "rto_ms": args.rto_ms,
                "edge_scale": args.edge_scale,
            },
            "duration_s_per_point": args.duration,
            "slo": {"tpot_ms": args.slo_tpot_ms, "percentile": args.slo_percentile},
            "results": rows,
            "headline": headline,
            "wall_s": time.monotonic() - started,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
