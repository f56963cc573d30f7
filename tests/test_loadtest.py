"""`edgecloud loadtest` against a real edge + verifier on loopback (the stack of
tests/edge_node, tiny models), and its metric math on hand-made records."""

from __future__ import annotations

import asyncio
import json
import math

import pytest

import edgecloud
from orchestrator.cli import main
from orchestrator.loadtest.prompts import load_prompt_file, round_robin_windows
from orchestrator.loadtest.records import (
    RequestRecord,
    Slo,
    percentile,
    summarize,
    timeline_record,
)
from orchestrator.loadtest.report import (
    PlotCaption,
    RunReport,
    plot_distributions,
    plot_sweep,
    summary_table,
    sweep_table,
)
from orchestrator.loadtest.runner import (
    CredentialsRefused,
    LoadPlan,
    LoadResult,
    arrival_offsets,
    run_load,
)

# The real stack's fixtures: a verifier, an edge serving Generation in front of it.
from tests.edge_node.conftest import draft, target, verifier  # noqa: F401
from tests.edge_node.test_service import CLIENT_TOKEN, PROMPT, edge  # noqa: F401

MAX_TOKENS = 8


def write_prompts(path, lines: list[dict]) -> None:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


async def test_closed_loop_cli_writes_counts_that_add_up(edge, tmp_path, capsys):  # noqa: F811
    """12 requests, 4 in flight; every 4th prompt has a token id outside the 64-token
    vocabulary, which only the server can know, so it answers INVALID_ARGUMENT."""
    prompts = tmp_path / "prompts.jsonl"
    write_prompts(
        prompts,
        [
            {"prompt_tokens": PROMPT},
            {"prompt_tokens": [3, 7, 11]},
            {"prompt_tokens": [40, 2]},
            {"prompt_tokens": [5, 64]},
        ],
    )
    out = tmp_path / "results.json"
    argv = [
        "loadtest",
        f"--target=127.0.0.1:{edge.port}",
        f"--token={CLIENT_TOKEN}",
        "--concurrency=4",
        "--requests=12",
        f"--max-tokens={MAX_TOKENS}",
        "--ignore-eos",
        f"--prompts={prompts}",
        "--slo=ttft=60000,tpot=60000",
        f"--out={out}",
        "--no-progress",
    ]
    assert await asyncio.to_thread(main, argv) == 0

    document = json.loads(out.read_text())
    assert document["config"]["options"]["max_tokens"] == MAX_TOKENS
    assert document["config"]["options"]["ignore_eos"] is True
    (run,) = document["runs"]
    records, summary = run["records"], run["summary"]
    assert run["plan"]["loop"] == "closed" and run["plan"]["concurrency"] == 4
    assert [r["index"] for r in records] == list(range(12))
    assert summary["completed"] + summary["failed"] == len(records) == 12
    assert summary["errors_by_code"] == {"INVALID_ARGUMENT": 3}
    failed = [r for r in records if not r["success"]]
    assert {r["prompt_index"] for r in failed} == {3}
    assert all("prompt_tokens" in r["error"] for r in failed)
    done = [r for r in records if r["success"]]
    assert summary["total_output_tokens"] == sum(r["output_tokens"] for r in done) == 9 * MAX_TOKENS
    assert summary["request_goodput"] == pytest.approx(9 / summary["duration_s"])
    # The closed loop never exceeds its concurrency, and its 4 users start together.
    assert max(r["in_flight"] for r in records) == summary["peak_in_flight"] == 4
    for r in done:
        assert r["tpot_ms"] == pytest.approx((r["e2el_ms"] - r["ttft_ms"]) / (MAX_TOKENS - 1))
        assert 0 < r["ttft_ms"] <= r["e2el_ms"] and r["rounds"] >= 1 and r["tau"] >= 1
        assert r["finish_reason"] == "length"
        assert len(r["chunk_tokens"]) == len(r["inter_chunk_ms"]) + 1 >= 2
        assert sum(r["chunk_tokens"]) == MAX_TOKENS
    # Per-token ITL spreads each chunk's gap over its tokens: the same total time as the
    # inter-chunk gaps, over one latency per token after each request's first.
    gaps = [gap for r in done for gap in r["inter_chunk_ms"]]
    assert summary["mean_inter_chunk_ms"] == pytest.approx(sum(gaps) / len(gaps))
    assert summary["mean_itl_ms"] == pytest.approx(sum(gaps) / (len(done) * (MAX_TOKENS - 1)))
    assert summary["num_drafts"] == sum(r["rounds"] for r in done)
    assert "Serving Benchmark Result" in capsys.readouterr().out


