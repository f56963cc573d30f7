"""An edge request allocates the SLM cache it can use (its prompt, max_tokens and the
draft reserve), not the model's whole context, and generates what it did with the
whole-context cache: on an 8192-token draft model, lossless equals cloud_only, every
mode equals its run with the old size, cloud_only allocates nothing, and a failover
mid-generation changes nothing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from edge_node import generation
from edge_node.slm import EdgeLM, cache_len
from edge_node.types import DraftConfig
from lm.kv_cache import bytes_per_position
from protocol.types import Mode
from tests.edge_node.conftest import make_runtime, noisy_copy
from tests.edge_node.test_traffic import PROMPT, failover_runs, generate, request
from tests.tiny import tiny_model

LONG_CONTEXT = 8192
# The prompt, max_tokens and two rounds of the edge's default 64-node trees (130).
MAX_TOKENS = 30
NEEDED = len(PROMPT) + MAX_TOKENS + 130


@pytest.fixture(scope="module")
def long_draft():
    """The tests' draft model (the same weights: the context adds none) with an
    8192-token context."""
    model = tiny_model(seed=21, vocab=64, sharpen=3.0, max_seq_len=LONG_CONTEXT)
    return noisy_copy(model, 0.01, seed=5)


@pytest.fixture
def allocated(long_draft, monkeypatch) -> list:
    """Every cache the draft model allocates from now on, in order."""
    caches = []
    new_cache = long_draft.new_cache

    def recorded(*args, **kwargs):
        caches.append(new_cache(*args, **kwargs))
        return caches[-1]

    monkeypatch.setattr(long_draft, "new_cache", recorded)
    return caches


def test_cache_len_replays_its_example():
    assert cache_len(20, 100, 64, LONG_CONTEXT) == 250
    assert cache_len(8000, 150, 64, LONG_CONTEXT) == LONG_CONTEXT  # never past the model


def test_a_view_longer_than_the_model_is_refused(long_draft):
    with pytest.raises(ValueError, match=r"max_len: must be in \[1, 8192\], got 8193"):
        EdgeLM(long_draft, LONG_CONTEXT + 1)


@pytest.mark.parametrize("mode", [Mode.LOSSLESS, Mode.ADAPTIVE, Mode.EDGE_ONLY])
async def test_a_request_allocates_what_it_can_use_and_generates_the_same(
    mode, long_draft, verifier, allocated, monkeypatch
):
    runtime = make_runtime(long_draft, [f"127.0.0.1:{verifier.port}"])
    try:
        with monkeypatch.context() as old:  # the old size: the model's whole context
            old.setattr(generation, "cache_len", lambda *shape: shape[-1])
            whole, _ = await generate(runtime, request(mode, MAX_TOKENS))
        sized, last = await generate(runtime, request(mode, MAX_TOKENS))
        cloud, _ = await generate(runtime, request(Mode.CLOUD_ONLY, MAX_TOKENS))
    finally:
        await runtime.close()
    config = long_draft.config
    old_cache, cache = allocated  # cloud_only, which never runs the SLM, allocated none
    assert old_cache.max_len == LONG_CONTEXT
    assert cache.k.shape == (config.n_layers, 2, config.n_kv_heads, NEEDED, config.head_dim)
    assert cache.nbytes == 2 * NEEDED * bytes_per_position(config, torch.float32)
    assert last.finish_reason == "length" and len(sized) == MAX_TOKENS
    assert sized == whole
    if mode is Mode.LOSSLESS:
        assert sized == cloud


@pytest.mark.parametrize(
    "draft", [DraftConfig("chain", 1, 32, adapt=False), DraftConfig("beam", 8, 8, adapt=False)]
)
async def test_the_largest_pipelined_drafts_fit_to_the_last_token(
    draft, long_draft, verifier, allocated
):
    """The deepest chain and the widest beams the shapes allow, each drafted in the spare
    row past an assumed path and bonus token while a round is verified, up to the end
    (a round trip longer than a draft: the edge drafts ahead only then)."""
    runtime = make_runtime(long_draft, [f"127.0.0.1:{verifier.port}"], simulated_rtt_ms=100)
    try:
        lossless, last = await generate(
            runtime, replace(request(Mode.LOSSLESS, MAX_TOKENS), draft=draft)
        )
        cloud, _ = await generate(runtime, request(Mode.CLOUD_ONLY, MAX_TOKENS))
    finally:
        await runtime.close()
    [cache] = allocated
    assert cache.max_len == NEEDED
    assert cache.lengths[1] > 0, "nothing was drafted ahead in the spare row"
    assert lossless == cloud and last.finish_reason == "length"


@pytest.mark.parametrize("sampling", [{}, {"temperature": 1.0, "seed": 11}])
async def test_a_failover_mid_generation_with_the_sized_cache(
    sampling, target, long_draft, allocated
):
    """Greedy drafts the next round in the spare row while a round is verified (fork,
    pipelining); seeded sampling does not. Both fail over with identical output."""
    req = request(max_tokens=40, **sampling)
    reference, _, failed_over, stats = await failover_runs(target, long_draft, req, kill_after=2)
    assert stats.failovers == 1
    assert failed_over == reference
    assert [c.max_len for c in allocated] == [len(PROMPT) + 40 + 130] * 3
