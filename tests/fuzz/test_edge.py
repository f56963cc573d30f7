"""Fuzzing `edgecloud edge serve` (with a verifier behind it): generated and mutated
`GenerateRequest`s, random `ListModels` bytes and random bytes on the port. Every
reply must be a documented status; the server must stay up, healthy, free of
tracebacks and within the memory bound. The tests live in `tests.fuzz.cases`."""

from __future__ import annotations

import pytest

from tests.fleet import start_edge, start_verifier, write_files
from tests.fuzz.cases import (
    test_generated_generate_requests,  # noqa: F401
    test_list_models_with_any_bytes,  # noqa: F401
    test_mutated_generate_requests,  # noqa: F401
    test_random_bytes_to_the_port,  # noqa: F401
    test_server_survived_healthy_and_memory_bounded,  # noqa: F401
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = write_files(tmp_path_factory.mktemp("fuzz-edge"))
    verifier = start_verifier(files)
    edge = start_edge(files, verifier)
    yield edge
    edge.stop()
    verifier.stop()
