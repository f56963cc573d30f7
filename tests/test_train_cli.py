"""`edgecloud train / distill / eval` through the real CLI entry point: a tiny happy path, and one
clear line (naming the path or field, exit code 2) for each kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.cli import main
from tests.lm.test_train import make_corpus

TINY = ["--dim", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--hidden", "64"]
TINY_RUN = ["--context", "32", "--batch", "4", "--warmup", "2", "--log-every", "5"]
TINY_RUN += ["--heldout-fraction", "0.25"]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("edgecloud: error: ")
    return err[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(corpus, model) of a 20-step CLI training run on a copy of a few stdlib modules."""
    root = tmp_path_factory.mktemp("cli")
    corpus_dir = make_corpus(root / "corpus")
    model_dir = root / "model"
    argv = ["train", "--corpus", str(corpus_dir), "--out", str(model_dir), "--vocab-size", "300"]
    assert main([*argv, *TINY, *TINY_RUN, "--steps", "20", "--lr", "3e-3"]) == 0
    return corpus_dir, model_dir


def test_train_reports_progress_and_saves_an_hf_directory(trained, capsys):
    _, model_dir = trained
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).is_file()
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["hidden_act"], config["vocab_size"], config["hidden_size"]) == ("relu", 300, 32)


def test_train_progress_lines_and_resume(tmp_path, capsys):
    corpus_dir = make_corpus(tmp_path / "corpus")
    argv = ["train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "m"), "--vocab-size"]
    argv += ["300", *TINY, *TINY_RUN, "--checkpoint-every", "5"]
    assert main([*argv, "--steps", "10"]) == 0
    captured = capsys.readouterr()
    progress = captured.err.strip().splitlines()
    assert [line.split()[1] for line in progress] == ["5/10", "10/10"]
    assert all(" tok/s " in line and " eta " in line and " loss " in line for line in progress)
    assert "saved" in captured.out
    # Asking for more steps continues from step 10 rather than starting over.
    assert main([*argv, "--steps", "15"]) == 0
    assert [line.split()[1] for line in capsys.readouterr().err.strip().splitlines()] == ["15/15"]


def test_eval_of_a_model_against_itself_accepts_every_token(trained, capsys):
    corpus_dir, model_dir = trained
    argv = ["eval", "--model", str(model_dir), "--draft", str(model_dir), "--corpus"]
    argv += [str(corpus_dir), "--heldout-fraction", "0.25", "--chains", "8", "--prompt-len", "8"]
    argv += ["--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["greedy_agreement"] == 1.0
    assert report["chain_acceptance"] == [1.0] * 8
    assert report["expected_tau"] == [float(n) for n in range(2, 10)]
    assert report["target_perplexity"] == pytest.approx(report["draft_perplexity"])
    assert report["target_decode_tokens_per_s"] > 0


def test_missing_corpus_is_one_line(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    assert main(["train", "--corpus", str(missing), "--out", str(tmp_path / "m")]) == 2
    assert f"corpus: {missing} does not exist" in _error_line(capsys)


def test_empty_corpus_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not python\n")
    assert main(["train", "--corpus", str(tmp_path / "empty"), "--out", str(tmp_path / "m")]) == 2
    assert f"no files matching '*.py' under {tmp_path / 'empty'}" in _error_line(capsys)


def test_target_without_tokenizer_is_one_line(trained, tmp_path, capsys):
    corpus_dir, model_dir = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    argv = ["distill", "--target", str(bare), "--out", str(tmp_path / "d"), "--corpus"]
    assert main([*argv, str(corpus_dir), *TINY_RUN, "--steps", "1"]) == 2
    assert f"{bare / 'tokenizer.json'}: missing" in _error_line(capsys)


def test_target_tokenizer_without_bos_or_eos_is_one_line(trained, tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    corpus_dir, model_dir = trained
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((model_dir / name).read_bytes())
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 ids, no special token
    inner = Tokenizer(models.BPE({symbol: i for i, symbol in enumerate(alphabet)}, []))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.save(str(bare / "tokenizer.json"))
    argv = ["eval", "--model", str(bare), "--corpus", str(corpus_dir), "--heldout-fraction"]
    assert main([*argv, "0.25"]) == 2
    assert f"{bare}: the tokenizer has no bos or eos token" in _error_line(capsys)


def test_draft_with_another_vocabulary_is_one_line(trained, tmp_path, capsys):
    corpus_dir, model_dir = trained
    other = tmp_path / "other"
    argv = ["train", "--corpus", str(corpus_dir), "--out", str(other), "--vocab-size", "280"]
    assert main([*argv, *TINY, *TINY_RUN, "--steps", "1"]) == 0
    capsys.readouterr()
    argv = ["eval", "--model", str(model_dir), "--draft", str(other), "--corpus", str(corpus_dir)]
    assert main([*argv, "--heldout-fraction", "0.25"]) == 2
    line = _error_line(capsys)
    assert f"{other / 'config.json'}: vocab_size 280 differs from the target's 300" in line


def test_bad_flag_value_is_one_line(tmp_path, capsys):
    corpus_dir = make_corpus(tmp_path / "corpus")
    argv = ["train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "m"), "--steps", "0"]
    assert main(argv) == 2
    assert "steps: must be >= 1, got 0" in _error_line(capsys)
