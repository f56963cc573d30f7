"""`edgecloud demo`, as a new user runs it: a subprocess, the bundled models, no flags
beyond a short output. It must stream text and confirm the output is identical."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_end_to_end_and_confirms_identical_output():
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "--max-tokens", "24", "--rtt-ms", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "identical to cloud-only     yes" in result.stdout
    assert "tau (tokens per cloud round)" in result.stdout
    assert "cleaning up" in result.stderr


def test_demo_refuses_a_bad_flag_in_one_line():
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "demo", "--max-tokens", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--max-tokens" in result.stderr and result.stderr.strip().count("\n") == 0
