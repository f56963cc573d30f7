"""The `edgecloud` console script: help, version, and one-line errors for bad flags."""

from __future__ import annotations

import subprocess
import sys

from orchestrator.cli import main, package_version


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert capsys.readouterr().out.strip() == f"edgecloud {package_version()}"
    assert package_version() != "0+unknown"


def test_help_lists_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("cloud", "train", "distill", "eval"):
        assert command in result.stdout


def test_bad_flag_is_one_line_naming_it(tmp_path):
    result = run_cli("cloud", "serve", "--model", str(tmp_path / "missing"), "--insecure-no-auth")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "--model" in result.stderr


def test_serving_without_auth_choice_is_refused(tmp_path):
    result = run_cli("cloud", "serve", "--model", str(tmp_path))
    assert result.returncode == 2
    assert "--insecure-no-auth" in result.stderr
    assert "Traceback" not in result.stderr


def test_config_file_keys_are_the_flags(tmp_path):
    config = tmp_path / "verifier.toml"
    config.write_text(f'model = "{tmp_path}"\ninsecure-no-auth = true\nmax_sessions = 0\n')
    result = run_cli("cloud", "serve", "--config", str(config))
    assert result.returncode == 2
    assert "max_sessions" in result.stderr and "Traceback" not in result.stderr


def test_config_file_unknown_key_is_named(tmp_path):
    config = tmp_path / "verifier.toml"
    config.write_text('model = "x"\nmax-sesions = 4\n')
    result = run_cli("cloud", "serve", "--config", str(config))
    assert result.returncode == 2
    assert "--max-sesions" in result.stderr


def test_config_file_that_is_not_toml_is_one_line(tmp_path):
    config = tmp_path / "verifier.toml"
    config.write_text("model = \n")
    result = run_cli("cloud", "serve", "--config", str(config))
    assert result.returncode == 2
    assert "--config" in result.stderr and result.stderr.strip().count("\n") == 0
