"""Regenerate the committed Python stubs from the .proto files.

The generated modules live at ``protocol/v1/``, the contract package shared by the SDK
and the servers: protoc derives a module's import path from the .proto file's path, so
the files sit at ``protos/protocol/v1/`` while their proto package (the names on the
wire) stays ``edgecloud.v1``. Run: ``python protos/generate.py`` (needs the dev extra).
"""

from __future__ import annotations

import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "protos"


def generate(out_dir: Path = ROOT) -> list[Path]:
    """Writes *_pb2.py, *_pb2_grpc.py and *.pyi for every proto; returns the protos."""
    protos = sorted(PROTO_DIR.glob("protocol/v1/*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_DIR}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_DIR)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed")
    return protos


if __name__ == "__main__":
    generate()
    sys.exit(0)
