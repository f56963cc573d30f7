"""SIGTERM on a real verifier process: new sessions get UNAVAILABLE, the open session's
rounds still finish, and the process exits once it is done."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc import aio

from edge_node.verifier_client import VerifierSession
from lm.checkpoint import save_model
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from tests.processes import ServerProcess
from tests.tiny import METADATA, MODEL_NAME, TOKEN, tiny_model


@pytest.mark.slow
async def test_sigterm_drains(tmp_path):
    model_dir = tmp_path / MODEL_NAME
    save_model(tiny_model(seed=2), model_dir)
    server = ServerProcess(
        ["cloud", "serve", "--model", str(model_dir), "--port", "0", "--auth-token", TOKEN]
    )
    try:
        async with aio.insecure_channel(server.address) as channel:
            session = VerifierSession(channel, metadata=METADATA)
            await session.open(MODEL_NAME, [1, 2, 3], SamplingParams())
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            late = VerifierSession(channel, metadata=METADATA)
            with pytest.raises(aio.AioRpcError) as refused:
                await late.open(MODEL_NAME, [1], SamplingParams())
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            result = await session.verify(TokenTree.chain([4, 5]))
            assert result.nodes_verified == 2
            await session.close()
        assert await asyncio.to_thread(server.proc.wait, 15) == 0
    finally:
        server.stop()