async def test_open_loop_follows_its_schedule_and_cap(edge):  # noqa: F811
    plan = LoadPlan(rate=500.0, max_concurrency=2, requests=10, seed=3)
    async with edgecloud.AsyncClient(f"127.0.0.1:{edge.port}", token=CLIENT_TOKEN) as client:
        result = await run_load(
            {"edge": client}, [PROMPT], plan, edgecloud.GenerateOptions(max_tokens=4)
        )
    schedule = arrival_offsets(500.0, 3, count=10)
    assert [r.scheduled_s for r in result.records] == schedule
    assert all(r.start_s >= r.scheduled_s for r in result.records)  # sent no earlier than planned
    assert all(r.success for r in result.records)
    assert max(r.in_flight for r in result.records) <= 2


@pytest.mark.parametrize(
    "plan,at_most",
    [
        (LoadPlan(concurrency=2, requests=40), 2),  # the two in flight
        (LoadPlan(rate=20.0, requests=40), 10),  # those sent before the first refusal came
    ],
)
async def test_a_refused_token_stops_the_run_at_once(edge, plan, at_most):  # noqa: F811
    seen = []
    async with edgecloud.AsyncClient(f"127.0.0.1:{edge.port}", token="wrong") as client:
        with pytest.raises(CredentialsRefused) as refused:
            await run_load({"edge": client}, [PROMPT], plan, on_record=seen.append)
    assert refused.value.record.error_code == "UNAUTHENTICATED"
    assert 1 <= len(seen) <= at_most and all(r.error_code == "UNAUTHENTICATED" for r in seen)


@pytest.mark.parametrize("token", [[], ["--token=s3cret-but-wrong"]])
async def test_cli_with_no_or_a_wrong_token_exits_2_naming_the_flags(
    edge,  # noqa: F811
    token,
    tmp_path,
    capsys,
):
    out = tmp_path / "results.json"
    argv = [
        "loadtest",
        f"--target=127.0.0.1:{edge.port}",
        *token,
        "--concurrency=2",
        "--requests=40",
        f"--max-tokens={MAX_TOKENS}",
        f"--out={out}",
        "--no-progress",
    ]
    assert await asyncio.to_thread(main, argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.count("\n") == 0 and "--token/--token-file" in err and "UNAUTHENTICATED" in err
    assert "s3cret" not in err
    assert "Mean TTFT" not in captured.out and not out.exists()


def test_arrival_schedule_is_a_seeded_poisson_process():
    # The docstring's worked example.
    assert arrival_offsets(2.0, 0, count=3) == pytest.approx([0.0, 0.930304, 1.639618], abs=1e-6)
    offsets = arrival_offsets(50.0, 7, count=4000)
    assert offsets == arrival_offsets(50.0, 7, count=4000) != arrival_offsets(50.0, 8, count=4000)
    gaps = [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.05)
    # Exponential gaps: the standard deviation equals the mean, and P(gap > mean) = 1/e.
    mean = sum(gaps) / len(gaps)
    assert math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) == pytest.approx(mean, rel=0.1)
    assert sum(g > 1 / 50 for g in gaps) / len(gaps) == pytest.approx(math.exp(-1), abs=0.03)
    timed = arrival_offsets(50.0, 7, duration_s=10.0)
    assert timed == offsets[: len(timed)] and timed[-1] < 10.0 <= offsets[len(timed)]
    assert arrival_offsets(math.inf, 0, count=3) == [0.0, 0.0, 0.0]


