"""The fleet emulator (orchestrator/loadtest/fleet.py, recording.py) against a real verifier
on loopback with the tiny model pair of tests/edge_node: recording the real edge at the
wire, replaying it, a small fleet in both modes, the CLI, and the timeline maths."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re

import pytest
from prometheus_client import generate_latest

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.drafters import DraftShape
from lm.checkpoint import save_model
from lm.tree import TokenTree
from orchestrator.cli import main
from orchestrator.loadtest.draft_book import expected_round, load_book, make_book, save_book
from orchestrator.loadtest.fleet import (
    FleetPlan,
    LinkProfile,
    Shaping,
    VerifierWork,
    clients_served,
    measure_fleet,
    run_fleet,
    timeline_record,
)
from orchestrator.loadtest.recording import (
    RecordedRequest,
    Recording,
    RecordingKey,
    find_recording,
    load_recordings,
    record,
    save_recordings,
)
from orchestrator.loadtest.records import Slo
from protocol.types import Mode
from protocol.v1 import verification_pb2 as pb
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.edge_node.conftest import draft, target  # noqa: F401
from tests.tiny import MODEL_NAME, TOKEN

PROMPTS = [(1, 5, 9), (7, 7, 7, 2, 40, 11), (12, 30), (3, 44, 8, 19)]
GREEDY = RecordingKey(max_tokens=24, width=2, depth=4, adapt=False)
SAMPLED = RecordingKey(temperature=0.7, seed=11, max_tokens=24, width=2, depth=4, adapt=False)


@pytest.fixture
async def verifier(target):  # noqa: F811
    """The tiny target with its /metrics on a port of its own."""
    server = await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_context=256),
        ServerConfig(port=0, auth=AuthConfig(token=TOKEN), metrics_port=0),
    )
    yield server
    await server.drain()


def address(verifier) -> str:
    return f"127.0.0.1:{verifier.port}"


async def record_pair(draft, verifier, key):  # noqa: F811
    return await record(draft, address(verifier), MODEL_NAME, PROMPTS, key, token=TOKEN)


@pytest.mark.parametrize("key", [GREEDY, SAMPLED], ids=["greedy", "t0.7-seeded"])
async def test_replay_reproduces_the_real_drafters_acceptance(draft, verifier, key):  # noqa: F811
    recording = await record_pair(draft, verifier, key)
    assert [r.prompt_index for r in recording.requests] == list(range(len(PROMPTS)))
    # The recorded stream is what the real edge got: its own tau, from its statistics.
    real_tau = sum(r.tau * len(r.rounds) for r in recording.requests) / sum(
        len(r.rounds) for r in recording.requests
    )
    assert recording.tau == pytest.approx(real_tau)
    assert 1.3 < real_tau  # the pair agrees often enough for the comparison to mean something
    assert all(r.edge_ms > 0 for q in recording.requests for r in q.rounds)

    plan = FleetPlan(clients=1, requests=len(PROMPTS), link=LinkProfile(rtt_ms=2))
    result = await run_fleet(address(verifier), recording, plan, token=TOKEN)
    records = result.records
    assert all(r.success for r in records), [r.error for r in records]
    replay_tau = sum(r.tau * r.rounds for r in records) / sum(r.rounds for r in records)
    assert replay_tau == pytest.approx(real_tau, rel=0.05)
    assert result.mismatched_rounds == 0  # deterministic verification: the very same replies
    assert [r.output_tokens for r in records] == [q.output_tokens for q in recording.requests]


async def test_small_fleet_both_modes_and_verifier_work(draft, verifier, tmp_path):  # noqa: F811
    recording = await record_pair(draft, verifier, GREEDY)
    path = tmp_path / "rec.json"
    save_recordings(path, [recording])
    (loaded,) = load_recordings(path)
    assert loaded == recording  # protos and times survive the file

    registry = verifier.engine.metrics.registry
    link = LinkProfile(rtt_ms=4, jitter_ms=1, loss=0.05, rto_ms=10)
    rows = {}
    for mode in (Mode.LOSSLESS, Mode.CLOUD_ONLY):
        plan = FleetPlan(clients=3, mode=mode, requests=6, link=link, seed=2)
        point = await measure_fleet(
            address(verifier),
            loaded,
            plan,
            slo=Slo(tpot_ms=60_000),
            metrics=lambda: generate_latest(registry).decode(),
            token=TOKEN,
        )
        assert point.summary.completed == 6 and point.summary.failed == 0
        assert set(point.result.clients) == {0, 1, 2}
        rows[mode] = point.row()
    lossless, cloud = rows[Mode.LOSSLESS], rows[Mode.CLOUD_ONLY]
    # The same generations: every request gets the recorded number of tokens either way.
    assert lossless["output_tokens"] == cloud["output_tokens"] > 0
    assert cloud["tau"] == 1.0 and cloud["rounds_per_token"] == 1.0
    assert lossless["verifier_round_passes_per_token"] < cloud["verifier_round_passes_per_token"]
    assert cloud["verifier_round_passes_per_token"] <= 1.0  # decoding steps share passes
    assert lossless["verifier_busy_ms_per_token"] > 0
    assert lossless["request_goodput"] > 0 and lossless["token_goodput"] > 0


async def test_a_draft_book_drafts_what_the_real_edge_drafted(draft, verifier, tmp_path):  # noqa: F811
    """The book's tree at each recorded round's position is the tree the real edge sent,
    and a fleet drafting from it in the recorded fixed shape gets the real acceptance."""
    recording = await record_pair(draft, verifier, GREEDY)
    book = make_book(draft, recording, max_width=3, max_depth=5, max_nodes=12)
    assert book.depth_for(1) == 5 and book.depth_for(3) == 4
    compared = 0
    for number, recorded in enumerate(recording.requests):
        position = 0
        for step in recorded.rounds:
            sent = step.request.round.tree
            booked = book.draft(number, position, DraftShape(GREEDY.width, GREEDY.depth)).tree
            assert booked == TokenTree(tuple(sent.tokens), tuple(sent.parents))
            assert expected_round(booked, book.requests[number].output, position) in (
                (*step.result.accepted_nodes, step.result.bonus_token),
                None,
            )
            position += step.tokens
            compared += 1
    assert compared > 2 * len(PROMPTS)
    save_book(tmp_path / "book.json", book)
    assert load_book(tmp_path / "book.json") == book and load_book(tmp_path / "none") is None
    save_recordings(tmp_path / "rec.json", [recording])
    with pytest.raises(ValueError, match="rec.json: not a draft book"):
        load_book(tmp_path / "rec.json")

    plan = FleetPlan(clients=1, requests=len(PROMPTS), shaping=Shaping.parse("2x4"))
    result = await run_fleet(address(verifier), recording, plan, token=TOKEN, book=book)
    assert all(r.success for r in result.records), [r.error for r in result.records]
    assert result.mismatched_rounds == 0
    replay_tau = sum(r.tau * r.rounds for r in result.records) / result.rounds
    assert replay_tau == pytest.approx(recording.tau, rel=0.05)
    assert [r.output_tokens for r in result.records] == [
        q.output_tokens for q in recording.requests
    ]

    # The adaptive policies choose their own shapes from the book; verification agrees.
    for shaping in ("load-aware", "latency", "1x5", "3x4"):
        plan = FleetPlan(
            clients=3, requests=6, link=LinkProfile(rtt_ms=3), shaping=Shaping.parse(shaping)
        )
        result = await run_fleet(address(verifier), recording, plan, token=TOKEN, book=book)
        assert all(r.success for r in result.records), (shaping, [r.error for r in result.records])
        assert result.mismatched_rounds == 0, shaping
    with pytest.raises(ValueError, match="depth: the book holds 1..4 at width 3"):
        await run_fleet(
            address(verifier),
            recording,
            FleetPlan(clients=1, requests=1, shaping=Shaping.parse("3x5")),
            book=book,
        )
    with pytest.raises(ValueError, match="book"):
        await run_fleet(address(verifier), recording, plan, token=TOKEN)
    sampled = await record_pair(draft, verifier, SAMPLED)
    with pytest.raises(ValueError, match="greedy recording"):
        make_book(draft, sampled)


def test_shapings_parse_and_refuse_bad_names():
    assert Shaping.parse("4x6") == Shaping("fixed", 4, 6)
    assert Shaping.parse("load-aware").describe() == "load-aware"
    for bad in ("wide", "4x", "0x3", "4x99"):
        with pytest.raises(ValueError, match="shaping|width|depth"):
            Shaping.parse(bad)


async def test_failed_requests_become_records_and_the_fleet_goes_on(verifier):
    opening = pb.VerifyRequest(open=pb.OpenSession(model=MODEL_NAME, context=[1, 5, 9]))
    recording = Recording(GREEDY, (RecordedRequest(0, opening, (), 4, 1.0, 0.0),))
    plan = FleetPlan(clients=2, requests=3)
    result = await run_fleet(address(verifier), recording, plan, token="wrong")
    assert [r.error_code for r in result.records] == ["UNAUTHENTICATED"] * 3
    assert sorted(result.clients) == [0, 0, 1] or sorted(result.clients) == [0, 1, 1]


def test_timeline_maths_on_a_constructed_example():
    # timeline_record's docstring example, by hand.
    record = timeline_record(
        sent=10.0,
        arrivals=[(10.100, 3), (10.150, 2), (10.230, 4)],
        ended=10.230,
        index=0,
        target="v",
        prompt_index=0,
        scheduled_s=None,
        start_s=0.0,
        in_flight=1,
    )
    assert record.ttft_ms == pytest.approx(100.0)
    assert record.inter_chunk_ms == pytest.approx((50.0, 80.0))
    assert record.e2el_ms == pytest.approx(230.0)
    assert record.output_tokens == 9
    assert record.tpot_ms == pytest.approx(130.0 / 8)  # 16.25 ms
    # clients_served's example: the first miss ends the count.
    points = [(1, 20.0), (2, 30.0), (4, 45.0), (8, 70.0), (16, 40.0)]
    assert clients_served(points, 50.0) == 4
    assert clients_served([(1, 60.0)], 50.0) == 0


def test_verifier_work_from_metrics_text():
    text = """# TYPE edgecloud_verifier_forward_passes counter
