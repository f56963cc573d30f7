"""Config files with the same keys as the command's flags.

`edgecloud up --config stack.toml` reads a TOML (or YAML, if PyYAML is installed)
table whose keys are the long flags without dashes (`port = 50051`,
`redis-url = "..."` or `redis_url = "..."`; lists repeat the flag, `true` sets a
switch, a table repeats it with KEY=VALUE: `[labels]` `region = "eu"` is
`--labels region=eu`). The file's flags replace `--config PATH` on the command line,
so flags written after it win. Unknown keys and bad values are refused by argparse itself,
with the flag's name, exactly as on the command line.
"""

from __future__ import annotations

import tomllib
from collections.abc import Sequence
from pathlib import Path

from orchestrator.usage import UsageError


def load_table(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--config: cannot read {path}: {exc.strerror}") from exc
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError as exc:
            raise UsageError("--config: YAML needs PyYAML; use a .toml file") from exc
        table = yaml.safe_load(text) or {}
    else:
        try:
            table = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise UsageError(f"--config: {path}: {exc}") from exc
    if not isinstance(table, dict):
        raise UsageError(f"--config: {path} must hold a table of flag = value")
    return table


def table_to_argv(table: dict) -> list[str]:
    argv: list[str] = []
    for key, value in table.items():
        flag = "--" + str(key).replace("_", "-")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        elif isinstance(value, dict):  # a table: KEY=VALUE pairs, e.g. [labels]
            for name, item in value.items():
                if isinstance(item, (dict, list)):
                    raise UsageError(f"--config: {key}.{name} must be a value, not {item!r}")
                argv += [flag, f"{name}={item}"]
        else:
            argv += [flag, str(value)]
    return argv


def expand_config(argv: Sequence[str]) -> list[str]:
    """`argv` with every `--config PATH` (or `--config=PATH`) replaced by the file's flags."""
    out: list[str] = []
    items = list(argv)
    i = 0
    while i < len(items):
        arg = items[i]
        if arg == "--config" and i + 1 < len(items):
            out += table_to_argv(load_table(Path(items[i + 1])))
            i += 2
            continue
        if arg.startswith("--config="):
            out += table_to_argv(load_table(Path(arg.split("=", 1)[1])))
        else:
            out.append(arg)
        i += 1
    return out
