"""The blocking client, and the settings it shares with `AsyncClient`."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Unpack, get_type_hints

from protocol.channel import (
    KeepAliveOptions,
    RetryPolicy,
    TlsOptions,
    bearer_metadata,
    open_channel,
)
from protocol.errors import InvalidRequest, translated_rpc_errors
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

# Deadline of every call unless the client or the call says otherwise. A whole
# generation must finish within it: raise it for long outputs.
DEFAULT_TIMEOUT_S = 120.0
# Services the retry policy covers.
RETRIED_SERVICES = (
    pb.DESCRIPTOR.services_by_name["Generation"].full_name,
    "grpc.health.v1.Health",
)


def options_signature(method: Callable) -> Callable:
    """Shows `GenerateKwargs`' keywords in `method`'s signature (for help() and editors)
    in place of its `**options`, before `timeout`."""
    signature = inspect.signature(method)
    fixed = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    timeout = [p for p in fixed if p.name == "timeout"]
    keywords = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=kind)
        for name, kind in get_type_hints(GenerateKwargs).items()
    ]
    parameters = [p for p in fixed if p.name != "timeout"] + keywords + timeout
    method.__signature__ = signature.replace(parameters=parameters)
    return method


@dataclass(frozen=True)
class ClientSettings:
    """What `Client` and `AsyncClient` take, checked once."""

    target: str
    tls: TlsOptions | None
    metadata: tuple[tuple[str, str], ...]
    timeout: float
    retry: RetryPolicy | None
    keepalive: KeepAliveOptions
    max_message_bytes: int
    defaults: GenerateOptions

    @classmethod
    def of(
        cls,
        target: str,
        *,
        token: str | None,
        tls: TlsOptions | None,
        timeout: float | None,
        retry: RetryPolicy | None,
        keepalive: KeepAliveOptions,
        max_message_bytes: int,
        defaults: GenerateOptions,
    ) -> ClientSettings:
        if not isinstance(target, str) or not target:
            raise InvalidRequest(f"target: must be 'host:port', got {target!r}", field="target")
        if token is not None and (not isinstance(token, str) or not token.strip()):
            raise InvalidRequest("token: must be a non-empty string or None", field="token")
        return cls(
            target=target,
            tls=tls,
            metadata=bearer_metadata(token),
            timeout=DEFAULT_TIMEOUT_S if timeout is None else checked_timeout(timeout),
            retry=retry,
            keepalive=keepalive,
            max_message_bytes=max_message_bytes,
            defaults=defaults,
        )

    def channel_options(self) -> dict[str, object]:
        """Keyword arguments for `open_channel` / `open_aio_channel`."""
        return {
            "max_message_bytes": self.max_message_bytes,
            "keepalive_s": self.keepalive.interval_s,
            "keepalive_timeout_s": self.keepalive.timeout_s,
            "service_config": self.retry.service_config(RETRIED_SERVICES) if self.retry else None,
        }

    def request(self, prompt: Prompt, options: GenerateKwargs) -> pb.GenerateRequest:
        """The wire request for `prompt` with `options` over the client's defaults;
        TypeError for a keyword that is not an option (even one passed as None)."""
        unknown = sorted(options.keys() - GenerateKwargs.__annotations__.keys())
        if unknown:
            raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
        return self.defaults.updated(**options).request(prompt)

    def timeout_for(self, override: float | None) -> float:
        return self.timeout if override is None else checked_timeout(override)


def checked_timeout(timeout: float) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise InvalidRequest(f"timeout: must be > 0 seconds, got {timeout!r}", field="timeout")
    if math.isinf(timeout):
        raise InvalidRequest("timeout: every call has a deadline, got inf", field="timeout")
    return float(timeout)


def health_modules() -> tuple[ModuleType, ModuleType]:
    """grpc.health.v1's messages and stubs, imported on first use: the SDK itself needs
    only grpcio and protobuf."""
    try:
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError as exc:
        raise ImportError(
            "health() needs grpcio-health-checking: pip install grpcio-health-checking"
        ) from exc
    return health_pb2, health_pb2_grpc


def health_status(response: object) -> HealthStatus:
    health_pb2, _ = health_modules()
    return HealthStatus[health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)]


class GenerationStream(Transcript):
    """The chunks of one `Generate` call, as an iterator. `text` and `tokens` hold the
    output so far with rollbacks applied; `stats` is set once the last chunk arrived.

    Leaving the `with` block (or `close()`) cancels a generation still running.
    Iteration raises `EdgecloudError` subclasses only; if the stream ends without its
    final statistics it raises `ServerError` (the output may be cut short).
    """

    def __init__(self, call: Iterator[pb.GenerateChunk]) -> None:
        super().__init__()
        self._call = call
        self._done = False

    def __iter__(self) -> GenerationStream:
        return self

    def __next__(self) -> Chunk:
        if self._done:
            raise StopIteration
        try:
            with translated_rpc_errors():
                msg = next(self._call)
            return self._apply(msg)
        except StopIteration:
            self._done = True
            self._result()  # raises if the final chunk never came
            raise
        except BaseException:
            self.close()
            raise

    def result(self) -> GenerationResult:
        """Reads the rest of the stream and returns the whole generation."""
        for _ in self:
            pass
        return self._result()

    def close(self) -> None:
        if not self._done:
            self._done = True
            self._call.cancel()

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Client:
    """Blocking client for the Generation service.

        with edgecloud.Client("localhost:50051", token="...") as client:
            print(client.generate("Once upon a time", max_tokens=32).text)

    One channel per client, reused by every call; it is thread-safe. Every call has a
    deadline (`timeout` seconds: the client's, or the call's own), carries the bearer
    token, and is retried on UNAVAILABLE per `retry` (for `generate`/`stream`: only
    before the first token, see `RetryPolicy`). `defaults` are the generation options
    used where a call leaves a parameter as None.
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
        self._channel = open_channel(
            self._settings.target, tls=self._settings.tls, **self._settings.channel_options()
        )
        self._stub = pb_grpc.GenerationStub(self._channel)

    @options_signature
    def generate(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateKwargs],
    ) -> GenerationResult:
        """Generates from `prompt` and returns the whole output with its statistics.
        `prompt` is text, a list of token ids, or a chat: a list of `ChatMessage`s or
        {"role", "content"} dicts, which the edge renders with its model's chat template
        (ending in an open assistant turn). Parameters left as None come from `defaults`;
        see `GenerateOptions` for their meaning and ranges."""
        with self.stream(prompt, timeout=timeout, **options) as stream:
            return stream.result()

    @options_signature
    def stream(
        self,
        prompt: Prompt,
        *,
        timeout: float | None = None,
        **options: Unpack[GenerateKwargs],
    ) -> GenerationStream:
        """Like `generate`, but yields chunks as tokens are produced. The request is
        validated here, before the call starts."""
        request = self._settings.request(prompt, options)
        call = self._stub.Generate(
            request, timeout=self._settings.timeout_for(timeout), metadata=self._settings.metadata
        )
        return GenerationStream(call)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        with translated_rpc_errors():
            response = self._stub.ListModels(
                pb.ListModelsRequest(),
                timeout=self._settings.timeout_for(timeout),
                metadata=self._settings.metadata,
            )
        return [ModelInfo.from_proto(m) for m in response.models]

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """grpc.health.v1 Check of `service` ("" = the whole server). Sends no token:
        the health service is open. Needs grpcio-health-checking."""
        health_pb2, health_pb2_grpc = health_modules()
        with translated_rpc_errors():
            response = health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=self._settings.timeout_for(timeout),
            )
        return health_status(response)

    def close(self) -> None:
        """Closes the channel, cancelling calls in flight."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