edgecloud_verifier_forward_passes_total{kind="round"} 40.0
edgecloud_verifier_forward_passes_total{kind="prefill"} 4.0
# TYPE edgecloud_verifier_busy_seconds counter
edgecloud_verifier_busy_seconds_total{kind="round"} 0.8
edgecloud_verifier_busy_seconds_total{kind="prefill"} 0.2
# TYPE edgecloud_verifier_batch_size histogram
edgecloud_verifier_batch_size_count 40.0
edgecloud_verifier_batch_size_sum 100.0
"""
    work = VerifierWork.parse(text) - VerifierWork(round_passes=10, batches=10, batched=10)
    assert work.per_token(60) == pytest.approx(
        {
            "verifier_passes_per_token": 34 / 60,
            "verifier_round_passes_per_token": 30 / 60,
            "verifier_busy_ms_per_token": 1000 / 60,
            "verifier_mean_batch": 90 / 30,
        }
    )


def test_recording_keys_and_lookup():
    with pytest.raises(ValueError, match="seed"):
        RecordingKey(temperature=0.7)
    near = [RecordingKey(rtt_ms=0), RecordingKey(rtt_ms=80), RecordingKey(max_tokens=8)]
    recordings = [type("R", (), {"key": k})() for k in near]
    assert find_recording(recordings, max_tokens=64, rtt_ms=50).key.rtt_ms == 80
    assert find_recording(recordings, temperature=0.7) is None


async def test_cli_emulate_edges_end_to_end(draft, verifier, tmp_path, capsys):  # noqa: F811
    path, out = tmp_path / "rec.json", tmp_path / "fleet.json"
    save_recordings(path, [await record_pair(draft, verifier, GREEDY)])
    argv = [
        "loadtest",
        "--emulate-edges=2",
        f"--target={address(verifier)}",
        f"--token={TOKEN}",
        f"--recording={path}",
        "--max-tokens=24",
        "--requests=4",
        "--rtt-ms=5",
        "--rtt-jitter-ms=1",
        "--loss=0.01",
        f"--verifier-metrics=127.0.0.1:{verifier.server.metrics.port}",
        "--slo=tpot=60000",
        f"--out={out}",
        "--no-progress",
    ]
    assert await asyncio.to_thread(main, argv) == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result (2 emulated edges" in printed
    assert "Verifier forward passes per token" in printed
    (run,) = json.loads(out.read_text())["runs"]
    assert run["summary"]["completed"] == 4 and run["fleet"]["clients"] == 2
    assert run["fleet"]["verifier_round_passes_per_token"] < 1
    assert {r["client"] for r in run["records"]} == {0, 1}


async def test_cli_shaped_fleet_books_the_draft_once_then_reuses_it(
    draft,  # noqa: F811
    verifier,
    tmp_path,
    capsys,
):
    rec, book, out = tmp_path / "rec.json", tmp_path / "book.json", tmp_path / "fleet.json"
    save_recordings(rec, [await record_pair(draft, verifier, GREEDY)])
    save_model(draft, tmp_path / "draft")
    argv = [
        "loadtest",
        "--emulate-edges=2",
        f"--target={address(verifier)}",
        f"--token={TOKEN}",
        f"--recording={rec}",
        "--max-tokens=24",
        "--requests=4",
        "--rtt-ms=3",
        f"--book={book}",
        f"--out={out}",
        "--no-progress",
    ]
    made = [*argv, "--shaping=load-aware", f"--record-with={tmp_path / 'draft'}"]
    assert await asyncio.to_thread(main, made) == 0
    printed = capsys.readouterr().out
    assert "drafting load-aware from the draft book of 4 recorded requests" in printed
    assert re.search(r"Replayed rounds unlike the recording:\s+0 of [1-9]", printed)
    assert load_book(book).fits(load_recordings(rec)[0])
    (run,) = json.loads(out.read_text())["runs"]
    assert run["summary"]["completed"] == 4 and run["fleet"]["shaping"] == "load-aware"
    # The book is reused: no draft needed now. A shape it does not hold is refused.
    assert await asyncio.to_thread(main, [*argv, "--shaping=2x3"]) == 0
    assert "drafting 2x3" in capsys.readouterr().out
    assert await asyncio.to_thread(main, [*argv, "--shaping=8x9"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--shaping: depth: the book holds" in err, err
    # A book made from other generations is refused, not drafted from.
    recording = load_recordings(rec)[0]
    other = tmp_path / "other.json"
    save_recordings(other, [dataclasses.replace(recording, requests=recording.requests[1:])])
    assert await asyncio.to_thread(main, [*argv, f"--recording={other}", "--shaping=2x3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--book:" in err and "a book of other generations" in err, err


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--emulate-edges", "2"], "--recording"),
        (["--emulate-edges", "2", "--recording", "r.json", "--rate", "1"], "--rate"),
        (["--emulate-edges", "2", "--recording", "r.json", "--mode", "adaptive"], "--mode"),
        (["--emulate-edges", "0", "--recording", "r.json"], "--emulate-edges"),
        (["--emulate-edges", "2", "--recording", "r.json", "--loss", "1"], "--loss"),
        (["--emulate-edges", "2", "--recording", "/nonexistent/r.json"], "--recording"),
        (["--rtt-ms", "20"], "--rtt-ms"),
        (["--emulate-edges", "2", "--recording", "r.json", "--shaping", "wide"], "--shaping"),
        (["--emulate-edges", "2", "--recording", "r.json", "--shaping", "0x3"], "--shaping"),
        (["--emulate-edges", "2", "--recording", "r.json", "--book", "b.json"], "--book"),
        (["--shaping", "4x6"], "--shaping"),
        (
            ["--emulate-edges", "2", "--recording", "r.json", "--shaping", "2x3", "--mode"]
            + ["cloud_only"],
            "--shaping",
        ),
        (
            ["--emulate-edges", "2", "--recording", "r.json", "--shaping", "2x3", "--book"]
            + ["/nonexistent/dir/b.json"],
            "--book",
        ),
    ],
)
def test_bad_fleet_flags_are_one_line_naming_the_flag(flags, needle, capsys):
    assert main(["loadtest", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err