def record(index: int = 0, **fields) -> RequestRecord:
    values = dict(
        index=index,
        target="t",
        prompt_index=0,
        scheduled_s=None,
        start_s=0.0,
        in_flight=1,
        ttft_ms=100.0,
        inter_chunk_ms=(),
        chunk_tokens=(),
        e2el_ms=400.0,
        output_tokens=4,
    )
    return RequestRecord(**(values | fields))


def test_percentiles_interpolate_like_numpy():
    assert percentile([10, 20, 30, 40], 50) == 25.0  # the docstring's example
    assert percentile([10, 20, 30, 40], 90) == pytest.approx(37.0)
    assert percentile([5.0], 99) == 5.0
    np = pytest.importorskip("numpy")
    values = list(np.random.default_rng(0).exponential(size=37))
    for q in (0, 1, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_metrics_on_hand_made_records():
    records = [
        # TPOT (400 - 100) / 3 = 100; meets ttft<=150, tpot<=120.
        # Per-token ITL: (none for the 1st chunk's 1 token), 45, 45, 110.
        record(
            0,
            inter_chunk_ms=(90.0, 110.0),
            chunk_tokens=(1, 2, 1),
            rounds=2,
            draft_tokens=6,
            accepted_tokens=2,
            accepted_per_position=(2,),
            prompt_tokens=5,
            cloud_forward_passes=3,
        ),
        # TPOT (1300 - 200) / 11 = 100; misses the TTFT bound.
        record(
            1,
            ttft_ms=200.0,
            e2el_ms=1300.0,
            output_tokens=12,
            # Per-token ITL: 6 zeros (the 1st chunk's 7 tokens after the first), 5 x 10.
            inter_chunk_ms=(50.0,),
            chunk_tokens=(7, 5),
            rounds=3,
            draft_tokens=9,
            accepted_tokens=6,
            accepted_per_position=(3, 2, 1),
            prompt_tokens=7,
            cloud_forward_passes=4,
        ),
        # One token: no TPOT, counted as 0 against the SLO (as vLLM does): good.
        record(
            2,
            ttft_ms=50.0,
            e2el_ms=50.0,
            output_tokens=1,
            chunk_tokens=(1,),
            rounds=1,
            prompt_tokens=2,
        ),
        record(3, output_tokens=2, error_code="UNAVAILABLE", error="gone"),
        record(4, ttft_ms=None, output_tokens=0, error_code="UNAVAILABLE", error="gone"),
        record(5, ttft_ms=None, output_tokens=0, error_code="INVALID_ARGUMENT", error="top_p"),
    ]
    assert records[0].tpot_ms == 100.0 and records[2].tpot_ms is None
    summary = summarize(records, duration_s=2.0, slo=Slo.parse("ttft=150,tpot=120"))
    s = summary.as_dict()
    assert (summary.completed, summary.failed) == (3, 3)
    assert summary.errors_by_code == {"UNAVAILABLE": 2, "INVALID_ARGUMENT": 1}
    assert s["total_output_tokens"] == 17 and s["total_input_tokens"] == 14  # failures excluded
    assert s["request_throughput"] == 1.5 and s["output_throughput"] == 8.5
    assert s["total_token_throughput"] == 15.5
    assert s["request_goodput"] == 1.0  # records 0 and 2
    assert s["mean_tpot_ms"] == 100.0 and s["p99_tpot_ms"] == 100.0
    assert s["median_ttft_ms"] == 100.0 and s["mean_ttft_ms"] == pytest.approx(350 / 3)
    assert s["p90_e2el_ms"] == pytest.approx(400 + 0.8 * 900)
    assert s["mean_inter_chunk_ms"] == pytest.approx(250 / 3)
    assert s["mean_itl_ms"] == pytest.approx(250 / 14) and s["median_itl_ms"] == 10.0
    assert (s["num_drafts"], s["num_draft_tokens"], s["num_accepted_tokens"]) == (6, 15, 8)
    assert s["mean_acceptance_length"] == pytest.approx(1 + 8 / 6)
    assert s["draft_acceptance_rate"] == pytest.approx(8 / 15)
    assert s["acceptance_rate_per_position"] == pytest.approx([5 / 6, 2 / 6, 1 / 6])
    assert s["cloud_passes_per_output_token"] == pytest.approx(7 / 17)
    table = summary_table(summary)
    assert "Request goodput (req/s):" in table and "UNAVAILABLE:" in table
    assert "Inter-token Latency (per token)" in table and "Mean ITL (ms):" in table
    assert "Inter-chunk Latency (per streamed chunk)" in table
    assert "Mean inter-chunk (ms):" in table
    assert summarize(records, 2.0).request_goodput is None


def test_per_token_itl_of_a_scripted_timeline():
    """Chunks of 2, 1, 2 and 1 tokens at 250, 375, 500 and 1000 ms (binary fractions, so
    the gaps are exact): inter-chunk gaps 125, 125, 500; per token, the first chunk's
    second token adds 0, then 125 / 1, 2 x 125 / 2 and 500 / 1: 5 latencies for 6 tokens."""
    scripted = timeline_record(
        sent=0.0,
        arrivals=[(0.25, 2), (0.375, 1), (0.5, 2), (1.0, 1)],
        ended=1.0,
        index=0,
        target="t",
        prompt_index=0,
        scheduled_s=None,
        start_s=0.0,
        in_flight=1,
    )
    assert scripted.inter_chunk_ms == (125.0, 125.0, 500.0)
    assert scripted.itl_ms == (0.0, 125.0, 62.5, 62.5, 500.0)
    s = summarize([scripted], duration_s=1.0).as_dict()
    # Sorted 0, 62.5, 62.5, 125, 500: p50 at rank 2, p90 at 3.6, p99 at 3.96.
    assert s["mean_itl_ms"] == 150.0 and s["median_itl_ms"] == s["p50_itl_ms"] == 62.5
    assert s["p90_itl_ms"] == pytest.approx(125 + 0.6 * 375, rel=1e-12)  # 350
    assert s["p99_itl_ms"] == pytest.approx(125 + 0.96 * 375, rel=1e-12)  # 485
    assert s["mean_tpot_ms"] == 150.0  # the same 750 ms over the same 5 tokens
    # Per chunk: 125, 125, 500; p90 at rank 1.8.
    assert s["mean_inter_chunk_ms"] == 250.0 and s["p50_inter_chunk_ms"] == 125.0
    assert s["p90_inter_chunk_ms"] == pytest.approx(125 + 0.8 * 375, rel=1e-12)  # 425


def test_slo_parsing_names_the_problem():
    assert Slo.parse("ttft=200, tpot:50") == Slo(ttft_ms=200.0, tpot_ms=50.0)
    for bad, needle in (("itl=5", "unknown key 'itl'"), ("ttft=-1", "ttft"), ("ttft", "KEY=MS")):
        with pytest.raises(ValueError, match=needle):
            Slo.parse(bad)


def test_prompt_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("def f(x):\n\n  return 1\n")
    assert load_prompt_file(text) == ["def f(x):", "  return 1"]
    ids = tmp_path / "ids.txt"
    ids.write_text("1 5 9\n3,4\n")
    assert load_prompt_file(ids, tokens=True) == [(1, 5, 9), (3, 4)]
    jsonl = tmp_path / "p.jsonl"
    write_prompts(jsonl, [{"prompt": "a", "prompt_tokens": [1]}, {"prompt_tokens": [2, 3]}])
    assert load_prompt_file(jsonl) == ["a", (2, 3)]
    assert load_prompt_file(jsonl, tokens=True) == [(1,), (2, 3)]
    write_prompts(jsonl, [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(ValueError, match=r"p.jsonl:2: no \"prompt\""):
        load_prompt_file(jsonl)
    with pytest.raises(ValueError, match="ids.txt:1: token ids"):
        ids.write_text("1 x\n")
        load_prompt_file(ids, tokens=True)


def test_heldout_windows_round_robin():
    # The worked example of `heldout_prompts`.
    texts = ["x = 1\ny = 2\n", "z = 3\n"]
    assert round_robin_windows(texts, 3, 6) == ["x = 1\n", "z = 3\n", "y = 2\n"]
    assert round_robin_windows(texts, 2, 100) == ["x = 1\ny = 2\n", "z = 3\n"]
    assert round_robin_windows(["a" * 10 + "\n", "  \n"], 5, 4) == ["aaa\n"]


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--target", "10.1.2.3:50051"], "--allow-remote"),
        (["--target", "localhost"], "--target"),
        (["--concurrency", "2", "--rate", "1"], "--concurrency"),
        (["--max-concurrency", "2"], "--max-concurrency"),
        (["--rate", "0"], "--rate"),
        (["--rate", "1,1"], "--rate"),
        (["--rate", "inf", "--duration", "5"], "--rate"),
        (["--concurrency", "0"], "--concurrency"),
        (["--requests", "many"], "--requests"),
        (["--duration", "-1"], "--duration"),
        (["--top-p", "1.5"], "--top-p"),
        (["--temperature", "nan"], "--temperature"),
        (["--mode", "fast"], "--mode"),
        (["--max-tokens", "0"], "--max-tokens"),
        (["--emulate-edges", "4", "--ignore-eos"], "--ignore-eos"),
        (["--seed", "-1"], "--seed"),
        (["--slo", "ttft=abc"], "--slo"),
        (["--prompt-tokens-from-file"], "--prompt-tokens-from-file"),
        (["--prompts", "/nonexistent/p.txt"], "--prompts"),
        (["--prompts", "/nonexistent/p.txt", "--prompt-chars", "9"], "--prompt-chars"),
        (["--prompt-chars", "0"], "--prompt-chars"),
        (["--token", "a", "--token-file", "b"], "--token"),
        (["--out", "/nonexistent/dir/r.json"], "--out"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(flags, needle, capsys):
    assert main(["loadtest", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err


def test_sweep_table_and_plots(tmp_path):
    records = tuple(
        record(i, ttft_ms=10.0 * i + 5, inter_chunk_ms=(3.0, 4.0), chunk_tokens=(1, 2, 1))
        for i in range(20)
    )
    runs = [
        RunReport(
            LoadPlan(rate=rate, requests=20),
            LoadResult(records, 2.0 / rate),
            summarize(records, 2.0 / rate),
        )
        for rate in (1.0, 2.0, math.inf)
    ]
    assert [line.split()[0] for line in sweep_table(runs).splitlines()] == ["rate", "1", "2", "inf"]
    pytest.importorskip("matplotlib")
    caption = PlotCaption(
        targets=("127.0.0.1:50051",),
        mode="lossless",
        load="concurrency 8",
        max_tokens=64,
        temperature=0.7,
        requests=20,
        started_at="2025-01-02T03:04:05+00:00",
    )
    figures = {
        "cdf.png": plot_distributions(records, tmp_path / "cdf.png", caption),
        "sweep.png": plot_sweep(runs, tmp_path / "sweep.png", caption),
    }
    configuration = (
        "target 127.0.0.1:50051 | mode lossless | concurrency 8 | max_tokens 64 | "
        "temperature 0.7 | 20 requests | 2025-01-02T03:04:05+00:00"
    )
    for name, figure in figures.items():
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
        title, config = figure.get_suptitle().split("\n")
        assert title.startswith("edgecloud loadtest: latency") and config == configuration
    panels = [a.get_title() for a in figures["cdf.png"].axes if a.get_visible()]
    assert "Inter-token Latency (per token)" in panels and len(panels) == 5
