"""The bundled demo models: present, intact (checksums in MODEL_CARD.md), loadable, one shared
tokenizer, sized as promised, and actually trained (low perplexity, the draft and the draft head
agree with the target)."""

from __future__ import annotations

import hashlib
import re
import sys

import pytest
import torch
from tokenizers import Tokenizer

from lm.checkpoint import load_model
from lm.draft_head import load_head
from lm.training import corpus
from lm.training.evaluate import check_pair, greedy_agreement, head_lookahead_agreement, perplexity
from orchestrator.demo_models import DEMO_DIR, DRAFT_DIR, HEAD_DIR, MODEL_CARD, TARGET_DIR

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
HEAD_FILES = ("head_config.json", "head.safetensors")
CHECKSUM_ROW = re.compile(
    r"^\| `((?:target|draft|head)/[\w.]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \|$"
)


def _card_checksums() -> dict[str, tuple[int, str]]:
    rows = {}
    for line in MODEL_CARD.read_text().splitlines():
        match = CHECKSUM_ROW.match(line.strip())
        if match:
            rows[match[1]] = (int(match[2].replace(",", "")), match[3])
    return rows


@pytest.fixture(scope="module")
def pair():
    target = load_model(TARGET_DIR, device="cpu", dtype=torch.float32)
    draft = load_model(DRAFT_DIR, device="cpu", dtype=torch.float32)
    return target, draft


@pytest.fixture(scope="module")
def heldout_windows() -> torch.Tensor:
    """A few held-out windows of the stdlib split the pair was trained on."""
    tokenizer = Tokenizer.from_file(str(TARGET_DIR / "tokenizer.json"))
    split = corpus.discover()
    texts = corpus.read_texts(split.paths("heldout")[:4])
    stream = torch.tensor([i for e in tokenizer.encode_batch(texts) for i in e.ids])
    return corpus.sequential_windows(stream, 256, limit=8)


def test_every_file_matches_the_card_checksum():
    recorded = _card_checksums()
    expected = {f"{part}/{name}" for part in ("target", "draft") for name in FILES}
    expected |= {f"head/{name}" for name in HEAD_FILES}
    assert set(recorded) == expected
    for rel, (size, digest) in recorded.items():
        data = (DEMO_DIR / rel).read_bytes()
        assert len(data) == size, rel
        assert hashlib.sha256(data).hexdigest() == digest, rel


def test_pair_loads_and_shares_one_tokenizer(pair):
    target, draft = pair
    assert (TARGET_DIR / "tokenizer.json").read_bytes() == (
        DRAFT_DIR / "tokenizer.json"
    ).read_bytes()
    check_pair(TARGET_DIR, DRAFT_DIR, target.config.vocab_size, draft.config.vocab_size)
    tokenizer = Tokenizer.from_file(str(TARGET_DIR / "tokenizer.json"))
    assert tokenizer.get_vocab_size() == target.config.vocab_size
    assert target.config.activation == draft.config.activation == "relu"
    assert target.config.bos_token_id == tokenizer.token_to_id("<|bos|>")


def test_sizes_as_promised(pair):
    target, draft = pair
    target_params = sum(p.numel() for p in target.parameters())
    draft_params = sum(p.numel() for p in draft.parameters())
    assert target_params >= 5 * draft_params
    total = sum(f.stat().st_size for d in (TARGET_DIR, DRAFT_DIR) for f in d.iterdir())
    assert total <= 30 * 1024 * 1024


def test_card_names_the_heldout_split_of_this_stdlib():
    card = MODEL_CARD.read_text()
    recorded = re.search(r"held-out split sha256 `([0-9a-f]{64})`", card)
    version = re.search(r"Python (\d+\.\d+\.\d+)", card)
    assert recorded and version
    if version[1] != "{}.{}.{}".format(*sys.version_info[:3]):
        pytest.skip(f"card split is for Python {version[1]}'s stdlib")
    assert corpus.heldout_digest(corpus.discover()) == recorded[1]


@torch.no_grad()
def test_pair_is_trained(pair, heldout_windows):
    """A random model scores perplexity ~4096 and agrees ~0%; these are far from that."""
    target, draft = pair
    assert perplexity(target, heldout_windows).perplexity < 45
    assert perplexity(draft, heldout_windows).perplexity < 50
    assert greedy_agreement(target, draft, heldout_windows) > 0.7


@torch.no_grad()
def test_head_serves_the_target_and_is_trained(pair, heldout_windows):
    """The head reads the target's hidden states and copies its embedding; a random head would
    agree ~0% with the target's argmax two tokens ahead."""
    target, _ = pair
    head = load_head(HEAD_DIR, device="cpu", dtype=torch.float32)
    assert head.config.vocab_size == target.config.vocab_size
    assert head.config.hidden_size == target.config.dim
    assert torch.equal(head.embedding.weight, target.tok_embeddings.weight)
    assert sum(f.stat().st_size for f in HEAD_DIR.iterdir()) <= 8 * 1024 * 1024
    agreement = head_lookahead_agreement(target, head, heldout_windows[:2], depth=2)
    assert agreement[0] > 0.4
