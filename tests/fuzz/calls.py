"""Calling each method with raw request bytes, so generated and mutated messages go
through the same path; each returns the final status and its message."""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from tests.fuzz.strategies import CALL_TIMEOUT_S, identity

GENERATE = "/edgecloud.v1.Generation/Generate"
LIST_MODELS = "/edgecloud.v1.Generation/ListModels"
VERIFY = "/edgecloud.v1.Verifier/Verify"
Metadata = Sequence[tuple[str, str]]


def generate(channel: grpc.Channel, data: bytes, metadata: Metadata) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_stream(GENERATE, request_serializer=identity)
    try:
        for _ in call(data, metadata=metadata, timeout=CALL_TIMEOUT_S):
            pass
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def list_models(
    channel: grpc.Channel, data: bytes, metadata: Metadata
) -> tuple[grpc.StatusCode, str]:
    call = channel.unary_unary(LIST_MODELS, request_serializer=identity)
    try:
        call(data, metadata=metadata, timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""


def verify(
    channel: grpc.Channel, messages: Sequence[bytes], metadata: Metadata
) -> tuple[grpc.StatusCode, str]:
    call = channel.stream_stream(VERIFY, request_serializer=identity)
    try:
        for _ in call(iter(messages), metadata=metadata, timeout=CALL_TIMEOUT_S):
            pass
    except grpc.RpcError as error:
        return error.code(), error.details() or ""
    return grpc.StatusCode.OK, ""
