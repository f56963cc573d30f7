"""Flags every serving command shares (address, auth, TLS), parsed into `ServerConfig`."""

from __future__ import annotations

import argparse
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")


def dtype_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights and activations (default: bfloat16 on CUDA, float32 on CPU)",
    )


def torch_dtype(name: str | None):
    """The torch dtype for a `--dtype` value; None keeps the device's default."""
    import torch

    return None if name is None else getattr(torch, name)


def config_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="TOML file of flag = value (same names as the flags); later flags override it",
    )


def add_server_flags(parser: argparse.ArgumentParser, *, default_port: int) -> None:
    config_flag(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=default_port,
        help="gRPC port; 0 picks a free one (default: %(default)s)",
    )
    parser.add_argument("--auth-token", help="bearer token clients must send")
    parser.add_argument("--auth-token-file", help="file holding the bearer token")
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="accept calls without a token (local demos only)",
    )
    tls_flags(parser)
    parser.add_argument(
        "--max-message-bytes",
        type=int,
        default=4 * 1024 * 1024,
        help="largest gRPC message either way, in bytes, in [1024, 2**30]; bigger ones get "
        "RESOURCE_EXHAUSTED (default: %(default)s)",
    )
    metrics_flag(parser)


def metrics_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus /metrics on this port of --host, without a token "
        "(default: off; 0 picks a free port)",
    )


def tls_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain; enables TLS")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for --tls-cert")
    parser.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates signed by this CA"
    )


def existing_file(flag: str, path: Path | None) -> Path | None:
    """`path` itself; ValueError naming `flag` when it is given but is no file."""
    if path is not None and not Path(path).is_file():
        raise ValueError(f"{flag}: {path} is not a file")
    return path


def tls_config(args: argparse.Namespace):
    """The `TlsConfig` of `tls_flags`, or None without --tls-cert; ValueError naming the
    bad flag."""
    from serving.server import TlsConfig

    if bool(args.tls_cert) != bool(args.tls_key):
        raise ValueError("--tls-cert and --tls-key: give both or neither")
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca: needs --tls-cert and --tls-key")
    if not args.tls_cert:
        return None
    return TlsConfig(
        existing_file("--tls-cert", args.tls_cert),
        existing_file("--tls-key", args.tls_key),
        existing_file("--tls-client-ca", args.tls_client_ca),
    )


def server_config(args: argparse.Namespace):
    """Raises ValueError naming the bad flag."""
    from serving.auth import AuthConfig
    from serving.server import ServerConfig

    tls = tls_config(args)
    auth = AuthConfig.from_flags(args.auth_token, args.auth_token_file, args.insecure_no_auth)
    return ServerConfig(
        host=args.host,
        port=args.port,
        auth=auth,
        tls=tls,
        max_message_bytes=args.max_message_bytes,
        metrics_port=args.metrics_port,
    )


def drafter_setting(value: str) -> str:
    """argparse `type` of `--drafter`: a draft source this version offers, or auto.
    Checked when parsed, so `--help` does not load the edge's modules."""
    from edge_node.drafters.sources import SETTINGS

    if value not in SETTINGS:
        names = ", ".join(SETTINGS)
        raise argparse.ArgumentTypeError(f"invalid choice: {value!r} (choose from {names})")
    return value


def corpus_flags(parser: argparse.ArgumentParser) -> None:
    """The training corpus and its held-out split, as `train`, `distill`, `eval` and
    `flash calibrate` take them (the same split everywhere for one --heldout-fraction)."""
    parser.add_argument(
        "--corpus", type=Path, help="directory of source files (default: the Python stdlib)"
    )
    parser.add_argument(
        "--pattern", default="*.py", help="file glob in --corpus (default: %(default)s)"
    )
    parser.add_argument(
        "--include-tests", action="store_true", help="keep test/ and tests/ packages"
    )
    parser.add_argument(
        "--heldout-fraction",
        type=float,
        default=0.05,
        help="share of files held out by path hash; use the same value everywhere "
        "(default: %(default)s)",
    )
