"""The catlens command: help texts, exit code 2 with the reason on bad input (more cases: test_bad_inputs.py)."""

import subprocess
import sys

import pytest

from catlens.cli import main
from catlens.options import parse_layers


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
def test_bad_input_exits_2_with_one_line(args, reason, capsys):
    """In this process (``main`` is what ``python -m catlens`` exits with; test_argparse_errors_exit_2 runs that
    entry point itself): exit status 2 and one error line naming the command, no traceback."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"catlens {args[0]}: error:") and reason in last


def test_argparse_errors_exit_2():
    result = _run("data", "frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_parse_floats():
    # the one number-list reader of analyses/p1_steering.py, p2_steering.py and steer_sweep.py
    from catlens.cli import parse_floats

    assert parse_floats(" 0.5, 1,,0.5", "coeffs") == [0.5, 1.0, 0.5]
    assert parse_floats("0.5,1,0.5", "coeffs", unique=True) == [0.5, 1.0]
    assert parse_floats("none, 0.1", "toward", allow_none=True) == [None, 0.1]
    assert parse_floats(None, "toward", allow_empty=True) == [] and parse_floats("", "x", allow_empty=True) == []
    assert parse_floats("-0.5,0", "coeffs") == [-0.5, 0.0]
    for text, kw, message in [
        ("0.1,abc", {}, "--toward '0.1,abc': cannot read 'abc' as a number; give comma-separated numbers like "
                        "'0.1,0.2'."),
        ("none", {}, "cannot read 'none' as a number"),
        ("x", {"allow_none": True, "example": "0.05,0.1"}, "numbers like '0.05,0.1' (or 'none')."),
        ("0.1,inf", {}, "--toward '0.1,inf': 'inf' must be a finite number; give e.g. '0.1,0.2'."),
        ("nan", {"positive": True}, "'nan' must be a finite number > 0"),
        ("0.1,-0.2", {"positive": True, "note": "a fraction of the norm"},
         "--toward '0.1,-0.2': '-0.2' must be a finite number > 0 (a fraction of the norm); give e.g. '0.1,0.2'."),
        ("0", {"positive": True}, "'0' must be a finite number > 0"),
        (" , ", {}, "--toward is empty (given ' , '); give at least one number, e.g. '0.1,0.2'."),
        (None, {}, "--toward is empty (given None)"),
    ]:
        with pytest.raises(ValueError) as e:
            parse_floats(text, "toward", **kw)
        assert message in str(e.value), (text, str(e.value))
