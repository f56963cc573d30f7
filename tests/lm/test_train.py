"""`edgecloud train`'s pieces: corpus split and packing, BPE, the LR schedule, the training loop
with checkpoint/resume, and a tiny end-to-end run whose output transformers loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lm.checkpoint import load_model
from lm.config import ModelConfig
from lm.model import Transformer
from lm.training import bpe, corpus
from lm.training.train import (
    ModelShape,
    TrainConfig,
    batch_generator,
    cosine_lr,
    format_seconds,
    init_weights,
    next_token_loss,
    run_training,
    train_language_model,
)

# Small, stable stdlib modules: enough text (~60 KB) for a tokenizer and a few training steps.
TINY_CORPUS_FILES = (
    "json/__init__.py",
    "json/decoder.py",
    "json/encoder.py",
    "json/scanner.py",
    "json/tool.py",
    "textwrap.py",
    "copy.py",
    "bisect.py",
    "heapq.py",
    "colorsys.py",
)
TINY_SHAPE = ModelShape(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64)


def make_corpus(directory: Path) -> Path:
    """Copy TINY_CORPUS_FILES (keeping their package folders) under `directory`."""
    for rel in TINY_CORPUS_FILES:
        target = directory / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus.stdlib_root() / rel, target)
    return directory


def train_tiny(corpus_dir: Path, out_dir: Path, steps: int = 40, **overrides) -> dict:
    """A seconds-long `edgecloud train` run on `corpus_dir` (a quarter of the files held out)."""
    split = corpus.discover(corpus_dir, heldout_fraction=0.25)
    fields = dict(steps=steps, batch_size=8, context=32, lr=3e-3, warmup_steps=5)
    fields.update(overrides)
    return train_language_model(
        split,
        out_dir,
        TINY_SHAPE,
        TrainConfig(**fields),
        vocab_size=320,
        device=torch.device("cpu"),
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("train")
    corpus_dir = make_corpus(root / "corpus")
    summary = train_tiny(corpus_dir, root / "model")
    return corpus_dir, root / "model", summary


# --- corpus -------------------------------------------------------------------------------


def test_pack_frames_documents_as_in_docstring():
    assert corpus.pack([[5, 6], [7]], bos_id=1, eos_id=2).tolist() == [1, 5, 6, 2, 1, 7, 2]


def test_sequential_windows_drop_the_tail_as_in_docstring():
    windows = corpus.sequential_windows(torch.arange(10), 4)
    assert windows.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_split_is_a_pure_function_of_the_relative_path(tmp_path):
    corpus_dir = make_corpus(tmp_path / "a")
    split = corpus.discover(corpus_dir, heldout_fraction=0.25)
    assert set(split.train) | set(split.heldout) == set(TINY_CORPUS_FILES)
    assert not set(split.train) & set(split.heldout)
    for rel in split.heldout:
        assert corpus.heldout_score(rel) < 0.25
    # Another root, another file added: the files both corpora have stay on the same side.
    other = make_corpus(tmp_path / "b")
    (other / "extra.py").write_text("x = 1\n")
    again = corpus.discover(other, heldout_fraction=0.25)
    assert set(again.heldout) - {"extra.py"} == set(split.heldout)
    assert (
        corpus.heldout_digest(again) == corpus.heldout_digest(split) or "extra.py" in again.heldout
    )


def test_discover_skips_tests_and_site_packages_unless_asked(tmp_path):
    for rel in ("pkg/mod.py", "test/test_mod.py", "pkg/tests/t.py", "site-packages/x/y.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("pass\n")
    split = corpus.discover(tmp_path, heldout_fraction=0.0)
    assert split.train == ("pkg/mod.py",)
    with_tests = corpus.discover(tmp_path, heldout_fraction=0.0, include_tests=True)
    assert with_tests.train == ("pkg/mod.py", "pkg/tests/t.py", "test/test_mod.py")


def test_default_corpus_is_the_stdlib_and_holds_out_about_five_percent():
    split = corpus.discover()
    total = len(split.train) + len(split.heldout)
    assert split.root == corpus.stdlib_root()
    assert "json/decoder.py" in split.train + split.heldout
    assert not any("site-packages" in p or p.startswith("test/") for p in split.train)
    assert 0.02 < len(split.heldout) / total < 0.08


def test_missing_and_empty_corpora_name_the_path(tmp_path):
    with pytest.raises(corpus.CorpusError, match=str(tmp_path / "nope")):
        corpus.discover(tmp_path / "nope")
    with pytest.raises(corpus.CorpusError, match=rf"no files matching '\*\.py' under {tmp_path}"):
        corpus.discover(tmp_path)
    (tmp_path / "blank.py").write_text("\n\n")
    with pytest.raises(corpus.CorpusError, match="no text in 1 file"):
        corpus.read_texts(corpus.discover(tmp_path, heldout_fraction=0.0).paths("train"))


# --- tokenizer ----------------------------------------------------------------------------


def test_bpe_round_trips_any_text_and_fixes_special_ids():
    text = (corpus.stdlib_root() / "textwrap.py").read_text()
    tokenizer = bpe.train_bpe([text], vocab_size=400)
    assert bpe.special_ids(tokenizer) == (0, 1, 2)
    assert tokenizer.get_vocab_size() == 400
    for sample in ("    def wrap(self, text):\n", "ünïcode ✓ \t\r\n", text[:500]):
        ids = tokenizer.encode(sample).ids
        assert tokenizer.decode(ids) == sample
    # Merges learned from code: a 4-space indent is one token, fewer tokens than bytes.
    assert len(tokenizer.encode(text).ids) < len(text.encode()) / 2


# --- schedule and loop --------------------------------------------------------------------


def test_cosine_lr_worked_example():
    config = TrainConfig(
        steps=111, batch_size=1, context=1, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1
    )
    assert cosine_lr(0, config) == pytest.approx(1e-4)
    assert cosine_lr(9, config) == pytest.approx(1e-3)
    assert cosine_lr(10, config) == pytest.approx(1e-3)
    assert cosine_lr(60, config) == pytest.approx(5.5e-4)
    assert cosine_lr(110, config) == pytest.approx(1e-4)
    assert format_seconds(3725.4) == "1:02:05"


def test_train_config_names_the_bad_field():
    with pytest.raises(ValueError, match="steps: must be >= 1, got 0"):
        TrainConfig(steps=0, batch_size=1, context=8)
    with pytest.raises(ValueError, match="lr: must be > 0"):
        TrainConfig(steps=1, batch_size=1, context=8, lr=0.0)


def _tiny_model(seed: int = 0) -> Transformer:
    config = ModelConfig(
        vocab_size=50, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, hidden_dim=32,
        activation="relu", tie_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Transformer(config)
    init_weights(model, config.n_layers)
    return model


def _random_batches(step: int) -> torch.Tensor:
    return torch.randint(0, 50, (4, 17), generator=batch_generator(7, step))


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """Kill a run during step 8 (last checkpoint after step 6), resume it with a freshly
    initialised model: the weights and losses equal those of an uninterrupted run."""
    config = TrainConfig(steps=12, batch_size=4, context=16, warmup_steps=2, checkpoint_every=3)
    whole = _tiny_model()
    whole_result = run_training(
        whole, next_token_loss, _random_batches, config, tmp_path / "a" / "state.pt"
    )

    def dies_at_step_7(step: int) -> torch.Tensor:
        if step == 7:
            raise KeyboardInterrupt
        return _random_batches(step)

    with pytest.raises(KeyboardInterrupt):
        run_training(_tiny_model(), next_token_loss, dies_at_step_7, config, tmp_path / "b.pt")
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 6
    resumed = _tiny_model(seed=123)  # everything must come from the checkpoint
    resumed_result = run_training(
        resumed, next_token_loss, _random_batches, config, tmp_path / "b.pt"
    )
    assert resumed_result.losses == pytest.approx(whole_result.losses, rel=1e-5)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=1e-6, rtol=0)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    config = TrainConfig(steps=2, batch_size=4, context=16, warmup_steps=1)
    run_training(_tiny_model(), next_token_loss, _random_batches, config, tmp_path / "state.pt")
    bigger = Transformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                                     hidden_dim=32))  # fmt: skip
    with pytest.raises(ValueError, match=r"state\.pt: saved model does not match"):
        run_training(bigger, next_token_loss, _random_batches, config, tmp_path / "state.pt")


# --- end to end ---------------------------------------------------------------------------


def test_tiny_train_lowers_loss_on_its_own_data(tiny_run):
    corpus_dir, model_dir, summary = tiny_run
    split = corpus.discover(corpus_dir, heldout_fraction=0.25)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode_batch(corpus.read_texts(split.paths("train")))
    stream = corpus.pack([e.ids for e in ids], *bpe.special_ids(tokenizer)[:2])
    windows = corpus.sequential_windows(stream, 33, limit=32)
    trained = load_model(model_dir, device="cpu")
    untrained = Transformer(trained.config)
    init_weights(untrained, trained.config.n_layers)
    with torch.no_grad():
        before = next_token_loss(untrained, windows).item()
        after = next_token_loss(trained, windows).item()
    assert after < before - 1.0
    assert summary["final_loss"] < summary["first_loss"]
    assert trained.config.activation == "relu"
    assert json.loads((model_dir / "training.json").read_text())["heldout_sha256"] == (
        corpus.heldout_digest(split)
    )


def test_saved_model_loads_in_transformers_to_the_same_logits(tiny_run):
    transformers = pytest.importorskip("transformers")
    _, model_dir, _ = tiny_run
    ours = load_model(model_dir, device="cpu", dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        model_dir, attn_implementation="eager", dtype=torch.float32
    ).eval()
    ids = torch.randint(
        0, ours.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        expected = theirs(ids).logits
        assert expected.std() > 0.3
        torch.testing.assert_close(ours(ids), expected, atol=1e-4, rtol=0)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = "def f(x):\n    return x\n"
    assert hf_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (0, 1)


def test_save_dtype_is_the_dtype_on_disk(tmp_path, tiny_run):
    corpus_dir, _, _ = tiny_run
    split = corpus.discover(corpus_dir, heldout_fraction=0.25)
    train_language_model(
        split,
        tmp_path / "half",
        TINY_SHAPE,
        TrainConfig(steps=2, batch_size=2, context=32, warmup_steps=1),
        vocab_size=320,
        device=torch.device("cpu"),
        save_dtype=torch.float16,
    )
    with safe_open(str(tmp_path / "half" / "model.safetensors"), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert json.loads((tmp_path / "half" / "config.json").read_text())["torch_dtype"] == "float16"
