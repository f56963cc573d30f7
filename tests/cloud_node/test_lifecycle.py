"""Session lifecycle under traffic on a real verifier: a session that closes while its
round is in the running pass (client cancel, round timeout, reaper) never disturbs the
sessions batched with it, and its row is not reused before the pass ends; a greedy
session with a seed runs many rounds; the context limit is OUT_OF_RANGE.

The pass is held open by a forward pre-hook that waits on an event: the race window
is microseconds wide for real, and the hook widens it deterministically. Nothing else
is faked: real model, real gRPC streams, real engine loop.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
import torch
from grpc import aio

import cloud_node.engine
from edge_node.verifier_client import VerifierSession
from lm.acceptance import accept_batch
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from tests.cloud_node.test_verify_greedy import greedy_reference
from tests.tiny import METADATA, MODEL_NAME, tiny_model

CONTEXT = [1, 5, 9, 2]


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=0, sharpen=3.0)


class PassGate:
    """Holds the next forward pass of `model` until `release()`; `entered` is set
    when a pass is waiting."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.entered = threading.Event()
        self._go = threading.Event()
        self._armed = False
        self._handle = model.register_forward_pre_hook(self._hook)

    def arm(self) -> None:
        self.entered.clear()
        self._go.clear()
        self._armed = True

    def release(self) -> None:
        self._armed = False
        self._go.set()

    def remove(self) -> None:
        self.release()
        self._handle.remove()

    def _hook(self, module, args) -> None:
        if self._armed:
            self.entered.set()
            self._go.wait(10)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 10), "no pass started"


@pytest.fixture
def gate(target):
    # The engine calls `model.hidden` (not `forward`) for passes; hook the first layer.
    g = PassGate(target.layers[0])
    yield g
    g.remove()


