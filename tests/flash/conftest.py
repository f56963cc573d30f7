"""Tiny ReLU models, their packs, and a pack with predictors, made once per module."""

from __future__ import annotations

import pytest
import torch

from edge_node.flash.ffn import flash_store, load_flash_model
from edge_node.flash.pack import pack_model, read_manifest
from edge_node.flash.predictors import save_predictors
from edge_node.flash.store import StoreOptions, minimum_budget
from lm.checkpoint import save_model
from lm.config import ModelConfig
from lm.model import Transformer
from lm.sparsity import LowRankPredictor

# A verifier of the module's `target` for the edge tests, as the edge suite has it.
from tests.edge_node.conftest import verifier  # noqa: F401

VOCAB = 96
STD = 0.125  # 1 / sqrt(dim): each layer keeps the scale of what it is given
# Small reads and two threads keep the fixed buffers small next to these tiny models.
OPTIONS = StoreOptions(io_threads=2, read_bytes=8192)


def make_model(seed: int, activation: str = "relu", hidden: int = 256) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(
        vocab_size=VOCAB,
        dim=64,
        n_layers=3,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=hidden,
        max_seq_len=512,
        activation=activation,
    )
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, STD)
    return model


def random_windows(seed: int, n: int, time: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, time), generator=torch.Generator().manual_seed(seed))


def budget_info(pack_dir, options: StoreOptions = OPTIONS, **kwargs) -> tuple[int, int]:
    """(minimum budget, budget that holds everything) for this pack and options."""
    model = load_flash_model(pack_dir, 1 << 34, device="cpu", options=options, **kwargs)
    plan = flash_store(model).plan
    manifest = read_manifest(pack_dir)
    decoded = (plan.scratch // plan.chunk_rows) - manifest.payload
    minimum = minimum_budget(manifest, plan.resident, options, decoded)
    return minimum, plan.total


@pytest.fixture(scope="module")
def relu_model() -> Transformer:
    return make_model(seed=1)


@pytest.fixture(scope="module")
def relu_dir(relu_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("relu") / "model"
    save_model(relu_model, path)
    return path


@pytest.fixture(scope="module")
def relu_pack(relu_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("relu_pack")
    pack_model(relu_dir, path)
    return path


def exact_predictors(model: Transformer) -> list[LowRankPredictor]:
    """Full-rank predictors that compute gate(x) itself, cut at 0: for a ReLU model they
    predict exactly the active neurons (recall 1, no false positives)."""
    config = model.config
    predictors = []
    for block in model.layers:
        predictor = LowRankPredictor(config.dim, config.hidden_dim, config.dim)
        with torch.no_grad():
            predictor.down.weight.copy_(torch.eye(config.dim))
            predictor.up.weight.copy_(block.feed_forward.gate.weight)
            predictor.up.bias.zero_()
            predictor.cut.fill_(1e-30)  # gate(x) >= tiny <=> relu(gate(x)) > 0, as a rule
        predictors.append(predictor)
    return predictors


@pytest.fixture(scope="module")
def predicted_pack(relu_model, relu_dir, tmp_path_factory):
    """A float32 pack of the ReLU model with exact predictors (see exact_predictors)."""
    path = tmp_path_factory.mktemp("predicted")
    manifest = pack_model(relu_dir, path)
    save_predictors(path, manifest, exact_predictors(relu_model), {"activation": "relu"})
    return path
