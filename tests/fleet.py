"""Real `edgecloud` server processes for the fuzz, limits and security suites: a
verifier, an edge in front of it, and a whole stack (Ray + gateway), each built from
tiny models the tests save, writing its log to a file the test can grep.

Two credentials, as in production: `CLIENT_TOKEN` for clients of the edge and the
gateway, `VERIFIER_TOKEN` for the edge-to-verifier hop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protocol.channel import bearer_metadata
from tests.edge_node.conftest import save_model_pair
from tests.processes import ServerProcess
from tests.tiny import MODEL_NAME

VOCAB = 64
# Context of the saved models: the edge's limit; the verifier's is this minus one round.
MAX_SEQ_LEN = 256
# The verifier's --max-tree-nodes and --max-sessions.
MAX_TREE_NODES = 16
MAX_SESSIONS = 4
CLIENT_TOKEN = "client-secret-7d1e9a"
VERIFIER_TOKEN = "verifier-secret-2b8c4f"
CLIENT_METADATA = bearer_metadata(CLIENT_TOKEN)
VERIFIER_METADATA = bearer_metadata(VERIFIER_TOKEN)


@dataclass(frozen=True)
class Files:
    target: Path  # a model directory named MODEL_NAME, so servers default to that name
    draft: Path
    client_token: Path
    verifier_token: Path
    root: Path


def write_files(root: Path) -> Files:
    target, draft = save_model_pair(root, max_seq_len=MAX_SEQ_LEN)
    (root / "client.token").write_text(CLIENT_TOKEN + "\n")
    (root / "verifier.token").write_text(VERIFIER_TOKEN + "\n")
    return Files(target, draft, root / "client.token", root / "verifier.token", root)


def start_verifier(files: Files, *extra: str, log_level: str = "INFO") -> ServerProcess:
    args = ["--log-level", log_level, "cloud", "serve", "--model", str(files.target), "--port", "0"]
    args += ["--auth-token-file", str(files.verifier_token)]
    args += ["--max-tree-nodes", str(MAX_TREE_NODES), "--max-sessions", str(MAX_SESSIONS)]
    return ServerProcess([*args, *extra], log_path=files.root / "verifier.log")


def start_edge(
    files: Files, verifier: ServerProcess, *extra: str, log_level: str = "INFO"
) -> ServerProcess:
    args = ["--log-level", log_level, "edge", "serve", "--model", str(files.draft), "--port", "0"]
    args += ["--auth-token-file", str(files.client_token)]
    args += ["--verifier", verifier.address, "--verifier-model", MODEL_NAME]
    args += ["--verifier-token-file", str(files.verifier_token)]
    args += ["--max-concurrency", "4", "--draft-width", "2", "--draft-depth", "4"]
    return ServerProcess([*args, *extra], log_path=files.root / "edge.log")


def start_gateway(files: Files, ray_dir: Path, log_level: str = "INFO") -> ServerProcess:
    """`edgecloud up`: a private Redis, local Ray with one verifier and one edge actor,
    and the gateway; the Redis URL lands in `files.root / "up.json"`.

    `ray_dir` is Ray's own temp dir (short: Ray's socket paths must fit 107 bytes), so
    that `ray.init()` starts a cluster rather than join one another process started.
    """
    args = ["--log-level", log_level, "up", "--target", str(files.target)]
    args += ["--draft", str(files.draft), "--edges", "1", "--verifiers", "1", "--port", "0"]
    args += ["--auth-token-file", str(files.client_token)]
    return ServerProcess(
        args,
        timeout=180,
        log_path=files.root / "gateway.log",
        env={"EDGECLOUD_STATE": str(files.root / "up.json"), "RAY_TMPDIR": str(ray_dir)},
        listening=re.compile(r"gateway listening on [\w.\-]+:(\d+)"),
    )


def is_serving(address: str, service: str = "") -> bool:
    """Health `Check` (open without a token) answers SERVING within 5 s."""
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING
