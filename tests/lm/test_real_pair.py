"""The real pair end to end, as a user runs it: `edgecloud demo --model smollm2` fetches
SmolLM2-135M-Instruct (here: the `real_gguf` fixture's sha256-checked copy), loads its
bundled distilled draft, and chats through the SDK, the gateway, a Ray edge actor and a
verifier actor; lossless must equal cloud-only token for token (the demo's exit status)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.real_model, pytest.mark.slow]


def test_the_chat_demo_on_the_real_pair_equals_cloud_only(real_gguf, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "--model", "smollm2"]
        + ["--max-tokens", "16", "--edges", "1", "--rtt-ms", "0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={
            **os.environ,
            "EDGECLOUD_MODELS": str(real_gguf.parent),
            "EDGECLOUD_STATE": str(tmp_path / "up.json"),
        },
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "user: Explain in two sentences why the sky is blue." in done.stdout
    assert "tokens generated            16" in done.stdout
    assert "identical to cloud-only     yes" in done.stdout
