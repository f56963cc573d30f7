"""`edgecloud flash pack|calibrate|info` and `edge serve --flash-budget-mb`, in process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer

from lm.checkpoint import save_model
from lm.config import ModelConfig
from lm.model import Transformer
from lm.training.bpe import train_bpe
from orchestrator.cli import main

LM_DIR = Path(__file__).resolve().parents[2] / "lm"


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    for path in sorted(LM_DIR.glob("*.py"))[:12]:
        shutil.copy(path, corpus / path.name)
    return corpus


@pytest.fixture(scope="module")
def model_dir(corpus_dir, tmp_path_factory) -> Path:
    """A tiny ReLU model with a real BPE tokenizer trained on the corpus."""
    out = tmp_path_factory.mktemp("cli_model")
    texts = [p.read_text() for p in corpus_dir.glob("*.py")]
    tokenizer: HFTokenizer = train_bpe(texts, 300)
    tokenizer.save(str(out / "tokenizer.json"))
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=tokenizer.get_vocab_size(),
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=128,
        activation="relu",
        max_seq_len=256,
    )
    save_model(Transformer(config), out)
    return out


def test_pack_info_calibrate(model_dir, corpus_dir, tmp_path, capsys):
    pack = tmp_path / "pack"
    assert main(["flash", "pack", str(model_dir), str(pack), "--quantize", "int4"]) == 2
    assert "--group-size: 64 must divide the model's dim (32)" in capsys.readouterr().err
    assert main(["flash", "pack", str(model_dir), str(pack), "--quantize", "int8"]) == 0
    # int8 defaults to one scale per row: 32 codes + float32 scale and bias per segment.
    assert "120-byte bundles at stride 128 (int8)" in capsys.readouterr().out
    assert (pack / "tokenizer.json").is_file()
    assert main(["flash", "info", str(pack)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["storage"] == "int8" and not info["predictor"]
    assert info["minimum_budget_bytes"] > info["resident_bytes"]
    assert main(["flash", "info", str(pack), "--dtype", "float16"]) == 0
    half = json.loads(capsys.readouterr().out)
    assert half["resident_bytes"] * 2 == info["resident_bytes"]
    assert half["minimum_budget_bytes"] == info["minimum_budget_bytes"] - half["resident_bytes"]
    args = ["flash", "calibrate", str(pack), "--corpus", str(corpus_dir), "--heldout-fraction"]
    args += ["0.3", "--tokens", "2048", "--heldout-tokens", "512", "--context", "128"]
    args += ["--rank", "8", "--steps", "20", "--batch", "256", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["layers"]) == 2 and report["heldout_tokens"] == 512
    assert {"recall", "false_positive_rate"} <= report["layers"][0].keys()
    assert (pack / "predictor.json").is_file()


def test_bad_inputs_are_one_line_naming_the_flag_or_file(model_dir, tmp_path, capsys):
    assert main(["flash", "pack", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "MODEL_DIR" in capsys.readouterr().err
    out = tmp_path / "out"
    args = ["flash", "pack", str(model_dir), str(out), "--quantize", "int4", "--group-size", "7"]
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("edgecloud: error: --group-size")
    assert main(["flash", "info", str(model_dir)]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err
    assert main(["flash", "calibrate", str(model_dir), "--tokens", "256", "--context", "64"]) == 2
    assert "manifest.json: missing" in capsys.readouterr().err
    assert main(["flash", "calibrate", str(tmp_path), "--context", "99999"]) == 2
    assert "--context" in capsys.readouterr().err


def test_edge_serve_refuses_a_budget_below_the_minimum(model_dir, tmp_path, capsys):
    pack = tmp_path / "pack"
    assert main(["flash", "pack", str(model_dir), str(pack)]) == 0
    capsys.readouterr()
    serve = ["edge", "serve", "--model", str(pack), "--insecure-no-auth"]
    assert main([*serve, "--flash-budget-mb", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "--flash-budget-mb: budget: 10,485 bytes" in err and "below the minimum" in err
    assert main([*serve, "--flash-budget-mb", "0"]) == 2
    assert "--flash-budget-mb: must be > 0" in capsys.readouterr().err
