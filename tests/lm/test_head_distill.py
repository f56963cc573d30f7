"""`edgecloud distill --head` (lm/training/head_distill.py) and `edgecloud eval --head`: the
lookahead KL loss against a loop over starts, the target-initialised head, a tiny run that lowers
the loss and resumes exactly, the head's acceptance figures, and one-line errors for bad flags."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lm.checkpoint import save_model
from lm.draft_head import DraftHead, DraftHeadConfig, save_head
from lm.training import bpe, corpus
from lm.training.distill import DistillConfig, load_target
from lm.training.evaluate import (
    acceptance_rates,
    chain_matches,
    draft_tree_matches,
    generate,
    head_chain_matches,
    head_prompt_state,
    head_tree_matches,
)
from lm.training.head_distill import HeadShape, distill_head, head_loss, init_from_target
from lm.training.train import TrainConfig
from orchestrator.cli import main
from tests.lm.test_train import make_corpus
from tests.tiny import tiny_model

VOCAB = 300
SHAPE = HeadShape(state_size=16, n_blocks=1, lookahead=3, start_stride=2)
RUN = TrainConfig(steps=24, batch_size=4, context=32, lr=1e-2, warmup_steps=2, checkpoint_every=6)
POOL = DistillConfig(pool_size=6, prompt_len=8, generate_batch=6)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, target): a peaked random tiny target with a BPE tokenizer of the corpus."""
    root = tmp_path_factory.mktemp("head")
    corpus_dir = make_corpus(root / "corpus")
    target = root / "target"
    split = corpus.discover(corpus_dir, heldout_fraction=0.25)
    tokenizer = bpe.train_bpe(corpus.read_texts(split.paths("train")), VOCAB)
    bpe.save_tokenizer(tokenizer, target, max_length=64)
    save_model(tiny_model(0, vocab=VOCAB, dim=32, sharpen=2.0), target)
    return corpus_dir, target


def _split(corpus_dir: Path) -> corpus.CorpusSplit:
    return corpus.discover(corpus_dir, heldout_fraction=0.25)


def test_head_loss_is_the_mean_kl_over_starts_and_lookahead_steps():
    target = tiny_model(1, vocab=40, dim=32, sharpen=2.0)
    torch.manual_seed(0)
    head = DraftHead(DraftHeadConfig(vocab_size=40, hidden_size=32, state_size=8))
    for p in head.parameters():
        torch.nn.init.normal_(p, 0, 0.3)
    batch = torch.randint(0, 40, (2, 9))
    logits, hidden = target(batch, return_hidden=True)
    terms = []
    for b in range(2):
        for p in range(b % 2, 9 - 3, 2):  # starts of stride 2, offset by the row
            q = head(hidden[b, p][None], batch[b, p + 1 : p + 4][None])[0].log_softmax(-1)
            for k in range(3):
                target_p = logits[b, p + 1 + k].softmax(-1)
                terms.append((target_p * (target_p.log() - q[k])).sum())
    # Starts 0, 2, 4 (row 0) and 1, 3, 5 (row 1): p = 5 reads tokens 6..8, the last ones.
    assert len(terms) == 2 * 3 * 3
    expected = torch.stack(terms).mean()
    torch.testing.assert_close(head_loss(head, target, batch, 3, 2), expected)


def test_a_head_initialised_from_the_target_starts_with_its_logits():
    target = tiny_model(2, vocab=40, dim=32)
    head = DraftHead(DraftHeadConfig(vocab_size=40, hidden_size=32, state_size=8, n_blocks=2))
    init_from_target(head, target)
    batch = torch.randint(0, 40, (1, 6))
    logits, hidden = target(batch, return_hidden=True)
    # Whatever tokens follow, a fresh head reads h through and applies the target's output.
    head_logits = head(hidden[0, :4], batch[0, 1:5, None])[:, 0]
    torch.testing.assert_close(head_logits, logits[0, :4])
    assert torch.equal(head.embedding.weight, target.tok_embeddings.weight)
    assert not head.embedding.weight.requires_grad


class _Stop(Exception):
    pass


