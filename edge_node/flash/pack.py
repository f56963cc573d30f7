"""The flash layout of a model: what `edgecloud flash pack` writes and the store reads.

A pack directory holds:

    manifest.json      shapes, offsets, dtypes and a sha256 of each file below
    dram.safetensors   everything but the FFN (embeddings, attention, norms, classifier),
                       loaded into DRAM whole
    ffn.bin            every FFN neuron's bundle (edge_node.flash.bundle), layer-major and
                       neuron-minor: layer l's neuron i sits at layer_offsets[l] + i * stride.
                       Neighbouring neurons are neighbouring bytes, so reads of neighbours
                       merge; every layer starts on an `align` boundary and the file ends on
                       a page boundary, so O_DIRECT reads never run past its end.
    tokenizer*.json    copied from the model directory when present

Problems with a pack (a missing or corrupt file, shapes that disagree with the config)
raise CheckpointError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from edge_node.flash.bundle import BundleFormat, bundle_stride
from lm.checkpoint import load_model
from lm.config import ModelConfig
from lm.device import default_device, default_dtype
from lm.errors import CheckpointError
from lm.model import Transformer
from lm.quantize import QuantSpec

logger = logging.getLogger(__name__)

FORMAT = "edgecloud-flash"
VERSION = 2  # 2: int8 segments in fbgemm's byte-rowwise layout
MANIFEST_FILE = "manifest.json"
DRAM_FILE = "dram.safetensors"
FFN_FILE = "ffn.bin"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
PAGE = 4096  # O_DIRECT granularity: reads start and end on these boundaries
FFN_PREFIX = "feed_forward."
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class FileEntry:
    name: str  # relative to the pack directory
    nbytes: int
    sha256: str


@dataclass(frozen=True)
class FlashManifest:
    """What manifest.json says: the model, the bundle format and where each layer starts."""

    config: ModelConfig
    bundle: BundleFormat
    align: int  # layers start on multiples of this; bundles never straddle it
    stride: int  # bytes from one neuron's bundle to the next
    layer_offsets: tuple[int, ...]  # (n_layers,) byte offset of neuron 0 of each layer
    dram: FileEntry
    ffn: FileEntry
    tensors: dict[str, tuple[int, ...]]  # dram.safetensors name -> shape
    source: str  # the model directory packed, for the record

    @property
    def payload(self) -> int:
        return self.bundle.payload

    @property
    def ffn_layer_bytes(self) -> int:
        """Bytes of one layer's FFN weights as dense matrices in the storage format."""
        return self.config.hidden_dim * self.payload

    def offset(self, layer: int, neuron: int) -> int:
        return self.layer_offsets[layer] + neuron * self.stride

    def to_json(self) -> dict[str, Any]:
        quant = self.bundle.quant
        return {
            "format": FORMAT,
            "version": VERSION,
            "config": self.config.to_hf(),
            "dtype": _dtype_name(self.bundle.dtype),
            "quantization": None if quant is None else _quant_json(quant),
            "ffn": {
                "file": self.ffn.name,
                "bytes": self.ffn.nbytes,
                "sha256": self.ffn.sha256,
                "order": "layer-major, neuron-minor",
                "align": self.align,
                "bundle_bytes": self.payload,
                "stride": self.stride,
                "layer_offsets": list(self.layer_offsets),
                "segments": [
                    {
                        "name": s.name,
                        "offset": s.offset,
                        "bytes": s.nbytes,
                        "shape": [self.config.dim],
                        "dtype": _dtype_name(self.bundle.dtype) if quant is None else quant.name,
                    }
                    for s in self.bundle.segments
                ],
            },
            "dram": {
                "file": self.dram.name,
                "bytes": self.dram.nbytes,
                "sha256": self.dram.sha256,
                "tensors": {name: list(shape) for name, shape in self.tensors.items()},
            },
            "source": self.source,
        }


def default_quant(bits: int, dim: int) -> QuantSpec:
    """int8: one scale per row, the layout the fused kernels multiply (edge_node.flash.fused);
    int4: 64-value groups, as a scale per row is too coarse for 15 levels."""
    return QuantSpec(bits=bits, group_size=dim if bits == 8 else 64)