async def greedy_rounds(session: VerifierSession, context: list[int], n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        result = await session.verify(TokenTree.chain([0, 1]))
        out += [*result.accepted_tokens, result.bonus_token]
    return out[:n]


async def test_greedy_with_a_seed_runs_many_rounds(target, verifier_factory, channel_factory):
    """temperature 0 with a seed: the verifier used to reseed a generator greedy
    sessions do not have, failing every round (and every session batched with it)."""
    server = await verifier_factory(target)
    channel = channel_factory(server.port)
    async with VerifierSession(channel, metadata=METADATA) as seeded:
        await seeded.open(MODEL_NAME, CONTEXT, SamplingParams(temperature=0.0, seed=1))
        got = await greedy_rounds(seeded, CONTEXT, 16)
    assert got == greedy_reference(target, CONTEXT, 16)


async def test_session_cancelled_mid_pass_leaves_its_batch_alone(
    target, gate, verifier_factory, channel_factory
):
    """A client cancel or the edge's round timeout (both cancel the stream) while the
    round is in the pass: the row used to be reset and freed under the worker thread."""
    server = await verifier_factory(target, max_sessions=2, batch_window_ms=50)
    channel = channel_factory(server.port)
    bystander = VerifierSession(channel, metadata=METADATA)
    victim = VerifierSession(channel, metadata=METADATA)
    await bystander.open(MODEL_NAME, CONTEXT, SamplingParams())
    await victim.open(MODEL_NAME, [3, 4, 5], SamplingParams())
    victim_row = next(s.row for s in server.engine.sessions.values() if s.pending == [5])

    gate.arm()
    rounds = [
        asyncio.ensure_future(s.verify(TokenTree.chain([7, 8, 9]))) for s in (bystander, victim)
    ]
    await gate.wait_entered()  # both rounds are in the pass now
    victim.abort()
    for _ in range(50):
        if len(server.engine.sessions) == 1:
            break
        await asyncio.sleep(0.01)
    assert len(server.engine.sessions) == 1
    # The closed session's row stays out of the free list until the pass ends ...
    assert victim_row not in server.engine._free_rows
    gate.release()
    result = await rounds[0]
    # ... and then comes back, reset.
    for _ in range(50):
        if victim_row in server.engine._free_rows:
            break
        await asyncio.sleep(0.01)
    assert victim_row in server.engine._free_rows
    assert server.engine.cache.lengths[victim_row] == 0
    with pytest.raises((aio.AioRpcError, ConnectionError, asyncio.CancelledError)):
        await rounds[1]
    got = [*result.accepted_tokens, result.bonus_token]
    got += await greedy_rounds(bystander, CONTEXT, 12)
    assert got[:12] == greedy_reference(target, CONTEXT, 12)
    await bystander.close()


async def test_reaper_spares_a_session_whose_round_is_in_the_pass(
    target, gate, verifier_factory, channel_factory
):
    server = await verifier_factory(target, session_ttl_s=0.1)
    channel = channel_factory(server.port)
    async with VerifierSession(channel, metadata=METADATA) as session:
        await session.open(MODEL_NAME, CONTEXT, SamplingParams())
        gate.arm()
        pending = asyncio.ensure_future(session.verify(TokenTree.chain([7])))
        await gate.wait_entered()
        await asyncio.sleep(0.3)  # several reaper ticks past the TTL while the pass runs
        assert len(server.engine.sessions) == 1
        gate.release()
        result = await pending
        assert result.nodes_verified == 1


async def test_one_sessions_failure_fails_it_alone(
    target, gate, verifier_factory, channel_factory, monkeypatch
):
    """A fault in one session's acceptance (injected: every such bug we found is fixed,
    so none can be caused for real) fails that session; its batch-mates' rounds succeed."""
    server = await verifier_factory(target, batch_window_ms=50)
    channel = channel_factory(server.port)
    engine = server.engine

    def flaky(logits, rounds):  # the session opened with 3 tokens decides position 3
        results = accept_batch(logits, rounds)
        return [
            RuntimeError("injected") if r.first == 3 else a
            for r, a in zip(rounds, results, strict=True)
        ]

    monkeypatch.setattr(cloud_node.engine, "accept_batch", flaky)
    async with (
        VerifierSession(channel, metadata=METADATA) as good,
        VerifierSession(channel, metadata=METADATA) as bad,
    ):
        await good.open(MODEL_NAME, CONTEXT, SamplingParams())
        await bad.open(MODEL_NAME, [3, 4, 5], SamplingParams())
        gate.arm()
        rounds = [asyncio.ensure_future(s.verify(TokenTree.chain([7]))) for s in (good, bad)]
        await gate.wait_entered()
        gate.release()
        done = await asyncio.gather(*rounds, return_exceptions=True)
    assert not isinstance(done[0], BaseException)
    assert isinstance(done[1], aio.AioRpcError)
    assert done[1].code() == grpc.StatusCode.INTERNAL
    assert engine.forward_passes >= 1


async def test_round_past_the_context_is_out_of_range(target, verifier_factory, channel_factory):
    server = await verifier_factory(target, max_context=8)
    channel = channel_factory(server.port)
    async with VerifierSession(channel, metadata=METADATA) as session:
        await session.open(MODEL_NAME, CONTEXT, SamplingParams())  # 4 tokens
        await session.verify(TokenTree.chain([1, 2]))  # needs 4 + 2 + 1 = 7
        with pytest.raises(aio.AioRpcError) as error:
            await session.verify(TokenTree.chain([1, 2, 3]))
    assert error.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "max_context" in error.value.details()


async def test_a_long_prefill_does_not_stall_running_sessions(
    target, verifier_factory, channel_factory
):
    """Prefill chunks and round batches take turns: while six sessions open with 20
    chunks of context each (their chunks queue together), a running session's rounds
    go through between chunks, not after all of them."""
    server = await verifier_factory(target, prefill_chunk=4, max_context=256)
    channel = channel_factory(server.port)
    opening = [VerifierSession(channel, metadata=METADATA) for _ in range(6)]
    async with VerifierSession(channel, metadata=METADATA) as running:
        await running.open(MODEL_NAME, CONTEXT, SamplingParams())
        opened = asyncio.gather(*(s.open(MODEL_NAME, [3] * 81, SamplingParams()) for s in opening))
        rounds = 0
        while not opened.done():
            await running.verify(TokenTree.chain([7]))
            rounds += 1
        await opened
    for session in opening:
        await session.close()
    # 120 prefill passes. Taking turns gives the running session about one round per
    # chunk; prefill first gave it about one per six (each session's next chunk).
    assert rounds >= 60, rounds
