"""Dynamic-priority verification on a real engine: with rounds of two sessions waiting,
the one with less slack against its tpot_slo_ms (or in a lower priority class) is
verified first, where FIFO takes the first to arrive; a session far behind its target
is told so and waits behind the others; long prefills hold a waiting round for one
chunk at most, and short ones of several sessions share a pass; bad targets get
INVALID_ARGUMENT naming the field.

Passes are held with the same forward pre-hook as the lifecycle tests (PassGate), so
which rounds are waiting when the next pass forms is deterministic.
"""

from __future__ import annotations

import asyncio

import pytest

import edgecloud
from cloud_node.config import VerifierConfig
from cloud_node.engine import VerifierEngine, _PrefillWork
from cloud_node.scheduling import Pace, Slack
from cloud_node.validation import OpenRequest, RoundRequest
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from protocol.types import Schedule
from tests.cloud_node.test_lifecycle import PassGate
from tests.cloud_node.test_verify_greedy import greedy_reference
from tests.tiny import MODEL_NAME, tiny_model


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, sharpen=3.0)


@pytest.fixture
def gate(target):
    g = PassGate(target.layers[0])
    yield g
    g.remove()


class Work:
    def __init__(self, pace: Pace, arrived: float) -> None:
        self.pace, self.arrived, self.slo_unreachable = pace, arrived, False


def test_slack_orders_the_docstring_example():
    a = Pace(Schedule(tpot_slo_ms=50), paced_from=0.0, tokens=10)
    b = Pace(Schedule(tpot_slo_ms=50), paced_from=0.0, tokens=4)
    assert a.due(0.29) == pytest.approx(0.55) and b.due(0.29) == pytest.approx(0.25)
    wa, wb = Work(a, 0.29), Work(b, 0.29)
    assert Slack().order([wa, wb], now=0.3) == [wb, wa]
    # Two tokens given instead of four: 150 ms late is 3 tokens' worth, within 8.
    b.tokens = 2
    assert Slack().order([wa, wb], now=0.3) == [wb, wa] and not wb.slo_unreachable
    # Behind by more than 8 tokens' worth: flagged, and due as best effort (1 s after
    # it arrived), so behind a that can still make its target, but never starved.
    assert Slack().order([wb, wa], now=0.3 + 8 * 0.05) == [wa, wb] and wb.slo_unreachable
    # A lower priority class goes first whatever the slack; no target: due 1 s after arrival.
    wc = Work(Pace(Schedule(priority=-1, tpot_slo_ms=0)), arrived=0.29)
    assert Slack().order([wa, wb, wc], now=0.3)[0] is wc
    # Best effort that arrived long ago goes before a hopeless round that just came.
    old = Work(Pace(Schedule()), arrived=0.0)
    assert Slack().order([wb, old], now=0.3 + 8 * 0.05) == [old, wb]
    assert Pace(Schedule()).due(2.0) == 3.0


async def open_session(engine, name: str, schedule: Schedule, context=(1, 5, 9, 2)):
    request = OpenRequest(name, tuple(context), SamplingParams(), schedule=schedule)
    return await engine.open(request)


def one_token_round() -> RoundRequest:
    return RoundRequest(new_tokens=(), tree=TokenTree.chain([3]), draft={}, round_id=0)


async def completion_order(engine, gate, blocker, sessions) -> list[str]:
    """Holds a pass of `blocker`, queues a round of each of `sessions` in that order,
    then releases: the order the waiting rounds complete in (max_batch 1)."""
    gate.arm()
    held = asyncio.ensure_future(engine.verify(blocker, one_token_round()))
    await gate.wait_entered()
    done: list[str] = []

    async def run(session):
        await engine.verify(session, one_token_round())
        done.append(session.id)

    tasks = []
    for session in sessions:
        tasks.append(asyncio.ensure_future(run(session)))
        await asyncio.sleep(0.01)  # arrive in this order
    gate.release()
    await asyncio.gather(held, *tasks)
    return done


@pytest.mark.parametrize(("policy", "first"), [("slack", "tight"), ("fifo", "loose")])
async def test_the_session_with_less_slack_is_verified_first(target, gate, policy, first):
    engine = VerifierEngine(
        target,
        VerifierConfig(MODEL_NAME, max_batch=1, batch_window_ms=0.0, schedule=policy),
    )
    engine.start()
    try:
        blocker = await open_session(engine, "blocker", Schedule())
        loose = await open_session(engine, "loose", Schedule(tpot_slo_ms=5_000))
        tight = await open_session(engine, "tight", Schedule(tpot_slo_ms=20))
        for session in (loose, tight):  # one round each starts their pacing
            await engine.verify(session, one_token_round())
        order = await completion_order(engine, gate, blocker, [loose, tight])
        assert order[0] == first
        # A lower priority class beats any slack.
        urgent = await open_session(engine, "urgent", Schedule(priority=-5))
        await engine.verify(urgent, one_token_round())
        order = await completion_order(engine, gate, blocker, [tight, urgent])
        assert order[0] == ("urgent" if policy == "slack" else "tight")
    finally:
        await engine.stop()


