"""The `edgecloud` command line.

Each subcommand group lives in its own module under `orchestrator.commands` and adds
itself with `register(subparsers)`; the parser sets `args.run`, a callable taking the
parsed arguments and returning the exit code. Bad arguments end in a one-line message
naming the flag, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

from orchestrator.config_file import expand_config
from orchestrator.usage import UsageError

COMMAND_MODULES = ("train", "cloud", "edge", "stack", "loadtest", "flash", "fetch")


def package_version() -> str:
    try:
        return version("edgecloud")
    except PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecloud",
        description="Edge devices draft tokens, cloud GPUs verify them: speculative decoding "
        "split across a Ray cluster.",
    )
    parser.add_argument("--version", action="version", version=f"edgecloud {package_version()}")
    parser.add_argument(
        "--log-level",
        default="WARNING",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity (default: WARNING)",
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"orchestrator.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        argv = expand_config(sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        print(f"edgecloud: error: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    if not hasattr(args, "run"):
        parser.print_help()
        return 0
    try:
        return int(args.run(args) or 0)
    except UsageError as exc:
        print(f"edgecloud: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgecloud: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
