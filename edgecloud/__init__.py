"""edgecloud client SDK: generate text with edge-drafted, cloud-verified decoding.

Needs only grpcio and protobuf (plus grpcio-health-checking for `health()`). The
public names are below; the clients live in private modules, and the values, limits,
errors and generated stubs they share with the servers in `protocol`.
"""

from edgecloud._async_client import AsyncClient, AsyncGenerationStream
from edgecloud._client import Client, GenerationStream
from protocol.channel import KeepAliveOptions, RetryPolicy, TlsOptions
from protocol.errors import (
    DeadlineExceeded,
    EdgecloudError,
    InvalidRequest,
    ResourceExhausted,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from protocol.types import (
    ChatMessage,
    Chunk,
    DraftOptions,
    FinishReason,
    GenerateOptions,
    GenerationResult,
    GenerationStats,
    HealthStatus,
    Mode,
    ModelInfo,
    Rollback,
)

__all__ = [
    "AsyncClient",
    "AsyncGenerationStream",
    "ChatMessage",
    "Chunk",
    "Client",
    "DeadlineExceeded",
    "DraftOptions",
    "EdgecloudError",
    "FinishReason",
    "GenerateOptions",
    "GenerationResult",
    "GenerationStats",
    "GenerationStream",
    "HealthStatus",
    "InvalidRequest",
    "KeepAliveOptions",
    "Mode",
    "ModelInfo",
    "ResourceExhausted",
    "RetryPolicy",
    "Rollback",
    "ServerError",
    "TlsOptions",
    "Unauthenticated",
    "Unavailable",
]
