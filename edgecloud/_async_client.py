"""The asyncio client: `Client`'s twin on `grpc.aio`, same parameters and results."""

from __future__ import annotations

from typing import Unpack

from grpc import aio

from edgecloud._client import ClientSettings, health_modules, health_status, options_signature
from protocol.channel import KeepAliveOptions, RetryPolicy, TlsOptions, open_aio_channel
from protocol.errors import translated_rpc_errors
from protocol.types import (
    Chunk,
    GenerateKwargs,
    GenerateOptions,
    GenerationResult,
    HealthStatus,
    ModelInfo,
    Prompt,
    Transcript,
)
from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc


class AsyncGenerationStream(Transcript):
    """The chunks of one `Generate` call, as an async iterator; otherwise as
    `GenerationStream`: `text`/`tokens` with rollbacks applied, `stats` at the end,
    and leaving `async with` cancels a generation still running."""

    def __init__(self, call: aio.UnaryStreamCall) -> None:
        super().__init__()
        self._call = call
        self._done = False

    def __aiter__(self) -> AsyncGenerationStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._done:
            raise StopAsyncIteration
        try:
            with translated_rpc_errors():
                msg = await self._call.read()
            if msg is aio.EOF:
                self._done = True
                self._result()  # raises if the final chunk never came
                raise StopAsyncIteration
            return self._apply(msg)
        except StopAsyncIteration:
            raise
        except BaseException:
            self.close()
            raise

    async def result(self) -> GenerationResult:
        """Reads the rest of the stream and returns the whole generation."""
        async for _ in self:
            pass
        return self._result()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._call.cancel()

    async def __aenter__(self) -> AsyncGenerationStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()


class AsyncClient:
    """Asyncio client for the Generation service; see `Client` for the behaviour.

        async with edgecloud.AsyncClient("localhost:50051", token="...") as client:
            result = await client.generate("Once upon a time", max_tokens=32)

    Create it inside the event loop that will use it.
    """

    def __init__(
        self,
        target: str,
        *,
        token: str | None = None,
        tls: TlsOptions | None = None,
        timeout: float | None = None,
        retry: RetryPolicy | None = RetryPolicy.default,
        keepalive: KeepAliveOptions = KeepAliveOptions.default,
        max_message_bytes: int = 4 * 1024 * 1024,
        defaults: GenerateOptions = GenerateOptions.default,
    ) -> None:
        self._settings = ClientSettings.of(
            target,
            token=token,
            tls=tls,
            timeout=timeout,
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
            defaults=defaults,
        )
        self._channel = open_aio_channel(
            self._settings.target, tls=self._settings.tls, **self._settings.channel_options()
        )
        self._stub = pb_grpc.GenerationStub(self._channel)

    @options_signature
    async def generate(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateKwargs],
    ) -> GenerationResult:
        """See `Client.generate`."""
        async with self.stream(prompt, timeout=timeout, **options) as stream:
            return await stream.result()

    @options_signature
    def stream(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateKwargs],
    ) -> AsyncGenerationStream:
        """See `Client.stream`; use as `async for chunk in client.stream(...)`. The request
        is validated here, before the call starts."""
        request = self._settings.request(prompt, options)
        call = self._stub.Generate(
            request, timeout=self._settings.timeout_for(timeout), metadata=self._settings.metadata
        )
        return AsyncGenerationStream(call)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        with translated_rpc_errors():
            response = await self._stub.ListModels(
                pb.ListModelsRequest(),
                timeout=self._settings.timeout_for(timeout),
                metadata=self._settings.metadata,
            )
        return [ModelInfo.from_proto(m) for m in response.models]

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """See `Client.health`."""
        health_pb2, health_pb2_grpc = health_modules()
        with translated_rpc_errors():
            response = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._settings.timeout_for(timeout),
            )
        return health_status(response)

    async def close(self) -> None:
        """Closes the channel, cancelling calls in flight."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
