"""`edgecloud loadtest`: send load to a Generation server (an edge or the gateway) and report
latency and throughput as `vllm bench serve` names them, plus the draft figures."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import ipaddress
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.usage import UsageError

if TYPE_CHECKING:
    from edgecloud import GenerateOptions, TlsOptions
    from orchestrator.loadtest.prompts import Prompt
    from orchestrator.loadtest.records import RequestRecord, Slo
    from orchestrator.loadtest.report import RunReport
    from orchestrator.loadtest.runner import LoadPlan

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_REQUESTS = 100
DEFAULT_PROMPT_CHARS = 256
# Held-out prompts drawn when only --duration bounds the run; they are reused in a cycle.
DURATION_PROMPTS = 512
# Fields of LoadPlan, GenerateOptions and AsyncClient -> the flag that sets them.
FLAGS = {
    "concurrency": "--concurrency",
    "rate": "--rate",
    "max_concurrency": "--max-concurrency",
    "requests": "--requests",
    "duration_s": "--duration",
    "seed": "--seed",
    "max_tokens": "--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "mode": "--mode",
    "model": "--model",
    "ignore_eos": "--ignore-eos",
    "timeout": "--timeout",
    "token": "--token",
    "slo": "--slo",
    "clients": "--emulate-edges",
    "rtt_ms": "--rtt-ms",
    "jitter_ms": "--rtt-jitter-ms",
    "loss": "--loss",
    "rto_ms": "--rto-ms",
    "edge_scale": "--edge-scale",
}
MODES = ("lossless", "adaptive", "edge_only", "cloud_only")

EPILOG = """\
examples:
  edgecloud loadtest --token-file tok --concurrency 8 --requests 200
  edgecloud loadtest --token-file tok --rate 1,2,4,8 --duration 60 --plot sweep.png
  edgecloud loadtest --target 127.0.0.1:50051 --target 127.0.0.1:50052 \\
      --prompts prompts.jsonl --slo ttft=500,tpot=50 --out results.json

  edgecloud loadtest --emulate-edges 1,4,16 --target VERIFIER:50061 --token-file edge-tok \\
      --recording rec.json --record-with DRAFT_DIR --model target --rtt-ms 80 \\
      --verifier-metrics 127.0.0.1:9100 --slo tpot=50
  edgecloud loadtest --emulate-edges 8,32 --target VERIFIER:50061 --token-file edge-tok \\
      --recording rec.json --record-with DRAFT_DIR --model target --rtt-ms 20 \\
      --shaping load-aware --book book.json     # or --shaping 1x4: compare shapes