def test_distill_head_lowers_the_kl_and_resumes_exactly(target_dir, tmp_path):
    corpus_dir, target = target_dir
    split = _split(corpus_dir)
    cpu = torch.device("cpu")
    summary = distill_head(target, split, tmp_path / "a", SHAPE, RUN, POOL, device=cpu)
    losses = torch.load(tmp_path / "a/checkpoint/state.pt", weights_only=True)["losses"]
    assert len(losses) == RUN.steps
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4
    assert summary["trained_parameters"] == summary["parameters"] - VOCAB * 32
    assert len(summary["head_chain_tau"]) == SHAPE.lookahead

    def stop_at_10(progress):  # the last checkpoint is step 6: steps 7..10 are redone
        if progress.step == 10:
            raise _Stop

    with pytest.raises(_Stop):
        distill_head(
            target, split, tmp_path / "b", SHAPE, RUN, POOL, device=cpu, progress=stop_at_10
        )
    distill_head(target, split, tmp_path / "b", SHAPE, RUN, POOL, device=cpu)
    resumed = torch.load(tmp_path / "b/checkpoint/state.pt", weights_only=True)
    assert resumed["losses"] == losses
    for name in ("head.safetensors", "head_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_head_acceptance_on_a_known_case(target_dir):
    """A head whose lm_head is the target's and whose state is ignored proposes, after any
    token, the target's argmax at p: token j then matches g_{j+1} only where g repeats."""
    _, target_path = target_dir
    target, _ = load_target(target_path, torch.device("cpu"))
    head = DraftHead(DraftHeadConfig(VOCAB, 32, 4, n_blocks=0))
    init_from_target(head, target)
    prompts = torch.randint(3, VOCAB, (5, 10), generator=torch.Generator().manual_seed(0))
    hidden, continuation = head_prompt_state(target, prompts, 4)
    assert torch.equal(continuation[:, 0], target(prompts)[:, -1].argmax(-1))
    expected = continuation[:, 1:] == continuation[:, :1]
    assert torch.equal(head_chain_matches(head, hidden, continuation), expected)
    # The tree of one beam is that chain, accepted up to its first mismatch.
    tree = head_tree_matches(head, hidden, continuation, width=1)
    assert torch.equal(tree, expected.long().cumprod(1).bool())
    wide = head_tree_matches(head, hidden, continuation, width=3)
    assert (wide.sum(1) >= tree.sum(1)).all()
    assert acceptance_rates(wide)[0] >= acceptance_rates(tree)[0]


def test_slm_tree_of_one_beam_is_its_greedy_chain():
    target, draft = tiny_model(3, sharpen=2.0), tiny_model(4, sharpen=2.0)
    prompts = torch.randint(0, 64, (6, 5), generator=torch.Generator().manual_seed(1))
    continuation = generate(target, prompts, 4)
    chain = chain_matches(target, draft, prompts, 4)
    narrow = draft_tree_matches(draft, prompts, continuation, width=1)
    assert torch.equal(narrow, chain.long().cumprod(1).bool())
    wide = draft_tree_matches(draft, prompts, continuation, width=4)
    assert (wide.sum(1) >= narrow.sum(1)).all()
    # A draft that is the target accepts everything.
    assert draft_tree_matches(target, prompts, continuation, width=3).all()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("edgecloud: error: ")
    return err[0]


def _distill_argv(corpus_dir: Path, target: Path, out: Path) -> list[str]:
    return [
        "distill", "--head", "--target", str(target), "--out", str(out), "--corpus",
        str(corpus_dir), "--heldout-fraction", "0.25", "--context", "32", "--batch", "4",
        "--steps", "4", "--warmup", "1", "--log-every", "2", "--pool-size", "4",
        "--prompt-len", "8", "--state-size", "8", "--blocks", "1", "--lookahead", "3",
    ]  # fmt: skip


def test_cli_distill_head_then_eval_head(target_dir, tmp_path, capsys):
    corpus_dir, target = target_dir
    out = tmp_path / "head"
    assert main([*_distill_argv(corpus_dir, target, out), "--save-dtype", "float16"]) == 0
    assert "head with" in capsys.readouterr().out
    config = json.loads((out / "head_config.json").read_text())
    assert config == {"vocab_size": VOCAB, "hidden_size": 32, "state_size": 8, "n_blocks": 1}
    argv = ["eval", "--model", str(target), "--draft", str(target), "--head", str(out)]
    argv += ["--corpus", str(corpus_dir), "--heldout-fraction", "0.25", "--context", "32"]
    argv += ["--chains", "8", "--prompt-len", "8", "--max-len", "3", "--depth", "3", "--json"]
    argv += ["--windows", "4"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    for key in ("head_lookahead_agreement", "head_chain_acceptance", "head_tree_tau"):
        assert len(report[key]) == 3, key
    assert report["chain_acceptance"] == [1.0, 1.0, 1.0]  # the target drafting for itself


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--state-size", "0", "--state-size: must be >= 1, got 0"),
        ("--blocks", "-1", "--blocks: must be >= 0, got -1"),
        ("--lookahead", "0", "--lookahead: must be >= 1, got 0"),
        ("--start-stride", "0", "--start-stride: must be >= 1, got 0"),
        ("--lookahead", "31", "lookahead: lookahead 31 + start_stride 4 must be <= context 32"),
    ],
)
def test_cli_distill_head_bad_flags_give_one_line(
    target_dir, tmp_path, capsys, flag, value, message
):
    corpus_dir, target = target_dir
    assert main([*_distill_argv(corpus_dir, target, tmp_path / "h"), flag, value]) == 2
    assert _error_line(capsys) == f"edgecloud: error: {message}"


def test_cli_eval_rejects_a_head_for_another_target(target_dir, tmp_path, capsys):
    corpus_dir, target = target_dir
    save_head(DraftHead(DraftHeadConfig(VOCAB + 1, 32, 4)), tmp_path / "other")
    argv = ["eval", "--model", str(target), "--head", str(tmp_path / "other")]
    assert main([*argv, "--corpus", str(corpus_dir), "--heldout-fraction", "0.25"]) == 2
    line = _error_line(capsys)
    assert f"{tmp_path / 'other' / 'head_config.json'}: vocab_size {VOCAB + 1}" in line
    argv[4] = str(tmp_path / "missing")
    assert main([*argv, "--corpus", str(corpus_dir), "--heldout-fraction", "0.25"]) == 2
    assert "head_config.json: missing" in _error_line(capsys)
