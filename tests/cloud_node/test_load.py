"""The verifier's load (cloud_node/load.py): the busy share of its last second, exact on
given intervals, and carried by every reply of a real verifier, rising under traffic."""

from __future__ import annotations

import asyncio
import random

import pytest

from cloud_node.load import BusyMeter
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


async def test_replies_carry_a_load_that_rises_under_traffic(verifier_factory, channel_factory):
    target = tiny_model(seed=0, dim=128, layers=4, sharpen=3.0)
    server = await verifier_factory(target, batch_window_ms=0.0)
    rng = random.Random(1)

    async def rounds(count: int) -> list[float]:
        async with VerifierSession(channel_factory(server.port), metadata=METADATA) as session:
            await session.open(MODEL_NAME, [1, 2, 3], SamplingParams())
            loads = []
            for _ in range(count):
                result = await session.verify(random_tree(rng, 64, 16))
                loads.append(result.load)
            return loads

    first = await rounds(1)
    assert 0.0 <= first[0] < 0.1  # an idle verifier: one prefill and one pass
    busy = await asyncio.gather(*(rounds(40) for _ in range(6)))
    last = [loads[-1] for loads in busy]
    assert all(0.0 <= load <= 1.0 for loads in busy for load in loads)
    # six sessions back to back, in this process: about half the time in passes (0.47-0.50
    # measured), the rest gRPC and the clients on the same two cores
    assert max(last) > 0.25, last
    await asyncio.sleep(1.1)  # a second idle: the window forgets the traffic
    assert server.engine.busy.load() == 0.0
