"""Starting real server processes (`edgecloud ...`) for tests that kill them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

LISTENING = re.compile(r"listening on [\w.\-]+:(\d+)")


class ServerProcess:
    def __init__(self, args: list[str], timeout: float = 60.0) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        deadline = time.monotonic() + timeout
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if match := LISTENING.search(line):
                self.port = int(match.group(1))
                self.address = f"127.0.0.1:{self.port}"
                return
        self.proc.kill()
        raise RuntimeError(f"server did not start: {' '.join(args)}\n{''.join(lines)}")

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to drain or close its streams cleanly."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc.stdout.close()
