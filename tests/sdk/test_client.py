"""The SDK clients against a real gRPC server on loopback.

The server here is scripted: it stands in for the edge/gateway stack, which does not
exist yet, and streams a fixed script (with a rollback chunk and a final stats chunk)
or fails on request, as the prompt tells it. It is a real `grpc.server`, so
deadlines, metadata, retries and status codes all cross a real HTTP/2 connection.
End-to-end tests against the real server come with the edge server.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import edgecloud
from edgecloud import (
    AsyncClient,
    Client,
    DeadlineExceeded,
    EdgecloudError,
    FinishReason,
    HealthStatus,
    InvalidRequest,
    ResourceExhausted,
    RetryPolicy,
    Rollback,
    ServerError,
    Unauthenticated,
    Unavailable,
)
from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc
from tests.certs import make_certificates

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "sdk-test-token"
# Backoff short enough that retried failures stay fast.
FAST_RETRY = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.02)

STATS = pb.GenerationStats(
    rounds=3,
    tokens_per_round=2.5,
    cloud_forward_passes=4,
    generated_tokens=5,
    prompt_tokens=6,
    bytes_to_cloud=7_000_000_000,  # past 2**32: int64 on the wire
    bytes_from_cloud=8,
    time_to_first_token_ms=12.25,
    total_ms=88.5,
    degraded=True,
    failovers=1,
    draft_tokens=9,
    accepted_tokens=10,
    accepted_per_position=[3, 2, 1],
    rollbacks=1,
)
SCRIPT = (
    pb.GenerateChunk(text="Héllo", tokens=[1, 2], verified=True),
    pb.GenerateChunk(text=" wrld", tokens=[3, 4], verified=False),
    # Adaptive mode corrects its unverified span: keep "Héllo" (5 characters, 6 bytes).
    pb.GenerateChunk(
        text=" world",
        tokens=[5, 6],
        verified=True,
        rollback=pb.Rollback(keep_tokens=2, keep_chars=5),
    ),
    pb.GenerateChunk(
        text="!", tokens=[7], verified=True, stats=STATS, finish_reason=pb.FINISH_REASON_STOP
    ),
)
# What a client holds after each chunk of SCRIPT.
TEXT_SO_FAR = ("Héllo", "Héllo wrld", "Héllo world", "Héllo world!")
TOKENS_SO_FAR = ((1, 2), (1, 2, 3, 4), (1, 2, 5, 6), (1, 2, 5, 6, 7))
MODELS = (
    pb.ModelInfo(name="stories260K", vocab_size=512, max_context=512, roles=["edge", "cloud"]),
    pb.ModelInfo(name="tiny-cloud", vocab_size=32000, max_context=4096, roles=["cloud"]),
)


class ScriptedGeneration(pb_grpc.GenerationServicer):
    """Answers by prompt:
    "abort:CODE"        fails with that status and the message "scripted CODE";
    "sleep:SECONDS"     waits (while the call is alive), then plays the script;
    "flaky:ID"          fails UNAVAILABLE on its first attempt, plays the script after;
    "drop-after-first:ID" sends one chunk, then fails UNAVAILABLE;
    "no-stats"          plays the script without its final chunk;
    anything else       plays the script.
    Every call must carry the test token; `requests` and `attempts` record the calls."""

    def __init__(self) -> None:
        self.requests: list[pb.GenerateRequest] = []
        self.attempts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def _check_token(self, context: grpc.ServicerContext) -> None:
        sent = dict(context.invocation_metadata()).get("authorization")
        if sent is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        if sent != f"Bearer {TOKEN}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "wrong bearer token")

    def Generate(self, request, context):
        self._check_token(context)
        with self._lock:
            self.requests.append(request)
            self.attempts[request.prompt] += 1
            attempt = self.attempts[request.prompt]
        command, _, arg = request.prompt.partition(":")
        if command == "abort":
            context.abort(grpc.StatusCode[arg], f"scripted {arg}")
        if command == "sleep":
            until = time.monotonic() + float(arg)
            while context.is_active() and time.monotonic() < until:
                time.sleep(0.01)
        if command == "flaky" and attempt == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "no verifier yet")
        if command == "drop-after-first":
            yield SCRIPT[0]
            context.abort(grpc.StatusCode.UNAVAILABLE, "edge lost")
        yield from SCRIPT[:-1] if command == "no-stats" else SCRIPT

    def ListModels(self, request, context):
        self._check_token(context)
        return pb.ListModelsResponse(models=MODELS)


@pytest.fixture(scope="module")
def server():
    servicer = ScriptedGeneration()
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_GenerationServicer_to_server(servicer, grpc_server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    servicer.port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield servicer
    grpc_server.stop(grace=None)


@pytest.fixture
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


@pytest.fixture
def client(target):
    with Client(target, token=TOKEN, retry=FAST_RETRY, timeout=10) as client:
        yield client


def assert_scripted_result(result: edgecloud.GenerationResult) -> None:
    assert result.text == TEXT_SO_FAR[-1]
    assert result.tokens == TOKENS_SO_FAR[-1]
    assert result.finish_reason is FinishReason.STOP
    for field in pb.GenerationStats.DESCRIPTOR.fields:
        sent = getattr(STATS, field.name)
        expected = tuple(sent) if field.is_repeated else sent
        assert getattr(result.stats, field.name) == expected, field.name
    assert result.stats.tau == 2.5


def test_generate_returns_text_tokens_and_stats(client):
    assert_scripted_result(client.generate("Once upon a time", max_tokens=8))


def test_stream_applies_rollbacks_as_chunks_arrive(client):
    with client.stream("Once upon a time", max_tokens=8) as stream:
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            i = len(chunks) - 1
            assert (stream.text, stream.tokens) == (TEXT_SO_FAR[i], TOKENS_SO_FAR[i])
            assert (stream.stats is None) == (i < len(SCRIPT) - 1)
        assert_scripted_result(stream.result())
    assert [c.text for c in chunks] == [m.text for m in SCRIPT]
    assert [c.verified for c in chunks] == [True, False, True, True]
    assert [c.rollback for c in chunks] == [None, None, Rollback(keep_tokens=2, keep_chars=5), None]
    assert chunks[-1].stats == stream.stats


async def test_async_generate_and_stream_agree_with_sync(client, target):
    sync_result = client.generate("Once upon a time", max_tokens=8)
    async with AsyncClient(target, token=TOKEN, retry=FAST_RETRY, timeout=10) as aclient:
        async_result = await aclient.generate("Once upon a time", max_tokens=8)
        async with aclient.stream("Once upon a time", max_tokens=8) as stream:
            seen = [(stream.text, stream.tokens) async for _ in stream]
            streamed = await stream.result()
    assert seen == list(zip(TEXT_SO_FAR, TOKENS_SO_FAR, strict=True))
    assert sync_result == async_result == streamed
    assert_scripted_result(async_result)


def test_request_reaches_the_server_as_given(server, target):
    defaults = edgecloud.GenerateOptions(mode="adaptive", temperature=0.5)
    with Client(target, token=TOKEN, defaults=defaults) as client:
        client.generate([11, 12, 13], seed=2**64 - 1, stop="\n", top_k=4, max_tokens=8)
    (sent,) = [r for r in server.requests if list(r.prompt_tokens) == [11, 12, 13]]
    assert (sent.prompt, sent.mode, sent.temperature, sent.top_k) == ("", pb.MODE_ADAPTIVE, 0.5, 4)
    assert (sent.seed, list(sent.stop), sent.max_tokens) == (2**64 - 1, ["\n"], 8)


CODES = [
    (grpc.StatusCode.INVALID_ARGUMENT, InvalidRequest),
    (grpc.StatusCode.UNAUTHENTICATED, Unauthenticated),
    (grpc.StatusCode.UNAVAILABLE, Unavailable),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, ResourceExhausted),
    (grpc.StatusCode.DEADLINE_EXCEEDED, DeadlineExceeded),
    (grpc.StatusCode.CANCELLED, Unavailable),
    (grpc.StatusCode.INTERNAL, ServerError),
    (grpc.StatusCode.NOT_FOUND, ServerError),
    (grpc.StatusCode.PERMISSION_DENIED, ServerError),
    (grpc.StatusCode.FAILED_PRECONDITION, ServerError),
]


def assert_maps(error: BaseException, code: grpc.StatusCode, cls: type) -> None:
    assert type(error) is cls
    assert not isinstance(error, grpc.RpcError), "transport exceptions must not leak"
    assert error.code == code
    assert error.message == str(error) == f"scripted {code.name}"


@pytest.mark.parametrize(("code", "cls"), CODES, ids=[c.name for c, _ in CODES])
async def test_status_codes_map_to_typed_errors(client, target, code, cls):
    prompt = f"abort:{code.name}"
    with pytest.raises(EdgecloudError) as from_generate:
        client.generate(prompt)
    assert_maps(from_generate.value, code, cls)
    stream = client.stream(prompt)
    with pytest.raises(EdgecloudError) as from_stream:
        next(stream)
    assert_maps(from_stream.value, code, cls)
    async with AsyncClient(target, token=TOKEN, retry=FAST_RETRY) as aclient:
        with pytest.raises(EdgecloudError) as from_async:
            await aclient.generate(prompt)
    assert_maps(from_async.value, code, cls)


async def test_token_is_sent_and_checked(target):
    for token, message in [(None, "missing bearer token"), ("nope", "wrong bearer token")]:
        with Client(target, token=token) as client:
            with pytest.raises(Unauthenticated, match=f"^{message}$"):
                client.generate("hi")
            with pytest.raises(Unauthenticated, match=f"^{message}$"):
                client.list_models()
            assert client.health() is HealthStatus.SERVING, "health needs no token"
        async with AsyncClient(target, token=token) as aclient:
            with pytest.raises(Unauthenticated, match=f"^{message}$"):
                await aclient.list_models()
            assert await aclient.health() is HealthStatus.SERVING


async def test_list_models(client, target):
    expected = [
        edgecloud.ModelInfo("stories260K", 512, 512, ("edge", "cloud")),
        edgecloud.ModelInfo("tiny-cloud", 32000, 4096, ("cloud",)),
    ]
    assert client.list_models() == expected
    async with AsyncClient(target, token=TOKEN) as aclient:
        assert await aclient.list_models() == expected


async def test_deadlines_become_deadline_exceeded(target):
    with Client(target, token=TOKEN, timeout=0.05) as client:
        with pytest.raises(DeadlineExceeded):
            client.generate("sleep:5")
        assert_scripted_result(client.generate("sleep:0.2", timeout=10))  # per-call override
    async with AsyncClient(target, token=TOKEN, timeout=10) as aclient:
        with pytest.raises(DeadlineExceeded):
            await aclient.generate("sleep:5", timeout=0.05)


BAD_CALLS = [
    ({"temperature": 101.0}, "temperature: must be in [0, 100], got 101.0"),
    ({"top_p": -0.1}, "top_p: must be in [0, 1], got -0.1"),
    (
        {"max_tokens": 0},
        "max_tokens: must be in [1, max_context] (the model's context; at most 1048576), got 0",
    ),
    (
        {"mode": "fast"},
        "mode: must be one of lossless, adaptive, edge_only, cloud_only, got 'fast'",
    ),
    ({"seed": -1}, "seed: must be in [0, 2**64), got -1"),
    ({"stop": ["x" * 65]}, "stop[0]: must be a string of 1 to 64 characters"),
    ({"timeout": 0}, "timeout: must be > 0 seconds, got 0"),
]


@pytest.mark.parametrize(
    ("kwargs", "message"), BAD_CALLS, ids=[m.split(":")[0] for _, m in BAD_CALLS]
)
async def test_invalid_parameters_fail_before_any_call(server, client, target, kwargs, message):
    calls_before = len(server.requests)
    with pytest.raises(InvalidRequest) as from_generate:
        client.generate("hi", **kwargs)
    with pytest.raises(InvalidRequest) as from_stream:
        client.stream("hi", **kwargs)  # at the call, not at the first chunk
    async with AsyncClient(target, token=TOKEN) as aclient:
        with pytest.raises(InvalidRequest) as from_async_stream:
            aclient.stream("hi", **kwargs)
    for info in (from_generate, from_stream, from_async_stream):
        assert str(info.value).startswith(message)
        assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(server.requests) == calls_before, "nothing may reach the server"


def test_empty_prompt_fails_before_any_call(server, client):
    calls_before = len(server.requests)
    with pytest.raises(InvalidRequest, match="^prompt: exactly one of prompt, prompt_tokens and"):
        client.generate([])
    assert len(server.requests) == calls_before


def test_unavailable_is_retried_before_the_first_token(server, client):
    prompt = f"flaky:{uuid.uuid4()}"
    assert_scripted_result(client.generate(prompt))
    assert server.attempts[prompt] == 2


def test_unavailable_after_the_first_token_is_not_retried(server, client):
    prompt = f"drop-after-first:{uuid.uuid4()}"
    with client.stream(prompt) as stream:
        assert next(stream).text == "Héllo"
        with pytest.raises(Unavailable, match="^edge lost$"):
            next(stream)
        assert stream.text == "Héllo", "the tokens received so far stay available"
    assert server.attempts[prompt] == 1


def test_stream_cut_before_its_stats_is_a_server_error(client):
    with client.stream("no-stats") as stream:
        with pytest.raises(ServerError, match="without its final chunk"):
            list(stream)
        assert stream.text == "Héllo world"


async def test_unreachable_server_is_unavailable():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
    with Client(target, token=TOKEN, retry=FAST_RETRY, timeout=10) as client:
        with pytest.raises(Unavailable):
            client.generate("hi")
        with pytest.raises(Unavailable):
            client.health()
    async with AsyncClient(target, token=TOKEN, retry=FAST_RETRY, timeout=10) as aclient:
        with pytest.raises(Unavailable):
            await aclient.generate("hi")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls(tmp_path):
    files = make_certificates(tmp_path)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GenerationServicer_to_server(ScriptedGeneration(), grpc_server)
    credentials = grpc.ssl_server_credentials(
        [(files["server.key"].read_bytes(), files["server.pem"].read_bytes())],
        root_certificates=files["ca.pem"].read_bytes(),
        require_client_auth=True,
    )
    port = grpc_server.add_secure_port("127.0.0.1:0", credentials)
    grpc_server.start()
    try:
        target = f"127.0.0.1:{port}"
        tls = edgecloud.TlsOptions(
            ca=files["ca.pem"],
            cert=files["client.pem"],
            key=files["client.key"],
            server_name="localhost",  # the name in the server's certificate
        )
        with Client(target, token=TOKEN, tls=tls, retry=FAST_RETRY) as client:
            assert_scripted_result(client.generate("over TLS"))
        no_client_cert = edgecloud.TlsOptions(ca=files["ca.pem"], server_name="localhost")
        with Client(target, token=TOKEN, tls=no_client_cert, retry=FAST_RETRY) as client:
            with pytest.raises(Unavailable):
                client.generate("over TLS")
    finally:
        grpc_server.stop(grace=None)


LIGHT_INSTALL = """
import importlib.abc, json, sys