Metrics follow `vllm bench serve`: TTFT, TPOT = (e2el - ttft) / (tokens - 1), ITL (per
token: a chunk of k tokens g ms after the previous one counts k of g/k), E2EL,
request/output throughput and goodput; plus the inter-chunk latency (the gap between
streamed chunks: one chunk is one verified round), rounds, acceptance per position and
cloud forward passes per token. A refused token (UNAUTHENTICATED, PERMISSION_DENIED)
stops the run at its first request, with exit status 2.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "loadtest",
        help="load a Generation server and report latency and throughput",
        description=__doc__.split("\n\n")[0].removeprefix("`edgecloud loadtest`: "),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = p.add_argument_group("target")
    target.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help=f"server to load; repeat to spread requests round robin (default: {DEFAULT_TARGET})",
    )
    target.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow targets that are not loopback addresses. Off by default: a load test is a "
        "flood of requests, and a mistyped or copied address should fail here rather than "
        "overload a server you do not run",
    )
    target.add_argument("--token", help="the server's client bearer token")
    target.add_argument(
        "--token-file", type=Path, metavar="FILE", help="file holding the bearer token"
    )
    target.add_argument(
        "--tls-ca", type=Path, metavar="FILE", help="PEM CA that signed the server; enables TLS"
    )
    target.add_argument(
        "--tls-server-name", metavar="NAME", help="name to check in the server's certificate"
    )
    target.add_argument(
        "--timeout",
        default="600",
        metavar="S",
        help="seconds a request may take; no retries (default: %(default)s)",
    )

    load = p.add_argument_group("load (closed loop: --concurrency; open loop: --rate)")
    load.add_argument(
        "--concurrency", metavar="N", help="closed loop: requests kept in flight (default: 1)"
    )
    load.add_argument(
        "--rate",
        metavar="R[,R...]",
        help="open loop: Poisson arrivals per second, or inf for all at once; "
        "a comma list runs a sweep, one run per rate",
    )
    load.add_argument("--max-concurrency", metavar="N", help="open loop: cap on requests in flight")
    load.add_argument(
        "--requests",
        metavar="N",
        help=f"requests per run (default: {DEFAULT_REQUESTS} without --duration)",
    )
    load.add_argument(
        "--duration",
        metavar="S",
        help="seconds per run after which no request is sent; in-flight ones finish",
    )

    prompts = p.add_argument_group("prompts")
    prompts.add_argument(
        "--prompts",
        type=Path,
        metavar="FILE",
        help="one prompt per line, or .jsonl records with a 'prompt' string or 'prompt_tokens' "
        "list (default: text from the demo corpus's held-out split); reused in a cycle",
    )
    prompts.add_argument(
        "--prompt-tokens-from-file",
        action="store_true",
        help="send --prompts' token ids: the 'prompt_tokens' of .jsonl records, or each line's "
        "ids separated by spaces or commas (otherwise text is sent, tokenized by the server)",
    )
    prompts.add_argument(
        "--prompt-chars",
        metavar="N",
        help=f"held-out prompts: characters each (default: {DEFAULT_PROMPT_CHARS})",
    )

    gen = p.add_argument_group("generation")
    gen.add_argument(
        "--mode", default="lossless", help=f"{', '.join(MODES)} (default: %(default)s)"
    )
    gen.add_argument(
        "--max-tokens", default="128", metavar="N", help="tokens per request (default: %(default)s)"
    )
    gen.add_argument(
        "--ignore-eos",
        action="store_true",
        help="generate past end-of-sequence tokens: every output is --max-tokens long "
        "(vLLM's ignore_eos), unless a stop string ends it",
    )
    gen.add_argument(
        "--temperature",
        default="0",
        metavar="T",
        help="sampling temperature; 0 = greedy (default: %(default)s)",
    )
    gen.add_argument(
        "--top-p", default="1", metavar="P", help="nucleus mass; 1 = off (default: %(default)s)"
    )
    gen.add_argument(
        "--top-k",
        default="0",
        metavar="K",
        help="sample among the K likeliest tokens; 0 = off (default: %(default)s)",
    )
    gen.add_argument(
        "--seed",
        metavar="N",
        help="seeds the arrival schedule, and request i's sampler with seed + i (default: 0; "
        "samplers unseeded)",
    )
    gen.add_argument(
        "--model", default="", metavar="NAME", help="model name (default: the server's)"
    )

    fleet = p.add_argument_group(
        "fleet emulation (--emulate-edges: edge devices emulated against a verifier, "
        "replaying a real edge's recorded drafts; see orchestrator/loadtest/fleet.py)"
    )
    fleet.add_argument(
        "--emulate-edges",
        metavar="N[,N...]",
        help="emulated edges, each with one request at a time, sent to the verifier at "
        "--target (its edge token in --token); a comma list runs a sweep. --mode is "
        "lossless (replayed drafts) or cloud_only (server-side decoding)",
    )
    fleet.add_argument(
        "--recording",
        type=Path,
        metavar="FILE",
        help="the real edge's recorded streams to replay, for these --temperature, --seed, "
        "--max-tokens (benchmarks/fleet.py makes one; so does --record-with)",
    )
    fleet.add_argument(
        "--record-with",
        type=Path,
        metavar="DRAFT_DIR",
        help="when --recording holds none for these settings, first record the real edge "
        "with this draft model on the prompts, against --target serving --model",
    )
    fleet.add_argument(
        "--shaping",
        metavar="POLICY",
        help="lossless edges draft each round from a draft book (--book) in the shape this "
        "policy picks instead of replaying the recorded rounds: load-aware (the edge's "
        "policy), latency (the same, blind to the verifier's load) or a fixed WxD such as "
        "4x6; greedy recordings only",
    )
    fleet.add_argument(
        "--book",
        type=Path,
        metavar="FILE",
        help="with --shaping: the draft book of --recording's generations (made and saved "
        "here with --record-with's draft when absent; orchestrator/loadtest/draft_book.py)",
    )
    fleet.add_argument(
        "--rtt-ms",
        default="0",
        metavar="MS",
        help="each edge's mean round trip (default: %(default)s)",
    )
    fleet.add_argument(
        "--rtt-jitter-ms",
        default="0",
        metavar="MS",
        help="standard deviation of the round trip, drawn per exchange (default: %(default)s)",
    )
    fleet.add_argument(
        "--loss",
        default="0",
        metavar="P",
        help="chance a message is lost one way and waits --rto-ms for its resend "
        "(default: %(default)s)",
    )
    fleet.add_argument(
        "--rto-ms",
        default="200",
        metavar="MS",
        help="retransmission timeout (default: %(default)s)",
    )
    fleet.add_argument(
        "--edge-scale",
        default="1",
        metavar="X",
        help="multiplies the recorded drafting time: above 1 for a slower device "
        "(default: %(default)s)",
    )
    fleet.add_argument(
        "--verifier-metrics",
        metavar="HOST:PORT",
        help="the verifier's --metrics-port, read before and after each run for its forward "
        "passes and busy time per generated token",
    )

    out = p.add_argument_group("output")
    out.add_argument(
        "--slo", metavar="ttft=MS,tpot=MS", help="goodput counts requests meeting these (ms)"
    )
    out.add_argument(
        "--out", type=Path, metavar="FILE", help="JSON file: the config and every request's record"
    )
    out.add_argument(
        "--plot",
        type=Path,
        metavar="FILE",
        help="PNG: latency CDFs, or for a rate sweep latency against throughput (matplotlib)",
    )
    out.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run_loadtest)


