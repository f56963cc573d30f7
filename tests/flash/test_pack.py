"""The flash layout: bundles where the manifest says, and bad packs refused by file name."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from edge_node.flash.bundle import BundleFormat, bundle_stride
from edge_node.flash.ffn import load_flash_model
from edge_node.flash.pack import (
    DRAM_FILE,
    FFN_FILE,
    MANIFEST_FILE,
    load_dense,
    pack_model,
    read_manifest,
)
from edge_node.flash.predictors import PREDICTOR_FILE, PREDICTOR_META
from lm.errors import CheckpointError
from lm.quantize import QuantSpec
from tests.flash.conftest import OPTIONS, random_windows


def test_stride_examples_from_the_docstring():
    assert [bundle_stride(p, 4096) for p in (3072, 1536, 12288, 13000)] == [
        4096,
        2048,
        12288,
        16384,
    ]


def test_bundles_hold_gate_row_up_row_down_column(relu_model, relu_pack):
    manifest = read_manifest(relu_pack)
    assert manifest.payload == 3 * 64 * 4 and manifest.stride == 1024
    assert all(offset % 4096 == 0 for offset in manifest.layer_offsets)
    data = np.fromfile(relu_pack / FFN_FILE, dtype=np.uint8)
    assert len(data) % 4096 == 0
    layer, neuron = 2, 77
    start = manifest.offset(layer, neuron)
    bundle = torch.from_numpy(data[start : start + manifest.payload].copy()).view(torch.float32)
    ffn = relu_model.layers[layer].feed_forward
    assert torch.equal(bundle[:64], ffn.gate.weight[neuron])
    assert torch.equal(bundle[64:128], ffn.up.weight[neuron])
    assert torch.equal(bundle[128:], ffn.down.weight[:, neuron])
    raw = json.loads((relu_pack / MANIFEST_FILE).read_text())
    segments = raw["ffn"]["segments"]
    assert [(s["name"], s["offset"], s["bytes"]) for s in segments] == [
        ("gate", 0, 256),
        ("up", 256, 256),
        ("down", 512, 256),
    ]
    assert raw["ffn"]["layer_offsets"] == list(manifest.layer_offsets)


def test_dense_reference_from_the_pack_is_the_model(relu_model, relu_pack):
    ids = random_windows(3, 2, 16)
    assert torch.equal(load_dense(relu_pack, device="cpu")(ids), relu_model(ids))


def test_quantized_bundles_decode_to_the_dequantized_weights(relu_model, relu_dir, tmp_path):
    spec = QuantSpec(bits=4, group_size=32)
    manifest = pack_model(relu_dir, tmp_path, quant=spec)
    assert manifest.payload == 3 * (32 + 2 * 2)  # per segment: 64 nibbles + two fp16 scales
    assert json.loads((tmp_path / MANIFEST_FILE).read_text())["quantization"] == {
        "bits": 4,
        "group_size": 32,
        "layout": "codes, then a float16 scale per group",
    }
    dense = load_dense(tmp_path, device="cpu")
    ffn, got = relu_model.layers[0].feed_forward, dense.layers[0].feed_forward
    error = (got.down.weight - ffn.down.weight).abs().max()
    assert 0 < error <= ffn.down.weight.abs().max() / 7 / 2 * 1.01


def test_format_decodes_what_it_encodes():
    fmt = BundleFormat(dim=8, dtype=torch.bfloat16)
    gate, up, down = torch.randn(5, 8), torch.randn(5, 8), torch.randn(8, 5)
    rows = fmt.encode(gate, up, down)
    assert rows.shape == (5, 48) and rows.dtype == torch.uint8
    decoded = fmt.decode(rows, torch.float32)
    assert torch.equal(decoded[:, 2], down.t().bfloat16().float())


def _copy(pack, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(pack, target)
    return target


def test_corrupt_ffn_file_is_refused_naming_it(relu_pack, tmp_path):
    pack = _copy(relu_pack, tmp_path)
    with (pack / FFN_FILE).open("r+b") as f:
        f.seek(5000)
        f.write(b"\x00\x01\x02")
    with pytest.raises(CheckpointError, match=rf"{FFN_FILE}: checksum mismatch"):
        load_flash_model(pack, 1 << 30, device="cpu", options=OPTIONS)


def test_truncated_file_is_refused_naming_it(relu_pack, tmp_path):
    pack = _copy(relu_pack, tmp_path)
    with (pack / FFN_FILE).open("r+b") as f:
        f.truncate(4096)
    with pytest.raises(CheckpointError, match=rf"{FFN_FILE}: 4096 bytes, {MANIFEST_FILE} says"):
        read_manifest(pack)


def test_manifest_that_disagrees_with_the_weights_is_refused(relu_pack, tmp_path):
    pack = _copy(relu_pack, tmp_path)
    raw = json.loads((pack / MANIFEST_FILE).read_text())
    raw["config"]["vocab_size"] = 128  # the embedding in dram.safetensors has 96 rows
    (pack / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=rf"{DRAM_FILE}: tensor .* has shape"):
        load_flash_model(pack, 1 << 30, device="cpu", options=OPTIONS, verify=False)
    raw["config"]["vocab_size"] = 96
    raw["ffn"]["bundle_bytes"] = 100
    (pack / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=rf"{MANIFEST_FILE}: ffn.bundle_bytes"):
        read_manifest(pack)


def test_not_a_pack_is_refused(relu_dir):
    with pytest.raises(CheckpointError, match=rf"{MANIFEST_FILE}: missing; is .* a flash pack"):
        load_flash_model(relu_dir, 1 << 30)


def test_predictor_of_another_model_is_refused(predicted_pack, relu_pack, tmp_path):
    pack = _copy(relu_pack, tmp_path)
    for name in (PREDICTOR_FILE, PREDICTOR_META):
        shutil.copy(predicted_pack / name, pack / name)
    raw = json.loads((pack / MANIFEST_FILE).read_text())
    raw["ffn"]["sha256"] = "0" * 64  # as if ffn.bin came from another model
    (pack / MANIFEST_FILE).write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=rf"{PREDICTOR_META}: trained for another model"):
        load_flash_model(pack, 1 << 30, device="cpu", options=OPTIONS, verify=False)