def pack_model(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    quant: QuantSpec | None = None,
    dtype: torch.dtype | None = None,
    align: int = PAGE,
) -> FlashManifest:
    """Write the flash layout of the checkpoint at `model_dir` to `out_dir`.

    quant: int8/int4 FFN bundles (group-wise scales inside each bundle); None keeps floats.
    dtype: float storage dtype; default the checkpoint's own (config.json torch_dtype).
    align: a power of two >= 4096; layers start on it and bundles never straddle it.
    """
    if align < PAGE or align & (align - 1):
        raise ValueError(f"align: must be a power of two >= {PAGE}, got {align}")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    dtype = dtype or _checkpoint_dtype(model_dir)
    model = load_model(model_dir, device="cpu", dtype=torch.float32)
    config = model.config
    if quant is not None and config.dim % quant.group_size:
        raise ValueError(
            f"group_size: {quant.group_size} must divide the model's dim ({config.dim})"
        )
    bundle = BundleFormat(config.dim, dtype, quant)
    stride = bundle_stride(bundle.payload, align)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.detach().to(dtype).contiguous()
        for name, t in model.state_dict().items()
        if FFN_PREFIX not in name and not (config.tie_embeddings and name == "output.weight")
    }
    save_file(tensors, str(out_dir / DRAM_FILE), metadata={"format": FORMAT})
    offsets = _write_ffn(model, bundle, stride, align, out_dir / FFN_FILE)
    manifest = FlashManifest(
        config=config,
        bundle=bundle,
        align=align,
        stride=stride,
        layer_offsets=offsets,
        dram=_entry(out_dir, DRAM_FILE),
        ffn=_entry(out_dir, FFN_FILE),
        tensors={name: tuple(t.shape) for name, t in tensors.items()},
        source=str(model_dir.resolve()),
    )
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            (out_dir / name).write_bytes((model_dir / name).read_bytes())
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    logger.info(
        "packed %s -> %s: %d-byte bundles at stride %d", model_dir, out_dir, bundle.payload, stride
    )
    return manifest


def _write_ffn(
    model: Transformer, bundle: BundleFormat, stride: int, align: int, path: Path
) -> tuple[int, ...]:
    """Writes every layer's bundles (padded to `stride`, layers aligned); returns offsets."""
    offsets = []
    position = 0
    with path.open("wb") as f:
        for layer in model.layers:
            ffn = layer.feed_forward
            rows = bundle.encode(
                ffn.gate.weight.detach(), ffn.up.weight.detach(), ffn.down.weight.detach()
            )
            padded = torch.zeros(len(rows), stride, dtype=torch.uint8)
            padded[:, : bundle.payload] = rows
            offsets.append(position)
            f.write(padded.numpy().tobytes())
            position += padded.numel()
            gap = -position % align
            f.write(bytes(gap))
            position += gap
    return tuple(offsets)


