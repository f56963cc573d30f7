"""Fixtures every fuzz module shares; each module supplies its own `server` (a
`tests.processes.ServerProcess`) and may override `baseline`."""

from __future__ import annotations

import grpc
import pytest

from tests.fuzz.cases import healthy_generate
from tests.fuzz.strategies import Tally


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def baseline(server, channel) -> int:
    """The server's resident memory after one healthy request, in KiB."""
    healthy_generate(channel)
    return server.rss_kib()


@pytest.fixture(scope="module")
def tally() -> Tally:
    return Tally()
