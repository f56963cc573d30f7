"""`edgecloud up` owns what it starts: SIGTERM and Ctrl-C (SIGINT) stop the gateway, the
actors, Ray and its private Redis, and remove the state file; a taken port is refused
before anything starts. Real processes: the CLI in a subprocess, its Redis, local Ray."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.processes import ServerProcess

ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = pytest.mark.slow


def accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT", "down"])
def test_a_signal_or_down_stops_everything_up_started(tmp_path, stop):
    state = tmp_path / "up.json"
    up = ServerProcess(
        [
            *("up", "--port", "0", "--insecure-no-auth", "--edges", "1", "--verifiers", "1"),
            *("--metrics-port", "0"),
        ],
        timeout=180,
        log_path=tmp_path / "up.log",
        env={"EDGECLOUD_STATE": str(state)},
        listening=re.compile(r"gateway listening on [\w.\-]+:(\d+)"),
    )
    redis_port = int(json.loads(state.read_text())["redis_url"].rsplit(":", 1)[1].split("/")[0])
    assert accepts(redis_port) and accepts(up.port)
    targets = json.loads(cli(state, "status", "--prometheus").stdout)
    assert sorted(t["labels"]["node"] for t in targets) == ["edge-0", "gateway", "verifier-0"]
    for target in targets:  # Prometheus' file_sd format: each one scrapes
        (address,) = target["targets"]
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as reply:
            assert b"# TYPE edgecloud_" in reply.read(), target
    second = cli(state, "up", "--port", "0", "--insecure-no-auth")
    assert second.returncode == 2 and "`edgecloud down` stops it" in second.stderr
    if stop == "down":
        down = cli(state, "down")
        assert down.returncode == 0 and f"pid {up.proc.pid}" in down.stdout, down.stderr
    else:
        up.proc.send_signal(getattr(signal, stop))
    assert up.proc.wait(90) == 0, (tmp_path / "up.log").read_text()
    log = (tmp_path / "up.log").read_text()
    assert "Traceback" not in log and "never awaited" not in log, log
    assert not state.exists()
    deadline = time.monotonic() + 10
    while accepts(redis_port) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not accepts(redis_port), "the private redis-server outlived `edgecloud up`"
    for command in ("status", "down"):
        gone = cli(state, command)
        assert gone.returncode == 2 and "no `edgecloud up` is running" in gone.stderr


def test_down_removes_the_state_file_of_an_up_that_was_killed(tmp_path):
    """A SIGKILLed up leaves its state file; its pid is gone (or reused by another
    program): down removes the file and signals nothing."""
    state = tmp_path / "up.json"
    sleeper = subprocess.Popen(["sleep", "30"])  # a live pid that is not an up
    try:
        for pid in (sleeper.pid, 2**22 + 1):
            state.write_text(json.dumps({"pid": pid, "redis_url": "redis://127.0.0.1:1/0"}))
            down = cli(state, "down")
            assert down.returncode == 0 and "stale" in down.stdout, down.stderr
            assert not state.exists()
        assert sleeper.poll() is None, "down signalled a process that is not an up"
    finally:
        sleeper.kill()
        sleeper.wait()


def cli(state: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "EDGECLOUD_STATE": str(state)},
        timeout=60,
    )


def test_a_taken_port_is_refused_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "up", "--port", str(port)],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "EDGECLOUD_STATE": str(tmp_path / "up.json")},
            timeout=60,
        )
    assert done.returncode == 2
    assert f"--port: 127.0.0.1:{port} is taken" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - start < 20  # no Redis, Ray or actors were started first
    assert not (tmp_path / "up.json").exists()


def test_a_verifier_outside_ray_joins_a_running_up_with_its_token(tmp_path):
    """Scaling out without a restart: `up --verifiers 0 --verifier-token-file F`, then a
    `cloud serve --redis-url` that authenticates edges with F registers itself, and the
    gateway's requests are verified by it (equal to its cloud-only output)."""
    import edgecloud
    from orchestrator.demo_models import TARGET_DIR

    state, token = tmp_path / "up.json", tmp_path / "verifier-token"
    token.write_text("verifier-secret-0123456789\n")
    up = ServerProcess(
        [
            *("up", "--port", "0", "--insecure-no-auth", "--edges", "1", "--verifiers", "0"),
            *("--verifier-token-file", str(token)),
        ],
        timeout=180,
        log_path=tmp_path / "up.log",
        env={"EDGECLOUD_STATE": str(state)},
        listening=re.compile(r"gateway listening on [\w.\-]+:(\d+)"),
    )
    verifier = None
    try:
        redis_url = json.loads(state.read_text())["redis_url"]
        verifier = ServerProcess(
            [
                *("cloud", "serve", "--model", str(TARGET_DIR), "--port", "0"),
                *("--auth-token-file", str(token), "--redis-url", redis_url),
            ],
            timeout=120,
            log_path=tmp_path / "verifier.log",
        )
        with edgecloud.Client(up.address, timeout=120) as client:
            lossless = client.generate("def read(path):", max_tokens=16)
            cloud = client.generate("def read(path):", max_tokens=16, mode="cloud_only")
        assert lossless.tokens == cloud.tokens and lossless.stats.rounds > 0
        assert "verifier-secret" not in (tmp_path / "up.log").read_text()
    finally:
        if verifier is not None:
            verifier.stop()
        up.proc.send_signal(signal.SIGTERM)
        up.proc.wait(90)
