"""A generation's response, whole (JSON) or as server-sent events, with rollbacks
applied and, in adaptive mode, unverified text held back until it is verified."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from protocol.errors import DeadlineExceeded, ServerError
from protocol.types import FinishReason, GenerationResult, GenerationStats, Mode, Transcript
from protocol.v1 import generation_pb2 as gpb
from serving.http.schema import OpenAIRequest, classify, error_body, stats_object, usage

Chunks = AsyncGenerator[gpb.GenerateChunk, None]


class StreamedOutput(Transcript):
    """The generation so far (the SDK's `Transcript`: rollbacks applied) and, when
    streaming, how much of it the client has been sent. With `hold_unverified`,
    unverified chunks wait until a verified chunk or the final one releases them.

    Worked example (adaptive, holding): chunk "Hi" verified -> sends "Hi"; chunk " wrld"
    unverified -> sends nothing; chunk Rollback(keep 1 token, 2 chars) + " world"
    verified -> sends " world". The client saw "Hi world", never " wrld".
    """

    def __init__(self, hold_unverified: bool = False) -> None:
        super().__init__()
        self.hold_unverified = hold_unverified
        self._sent_tokens = 0
        self._sent_chars = 0

    def add(self, msg: gpb.GenerateChunk) -> None:
        """Applies `msg` (a whole response: nothing has been sent yet)."""
        self._apply(msg)

    def feed(self, msg: gpb.GenerateChunk) -> tuple[str, tuple[int, ...]]:
        """Applies `msg`; returns the text and token ids released to the stream now."""
        if msg.HasField("rollback") and (
            msg.rollback.keep_tokens < self._sent_tokens
            or msg.rollback.keep_chars < self._sent_chars
        ):
            raise ServerError("rollback: reaches output already streamed")
        self._apply(msg)
        if self.hold_unverified and not msg.verified and not msg.HasField("stats"):
            return "", ()
        text, tokens = self.text[self._sent_chars :], self.tokens[self._sent_tokens :]
        self._sent_chars += len(text)
        self._sent_tokens += len(tokens)
        return text, tokens

    def result(self) -> GenerationResult:
        """The whole generation; raises when its final chunk (with stats) never came."""
        return self._result()


class Responder:
    """Builds one request's response objects, whole or as server-sent events."""

    def __init__(self, call: OpenAIRequest) -> None:
        self.call = call
        self.id = f"{'chatcmpl' if call.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.deadline = (
            None if call.timeout_s is None else asyncio.get_running_loop().time() + call.timeout_s
        )

    async def next(self, upstream: Chunks) -> gpb.GenerateChunk | None:
        """The next chunk, None at the end; DeadlineExceeded past the request's timeout."""
        timeout = asyncio.timeout_at(self.deadline)
        try:
            async with timeout:
                return await anext(upstream, None)
        except TimeoutError as error:
            if not timeout.expired():
                raise
            raise DeadlineExceeded(
                f"timeout: the request's {self.call.timeout_s:g} s deadline passed"
            ) from error

    async def complete(self, upstream: Chunks) -> dict:
        output = StreamedOutput()
        while (msg := await self.next(upstream)) is not None:
            output.add(msg)
        result = output.result()
        choice: dict[str, object] = {"index": 0}
        if self.call.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice["text"] = result.text
        choice |= {
            "token_ids": list(result.tokens),
            "logprobs": None,
            "finish_reason": result.finish_reason,
        }
        return {
            **self._head(),
            "choices": [choice],
            "usage": usage(result.stats),
            "edgecloud": stats_object(result.stats),
        }

    async def events(self, upstream: Chunks, first: gpb.GenerateChunk | None) -> AsyncIterator[str]:
        """`data: {chunk}` events, then `data: [DONE]`. An error after the first chunk
        becomes a `data: {"error": ...}` event (the status is already 200)."""
        output = StreamedOutput(hold_unverified=self.call.request.options.mode is Mode.ADAPTIVE)
        async with aclosing(upstream):
            try:
                if self.call.chat:
                    yield event(self._chunk("", (), role=True))
                msg = first
                while msg is not None:
                    text, tokens = output.feed(msg)
                    final = msg if msg.HasField("stats") else None
                    if text or tokens or final:
                        yield event(self._chunk(text, tokens, final))
                    if final and self.call.include_usage:
                        totals = usage(GenerationStats.from_proto(final.stats))
                        yield event({**self._head(chunk=True), "choices": [], "usage": totals})
                    msg = await self.next(upstream)
            except Exception as error:
                yield event(error_body(*classify(error)))
            yield "data: [DONE]\n\n"

    def _chunk(
        self,
        text: str,
        tokens: tuple[int, ...],
        final: gpb.GenerateChunk | None = None,
        role: bool = False,
    ) -> dict:
        choice: dict[str, object] = {"index": 0}
        if not self.call.chat:
            choice["text"] = text
        elif role:
            choice["delta"] = {"role": "assistant", "content": ""}
        else:
            choice["delta"] = {"content": text} if text or final is None else {}
        choice |= {
            "token_ids": list(tokens),
            "logprobs": None,
            "finish_reason": None
            if final is None
            else FinishReason.from_proto(final.finish_reason),
        }
        chunk = {**self._head(chunk=True), "choices": [choice]}
        if final is not None:
            chunk["edgecloud"] = stats_object(GenerationStats.from_proto(final.stats))
        return chunk

    def _head(self, chunk: bool = False) -> dict:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
        return {
            "id": self.id,
            "object": kind if self.call.chat else "text_completion",
            "created": self.created,
            "model": self.call.model,
        }


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"