BLOCKED = {"torch", "ray", "redis", "grpc_health", "grpc_reflection", "grpc_tools"}

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is not installed in the light environment")
        return None

sys.meta_path.insert(0, Blocker())
import edgecloud

with edgecloud.Client(sys.argv[1], token=sys.argv[2]) as client:
    request = edgecloud.GenerateOptions(mode="edge_only").request([1, 2, 3])
    result = client.generate("Once upon a time", max_tokens=8)
    try:
        client.health()
        health = "worked"
    except ImportError as exc:
        health = str(exc)
ours = {"lm", "serving", "cloud_node", "edge_node", "orchestrator"}
print(json.dumps({
    "request_mode": request.mode,
    "text": result.text,
    "tokens": list(result.tokens),
    "health": health,
    "loaded": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED | ours),
}))
"""


def test_light_install_generates_with_grpc_and_protobuf_only(target):
    """`import edgecloud` and a generation need nothing beyond grpcio and protobuf:
    torch, ray, redis and the optional grpc extras are made unimportable."""
    done = subprocess.run(
        [sys.executable, "-c", LIGHT_INSTALL, target, TOKEN],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["request_mode"] == pb.MODE_EDGE_ONLY
    assert (report["text"], tuple(report["tokens"])) == (TEXT_SO_FAR[-1], TOKENS_SO_FAR[-1])
    assert report["health"].startswith("health() needs grpcio-health-checking")
    assert report["loaded"] == []
