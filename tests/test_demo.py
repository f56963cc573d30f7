"""`edgecloud demo`, as a new user runs it: a subprocess, the bundled models, no flags
beyond a short output. It must stream text and confirm the output is identical."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("drafter", ["slm", "head"])
def test_demo_runs_end_to_end_and_confirms_identical_output(drafter):
    """With the SLM, and with the bundled recurrent head fed the verifier's hidden state."""
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "--max-tokens", "24", "--rtt-ms", "20"]
        + ["--drafter", drafter],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "identical to cloud-only     yes" in result.stdout
    assert "tau (tokens per cloud round)" in result.stdout
    assert "cleaning up" in result.stderr
    if drafter == "head":
        head_rounds = re.search(r"rounds drafted by the head  (\d+) of (\d+)", result.stdout)
        assert head_rounds and 0 < int(head_rounds[1]) <= int(head_rounds[2]), result.stdout


def test_demo_refuses_a_bad_flag_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "--max-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--max-tokens" in result.stderr and result.stderr.strip().count("\n") == 0


def test_demo_needs_a_head_for_a_target_of_its_own(tmp_path):
    from lm.checkpoint import save_model
    from tests.tiny import tiny_model

    save_model(tiny_model(seed=1), tmp_path / "target")
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "--drafter", "head"]
        + ["--target", str(tmp_path / "target")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--head" in result.stderr and result.stderr.strip().count("\n") == 0
