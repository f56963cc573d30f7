"""Faults: a verifier killed mid-generation, no verifier at all, a verifier that
comes back. Verifiers here are real `edgecloud cloud serve` processes where the test
kills one, and in-process servers otherwise."""

from __future__ import annotations

import asyncio
import time

import pytest

from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.picker import VerifierEndpoint
from edge_node.types import DraftConfig, GenerationRequest
from lm.checkpoint import save_model
from protocol.errors import Unavailable
from protocol.types import Mode
from serving.auth import AuthConfig
from serving.server import ServerConfig
from tests.edge_node.conftest import make_runtime
from tests.processes import ServerProcess
from tests.tiny import MODEL_NAME, TOKEN

PROMPT = (1, 5, 9, 22)


def request(mode=Mode.LOSSLESS, max_tokens=60, **kw) -> GenerationRequest:
    return GenerationRequest(
        prompt_tokens=PROMPT,
        max_tokens=max_tokens,
        mode=mode,
        draft=DraftConfig("beam", 3, 4, adapt=False),
        **kw,
    )


def apply(chunks) -> list[int]:
    """What a client holds after applying every chunk and rollback in order."""
    out: list[int] = []
    for chunk in chunks:
        if chunk.rollback is not None:
            del out[chunk.rollback.keep_tokens :]
        out += chunk.tokens
    return out


def free_address() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def target_dir(target, tmp_path_factory):
    path = tmp_path_factory.mktemp("target") / MODEL_NAME
    save_model(target, path)
    return path


def spawn_verifier(target_dir) -> ServerProcess:
    return ServerProcess(
        [
            "cloud",
            "serve",
            "--model",
            str(target_dir),
            "--port",
            "0",
            "--auth-token",
            TOKEN,
            "--max-context",
            "256",
        ]
    )


@pytest.mark.slow
async def test_verifier_killed_mid_generation_fails_over_with_identical_output(draft, target_dir):
    first, second = spawn_verifier(target_dir), spawn_verifier(target_dir)
    try:
        reference_runtime = make_runtime(draft, [second.address])
        reference = [t async for c in reference_runtime.generate(request()) for t in c.tokens]
        await reference_runtime.close()
        runtime = make_runtime(draft, [first.address, second.address])
        chunks = []
        async for chunk in runtime.generate(request()):
            chunks.append(chunk)
            if len(chunks) == 3:
                first.kill()  # the first session of a fresh round-robin picker is on `first`
        await runtime.close()
    finally:
        first.stop()
        second.stop()
    assert apply(chunks) == reference
    assert chunks[-1].stats.failovers == 1
    assert chunks[-1].stats.generated_tokens == 60


async def test_lossless_without_verifier_is_unavailable_before_the_deadline(draft):
    runtime = make_runtime(draft, [free_address()], open_timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(Unavailable):
        async for _ in runtime.generate(request(timeout_s=2.0)):
            pass
    assert time.monotonic() - start < 2.0
    await runtime.close()


async def test_adaptive_without_verifier_degrades_then_catches_up_to_lossless(
    draft, target, verifier
):
    """Offline, adaptive goes on alone (unverified); once a verifier answers, the span is
    verified, the first wrong token is rolled back, and the result is the lossless text."""
    live = make_runtime(draft, [f"127.0.0.1:{verifier.port}"])
    lossless = [t async for c in live.generate(request(max_tokens=40)) for t in c.tokens]
    await live.close()

    runtime = make_runtime(draft, [free_address()], open_timeout_s=0.5)
    picker = runtime.link.picker
    chunks = []
    async for chunk in runtime.generate(
        request(mode=Mode.ADAPTIVE, max_tokens=40, adaptive_threshold=1.0)
    ):
        chunks.append(chunk)
        if len(chunks) == 3:
            picker.endpoints[:] = [VerifierEndpoint(f"127.0.0.1:{verifier.port}", MODEL_NAME)]
    await runtime.close()
    stats = chunks[-1].stats
    assert stats.degraded
    assert not chunks[0].verified
    assert apply(chunks) == lossless
    assert stats.rounds > 0


async def test_adaptive_with_no_verifier_ever_completes_unverified(draft):
    runtime = make_runtime(draft, [free_address()], open_timeout_s=0.3)
    chunks = [c async for c in runtime.generate(request(mode=Mode.ADAPTIVE, max_tokens=20))]
    await runtime.close()
    assert len(apply(chunks)) == 20
    assert not any(c.verified for c in chunks[:-1])
    assert chunks[-1].stats.degraded and chunks[-1].stats.rounds == 0


async def test_session_reopens_when_verifier_restarts_in_process(draft, target):
    """A verifier that drains mid-generation (SIGTERM semantics) hands the session over."""
    config = VerifierConfig(model_name=MODEL_NAME, max_context=256)
    servers = [
        await start_verifier(target, config, ServerConfig(port=0, auth=AuthConfig(token=TOKEN)))
        for _ in range(2)
    ]
    runtime = make_runtime(draft, [f"127.0.0.1:{s.port}" for s in servers])
    reference = [t async for c in runtime.generate(request()) for t in c.tokens]
    chunks = []
    async for chunk in runtime.generate(request()):
        chunks.append(chunk)
        if len(chunks) == 2:
            asyncio.ensure_future(servers[0].drain())
    await runtime.close()
    for server in servers:
        await server.drain()
    assert apply(chunks) == reference
