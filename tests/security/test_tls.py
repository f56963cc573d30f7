"""TLS end to end with certificates the test makes: client -> edge server (TLS, then
mutual TLS) -> verifier (mutual TLS), with a separate token on each hop. A client
that does not trust the CA, or lacks a certificate where one is required, is
refused; no token shows in the logs (captured at DEBUG). Then the same through the
real pieces: a `Stack` gateway (gRPC and HTTP) with mutual and one-way TLS, and
`edgecloud edge serve --verifier-ca/--verifier-cert/--verifier-key` processes in
front of `edgecloud cloud serve --tls-client-ca`."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shutil
import ssl
import urllib.request

import pytest
import pytest_asyncio

import edgecloud
from cloud_node.config import VerifierConfig
from cloud_node.server import start_verifier
from edge_node.cloud_link import CloudLink, CloudLinkConfig
from edge_node.picker import FixedListPicker, VerifierEndpoint
from edge_node.runtime import EdgeConfig, EdgeRuntime
from edge_node.server import start_edge_server
from orchestrator.cli import main
from orchestrator.stack import Stack, StackConfig
from protocol.channel import TlsOptions
from serving.auth import AuthConfig
from serving.server import ServerConfig, TlsConfig
from tests import fleet
from tests.certs import make_certificates
from tests.edge_node.conftest import draft, target  # noqa: F401
from tests.tiny import MODEL_NAME

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
CLIENT_TOKEN = "tls-client-token-61fa"
VERIFIER_TOKEN = "tls-verifier-token-0c9d"
PROMPT = [1, 5, 9]


@pytest.fixture
async def tls_pair(tmp_path, target, draft):  # noqa: F811
    """A verifier requiring client certificates, and an edge in front of it reaching
    it with the CA-signed client pair; the edge's own server requires one too."""
    files = make_certificates(tmp_path)
    mutual = TlsConfig(files["server.pem"], files["server.key"], client_ca=files["ca.pem"])
    verifier = await start_verifier(
        target,
        VerifierConfig(model_name=MODEL_NAME, max_context=128),
        ServerConfig(auth=AuthConfig(token=VERIFIER_TOKEN), tls=mutual),
    )
    client_pair = TlsOptions(
        ca=files["ca.pem"],
        cert=files["client.pem"],
        key=files["client.key"],
        server_name="localhost",
    )
    link = CloudLink(
        FixedListPicker([VerifierEndpoint(f"127.0.0.1:{verifier.port}", MODEL_NAME)]),
        CloudLinkConfig(token=VERIFIER_TOKEN, tls=client_pair),
    )
    edge = await start_edge_server(
        EdgeRuntime(draft, EdgeConfig(model_name=MODEL_NAME), link=link),
        ServerConfig(auth=AuthConfig(token=CLIENT_TOKEN), tls=mutual),
    )
    yield edge, files, client_pair
    await edge.drain()
    await verifier.drain()


async def test_mutual_tls_from_client_through_edge_to_verifier(tls_pair, caplog):
    caplog.set_level(logging.DEBUG)
    edge, files, client_pair = tls_pair
    address = f"127.0.0.1:{edge.port}"
    async with edgecloud.AsyncClient(address, token=CLIENT_TOKEN, tls=client_pair) as client:
        lossless = await client.generate(PROMPT, max_tokens=12)
        cloud = await client.generate(PROMPT, max_tokens=12, mode="cloud_only")
    assert list(lossless.tokens) == list(cloud.tokens) and len(cloud.tokens) == 12
    assert lossless.stats.rounds > 0 and not lossless.stats.degraded
    no_cert = TlsOptions(ca=files["ca.pem"], server_name="localhost")
    untrusting = TlsOptions(server_name="localhost")  # system roots: our CA is unknown
    for tls in (no_cert, untrusting):
        async with edgecloud.AsyncClient(address, token=CLIENT_TOKEN, tls=tls, retry=None) as c:
            with pytest.raises(edgecloud.Unavailable):
                await c.generate(PROMPT, max_tokens=2)
    async with edgecloud.AsyncClient(address, token=VERIFIER_TOKEN, tls=client_pair) as client:
        with pytest.raises(edgecloud.Unauthenticated) as caught:
            await client.generate(PROMPT, max_tokens=2)
    assert VERIFIER_TOKEN not in str(caught.value)
    assert CLIENT_TOKEN not in caplog.text and VERIFIER_TOKEN not in caplog.text


