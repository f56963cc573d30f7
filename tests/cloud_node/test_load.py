"""The verifier's load and pass cost (cloud_node/load.py): the busy share of its last
second, exact on given intervals; the fitted cost of a round and of a position, exact on
given passes; both carried by every reply of a real verifier, the load rising under
traffic."""

from __future__ import annotations

import asyncio
import random

import pytest

from cloud_node.load import BusyMeter, PassCost
from edge_node.verifier_client import VerifierSession
from lm.sampling import SamplingParams
from tests.cloud_node.test_verify_greedy import random_tree
from tests.tiny import METADATA, MODEL_NAME, tiny_model


def test_the_docstring_example_and_the_window_edges():
    meter = BusyMeter(window_s=1.0)
    meter.add(100.4, 100.7)  # ends 0.5 s before 101.2
    meter.add(101.0, 101.2)
    assert meter.load(101.2) == pytest.approx(0.5)
    assert meter.load(101.5) == pytest.approx(0.2 + 0.2)  # the first pass half out
    assert meter.load(102.0) == pytest.approx(0.2)  # the first pass forgotten
    assert meter.load(103.0) == 0.0
    meter.add(103.0, 104.5)  # longer than the window: capped at all of it
    assert meter.load(104.5) == 1.0
    with pytest.raises(ValueError, match="window_s: must be > 0"):
        BusyMeter(window_s=0)


def test_pass_cost_solves_the_docstring_example_and_says_when_it_cannot_tell():
    cost = PassCost()
    assert cost.estimate() == (0.0, 0.0)
    cost.add(1, 5, 3.25)
    assert cost.estimate() == (0.0, 0.0)  # one pass: two unknowns
    cost.add(4, 40, 19.6)
    assert cost.estimate() == pytest.approx((1.6, 0.33))
    # Exact data from any mix of passes is fitted exactly; older passes fade.
    cost = PassCost(decay=0.5)
    for rounds, width in [(1, 1), (3, 7), (8, 2), (2, 17), (5, 5)]:
        cost.add(rounds, rounds * width, 2.0 * rounds + 0.1 * rounds * width)
    assert cost.estimate() == pytest.approx((2.0, 0.1))
    for _ in range(60):  # the verifier got 3x slower per position
        cost.add(4, 20, 4 * 2.0 + 20 * 0.3)
        cost.add(2, 30, 2 * 2.0 + 30 * 0.3)
    assert cost.estimate() == pytest.approx((2.0, 0.3), rel=1e-3)
    same_shape = PassCost()  # every row as wide in every pass: cannot tell
    for rounds in (1, 2, 4, 8):
        same_shape.add(rounds, 6 * rounds, 3.0 * rounds)
    assert same_shape.estimate() == (0.0, 0.0)
    flat = PassCost()  # the wider, the (slightly) faster: noise; the rounds explain it
    flat.add(1, 2, 5.0)
    flat.add(2, 40, 9.9)
    flat.add(3, 9, 15.1)
    per_round, per_position = flat.estimate()
    assert per_position == 0.0 and per_round == pytest.approx(5.0, abs=0.1)
    with pytest.raises(ValueError, match="decay"):
        PassCost(decay=1.0)


async def test_replies_carry_a_load_that_rises_under_traffic(verifier_factory, channel_factory):
    target = tiny_model(seed=0, dim=128, layers=4, sharpen=3.0)
    server = await verifier_factory(target, batch_window_ms=0.0)
    rng = random.Random(1)

    async def rounds(count: int) -> list[float]:
        async with VerifierSession(channel_factory(server.port), metadata=METADATA) as session:
            await session.open(MODEL_NAME, [1, 2, 3], SamplingParams())
            loads = []
            for _ in range(count):
                result = await session.verify(random_tree(rng, 64, rng.choice((4, 16))))
                loads.append(result.load)
                costs.append((result.pass_ms_per_round, result.pass_ms_per_position))
            return loads

    costs: list[tuple[float, float]] = []

    first = await rounds(1)
    assert 0.0 <= first[0] < 0.1  # an idle verifier: one prefill and one pass
    busy = await asyncio.gather(*(rounds(40) for _ in range(6)))
    last = [loads[-1] for loads in busy]
    assert all(0.0 <= load <= 1.0 for loads in busy for load in loads)
    # six sessions back to back, in this process: about half the time in passes (0.47-0.50
    # measured), the rest gRPC and the clients on the same two cores
    assert max(last) > 0.25, last
    # Trees of 4 and 16 nodes in batches of 1 to 6: the fit tells rounds from positions
    # (this tiny model's passes cost about the same however wide: ~3 ms a round).
    per_round, per_position = costs[-1]
    assert per_round + per_position > 0 and min(per_round, per_position) >= 0
    assert (per_round, per_position) == pytest.approx(server.engine.cost.estimate(), rel=0.5)
    await asyncio.sleep(1.1)  # a second idle: the window forgets the traffic
    assert server.engine.busy.load() == 0.0
