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
    """`log_path`: the process writes stdout and stderr there instead of a pipe, so a
    chatty server never blocks on a full pipe and a test can read everything it said."""

    def __init__(
        self,
        args: list[str],
        timeout: float = 60.0,
        *,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        listening: re.Pattern[str] = LISTENING,
    ) -> None:
        self.log_path = log_path
        self._log = open(log_path, "w") if log_path else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", *args],
            stdout=self._log or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=Path(__file__).resolve().parent.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        deadline = time.monotonic() + timeout
        lines, partial = [], ""
        reader = open(log_path) if log_path else self.proc.stdout
        while time.monotonic() < deadline:
            line = partial + reader.readline()
            if not line.endswith("\n"):  # the file's end: wait for the rest
                if log_path is None or self.proc.poll() is not None:
                    break
                partial = line
                time.sleep(0.05)
                continue
            partial = ""
            lines.append(line)
            if match := listening.search(line):
                self.port = int(match.group(1))
                self.address = f"127.0.0.1:{self.port}"
                if log_path:
                    reader.close()
                return
        if log_path:
            reader.close()
        self.proc.kill()
        raise RuntimeError(f"server did not start: {' '.join(args)}\n{''.join(lines)}")

    def output(self) -> str:
        """Everything the process wrote so far (needs `log_path`)."""
        return Path(self.log_path).read_text()

    def rss_kib(self) -> int:
        """Resident memory of the process, from /proc (VmRSS), in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for process {self.proc.pid}")

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
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