def run_loadtest(args: argparse.Namespace) -> int:
    from edgecloud import GenerateOptions, InvalidRequest
    from orchestrator.loadtest.records import Slo

    started_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    if args.emulate_edges is not None:
        from orchestrator.commands.loadtest_fleet import run_fleet_loadtest

        if args.ignore_eos:
            raise UsageError("--ignore-eos: not with --emulate-edges (it replays recorded outputs)")

        return run_fleet_loadtest(args, started_at)
    fleet_only = {
        "recording": None,
        "record_with": None,
        "shaping": None,
        "book": None,
        "verifier_metrics": None,
        "rtt_ms": "0",
        "rtt_jitter_ms": "0",
        "loss": "0",
        "rto_ms": "200",
        "edge_scale": "1",
    }
    for name, default in fleet_only.items():
        if getattr(args, name) != default:
            raise UsageError(f"--{name.replace('_', '-')}: only with --emulate-edges")
    targets = checked_targets(args.target or [DEFAULT_TARGET], args.allow_remote)
    plans = load_plans(args)
    try:
        options = GenerateOptions(
            max_tokens=_int("--max-tokens", args.max_tokens),
            temperature=_float("--temperature", args.temperature),
            top_p=_float("--top-p", args.top_p),
            top_k=_int("--top-k", args.top_k),
            seed=None if args.seed is None else _int("--seed", args.seed),
            mode=args.mode,
            model=args.model,
            ignore_eos=args.ignore_eos,
        )
        slo = None if args.slo is None else Slo.parse(args.slo)
    except (InvalidRequest, ValueError) as exc:
        raise flag_error(exc) from None
    check_outputs(args)
    timeout_s = _float("--timeout", args.timeout)
    token, tls = client_token(args), tls_options(args)
    prompts, source = load_prompts(args, plans[0].requests)
    test = LoadTest(targets, token, tls, timeout_s, tuple(prompts), tuple(plans), options, slo)
    runs = asyncio.run(test.run(progress=not args.no_progress))
    if args.out:
        from orchestrator.loadtest.report import write_results

        config = {
            "started_at": started_at,
            "targets": targets,
            "prompts": source,
            "prompt_count": len(prompts),
            "options": dataclasses.asdict(options),
            "slo": None if slo is None else slo.describe(),
            "timeout_s": timeout_s,
        }
        write_results(args.out, config, runs)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.plot:
        from orchestrator.loadtest.report import (
            PlotCaption,
            plot_distributions,
            plot_sweep,
            run_label,
        )

        caption = PlotCaption(
            targets=tuple(targets),
            mode=options.mode,
            load=", ".join(run_label(run.plan) for run in runs),
            max_tokens=options.max_tokens,
            temperature=options.temperature,
            requests=sum(len(run.result.records) for run in runs),
            started_at=started_at,
        )
        if len(runs) > 1:
            plot_sweep(runs, args.plot, caption)
        else:
            plot_distributions(runs[0].result.records, args.plot, caption)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0 if all(run.summary.completed for run in runs) else 1


