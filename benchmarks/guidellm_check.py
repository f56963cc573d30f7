"""GuideLLM against edgecloud's OpenAI-compatible HTTP API, beside `edgecloud loadtest` on
the same server: a third-party load tester runs as documented in the README (a local
tokenizer, no model hub), and its figures agree with ours.

The server is the demo pair as a user starts it: `edgecloud cloud serve` (the target) and
`edgecloud edge serve --http-port` (the draft, lossless), each a process on loopback.
GuideLLM (installed on its own: `pip install guidellm` in another virtualenv; pass its
executable) sends `--requests` completions at `--concurrency` streams, greedy, with
synthetic prompts of `--prompt-tokens` and `--output-tokens` tokens; then `edgecloud
loadtest` sends the same count at the same concurrency over gRPC. Printed: each tool's
request throughput, output tokens/s, median TTFT, ITL and TPOT, and their ratio.

    python benchmarks/guidellm_check.py --guidellm /path/to/venv/bin/guidellm

The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from common import REPO_ROOT, machine, print_json

from tests.processes import ServerProcess

DEMO = REPO_ROOT / "orchestrator" / "demo_models"
HTTP_LISTENING = r"OpenAI-compatible HTTP on http://[\w.\-]+:(\d+)"


def start_servers(log_dir: Path) -> tuple[ServerProcess, ServerProcess, int, int]:
    """The verifier and an edge with its HTTP API; returns them, the edge's gRPC port
    and its HTTP port (the edge prints the gRPC line first, then the HTTP one)."""
    verifier = ServerProcess(
        ["cloud", "serve", "--model", str(DEMO / "target"), "--port", "0", "--insecure-no-auth"]
    )
    edge = ServerProcess(
        [
            *("edge", "serve", "--model", str(DEMO / "draft"), "--verifier-model", "target"),
            *("--verifier", verifier.address, "--port", "0", "--http-port", "0"),
            "--insecure-no-auth",
        ],
        log_path=log_dir / "edge.log",
        listening=re.compile(HTTP_LISTENING),
    )
    grpc = re.search(r"listening on [\w.\-]+:(\d+)", (log_dir / "edge.log").read_text())
    return verifier, edge, int(grpc.group(1)), edge.port


def run_guidellm(exe: str, url: str, args: argparse.Namespace, out: Path) -> dict:
    body = {"temperature": 0, "mode": "lossless"}
    command = [
        exe,
        "run",
        "--backend",
        json.dumps(
            {
                "kind": "openai_http",
                "target": url,
                "model": "target",
                "request_format": "/v1/completions",
                "extras": {"body": body},
            }
        ),
        "--tokenizer",
        f"kind=huggingface_auto,model={DEMO / 'target'}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={args.prompt_tokens},"
        f"output_tokens={args.output_tokens}",
        "--profile",
        f"kind=concurrent,streams={args.concurrency}",
        "--constraint",
        f"kind=max_requests,count={args.requests}",
        "--output",
        f"kind=json,path={out}",
        "--disable-console-interactive",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"guidellm failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def guidellm_figures(report: dict) -> dict:
    """Throughput over GuideLLM's benchmark duration, and its latency medians, from its
    JSON report (`benchmarks[0].metrics`, each a distribution by request status)."""
    [bench] = report["benchmarks"]
    metrics = bench["metrics"]

    def successful(name: str) -> dict:
        return metrics[name]["successful"]

    totals = metrics["request_totals"]
    return {
        "requests": totals["successful"],
        "errors": totals["errored"] + totals["incomplete"],
        "request_throughput": totals["successful"] / bench["duration"],
        "output_throughput": successful("output_token_count")["total_sum"] / bench["duration"],
        "median_ttft_ms": successful("time_to_first_token_ms")["median"],
        "median_itl_ms": successful("inter_token_latency_ms")["median"],
        "median_tpot_ms": successful("time_per_output_token_ms")["median"],
    }


def run_ours(grpc: str, args: argparse.Namespace, out: Path) -> dict:
    command = [
        sys.executable,
        "-m",
        "orchestrator.cli",
        *("loadtest", "--target", grpc, "--concurrency", str(args.concurrency)),
        *("--requests", str(args.requests), "--max-tokens", str(args.output_tokens)),
        # Held-out text of about --prompt-tokens tokens (the demo tokenizer: ~3 characters
        # a token), where GuideLLM sends synthetic text of exactly that many.
        *("--prompt-chars", str(3 * args.prompt_tokens)),
        *("--temperature", "0", "--out", str(out)),
    ]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"edgecloud loadtest failed:\n{done.stderr[-3000:]}")
    [run] = json.loads(out.read_text())["runs"]
    summary = run["summary"]
    return {
        "requests": summary["completed"],
        "errors": summary["failed"],
        "request_throughput": summary["request_throughput"],
        "output_throughput": summary["output_throughput"],
        "median_ttft_ms": summary["median_ttft_ms"],
        "median_itl_ms": summary["median_itl_ms"],
        "median_tpot_ms": summary["median_tpot_ms"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guidellm", required=True, help="the guidellm executable")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        verifier, edge, grpc_port, http_port = start_servers(Path(tmp))
        try:
            url = f"http://127.0.0.1:{http_port}"
            theirs = guidellm_figures(run_guidellm(args.guidellm, url, args, Path(tmp) / "g.json"))
            ours = run_ours(f"127.0.0.1:{grpc_port}", args, Path(tmp) / "ours.json")
        finally:
            edge.stop()
            verifier.stop()
    where = machine(torch.device("cpu"))
    print(f"machine: {where}")
    print(f"{'':24}{'guidellm (HTTP)':>18}{'edgecloud (gRPC)':>18}{'ratio':>8}")
    for key in theirs:
        ratio = theirs[key] / ours[key] if ours[key] else float("nan")
        print(f"{key:24}{theirs[key]:>18.2f}{ours[key]:>18.2f}{ratio:>8.2f}")
    print_json({"machine": where, "args": vars(args), "guidellm": theirs, "edgecloud": ours})
    return 0


if __name__ == "__main__":
    sys.exit(main())