def read_manifest(pack_dir: str | Path) -> FlashManifest:
    """Parse and check manifest.json, and the sizes of the files it names (not their hashes)."""
    pack_dir = Path(pack_dir)
    file = pack_dir / MANIFEST_FILE
    try:
        raw = json.loads(file.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{file}: missing; is {pack_dir} a flash pack (edgecloud flash pack)?"
        ) from e
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable: {e}") from e
    try:
        manifest = _parse(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file}: {e}") from e
    for entry in (manifest.dram, manifest.ffn):
        path = pack_dir / entry.name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (named by {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != entry.nbytes:
            raise CheckpointError(f"{path}: {size} bytes, {MANIFEST_FILE} says {entry.nbytes}")
    return manifest


def _quant_json(quant: QuantSpec) -> dict[str, Any]:
    layout = (
        "per group: codes + 128 as uint8, float32 scale, float32 bias (fbgemm byte rowwise)"
        if quant.bits == 8
        else "codes, then a float16 scale per group"
    )
    return {"bits": quant.bits, "group_size": quant.group_size, "layout": layout}


def _parse(raw: dict[str, Any]) -> FlashManifest:
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ValueError(
            f"format: expected {FORMAT!r} version {VERSION}, "
            f"got {raw.get('format')!r} version {raw.get('version')!r}"
        )
    config = ModelConfig.from_hf(raw["config"])
    if raw["dtype"] not in DTYPES:
        raise ValueError(f"dtype: must be one of {tuple(DTYPES)}, got {raw['dtype']!r}")
    q = raw["quantization"]
    quant = None if q is None else QuantSpec(bits=q["bits"], group_size=q["group_size"])
    bundle = BundleFormat(config.dim, DTYPES[raw["dtype"]], quant)
    ffn, dram = raw["ffn"], raw["dram"]
    align, stride, offsets = ffn["align"], ffn["stride"], tuple(ffn["layer_offsets"])
    if ffn["bundle_bytes"] != bundle.payload:
        raise ValueError(
            f"ffn.bundle_bytes: {ffn['bundle_bytes']} does not match dim={config.dim} "
            f"as {raw['dtype'] if quant is None else quant.name} ({bundle.payload})"
        )
    if stride < bundle.payload or (align % stride and stride % align):
        raise ValueError(
            f"ffn.stride: {stride} must be >= {bundle.payload} and divide, or be a multiple "
            f"of, align={align}"
        )
    layer_bytes = config.hidden_dim * stride
    if len(offsets) != config.n_layers or any(o % align for o in offsets):
        raise ValueError(
            f"ffn.layer_offsets: need {config.n_layers} multiples of {align}, got {list(offsets)}"
        )
    if any(b - a < layer_bytes for a, b in pairwise(offsets)) or offsets[0] < 0:
        raise ValueError(
            f"ffn.layer_offsets: layers of {layer_bytes} bytes overlap: {list(offsets)}"
        )
    if ffn["bytes"] < offsets[-1] + layer_bytes or ffn["bytes"] % PAGE:
        raise ValueError(
            f"ffn.bytes: {ffn['bytes']} cannot hold {config.n_layers} page-padded layers"
        )
    return FlashManifest(
        config=config,
        bundle=bundle,
        align=align,
        stride=stride,
        layer_offsets=offsets,
        dram=FileEntry(dram["file"], dram["bytes"], dram["sha256"]),
        ffn=FileEntry(ffn["file"], ffn["bytes"], ffn["sha256"]),
        tensors={name: tuple(shape) for name, shape in dram["tensors"].items()},
        source=raw.get("source", ""),
    )


def verify_pack(pack_dir: str | Path, manifest: FlashManifest) -> None:
    """Checks each file's sha256 against the manifest (reads every byte once)."""
    for entry in (manifest.dram, manifest.ffn):
        path = Path(pack_dir) / entry.name
        digest = file_sha256(path)
        if digest != entry.sha256:
            raise CheckpointError(
                f"{path}: checksum mismatch (sha256 {digest[:12]}..., {MANIFEST_FILE} says "
                f"{entry.sha256[:12]}...): the file is corrupt or from another pack"
            )


def load_dram_state(
    pack_dir: str | Path, manifest: FlashManifest, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The non-FFN state_dict of the model, each tensor checked against the config's shape."""
    path = Path(pack_dir) / manifest.dram.name
    with torch.device("meta"):
        expected = {
            name: tuple(t.shape)
            for name, t in Transformer(manifest.config).state_dict().items()
            if FFN_PREFIX not in name
        }
    if manifest.config.tie_embeddings:
        expected.pop("output.weight")
    state = {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            unexpected = sorted(names - expected.keys())
            if unexpected:
                raise CheckpointError(
                    f"{path}: unexpected tensor {unexpected[0]} for the manifest's config"
                )
            for name, shape in expected.items():
                if name not in names:
                    raise CheckpointError(f"{path}: missing tensor {name}")
                tensor = f.get_tensor(name)
                if tuple(tensor.shape) != shape:
                    raise CheckpointError(
                        f"{path}: tensor {name} has shape {tuple(tensor.shape)}, "
                        f"the manifest's config needs {shape}"
                    )
                state[name] = tensor.to(device=device, dtype=dtype)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from e
    if manifest.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def read_layer_bundles(pack_dir: str | Path, manifest: FlashManifest, layer: int) -> torch.Tensor:
    """All of one layer's bundles, (hidden, payload) uint8, by plain buffered reads."""
    hidden, stride = manifest.config.hidden_dim, manifest.stride
    with (Path(pack_dir) / manifest.ffn.name).open("rb") as f:
        f.seek(manifest.layer_offsets[layer])
        data = bytearray(f.read(hidden * stride))
    rows = torch.frombuffer(data, dtype=torch.uint8).view(hidden, stride)
    return rows[:, : manifest.payload].contiguous()


def load_dense(
    pack_dir: str | Path,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    *,
    verify: bool = True,
) -> Transformer:
    """The whole packed model in DRAM, FFN decoded (dequantized): the reference the flash
    model must match, and what calibration records activations from."""
    manifest = read_manifest(pack_dir)
    if verify:
        verify_pack(pack_dir, manifest)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    state = load_dram_state(pack_dir, manifest, device, dtype)
    for layer in range(manifest.config.n_layers):
        rows = read_layer_bundles(pack_dir, manifest, layer)
        gate, up, down = manifest.bundle.decode(rows, dtype).to(device).unbind(1)
        prefix = f"layers.{layer}.{FFN_PREFIX}"
        state[prefix + "gate.weight"] = gate.contiguous()
        state[prefix + "up.weight"] = up.contiguous()
        state[prefix + "down.weight"] = down.t().contiguous()
    with torch.device("meta"):
        model = Transformer(manifest.config)
    model.load_state_dict(state, strict=True, assign=True)
    if manifest.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _entry(directory: Path, name: str) -> FileEntry:
    path = directory / name
    return FileEntry(name, path.stat().st_size, file_sha256(path))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """config.json's torch_dtype (what the weights were saved as); float32 when absent."""
    try:
        name = json.loads((model_dir / "config.json").read_text()).get("torch_dtype")
    except (OSError, json.JSONDecodeError, AttributeError):
        name = None
    return DTYPES.get(name, torch.float32)
