"""The edge's side of one `Verifier.Verify` stream.

A `VerifierSession` opens a session with the full context, then sends one round
at a time and waits for its result. It counts the bytes each way, which the
speculative benchmark reports per generated token. Transport failures surface as
`grpc.aio.AioRpcError`; failover is the caller's job, since only the caller holds
the full token history to re-send.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence

from grpc import aio

from lm.acceptance import DraftDistribution
from lm.hidden_codec import EncodedHidden, HiddenEncoding
from lm.sampling import SamplingParams
from lm.tree import TokenTree
from protocol.types import Schedule
from protocol.v1 import verification_pb2 as pb
from protocol.v1 import verification_pb2_grpc as pb_grpc


def sampling_message(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(temperature=params.temperature, top_k=params.top_k, top_p=params.top_p)
    if params.seed is not None:
        msg.seed = params.seed
    return msg


def hidden_from_message(message: pb.HiddenState | None) -> EncodedHidden | None:
    """A reply's hidden state, None when it has none; ValueError when it is malformed."""
    if message is None:
        return None
    if message.encoding not in (HiddenEncoding.FLOAT16, HiddenEncoding.INT8):
        raise ValueError(f"hidden.encoding: unknown value {message.encoding}")
    return EncodedHidden(
        dim=message.dim,
        encoding=HiddenEncoding(message.encoding),
        data=message.data,
        scale=message.scale,
    )


def round_message(
    tree: TokenTree,
    new_tokens: Sequence[int] = (),
    draft: Mapping[int, DraftDistribution] | None = None,
    round_id: int = 0,
) -> pb.Round:
    return pb.Round(
        new_tokens=new_tokens,
        tree=pb.DraftTree(tokens=tree.tokens, parents=tree.parents),
        draft_dists=[
            pb.DraftDistribution(node=d.node, tokens=d.tokens, probs=d.probs)
            for d in (draft or {}).values()
        ],
        round_id=round_id,
    )


class VerifierSession:
    """One open session. Use as `async with VerifierSession(channel, ...) as s:`."""

    def __init__(
        self,
        channel: aio.Channel,
        *,
        metadata: Sequence[tuple[str, str]] = (),
        timeout: float | None = None,
        simulated_rtt_ms: float = 0.0,
    ) -> None:
        self._call = pb_grpc.VerifierStub(channel).Verify(metadata=tuple(metadata), timeout=timeout)
        self._delay_s = simulated_rtt_ms / 1000
        self.bytes_sent = 0
        self.bytes_received = 0
        self.opened: pb.SessionOpened | None = None

    async def __aenter__(self) -> VerifierSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _exchange(self, request: pb.VerifyRequest) -> pb.VerifyResponse:
        self.bytes_sent += request.ByteSize()
        try:
            await self._call.write(request)
        except asyncio.InvalidStateError as error:  # the stream ended before this write
            code, details = await self._call.code(), await self._call.details()
            raise ConnectionError(f"verifier stream ended: {code.name}: {details}") from error
        if self._delay_s:
            await asyncio.sleep(self._delay_s)
        return await self._read()

    async def _read(self) -> pb.VerifyResponse:
        response = await self._call.read()  # raises AioRpcError on an error status
        if response is aio.EOF:
            raise ConnectionError("verifier closed the stream without a reply")
        self.bytes_received += response.ByteSize()
        return response

    async def open(
        self,
        model: str,
        context: Sequence[int],
        sampling: SamplingParams,
        session_id: str = "",
        return_hidden: HiddenEncoding = HiddenEncoding.NONE,
        schedule: Schedule = Schedule(),
    ) -> pb.SessionOpened:
        """`return_hidden`: ask for the target's hidden state in every reply."""
        request = pb.VerifyRequest(
            open=pb.OpenSession(
                model=model,
                context=context,
                sampling=sampling_message(sampling),
                session_id=session_id,
                return_hidden=int(return_hidden),
                priority=schedule.priority,
                tpot_slo_ms=schedule.tpot_slo_ms,
            )
        )
        self.opened = (await self._exchange(request)).opened
        return self.opened

    async def verify(
        self,
        tree: TokenTree,
        new_tokens: Sequence[int] = (),
        draft: Mapping[int, DraftDistribution] | None = None,
        round_id: int = 0,
    ) -> pb.RoundResult:
        request = pb.VerifyRequest(round=round_message(tree, new_tokens, draft, round_id))
        return (await self._exchange(request)).result

    async def decode(self, tokens: int, round_id: int = 0) -> AsyncIterator[pb.RoundResult]:
        """Server-side decoding: the verifier's next `tokens` tokens, one result each as
        it makes them. One write, then reads: the round trip is paid once, not per
        token. To stop sooner (an end-of-sequence token, a stop string), `abort()`."""
        if tokens < 1:
            raise ValueError(f"tokens: must be >= 1, got {tokens}")
        request = pb.Round(tree=pb.DraftTree(), decode_tokens=tokens - 1, round_id=round_id)
        yield (await self._exchange(pb.VerifyRequest(round=request))).result
        for _ in range(tokens - 1):
            yield (await self._read()).result

    def abort(self) -> None:
        """Cancels the stream at once: for a verifier that failed or stalled."""
        self._call.cancel()

    async def close(self) -> None:
        """Half-closes the stream so the verifier frees the session; idempotent."""
        if not self._call.done():
            try:
                await self._call.done_writing()
            except Exception:  # the stream may already be broken; freeing is the server's job then
                self._call.cancel()
