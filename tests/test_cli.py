"""The catlens command: help texts, exit code 2 with the reason on bad input (more cases: test_bad_inputs.py)."""

import subprocess
import sys

import pytest

from catlens.cli import main, parse_layers


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "catlens.cli", *args], capture_output=True, text=True, timeout=300)


def test_parse_layers():
    assert parse_layers("all") is None and parse_layers(None) is None
    assert parse_layers("0-3,10,-1") == [0, 1, 2, 3, 10, -1]
    with pytest.raises(ValueError, match="'0-5,10,-1'"):
        parse_layers("a-b")


@pytest.mark.parametrize("command", ["models", "data", "cache"])
def test_help_has_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "Examples:" in capsys.readouterr().out


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "catlens" in capsys.readouterr().out


@pytest.mark.parametrize("args, reason", [
    (["cache", "--out", "x", "--layers", "a-b"], "--layers"),
    (["cache", "--out", "x", "--model", "smollm2-135m-instrct"], "Did you mean"),
    (["models", "--load", "/nonexistent/model"], "neither an existing checkpoint folder"),
    (["data", "show"], "needs a dataset name"),
])
def test_bad_input_exits_2_with_one_line(args, reason):
    result = _run(*args)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"catlens {args[0]}: error:") and reason in last


def test_argparse_errors_exit_2():
    result = _run("data", "frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr
