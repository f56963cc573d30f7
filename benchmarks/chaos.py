"""Chaos: a bounded load on the local fleet while faults are injected, one at a time and
then all together, with what every request met.

The fleet (tests/chaos/harness.py) is a private Redis, a local Ray with EdgeNode actors
and the gateway, and verifier processes registered from outside Ray, each behind a TCP
delay proxy. The faults are real: SIGKILL of a verifier process (a supervisor starts it
again after `--fault-s`), `ray.kill` of an EdgeNode actor (Ray restarts it), Redis stopped
and started again empty, the gateway dropped with its open streams and started again,
SIGSTOP of a verifier for `--fault-s` (a stall: connections stay open, nothing answers),
and a one-way delay spike on every edge-to-verifier link.

`--concurrency` clients send greedy lossless requests back to back for `--phase-s` seconds
per phase, each with a `--deadline-s` deadline, through the SDK (which retries UNAVAILABLE
before the first token, as any client should). Per phase it reports requests sent,
completed and failed by status code, whether every completed output equals the
fault-free (cloud-only) output of its prompt, requests past their deadline ("hung"),
failovers, and the recovery time: from the injection to the first correct completion of
a request sent after it. A request is lost when it completes wrong, fails with a status
a client cannot retry, hangs, or fails at all without having met a fault (before the
injection, or once the fleet healed and routing noticed); the goal is zero.

    python benchmarks/chaos.py                         # bundled demo pair, every fault
    python benchmarks/chaos.py --faults kill_verifier,stall_verifier --phase-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from common import heldout_prompts, machine, print_json

from lm.tokenizer import Tokenizer
from orchestrator.demo_models import DRAFT_DIR, TARGET_DIR
from tests.chaos.harness import FAULTS, ChaosConfig, run


def phase_line(summary: dict) -> str:
    failed = ", ".join(f"{k} {v}" for k, v in summary["failed"].items()) or "-"
    recovery = summary["recovery_s"]
    return (
        f"{'+'.join(summary['faults']):<40} sent {summary['sent']:>4}  ok {summary['completed']:>4}"
        f"  failed {failed:<22} identical {str(summary['lossless_identical']):<5}"
        f"  hung {summary['hung']}  lost {summary['lost']}  failovers {summary['failovers']:>3}"
        f"  recovery {'-' if recovery is None else f'{recovery:.2f} s'}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", type=Path, default=TARGET_DIR, help="target model dir")
    parser.add_argument("--draft", type=Path, default=DRAFT_DIR, help="draft model dir")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated, from {', '.join(FAULTS)}"
    )
    parser.add_argument("--no-combined", action="store_true", help="skip the all-at-once phase")
    parser.add_argument("--prompts", type=int, default=4, help="held-out prompts (4)")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="tokens per prompt (64)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (32)")
    parser.add_argument("--concurrency", type=int, default=4, help="clients (4)")
    parser.add_argument("--phase-s", type=float, default=15.0, help="load per phase (15)")
    parser.add_argument("--inject-at-s", type=float, default=4.0, help="fault time (4)")
    parser.add_argument("--fault-s", type=float, default=3.0, help="fault duration (3)")
    parser.add_argument("--deadline-s", type=float, default=30.0, help="per request (30)")
    args = parser.parse_args(argv)
    # The gateway's per-failure warnings are the faults doing their work; the table says it.
    logging.basicConfig(level=logging.ERROR)
    faults = [f.strip() for f in args.faults.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        parser.error(f"--faults: unknown {', '.join(unknown)}; choose from {', '.join(FAULTS)}")
    plan = [[f] for f in faults] + ([] if args.no_combined else [faults])

    tokenizer = Tokenizer.from_dir(args.target)
    prompts = [list(p.tokens) for p in heldout_prompts(tokenizer, args.prompts, args.prompt_tokens)]
    with tempfile.TemporaryDirectory(prefix="edgecloud-chaos-") as workdir:
        config = ChaosConfig(
            target_dir=args.target,
            draft_dir=args.draft,
            workdir=Path(workdir),
            concurrency=args.concurrency,
            max_tokens=args.max_tokens,
            deadline_s=args.deadline_s,
            phase_s=args.phase_s,
            inject_at_s=args.inject_at_s,
            fault_s=args.fault_s,
        )
        print(
            f"{len(plan)} phases of {args.phase_s:.0f} s, {args.concurrency} clients, "
            f"{args.max_tokens} tokens per request",
            flush=True,
        )
        phases = asyncio.run(run(config, prompts, plan, lambda s: print(phase_line(s), flush=True)))
    print_json(
        {
            "benchmark": "chaos",
            "machine": machine(torch.device("cpu")),
            "config": {
                k: getattr(args, k)
                for k in ("concurrency", "max_tokens", "phase_s", "fault_s", "deadline_s")
            },
            "phases": phases,
            "sent": sum(p["sent"] for p in phases),
            "lost": sum(p["lost"] for p in phases),
            "hung": sum(p["hung"] for p in phases),
            "all_identical": all(p["lossless_identical"] for p in phases),
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
