"""Broken or unsupported checkpoints raise CheckpointError naming the file and the problem."""

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lm.checkpoint import load_model
from lm.errors import CheckpointError


@pytest.fixture
def model_dir(hf_model_dir, tmp_path) -> Path:
    """A private, writable copy of a good tiny Llama checkpoint."""
    directory = tmp_path / "model"
    shutil.copytree(hf_model_dir("llama_gqa_untied"), directory)
    return directory


def edit_tensors(directory: Path, edit) -> None:
    file = directory / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(directory: Path, **changes) -> None:
    file = directory / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def expect_error(path: Path, *fragments: str) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(path, device="cpu")
    message = str(info.value)
    for fragment in fragments:
        assert re.search(fragment, message), f"{fragment!r} not in {message!r}"
    return message


def test_good_copy_loads(model_dir):
    assert load_model(model_dir, device="cpu").config.n_layers == 2


@pytest.mark.parametrize("keep", [0.5, 0.999, 20])
def test_truncated_safetensors(model_dir, keep):
    file = model_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: int(len(data) * keep) if keep < 1 else keep])
    expect_error(model_dir, re.escape(str(file)), "cannot read safetensors")


def test_missing_tensor(model_dir):
    edit_tensors(model_dir, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    expect_error(model_dir, r"model\.safetensors: missing tensor model\.layers\.0\.mlp\.up_proj")


def test_wrong_shape(model_dir):
    name = "model.layers.1.self_attn.k_proj.weight"
    edit_tensors(model_dir, lambda t: t.update({name: t[name][:8].clone()}))
    expect_error(
        model_dir,
        r"model\.safetensors: tensor model\.layers\.1\.self_attn\.k_proj\.weight",
        r"shape \(8, 48\), expected \(24, 48\)",
    )


def test_unexpected_tensor(model_dir):
    edit_tensors(model_dir, lambda t: t.update(extra=t["model.norm.weight"].clone()))
    expect_error(model_dir, r"model\.safetensors: unexpected tensor extra")


def test_unknown_architecture(model_dir):
    edit_config(model_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    expect_error(model_dir, r"config\.json", "GPT2LMHeadModel", "LlamaForCausalLM")


def test_vocabulary_mismatch(model_dir):
    edit_config(model_dir, vocab_size=200)  # the tensors have 211 rows
    expect_error(
        model_dir,
        r"model\.safetensors: vocabulary mismatch",
        r"model\.embed_tokens\.weight has 211 rows",
        "vocab_size is 200",
    )


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_type 'llama3'"),
        ({"head_dim": 15}, "head_dim: must be even"),
        ({"hidden_act": "gelu"}, "activation: must be one of"),
        ({"attention_bias": True}, "attention_bias"),
    ],
)
def test_unsupported_config(model_dir, changes, fragment):
    edit_config(model_dir, rope_parameters=None, **changes)
    expect_error(model_dir, r"config\.json", fragment)


def test_missing_files(model_dir, tmp_path):
    (model_dir / "model.safetensors").unlink()
    expect_error(model_dir, "no model.safetensors")
    (model_dir / "config.json").unlink()
    (model_dir / "tokenizer.json").write_text("{}")
    expect_error(model_dir, r"config\.json: missing")
    expect_error(tmp_path / "nowhere", "nowhere: no such file")
    expect_error(model_dir / "tokenizer.json", "expected a Hugging Face model directory")


def test_sharded_index_with_missing_shard(model_dir):
    index = {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    expect_error(model_dir, r"model\.safetensors\.index\.json: shard model-00002.* is missing")


def test_llama2c_size_mismatch(stories260k, tmp_path):
    path = tmp_path / "stories.bin"
    path.write_bytes(stories260k.read_bytes()[:-100])
    expect_error(path, re.escape(str(path)), "1056440 bytes", "implies 1056540")


def test_llama2c_bad_header(tmp_path):
    path = tmp_path / "zero.bin"
    path.write_bytes(bytes(28))
    expect_error(path, re.escape(str(path)), "invalid llama2.c header")
    path.write_bytes(struct.pack("<I", 0x616B3432) + bytes(60))  # export.py's version magic
    expect_error(path, "version >= 1")
