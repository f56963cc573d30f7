"""Contract tests: the SDK wraps every RPC of the Generation service, maps every field
of the messages it returns, keeps its two clients in step, exports a pinned list of
names, and imports nothing beyond grpcio and protobuf."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import pytest

import edgecloud
from edgecloud import AsyncClient, Client
from protocol.v1 import generation_pb2 as pb

SDK_DIR = Path(edgecloud.__file__).parent
# The contract the SDK shares with the servers; installed with it, held to the same rule.
PROTOCOL_DIR = SDK_DIR.parent / "protocol"
# Modules the SDK may import: the standard library aside, only grpcio and protobuf
# (and grpcio-health-checking, lazily, for health()).
ALLOWED_THIRD_PARTY = {"grpc", "google", "grpc_health"}


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@pytest.mark.parametrize("client", [Client, AsyncClient])
def test_every_generation_rpc_has_a_wrapper(client):
    service = pb.DESCRIPTOR.services_by_name["Generation"]
    assert service.methods, "the service descriptor lists no methods"
    for method in service.methods:
        wrapper = getattr(client, snake_case(method.name), None)
        assert callable(wrapper), f"{client.__name__} does not wrap {method.full_name}"
        if client is AsyncClient and not method.server_streaming:
            assert inspect.iscoroutinefunction(wrapper), f"{method.name} must be awaitable"


def test_sync_and_async_methods_take_the_same_parameters():
    for name in ("generate", "stream", "list_models", "health", "__init__"):
        sync = inspect.signature(getattr(Client, name)).parameters
        async_ = inspect.signature(getattr(AsyncClient, name)).parameters
        assert [(p.name, p.kind, p.default) for p in sync.values()] == [
            (p.name, p.kind, p.default) for p in async_.values()
        ], name


def test_generation_parameters_are_the_options_fields():
    """Every GenerateOptions field is a keyword of generate/stream, and vice versa."""
    fields = {f.name for f in dataclasses.fields(edgecloud.GenerateOptions)}
    for name in ("generate", "stream"):
        params = inspect.signature(getattr(Client, name)).parameters
        keywords = {p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY}
        assert keywords == fields | {"timeout"}, name


@pytest.mark.parametrize(
    ("sdk_type", "message"),
    [
        (edgecloud.GenerationStats, pb.GenerationStats),
        (edgecloud.ModelInfo, pb.ModelInfo),
        (edgecloud.Rollback, pb.Rollback),
        (edgecloud.Chunk, pb.GenerateChunk),
    ],
)
def test_every_proto_field_is_mapped(sdk_type, message):
    proto_fields = {f.name for f in message.DESCRIPTOR.fields}
    assert {f.name for f in dataclasses.fields(sdk_type)} == proto_fields


def test_health_status_covers_the_health_proto():
    health_pb2 = pytest.importorskip("grpc_health.v1.health_pb2")
    names = health_pb2.HealthCheckResponse.ServingStatus.keys()
    assert sorted(edgecloud.HealthStatus.__members__) == sorted(names)


def test_public_names_are_pinned():
    assert edgecloud.__all__ == [
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
    for name in edgecloud.__all__:
        assert getattr(edgecloud, name).__module__.startswith(("edgecloud.", "protocol.")), name


def test_errors_form_one_hierarchy():
    for name in (
        "InvalidRequest",
        "Unauthenticated",
        "Unavailable",
        "ResourceExhausted",
        "DeadlineExceeded",
        "ServerError",
    ):
        assert issubclass(getattr(edgecloud, name), edgecloud.EdgecloudError), name
    assert issubclass(edgecloud.InvalidRequest, ValueError)


def test_sdk_imports_only_grpc_and_protobuf():
    """Static check, lazy imports inside functions included; the light-install test in
    test_client.py checks the same at run time."""
    import sys

    allowed = set(sys.stdlib_module_names) | ALLOWED_THIRD_PARTY
    allowed |= {"edgecloud", "protocol", "__future__"}
    for path in sorted([*SDK_DIR.rglob("*.py"), *PROTOCOL_DIR.rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                assert top in allowed, f"{path.relative_to(SDK_DIR.parent)} imports {name}"


def test_an_unknown_option_is_a_type_error_even_as_none():
    """`**options` would otherwise drop a misspelled keyword passed as None."""
    settings = edgecloud.Client("127.0.0.1:1")._settings
    with pytest.raises(TypeError, match="max_token"):
        settings.request([1, 2], {"max_token": None})
    assert settings.request([1, 2], {"max_tokens": 3}).max_tokens == 3
