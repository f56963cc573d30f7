"""The sparsity predictors of a pack: predictor.safetensors plus predictor.json.

`edgecloud flash calibrate` writes them; the flash model loads them. predictor.json names
the ffn.bin they were trained for (its sha256), so a predictor copied next to another
pack is refused rather than silently predicting the wrong neurons.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from edge_node.flash.pack import FlashManifest, file_sha256
from lm.errors import CheckpointError
from lm.sparsity import LowRankPredictor

PREDICTOR_FILE = "predictor.safetensors"
PREDICTOR_META = "predictor.json"
FORMAT = "edgecloud-flash-predictor"


@dataclass(frozen=True)
class PredictorSet:
    predictors: tuple[LowRankPredictor, ...]  # one per layer
    meta: dict[str, Any]  # predictor.json: rank, thresholds, the calibration report


def save_predictors(
    pack_dir: str | Path,
    manifest: FlashManifest,
    predictors: list[LowRankPredictor],
    meta: dict[str, Any],
) -> None:
    pack_dir = Path(pack_dir)
    tensors = {
        f"layers.{i}.{name}": t.detach().cpu().contiguous()
        for i, p in enumerate(predictors)
        for name, t in p.state_dict().items()
    }
    save_file(tensors, str(pack_dir / PREDICTOR_FILE), metadata={"format": FORMAT})
    record = {
        "format": FORMAT,
        "version": 1,
        "ffn_sha256": manifest.ffn.sha256,
        "sha256": file_sha256(pack_dir / PREDICTOR_FILE),
        "rank": predictors[0].down.out_features,
        **meta,
    }
    (pack_dir / PREDICTOR_META).write_text(json.dumps(record, indent=2) + "\n")


def has_predictors(pack_dir: str | Path) -> bool:
    return (Path(pack_dir) / PREDICTOR_META).is_file()


def load_predictors(
    pack_dir: str | Path,
    manifest: FlashManifest,
    device: torch.device,
    dtype: torch.dtype,
) -> PredictorSet:
    """The pack's predictors, checked against its ffn.bin, checksum and shapes."""
    pack_dir = Path(pack_dir)
    meta_path, path = pack_dir / PREDICTOR_META, pack_dir / PREDICTOR_FILE
    try:
        meta = json.loads(meta_path.read_text())
        rank = int(meta["rank"])
        trained_for, digest = meta["ffn_sha256"], meta["sha256"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{meta_path}: unreadable predictor record ({e!r})") from e
    if trained_for != manifest.ffn.sha256:
        raise CheckpointError(
            f"{meta_path}: trained for another model (ffn sha256 {trained_for[:12]}..., this "
            f"pack's is {manifest.ffn.sha256[:12]}...); run edgecloud flash calibrate again"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (named by {PREDICTOR_META})")
    if file_sha256(path) != digest:
        raise CheckpointError(f"{path}: checksum mismatch with {PREDICTOR_META}: corrupt file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
    config = manifest.config
    predictors = []
    for i in range(config.n_layers):
        with torch.device("meta"):
            predictor = LowRankPredictor(config.dim, config.hidden_dim, rank)
        state = {}
        for name, want in predictor.state_dict().items():
            key = f"layers.{i}.{name}"
            if key not in tensors:
                raise CheckpointError(f"{path}: missing tensor {key}")
            if tensors[key].shape != want.shape:
                raise CheckpointError(
                    f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, this model "
                    f"needs {tuple(want.shape)}"
                )
            state[name] = tensors[key].to(device=device, dtype=dtype)
        predictor.load_state_dict(state, assign=True)
        predictors.append(predictor.eval().requires_grad_(False))
    return PredictorSet(tuple(predictors), meta)
