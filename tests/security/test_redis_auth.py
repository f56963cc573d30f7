"""Redis with a password (`requirepass`) and with an ACL user: the registry works
with the right credentials; a wrong password is refused, and the CLI says so in one
line that does not echo the password."""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from orchestrator.redis_server import RedisServer
from orchestrator.registry import Registry, connect, redact_url
from tests.orchestrator.conftest import make_node

PASSWORD = "redis-pw-91c3"
WRONG = "not-the-pw-5e7a"


@pytest.fixture(scope="module")
def server():
    with RedisServer(password=PASSWORD) as server:
        yield server


def url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


def status_stderr(redis_url: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "status", "--redis-url", redis_url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stderr


def test_requirepass_admits_the_password_and_refuses_others(server):
    registry = Registry(connect(server.url))
    registry.register(make_node("edge-a", kind="edge"), ttl_s=30)
    assert [n.info.node_id for n in registry.list_nodes()] == ["edge-a"]
    for bad in (url(server, "", WRONG), f"redis://127.0.0.1:{server.port}/0"):
        with pytest.raises(redis.AuthenticationError) as caught:
            Registry(connect(bad)).list_nodes()
        assert WRONG not in str(caught.value)


def test_an_acl_user_works_and_a_wrong_password_is_refused(server):
    admin = connect(server.url)
    admin.execute_command("ACL", "SETUSER", "edgecloud", "on", ">acl-pw-33b1", "~*", "&*", "+@all")
    registry = Registry(connect(url(server, "edgecloud", "acl-pw-33b1")))
    registry.register(make_node("verifier-a"), ttl_s=30)
    assert "verifier-a" in [n.info.node_id for n in registry.list_nodes()]
    with pytest.raises(redis.AuthenticationError):
        Registry(connect(url(server, "edgecloud", WRONG))).list_nodes()


def test_the_cli_refuses_a_wrong_password_in_one_line_without_echoing_it(server):
    code, stderr = status_stderr(url(server, "", WRONG))
    assert code == 2
    assert stderr.count("\n") == 1 and "AuthenticationError" in stderr, stderr
    assert WRONG not in stderr and "Traceback" not in stderr
    assert WRONG not in redact_url(url(server, "edgecloud", WRONG))
