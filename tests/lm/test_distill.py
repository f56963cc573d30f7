"""`edgecloud distill` and the pair metrics of `edgecloud eval`: the KL loss, chain acceptance
against a plain speculative-decoding loop, expected tau, and a tiny distillation run."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from lm.checkpoint import load_model
from lm.errors import CheckpointError
from lm.model import Transformer
from lm.training import corpus
from lm.training.distill import DistillConfig, distill_draft, distill_loss, load_target
from lm.training.evaluate import (
    acceptance_rates,
    chain_matches,
    check_pair,
    expected_tau,
    generate,
    greedy_agreement,
)
from lm.training.train import ModelShape, TrainConfig, init_weights
from tests.lm.test_train import make_corpus, train_tiny

DRAFT_SHAPE = ModelShape(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=32)


def _random_model(seed: int, vocab: int = 40, dim: int = 32) -> Transformer:
    from lm.config import ModelConfig

    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(vocab_size=vocab, dim=dim, n_layers=2, n_heads=4, n_kv_heads=2,
                    hidden_dim=48, max_seq_len=64, activation="relu")
    )  # fmt: skip
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model.eval()


def test_distill_loss_is_forward_kl():
    target = torch.randn(2, 3, 7)
    draft = torch.randn(2, 3, 7)
    p, q = target.softmax(-1), draft.softmax(-1)
    expected = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(distill_loss(draft, target), expected)
    assert distill_loss(target, target).item() == pytest.approx(0.0, abs=1e-6)


def test_acceptance_rates_worked_example():
    matches = torch.tensor([[1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)
    assert acceptance_rates(matches) == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert math.isnan(acceptance_rates(torch.tensor([[False, True]]))[1])


def test_expected_tau_worked_example():
    assert expected_tau([0.8, 0.5]) == pytest.approx([1.8, 2.2])
    assert expected_tau([1.0] * 4) == pytest.approx([2.0, 3.0, 4.0, 5.0])
    assert expected_tau([0.5, math.nan, 1.0]) == pytest.approx([1.5, 1.5, 1.5])


def _speculative_accepted(target, draft, prompt: torch.Tensor, length: int) -> int:
    """A plain greedy speculative round, no caches: the draft proposes `length` tokens one by
    one, the target scores prompt + proposal in one pass, the longest agreeing prefix wins."""
    tokens = prompt.clone()
    for _ in range(length):
        tokens = torch.cat([tokens, draft(tokens[None])[0, -1:].argmax(-1)])
    target_top = target(tokens[None])[0, len(prompt) - 1 : -1].argmax(-1)
    proposal = tokens[len(prompt) :]
    accepted = 0
    while accepted < length and proposal[accepted] == target_top[accepted]:
        accepted += 1
    return accepted


@torch.no_grad()
def test_chain_matches_reproduce_real_speculative_rounds():
    """A draft that is a noisy copy of the target accepts varied prefixes; the accepted length
    from `chain_matches` equals the one a real round gets, prompt by prompt."""
    target = _random_model(0)
    draft = _random_model(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.25 * torch.randn_like(p))
    prompts = torch.randint(0, 40, (24, 6), generator=torch.Generator().manual_seed(3))
    matches = chain_matches(target, draft, prompts, max_len=5)
    prefix = matches.long().cumprod(1).sum(1).tolist()
    expected = [_speculative_accepted(target, draft, p, 5) for p in prompts]
    assert prefix == expected
    assert 0 < sum(expected) < 24 * 5, "draft should be neither perfect nor useless"


@torch.no_grad()
def test_generate_with_cache_equals_recomputing():
    model = _random_model(1)
    prompts = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompts, 6)
    tokens = prompts
    for _ in range(6):
        tokens = torch.cat([tokens, model(tokens)[:, -1:].argmax(-1)], dim=1)
    assert out.tolist() == tokens[:, 5:].tolist()


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> tuple[Path, corpus.CorpusSplit]:
    root = tmp_path_factory.mktemp("distill")
    corpus_dir = make_corpus(root / "corpus")
    train_tiny(corpus_dir, root / "target", steps=60)
    return root / "target", corpus.discover(corpus_dir, heldout_fraction=0.25)


def test_tiny_distill_raises_agreement_over_the_untrained_draft(tiny_target, tmp_path):
    target_dir, split = tiny_target
    config = TrainConfig(steps=50, batch_size=8, context=32, lr=5e-3, warmup_steps=5, seed=1)
    summary = distill_draft(
        target_dir,
        split,
        tmp_path / "draft",
        DRAFT_SHAPE,
        config,
        DistillConfig(pool_size=16, prompt_len=8, generate_batch=8),
        device=torch.device("cpu"),
    )
    target, tokenizer = load_target(target_dir, torch.device("cpu"))
    draft = load_model(tmp_path / "draft", device="cpu")
    untrained = Transformer(draft.config)
    torch.manual_seed(config.seed)
    init_weights(untrained, draft.config.n_layers)
    texts = corpus.read_texts(split.paths("heldout"))
    stream = torch.tensor([i for ids in tokenizer.encode_batch(texts) for i in ids])
    windows = corpus.sequential_windows(stream, 32, limit=16)
    with torch.no_grad():
        before = greedy_agreement(target, untrained, windows)
        after = greedy_agreement(target, draft, windows)
    assert after > before + 0.1
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["greedy_agreement"] > before
    assert len(summary["expected_tau"]) == 8
    # The draft shares the target's tokenizer byte for byte, and its generated pool was kept.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "draft" / name).read_bytes() == (target_dir / name).read_bytes()
    pool = torch.load(tmp_path / "draft" / "checkpoint" / "generated.pt", weights_only=True)
    assert pool.shape == (16, 32)


def test_target_without_tokenizer_names_the_file(tiny_target, tmp_path):
    target_dir, _ = tiny_target
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(target_dir / name, bare / name)
    with pytest.raises(CheckpointError, match=rf"{bare / 'tokenizer.json'}: missing"):
        load_target(bare, torch.device("cpu"))


def test_pair_with_different_vocabularies_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"draft/config\.json: vocab_size 300 differs"):
        check_pair(tmp_path / "target", tmp_path / "draft", 320, 300)


def test_distill_config_names_the_bad_field():
    with pytest.raises(ValueError, match="generated_fraction: must be in"):
        DistillConfig(generated_fraction=1.5)
    with pytest.raises(ValueError, match="temperature: must be > 0"):
        DistillConfig(temperature=0.0)