async def test_one_way_tls_to_the_edge(tmp_path, target, draft):  # noqa: F811
    files = make_certificates(tmp_path)
    edge = await start_edge_server(
        EdgeRuntime(draft, EdgeConfig(model_name=MODEL_NAME)),
        ServerConfig(
            auth=AuthConfig(token=CLIENT_TOKEN),
            tls=TlsConfig(files["server.pem"], files["server.key"]),
        ),
    )
    tls = TlsOptions(ca=files["ca.pem"], server_name="localhost")
    async with edgecloud.AsyncClient(f"127.0.0.1:{edge.port}", token=CLIENT_TOKEN, tls=tls) as c:
        result = await c.generate(PROMPT, max_tokens=5, mode="edge_only")
    assert len(result.tokens) == 5
    async with edgecloud.AsyncClient(f"127.0.0.1:{edge.port}", retry=None) as plaintext:
        with pytest.raises(edgecloud.Unavailable):
            await plaintext.generate(PROMPT, max_tokens=2, mode="edge_only")
    await edge.drain()


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> dict:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def fleet_files(tmp_path_factory) -> fleet.Files:
    return fleet.write_files(tmp_path_factory.mktemp("fleet"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def tls_stack(fleet_files, certificates):
    """One edge, one verifier and the gateway (gRPC and HTTP) requiring client
    certificates signed by the test's CA."""
    files = certificates
    stack = Stack(
        StackConfig(
            target_dir=fleet_files.target,
            draft_dir=fleet_files.draft,
            edges=1,
            gateway_port=0,
            http_port=0,
            client_token=fleet.CLIENT_TOKEN,
            tls=TlsConfig(files["server.pem"], files["server.key"], client_ca=files["ca.pem"]),
        )
    )
    await stack.start()
    yield stack
    await stack.stop()


def get_models(url: str, context: ssl.SSLContext) -> list[str]:
    """GET /v1/models over HTTPS with the client token: the served model names."""
    request = urllib.request.Request(
        f"{url}/v1/models", headers={"Authorization": f"Bearer {fleet.CLIENT_TOKEN}"}
    )
    with urllib.request.urlopen(request, context=context, timeout=10) as reply:
        return [m["id"] for m in json.load(reply)["data"]]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_gateway_with_mutual_tls(tls_stack, certificates):
    files = certificates
    pair = TlsOptions(ca=files["ca.pem"], cert=files["client.pem"], key=files["client.key"])
    address = tls_stack.gateway_address  # 127.0.0.1: in the certificate, no name override
    async with edgecloud.AsyncClient(address, token=fleet.CLIENT_TOKEN, tls=pair) as client:
        lossless = await client.generate(PROMPT, max_tokens=12)
        cloud = await client.generate(PROMPT, max_tokens=12, mode="cloud_only")
    assert list(lossless.tokens) == list(cloud.tokens) and len(cloud.tokens) == 12
    assert lossless.stats.rounds > 0
    no_cert = TlsOptions(ca=files["ca.pem"])
    untrusting = TlsOptions(cert=files["client.pem"], key=files["client.key"])
    for tls in (no_cert, untrusting, None):
        async with edgecloud.AsyncClient(
            address, token=fleet.CLIENT_TOKEN, tls=tls, retry=None
        ) as client:
            with pytest.raises(edgecloud.Unavailable):
                await client.generate(PROMPT, max_tokens=2)
    assert tls_stack.http.url.startswith("https://")
    with_cert = ssl.create_default_context(cafile=files["ca.pem"])
    with_cert.load_cert_chain(files["client.pem"], files["client.key"])
    assert await asyncio.to_thread(get_models, tls_stack.http.url, with_cert) == [fleet.MODEL_NAME]
    without_cert = ssl.create_default_context(cafile=files["ca.pem"])
    with pytest.raises(OSError):  # the handshake or the first read fails
        await asyncio.to_thread(get_models, tls_stack.http.url, without_cert)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="module")
async def test_gateway_with_one_way_tls(tls_stack, certificates):
    """The same actors behind a gateway restarted with server-only TLS (and no HTTP):
    a client that trusts the CA needs no certificate; plaintext is still refused."""
    files = certificates
    await tls_stack.http.stop()
    tls_stack.http = None
    tls_stack.config = dataclasses.replace(
        tls_stack.config, tls=TlsConfig(files["server.pem"], files["server.key"]), http_port=None
    )
    await tls_stack.restart_gateway()
    address = tls_stack.gateway_address
    tls = TlsOptions(ca=files["ca.pem"])
    async with edgecloud.AsyncClient(address, token=fleet.CLIENT_TOKEN, tls=tls) as client:
        result = await client.generate(PROMPT, max_tokens=6, mode="cloud_only")
    assert len(result.tokens) == 6
    async with edgecloud.AsyncClient(address, token=fleet.CLIENT_TOKEN, retry=None) as client:
        with pytest.raises(edgecloud.Unavailable):
            await client.generate(PROMPT, max_tokens=2)


def test_stack_config_names_a_missing_tls_file(fleet_files, certificates):
    files = certificates
    for tls, field in (
        (TlsConfig(files["server.pem"], fleet_files.root / "nope.key"), "tls.key"),
        (
            TlsConfig(files["server.pem"], files["server.key"], fleet_files.root / "none.pem"),
            "tls.client_ca",
        ),
    ):
        with pytest.raises(ValueError, match=field):
            StackConfig(target_dir=fleet_files.target, draft_dir=fleet_files.draft, tls=tls)


@pytest.mark.slow
def test_edge_serve_reaches_a_mutual_tls_verifier_with_its_flags(fleet_files, certificates):
    """`edge serve` with the CA and client pair gets the cloud_only output; with only
    the CA (no client certificate) the verifier refuses it, and the client hears
    UNAVAILABLE once the edge gives up before the request's deadline."""
    files = certificates
    verifier = fleet.start_verifier(
        fleet_files,
        *("--tls-cert", str(files["server.pem"]), "--tls-key", str(files["server.key"])),
        *("--tls-client-ca", str(files["ca.pem"])),
    )
    edges = []
    try:
        ca = ("--verifier-ca", str(files["ca.pem"]))
        pair = (
            "--verifier-cert",
            str(files["client.pem"]),
            "--verifier-key",
            str(files["client.key"]),
        )
        edges.append(fleet.start_edge(fleet_files, verifier, *ca, *pair))
        edges.append(fleet.start_edge(fleet_files, verifier, *ca))
        trusted = edgecloud.Client(edges[0].address, token=fleet.CLIENT_TOKEN)
        # No client retries: the edge's own UNAVAILABLE is what the test is about.
        stranger = edgecloud.Client(edges[1].address, token=fleet.CLIENT_TOKEN, retry=None)
        with trusted, stranger:
            lossless = trusted.generate(PROMPT, max_tokens=12)
            cloud = trusted.generate(PROMPT, max_tokens=12, mode="cloud_only")
            assert list(lossless.tokens) == list(cloud.tokens) and len(cloud.tokens) == 12
            assert lossless.stats.rounds > 0 and not lossless.stats.degraded
            with pytest.raises(edgecloud.Unavailable):
                stranger.generate(PROMPT, max_tokens=4, timeout=3)
    finally:
        for process in (*edges, verifier):
            process.stop()


def test_edge_serve_verifier_tls_flags_are_checked(tmp_path, certificates, capsys):
    serve = ["edge", "serve", "--model", str(tmp_path), "--insecure-no-auth"]
    verifier = ["--verifier", "127.0.0.1:1", "--verifier-model", fleet.MODEL_NAME]
    cert = ["--verifier-cert", str(certificates["client.pem"])]
    cases = [
        ([*verifier, *cert], "--verifier-cert and --verifier-key: give both or neither"),
        ([*verifier, "--verifier-ca", str(tmp_path / "ca.pem")], "--verifier-ca: "),
        (["--verifier-ca", str(certificates["ca.pem"])], "--verifier-ca: needs --verifier"),
    ]
    for extra, message in cases:
        assert main([*serve, *extra]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"edgecloud: error: {message}") and error.count("\n") == 1


def test_up_tls_flags_are_checked(tmp_path, certificates, capsys):
    key = ["--tls-key", str(certificates["server.key"])]
    cases = [
        (key, "--tls-cert and --tls-key: give both or neither"),
        (["--tls-cert", str(tmp_path / "none.pem"), *key], "--tls-cert: "),
        (["--tls-client-ca", str(certificates["ca.pem"])], "--tls-client-ca: needs --tls-cert"),
    ]
    for extra, message in cases:
        assert main(["up", "--insecure-no-auth", *extra]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"edgecloud: error: {message}") and error.count("\n") == 1
