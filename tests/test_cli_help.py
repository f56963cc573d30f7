"""Every option of every `edgecloud` subcommand says what it does and, when it has a
default, shows it as "(default: X)": an operator reading `--help` should not have to
open the code to learn what `--max-batch` is or what it is when left out."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterator

import pytest

from orchestrator.cli import COMMAND_MODULES, build_parser


def parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """`parser` and every subcommand parser under it, depth first."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def shown_default(action: argparse.Action) -> object | None:
    """The default `--help` must show, or None: a flag that takes no value (store_true,
    -h) is off unless given, and an empty default means the option is simply unset."""
    if action.nargs == 0 or action.default in (None, argparse.SUPPRESS, "", []):
        return None
    return action.default


def problems(root: argparse.ArgumentParser) -> list[str]:
    """One line per option (or positional) under `root` that has no help, whose help does
    not show its default as "(default: X)", or that writes a default another way."""
    found = []
    for parser in parsers(root):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = f"{parser.prog} {'/'.join(action.option_strings) or action.dest}"
            if not (action.help or "").strip():
                found.append(f"{name}: no help")
                continue
            default = shown_default(action)
            text = formatter._expand_help(action)  # the help as printed: %(default)s filled
            if default is not None and f"(default: {default})" not in text:
                found.append(f"{name}: default {default!r} not shown in {text!r}")
            elif "(default " in text:
                found.append(f"{name}: write its default as '(default: X)' in {text!r}")
    return found


def module_parser(module: str) -> argparse.ArgumentParser:
    """A root parser holding only the subcommands `orchestrator.commands.<module>` adds."""
    root = argparse.ArgumentParser(prog="edgecloud")
    importlib.import_module(f"orchestrator.commands.{module}").register(root.add_subparsers())
    return root


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_every_option_has_help_and_shows_its_default(module):
    found = problems(module_parser(module))
    assert not found, "\n".join(found)


def test_the_checker_catches_a_missing_help_and_an_unshown_default():
    parser = argparse.ArgumentParser(prog="p")
    parser.add_argument("--bare", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=3, help="a value (default 3)")
    parser.add_argument("--shown", type=int, default=3, help="a value (default: %(default)s)")
    parser.add_argument("--unset", help="a value (default 3 when left out)")
    parser.add_argument("--flag", action="store_true", help="on when given")
    assert problems(parser) == [
        "p --bare: no help",
        "p --hidden: default 3 not shown in 'a value (default 3)'",
        "p --unset: write its default as '(default: X)' in 'a value (default 3 when left out)'",
    ]


def test_every_help_renders():
    """A stray % in a help string breaks `--help` only when it is printed."""
    for parser in parsers(build_parser()):
        assert parser.format_help()
