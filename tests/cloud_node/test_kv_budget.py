"""`kv_cache_gb` (`--kv-cache-gb`): the verifier's sessions from a KV-cache budget and
the model's shape, and the budgets it refuses, in the engine and on the command line.

The tiny model: 2 layers, 2 KV heads x 8 (dim 32 over 4 heads), so in float32 a cached
position takes 2 x 2 x 2 x 8 x 4 = 256 bytes. Its 512-token context leaves 382 for a
session after the 130 positions of a round (64-node trees): 512 positions, 131072 bytes.
"""

from __future__ import annotations

import pytest
import torch

from cloud_node.config import VerifierConfig
from cloud_node.engine import VerifierEngine
from lm.checkpoint import save_model
from tests.test_cli import run_cli
from tests.tiny import GEMMA3_SHAPE, MODEL_NAME, tiny_model

POSITION_BYTES = 256
SESSION_BYTES = 512 * POSITION_BYTES


def ROW_BYTES(positions: int) -> int:  # noqa: N802 (a constant of the tiny model)
    return positions * POSITION_BYTES


@pytest.mark.parametrize(
    ("dtype", "max_context", "sessions"),
    [
        (torch.float32, None, 7),  # 10^6 // 131072
        (torch.bfloat16, None, 15),  # 10^6 // 65536: half the bytes a position
        (torch.float32, 126, 15),  # 10^6 // ((126 + 130) x 256)
    ],
)
async def test_the_budget_gives_the_sessions_from_the_models_shape(dtype, max_context, sessions):
    model = tiny_model(seed=1).to(dtype)
    config = VerifierConfig(MODEL_NAME, kv_cache_gb=0.001, max_context=max_context)
    engine = VerifierEngine(model, config)
    try:
        assert engine.config.max_sessions == sessions
        positions = engine.config.max_context + engine.config.round_room
        assert engine.cache.k.shape == (2, sessions, 2, positions, 8)
        assert engine.cache.nbytes <= 10**6 < engine.cache.nbytes // sessions * (sessions + 1)
        gauge = engine.metrics.registry.get_sample_value
        assert gauge("edgecloud_verifier_kv_rows") == sessions
        assert gauge("edgecloud_verifier_kv_cache_bytes") == engine.cache.nbytes
    finally:
        await engine.stop()


async def test_the_budget_counts_sliding_window_layers_at_their_ring():
    """Gemma 3's shape (window 3 on layer 0 of 2; 2 KV heads x 16, float32: 256 bytes a
    layer and position): a 512-position session takes 512 x 256 on layer 1 but only
    (3 + 256 slack) x 256 on layer 0, 197376 bytes, so 10^6 holds 5 sessions, not 3."""
    model = tiny_model(seed=1, **GEMMA3_SHAPE)
    engine = VerifierEngine(model, VerifierConfig(MODEL_NAME, kv_cache_gb=0.001))
    try:
        assert engine.config.max_sessions == 5
        assert engine.cache.ring == 259 and engine.cache.ring_layers == (0,)
        assert engine.cache.nbytes == 5 * 197376
    finally:
        await engine.stop()


def test_without_a_budget_the_sessions_are_asked_for_or_32():
    assert VerifierConfig(MODEL_NAME).for_model(512, ROW_BYTES).max_sessions == 32
    config = VerifierConfig(MODEL_NAME, max_sessions=5)
    assert config.for_model(512, ROW_BYTES).max_sessions == 5


def test_sessions_asked_for_within_the_budget_are_kept():
    config = VerifierConfig(MODEL_NAME, kv_cache_gb=0.001, max_sessions=3)
    resolved = config.for_model(512, ROW_BYTES)
    assert resolved.max_sessions == 3
    assert resolved.for_model(512, ROW_BYTES) == resolved


def test_a_budget_that_holds_no_session_is_refused_naming_it():
    config = VerifierConfig(MODEL_NAME, kv_cache_gb=0.0001)
    with pytest.raises(ValueError) as refused:
        config.for_model(512, ROW_BYTES)
    assert str(refused.value) == (
        "kv_cache_gb: 0.0001 GB holds no session; a session takes 0.000131072 GB "
        "(512 positions): raise kv_cache_gb or lower max_context"
    )


def test_more_sessions_than_the_budget_holds_are_refused():
    config = VerifierConfig(MODEL_NAME, kv_cache_gb=0.001, max_sessions=8)
    with pytest.raises(ValueError, match="kv_cache_gb: 0.001 GB holds 7 sessions, max_sessions"):
        config.for_model(512, ROW_BYTES)


@pytest.mark.parametrize("budget", [0.0, -1.0, float("nan"), float("inf")])
def test_a_budget_out_of_range_is_refused(budget):
    with pytest.raises(ValueError, match=r"kv_cache_gb: must be in \[1e-06, 1000000.0\]"):
        VerifierConfig(MODEL_NAME, kv_cache_gb=budget)


def test_the_cli_answers_a_budget_that_holds_no_session_with_one_line(tmp_path):
    save_model(tiny_model(seed=1), tmp_path / "tiny")
    result = run_cli(
        "cloud",
        "serve",
        "--model",
        str(tmp_path / "tiny"),
        "--insecure-no-auth",
        "--port",
        "0",
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--kv-cache-gb",
        "0.0001",
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "edgecloud: error: kv_cache_gb: 0.0001 GB holds no session" in result.stderr
