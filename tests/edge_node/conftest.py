"""A real verifier and a real edge runtime on loopback, with tiny models the tests make.

The draft model is the target with noise added to its weights: related enough that
drafts are often accepted, different enough that they are sometimes rejected.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.cloud_link import CloudLink, CloudLinkConfig
from edge_node.picker import FixedListPicker, VerifierEndpoint
from edge_node.runtime import EdgeConfig, EdgeRuntime
from lm.checkpoint import save_model
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.tiny import MODEL_NAME, TOKEN, tiny_model


def save_model_pair(root: Path, **shape: int) -> tuple[Path, Path]:
    """The stack tests' tiny target (saved as MODEL_NAME, the name servers default to)
    and a draft that is a slightly noisy copy of it: (target_dir, draft_dir). shape:
    other `tiny_model` sizes (max_seq_len, ...)."""
    target = tiny_model(seed=21, vocab=64, sharpen=3.0, **shape)
    save_model(target, root / MODEL_NAME)
    save_model(noisy_copy(target, 0.01, seed=5), root / "draft")
    return root / MODEL_NAME, root / "draft"


def noisy_copy(model, scale: float, seed: int):
    draft = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return draft


@pytest.fixture(scope="module")
def target():
    return tiny_model(seed=21, vocab=64, sharpen=3.0)


@pytest.fixture(scope="module")
def draft(target):
    return noisy_copy(target, 0.01, seed=5)


@pytest.fixture
async def verifier(target):
    server = await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_context=256),
        ServerConfig(port=0, auth=AuthConfig(token=TOKEN)),
    )
    yield server
    await server.drain()


def make_runtime(draft, addresses, **link_options) -> EdgeRuntime:
    picker = FixedListPicker([VerifierEndpoint(a, MODEL_NAME) for a in addresses])
    link = CloudLink(picker, CloudLinkConfig(token=TOKEN, **link_options))
    return EdgeRuntime(draft, EdgeConfig(model_name=MODEL_NAME), link=link)


@pytest.fixture
async def runtime(draft, verifier):
    rt = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    yield rt
    await rt.close()