async def test_a_session_beyond_its_target_is_told_and_waits_behind(target, gate):
    engine = VerifierEngine(target, VerifierConfig(MODEL_NAME, max_batch=1, batch_window_ms=0.0))
    engine.start()
    try:
        blocker = await open_session(engine, "blocker", Schedule())
        lost = await open_session(engine, "lost", Schedule(tpot_slo_ms=1))
        other = await open_session(engine, "other", Schedule(tpot_slo_ms=1_000))
        for session in (lost, other):
            await engine.verify(session, one_token_round())
        await asyncio.sleep(0.05)  # "lost" is now 50 tokens' worth behind its 1 ms target
        order = await completion_order(engine, gate, blocker, [lost, other])
        assert order == ["other", "lost"]
        outcome = await engine.verify(lost, one_token_round())
        assert outcome.slo_unreachable
        assert engine.metrics.slo_unreachable._value.get() >= 2
    finally:
        await engine.stop()


async def test_long_prefills_hold_a_waiting_round_one_chunk_at_most(target, gate):
    chunk, opening = 16, 4
    engine = VerifierEngine(
        target, VerifierConfig(MODEL_NAME, batch_window_ms=0.0, prefill_chunk=chunk)
    )
    engine.start()
    try:
        blocker = await open_session(engine, "blocker", Schedule())
        waiting = await open_session(engine, "waiting", Schedule())
        prefills = engine.metrics.passes.labels("prefill")
        gate.arm()
        held = asyncio.ensure_future(engine.verify(blocker, one_token_round()))
        await gate.wait_entered()
        long = [
            asyncio.ensure_future(
                open_session(engine, f"long{i}", Schedule(), context=[7] * (10 * chunk + 1))
            )
            for i in range(opening)
        ]
        await asyncio.sleep(0.01)  # a chunk of each is queued
        round_ = asyncio.ensure_future(engine.verify(waiting, one_token_round()))
        await asyncio.sleep(0.01)
        before = prefills._value.get()
        gate.release()
        await round_
        assert prefills._value.get() - before <= 1  # 4 chunks were queued, 40 to come
        await asyncio.gather(held, *long)
        assert prefills._value.get() - before == 10 * opening
    finally:
        await engine.stop()


async def test_short_prefills_of_several_opening_sessions_share_a_pass(target, gate):
    """Chunks that fit in `prefill_chunk` together go in one pass, each in its own row.
    Each session's cache then holds what a prefill of its own would: a round drafting
    the model's own greedy continuation is accepted whole, with the greedy bonus."""
    engine = VerifierEngine(
        target, VerifierConfig(MODEL_NAME, batch_window_ms=0.0, prefill_chunk=64)
    )
    engine.start()
    try:
        blocker = await open_session(engine, "blocker", Schedule())
        prefills = engine.metrics.passes.labels("prefill")
        lengths = (9, 13, 5, 20)  # prefixes of 8, 12, 4 and 19 tokens
        contexts = [[(7 * i + 3 * k) % 50 + 1 for k in range(n)] for i, n in enumerate(lengths)]
        gate.arm()
        held = asyncio.ensure_future(engine.verify(blocker, one_token_round()))
        await gate.wait_entered()
        opening = [
            asyncio.ensure_future(open_session(engine, f"s{i}", Schedule(), context=c))
            for i, c in enumerate(contexts)
        ]
        await asyncio.sleep(0.01)  # every chunk is queued
        before = prefills._value.get()
        gate.release()
        sessions = await asyncio.gather(*opening)
        await held
        # 3 rows padded to 12 (36 positions), then 19: 4 rows of 19 would be 76 > 64.
        assert prefills._value.get() - before == 2
        for session, context in zip(sessions, contexts, strict=True):
            greedy = greedy_reference(target, context, 7)
            tree = TokenTree.chain(greedy[:6])
            outcome = await engine.verify(session, RoundRequest((), tree, {}, round_id=0))
            assert outcome.acceptance.tokens == tuple(greedy[:6])
            assert outcome.acceptance.bonus == greedy[6]
    finally:
        await engine.stop()


async def test_prefill_chunks_share_a_pass_only_within_its_budget_cache_and_slack():
    """Padded to the longest, shared chunks compute at most prefill_chunk positions, stay
    inside every row's cache, and pad no row by more than the ring's slack (256)."""
    engine = VerifierEngine(
        tiny_model(seed=0, max_seq_len=2048),
        VerifierConfig(MODEL_NAME, prefill_chunk=1024, max_context=1400),
    )
    engine.start()
    try:
        near_end = await open_session(engine, "near-end", Schedule(), context=[5] * 1200)
        fresh = await open_session(engine, "fresh", Schedule())

        def chunk(session, n: int) -> _PrefillWork:
            return _PrefillWork(session, [7] * n)

        assert engine._shares_pass([chunk(fresh, 200), chunk(near_end, 100)])
        assert not engine._shares_pass([chunk(fresh, 600), chunk(near_end, 500)])  # 1200 > 1024
        assert not engine._shares_pass([chunk(fresh, 300), chunk(near_end, 1)])  # pads 299
        assert engine._shares_pass([chunk(fresh, 257), chunk(near_end, 1)])  # pads 256
        # 1199 committed + 340 would pass the cache's end (1400 + the round room, 1530)
        assert engine.cache.lengths[near_end.row] + 340 > engine.cache.max_len
        assert not engine._shares_pass([chunk(near_end, 340), chunk(fresh, 330)])
        assert engine._shares_pass([chunk(near_end, 300), chunk(fresh, 290)])
    finally:
        await engine.stop()


def test_the_sdk_refuses_out_of_range_targets_naming_the_field():
    # The verifier's answer to the same values: test_verify_errors.BAD_OPENS.
    for options, field in [({"priority": -101}, "priority"), ({"tpot_slo_ms": 1e9}, "tpot_slo_ms")]:
        with pytest.raises(edgecloud.InvalidRequest) as refused:
            edgecloud.GenerateOptions(**options)
        assert refused.value.field == field