@dataclass(frozen=True)
class LoadTest:
    """Everything the flags decided; `run` sends each plan in turn."""

    targets: list[str]
    token: str | None
    tls: TlsOptions | None
    timeout_s: float
    prompts: tuple[Prompt, ...]
    plans: tuple[LoadPlan, ...]  # several for a rate sweep
    options: GenerateOptions
    slo: Slo | None

    async def run(self, *, progress: bool) -> list[RunReport]:
        """Runs each plan on one set of clients (made here: they belong to this event loop);
        prints each run's summary as it ends, and the sweep table after the last."""
        from edgecloud import AsyncClient, InvalidRequest
        from orchestrator.loadtest.records import summarize
        from orchestrator.loadtest.report import (
            Progress,
            RunReport,
            run_label,
            summary_table,
            sweep_table,
        )
        from orchestrator.loadtest.runner import CredentialsRefused, run_load

        try:
            clients = {
                t: AsyncClient(
                    t, token=self.token, tls=self.tls, timeout=self.timeout_s, retry=None
                )
                for t in self.targets
            }
        except InvalidRequest as exc:
            raise flag_error(exc) from None
        runs = []
        try:
            for plan in self.plans:
                label = run_label(plan)
                bar = Progress(plan.requests, label, enabled=progress)
                try:
                    result = await run_load(
                        clients, self.prompts, plan, self.options, on_record=bar
                    )
                except CredentialsRefused as refused:
                    raise credentials_error(refused.record, self.token) from None
                finally:
                    bar.close()
                run = RunReport(
                    plan, result, summarize(result.records, result.duration_s, self.slo)
                )
                runs.append(run)
                print(summary_table(run.summary, f"Serving Benchmark Result ({label})"), flush=True)
        finally:
            for client in clients.values():
                await client.close()
        if len(runs) > 1:
            print(sweep_table(runs))
        return runs


def credentials_error(record: RequestRecord, token: str | None) -> UsageError:
    """The one line that ends a run whose token a target refused (never the token)."""
    given = " (none was given)" if token is None else ""
    return UsageError(
        f"--token/--token-file: {record.target} answered {record.error_code} "
        f"({record.error}) and the run stopped there; give the server's client token{given}"
    )


def checked_targets(targets: list[str], allow_remote: bool) -> list[str]:
    """HOST:PORT (or [IPv6]:PORT, or unix:PATH), each once, loopback unless allowed."""
    seen = []
    for target in targets:
        if target in seen:
            raise UsageError(f"--target: {target} given twice")
        seen.append(target)
        if target.startswith("unix:"):
            continue
        host, _, port = target.rpartition(":")
        host = host.removeprefix("[").removesuffix("]")
        if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise UsageError(f"--target: expected HOST:PORT, got {target!r}")
        if not allow_remote and not is_loopback(host):
            raise UsageError(
                f"--target: {target} is not a loopback address; a load test can overload a "
                "server, so pass --allow-remote to load one you run"
            )
    return seen


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 and ::1; other names are not resolved (they could be anything)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_plans(args: argparse.Namespace) -> list[LoadPlan]:
    """One LoadPlan per rate of --rate (a sweep), or the one closed-loop plan."""
    from orchestrator.loadtest.runner import LoadPlan

    if args.concurrency is not None and args.rate is not None:
        raise UsageError("--concurrency and --rate: give one (closed or open loop), not both")
    if args.max_concurrency is not None and args.rate is None:
        raise UsageError("--max-concurrency: only with --rate (an open loop)")
    requests, duration = run_bounds(args)
    common = {
        "requests": requests,
        "duration_s": duration,
        "seed": 0 if args.seed is None else _int("--seed", args.seed),
    }
    try:
        if args.rate is None:
            concurrency = 1 if args.concurrency is None else _int("--concurrency", args.concurrency)
            return [LoadPlan(concurrency=concurrency, **common)]
        cap = args.max_concurrency
        cap = None if cap is None else _int("--max-concurrency", cap)
        rates = [_float("--rate", r, allow_inf=True) for r in args.rate.split(",")]
        if len(set(rates)) != len(rates):
            raise UsageError(f"--rate: each rate once, got {args.rate}")
        return [LoadPlan(rate=r, max_concurrency=cap, **common) for r in rates]
    except ValueError as exc:
        raise flag_error(exc) from None


