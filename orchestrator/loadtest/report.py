"""Showing a load test: the progress bar while it runs, the summary tables, the JSON file
and the plots. matplotlib (plots) and tqdm (the bar) are optional imports."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.loadtest.records import (
    LATENCY_METRICS,
    RequestRecord,
    Summary,
    latency_samples,
    percentile,
)
from orchestrator.loadtest.runner import LoadPlan, LoadResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

WIDTH = 50
TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency (per token)",
    "inter_chunk": "Inter-chunk Latency (per streamed chunk)",
    "e2el": "End-to-end Latency",
}
# How the summary's rows name each latency.
LABELS = {
    "ttft": "TTFT",
    "tpot": "TPOT",
    "itl": "ITL",
    "inter_chunk": "inter-chunk",
    "e2el": "E2EL",
}
DPI = 120


@dataclass(frozen=True)
class RunReport:
    """One load run (one point of a rate sweep) and its metrics."""

    plan: LoadPlan
    result: LoadResult
    summary: Summary


@dataclass(frozen=True)
class PlotCaption:
    """The run configuration a plot states under its title, so that a PNG read on its
    own says what was measured."""

    targets: tuple[str, ...]
    mode: str
    load: str  # how requests were sent: "concurrency 8", "rate 1/s, rate 2/s", ...
    max_tokens: int
    temperature: float
    requests: int  # requests sent, over every run the plot shows
    started_at: str  # ISO 8601

    def line(self) -> str:
        return (
            f"target {', '.join(self.targets)} | mode {self.mode} | {self.load} | "
            f"max_tokens {self.max_tokens} | temperature {self.temperature:g} | "
            f"{self.requests} requests | {self.started_at}"
        )

    def put_on(self, figure: Figure, title: str) -> None:
        """`title` over `figure`, this configuration under it."""
        figure.suptitle(f"{title}\n{self.line()}", fontsize=10)


def summary_table(summary: Summary, title: str = "Serving Benchmark Result") -> str:
    """vLLM's layout: totals and throughputs, then mean/median/percentiles per latency,
    then the draft metrics and the errors by status code."""
    s = summary.as_dict()
    lines = [f" {title} ".center(WIDTH, "=")]

    def row(label: str, value: object) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40} {text:>9}")

    row("Successful requests:", summary.completed)
    row("Failed requests:", summary.failed)
    row("Benchmark duration (s):", summary.duration_s)
    row("Peak requests in flight:", summary.peak_in_flight)
    row("Total input tokens:", summary.total_input_tokens)
    row("Total generated tokens:", summary.total_output_tokens)
    row("Request throughput (req/s):", summary.request_throughput)
    if summary.request_goodput is not None:
        row("Request goodput (req/s):", summary.request_goodput)
    row("Output token throughput (tok/s):", summary.output_throughput)
    row("Total token throughput (tok/s):", summary.total_token_throughput)
    for metric in LATENCY_METRICS:
        lines.append(TITLES[metric].center(WIDTH, "-"))
        name = LABELS[metric]
        for key, label in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            row(f"{label} {name} (ms):", s[f"{key}_{metric}_ms"])
    lines.append("Speculative Decoding".center(WIDTH, "-"))
    row("Drafts (verification rounds):", s["num_drafts"])
    row("Draft tokens:", s["num_draft_tokens"])
    row("Accepted tokens:", s["num_accepted_tokens"])
    row("Acceptance rate:", s["draft_acceptance_rate"])
    row("Mean acceptance length (tau):", s["mean_acceptance_length"])
    per_position = " ".join(f"{rate:.2f}" for rate in s["acceptance_rate_per_position"])
    lines.append(f"{'Acceptance per position:':<40} {per_position or '-'}")
    row("Cloud forward passes per output token:", s["cloud_passes_per_output_token"])
    row("Degraded requests:", summary.degraded_requests)
    row("Failovers:", summary.failovers)
    if summary.errors_by_code:
        lines.append("Errors".center(WIDTH, "-"))
        for code, count in sorted(summary.errors_by_code.items()):
            row(f"{code}:", count)
    lines.append("=" * WIDTH)
    return "\n".join(lines)


def sweep_table(runs: Sequence[RunReport]) -> str:
    """One line per rate: throughput, the latencies that move with load, goodput, errors."""
    head = (
        f"{'rate':>8} {'req/s':>8} {'tok/s':>9} {'p50 TTFT':>9} {'p99 TTFT':>9} "
        f"{'p50 TPOT':>9} {'p99 TPOT':>9} {'p99 E2EL':>9} {'goodput':>8} {'failed':>7}"
    )
    lines = [head]
    for run in runs:
        s = run.summary.as_dict()
        goodput = s["request_goodput"]
        lines.append(
            f"{_rate_label(run.plan.rate):>8} {s['request_throughput']:>8.2f} "
            f"{s['output_throughput']:>9.1f} {s['p50_ttft_ms']:>9.1f} {s['p99_ttft_ms']:>9.1f} "
            f"{s['p50_tpot_ms']:>9.1f} {s['p99_tpot_ms']:>9.1f} {s['p99_e2el_ms']:>9.1f} "
            f"{'-' if goodput is None else f'{goodput:.2f}':>8} {s['failed']:>7}"
        )
    return "\n".join(lines)


def write_results(path: Path, config: dict[str, object], runs: Sequence[RunReport]) -> None:
    """{"config": ..., "runs": [{"plan", "summary", "records": [every request]}]}."""
    document = {
        "config": config,
        "runs": [
            {
                "plan": run.plan.describe(),
                "summary": run.summary.as_dict(),
                "records": [r.as_dict() for r in run.result.records],
            }
            for run in runs
        ],
    }
    Path(path).write_text(json.dumps(document, indent=1, allow_nan=False) + "\n")


def plotting_available() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def plot_distributions(
    records: Sequence[RequestRecord], path: Path, caption: PlotCaption
) -> Figure:
    """Saves to `path` the empirical CDFs of every latency over the completed requests, one
    panel each with the median and p99 marked, under a title and `caption`; returns the
    matplotlib Figure."""
    from matplotlib.figure import Figure

    samples = latency_samples(records)
    figure = Figure(figsize=(14, 7.5), layout="constrained")
    panels = list(figure.subplots(2, 3).flat)
    for axes, metric in zip(panels, LATENCY_METRICS, strict=False):
        values = sorted(samples[metric])
        axes.set_title(TITLES[metric], fontsize=10)
        axes.set_xlabel("ms")
        axes.set_ylabel("fraction of samples")
        if not values:
            axes.text(0.5, 0.5, "no samples", ha="center", transform=axes.transAxes)
            continue
        axes.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post")
        for q, style in ((50, "--"), (99, ":")):
            at = percentile(values, q)
            axes.axvline(at, linestyle=style, color="gray", label=f"p{q} {at:.1f} ms")
        axes.legend(fontsize=8, loc="lower right")
    for axes in panels[len(LATENCY_METRICS) :]:  # the grid's cells left over
        axes.set_visible(False)
    caption.put_on(figure, "edgecloud loadtest: latency distributions")
    figure.savefig(path, dpi=DPI)
    return figure


def plot_sweep(runs: Sequence[RunReport], path: Path, caption: PlotCaption) -> Figure:
    """Saves to `path` latency against output throughput, one point per rate: TTFT, TPOT
    and E2EL panels, median and p99 lines, each point labelled with its rate, under a
    title and `caption`; returns the matplotlib Figure."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 4.6), layout="constrained")
    throughput = [run.summary.output_throughput for run in runs]
    for axes, metric in zip(figure.subplots(1, 3).flat, ("ttft", "tpot", "e2el"), strict=True):
        for q, marker in ((50, "o-"), (99, "s--")):
            axes.plot(
                throughput,
                [run.summary.latency[metric].percentiles[q] for run in runs],
                marker,
                label=f"p{q}",
            )
        for run, x in zip(runs, throughput, strict=True):
            axes.annotate(
                f"{_rate_label(run.plan.rate)}/s",
                (x, run.summary.latency[metric].percentiles[50]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=7,
            )
        axes.set_title(TITLES[metric], fontsize=10)
        axes.set_xlabel("output throughput (tok/s)")
        axes.set_ylabel("ms")
        axes.legend(fontsize=8)
    caption.put_on(figure, "edgecloud loadtest: latency against throughput, by request rate")
    figure.savefig(path, dpi=DPI)
    return figure


class Progress:
    """A tqdm bar on stderr, one tick per finished request, with the error count; a no-op
    when disabled or when tqdm is not installed (it is optional)."""

    def __init__(self, total: int | None, label: str, *, enabled: bool = True) -> None:
        self.errors = 0
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            print("(install tqdm for a progress bar)", file=sys.stderr)
            return
        self.bar = tqdm(total=total, desc=label, unit="req", file=sys.stderr, leave=False)

    def __call__(self, record: RequestRecord) -> None:
        if self.bar is None:
            return
        self.errors += not record.success
        self.bar.set_postfix(errors=self.errors, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_label(plan: LoadPlan) -> str:
    """ "rate 4/s" or "concurrency 8"."""
    if plan.rate is None:
        return f"concurrency {plan.concurrency}"
    return f"rate {_rate_label(plan.rate)}/s"


def _rate_label(rate: float | None) -> str:
    if rate is None:
        return "closed"
    return "inf" if rate == math.inf else f"{rate:g}"