def run_bounds(args: argparse.Namespace) -> tuple[int | None, float | None]:
    """--requests and --duration; DEFAULT_REQUESTS when neither is given."""
    requests = None if args.requests is None else _int("--requests", args.requests)
    duration = None if args.duration is None else _float("--duration", args.duration)
    if requests is None and duration is None:
        requests = DEFAULT_REQUESTS
    return requests, duration


def load_prompts(args: argparse.Namespace, requests: int | None) -> tuple[list[Prompt], str]:
    """The prompt list and a description of where it came from."""
    if args.prompts is None:
        if args.prompt_tokens_from_file:
            raise UsageError("--prompt-tokens-from-file: needs --prompts FILE")
        from orchestrator.loadtest.prompts import heldout_prompts

        raw = args.prompt_chars
        chars = DEFAULT_PROMPT_CHARS if raw is None else _int("--prompt-chars", raw)
        if chars < 1:
            raise UsageError(f"--prompt-chars: must be >= 1, got {chars}")
        prompts = heldout_prompts(min(requests or DURATION_PROMPTS, DURATION_PROMPTS), chars=chars)
        return prompts, f"demo corpus held-out split, {chars} characters each"
    if args.prompt_chars is not None:
        raise UsageError("--prompt-chars: only for held-out prompts (without --prompts)")
    from orchestrator.loadtest.prompts import load_prompt_file

    try:
        prompts = load_prompt_file(args.prompts, tokens=args.prompt_tokens_from_file)
    except OSError as exc:
        raise UsageError(f"--prompts: cannot read {args.prompts}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"--prompts: {exc}") from None
    kind = "token ids" if args.prompt_tokens_from_file else "text or token ids"
    return prompts, f"{args.prompts} ({kind})"


def check_outputs(args: argparse.Namespace) -> None:
    """Fail now, not after the run, on output paths that cannot be written."""
    from orchestrator.loadtest.report import plotting_available

    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None and not path.resolve().parent.is_dir():
            raise UsageError(f"{flag}: directory {path.parent} does not exist")
    if args.plot is not None and not plotting_available():
        raise UsageError("--plot: needs matplotlib, which is not installed (pip install it)")


def client_token(args: argparse.Namespace) -> str | None:
    if args.token and args.token_file:
        raise UsageError("--token and --token-file: give only one")
    if args.token_file:
        try:
            return args.token_file.read_text().strip()
        except OSError as exc:
            raise UsageError(f"--token-file: cannot read: {exc.strerror}") from None
    return args.token


def tls_options(args: argparse.Namespace) -> TlsOptions | None:
    from edgecloud import TlsOptions

    if args.tls_ca is None:
        if args.tls_server_name:
            raise UsageError("--tls-server-name: needs --tls-ca")
        return None
    if not args.tls_ca.is_file():
        raise UsageError(f"--tls-ca: {args.tls_ca} is not a file")
    return TlsOptions(ca=args.tls_ca, server_name=args.tls_server_name)


def flag_error(exc: Exception) -> UsageError:
    """A field-named error ("top_p: must be ...") renamed for the flag ("--top-p: must ...")."""
    field, sep, rest = str(exc).partition(": ")
    return UsageError(f"{FLAGS[field]}: {rest}" if sep and field in FLAGS else str(exc))


def _int(flag: str, raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise UsageError(f"{flag}: must be an integer, got {raw!r}") from None


def _float(flag: str, raw: str, *, allow_inf: bool = False) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise UsageError(f"{flag}: must be a number, got {raw!r}")
    return value
