"""analyses/main.py checks every stage's ``args`` table against its script's options (catlens.stages) when the job's
configuration is resolved: a typo or a wrong type stops the job before any work (no run folder, no model), a valid
override reaches the script as a value its own parser reads. Offline, no model is loaded."""

import dataclasses
import sys
import types
from pathlib import Path

import pytest

from _scripts import load_main
from catlens.config import ConfigError
from catlens.pipeline import resolve_args
from catlens.stages import P1Options, P2Options, build_parser

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def main(monkeypatch):
    module = load_main()

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the configuration was checked")

    import catlens.finetune
    import catlens.model

    monkeypatch.setattr(catlens.model, "load_model", no_model)
    monkeypatch.setattr(catlens.finetune, "ensure_refusal_model", no_model)
    return module


@pytest.mark.parametrize("sets, needles", [
    (["p1.args.layerz=3"], ["p1.args: Unknown option 'layerz' of analyses/p1_steering.py", "Did you mean: layers"]),
    (["p1.args.train-cap=lots"], ["p1.args.train-cap='lots'", "an integer", "--set p1.args.train-cap=<value>"]),
    (["p1.args.layers=true"], ["p1.args.layers=True", "without its value"]),
    (["p2.args.pairing=randm"], ["Unknown value of --pairing 'randm'", "Did you mean: random?"]),
    (["specificity.args.n-bot=5"], ["specificity.args: Unknown option 'n-bot'", "Did you mean: n-boot"]),
    (["eval.args.gen-per-set=many"], ["eval.args.gen-per-set='many'"]),
    (["p1.args.train-cap=0"], ["p1.args.train-cap=0: must be >= 1"]),
    (["geometry.args.whiten-methd=pca"], ["Did you mean: whiten-method"]),
])
def test_a_bad_stage_option_exits_2_before_any_work(main, sets, needles, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--out", str(out), "--model", str(tmp_path / "tuned")]
    for item in sets:
        argv += ["--set", item]
    assert main.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err
    assert not out.exists()  # nothing written: the check came before the run folder


def test_a_typo_in_a_config_file_s_stage_table_is_caught_the_same_way(main, tmp_path):
    (tmp_path / "c.toml").write_text("[p1.args]\nlayerz = 3\n")
    with pytest.raises(ConfigError, match=r"p1\.args: Unknown option 'layerz'.*Did you mean: layers"):
        resolve_args(["--config", str(tmp_path / "c.toml")])


def test_a_valid_override_reaches_the_script_as_the_typed_value(main, tmp_path, monkeypatch):
    """--set p1.args.layers=3 (read as the number 3) and a float and a null: resolved, checked, and the argv the p1
    stage builds parses, with the script's parser, to exactly the checked options."""
    from catlens.runs import RunDir
    from catlens.stages import check_stage_args, from_namespace, to_argv

    cfg = resolve_args(["--out", str(tmp_path / "run"), "--model", "tuned", "--dtype", "float32",
                             "--set", "p1.args.layers=3", "--set", "p1.args.gate-c=0.5", "--set", "p1.args.test-cap=null",
                             "--set", "p2.args.pairing=random"])
    checked = check_stage_args(cfg)
    assert (checked["p1"].layers, checked["p1"].gate_c, checked["p1"].test_cap) == ("3", 0.5, None)
    assert checked["p1"].train_cap == 150  # the demo size, untouched
    assert checked["p2"].pairing == "random"
    seen = {}
    monkeypatch.setattr(main, "load_script", lambda path: types.SimpleNamespace(
        run=lambda options, models: seen.__setitem__("options", options)))
    job = main.Job(config=cfg, run=RunDir.create(tmp_path / "run", {}), tuned="tuned", stock="stock")
    main.STAGES["p1"].fn(cfg, job, tmp_path / "run" / "p1")
    assert isinstance(seen["options"], P1Options)  # typed options, not a command line
    assert seen["options"] == dataclasses.replace(checked["p1"], out=str(tmp_path / "run" / "p1"), stock_model="stock")
    # and the script's own command line reads the same options back
    assert from_namespace(P1Options, build_parser(P1Options).parse_args(to_argv(seen["options"]))) == seen["options"]


def test_the_default_and_quick_configurations_pass(main):
    from catlens.stages import check_stage_args

    for argv in ([], ["--quick"], ["--config", str(REPO / "configs" / "default.toml")],
                 ["--config", str(REPO / "configs" / "quick.toml")]):
        checked = check_stage_args(resolve_args(argv))
        assert set(checked) == {"eval", "geometry", "p1", "p2", "specificity"}
    assert isinstance(check_stage_args(resolve_args(["--quick"]))["p2"], P2Options)


def test_a_typo_fails_before_torch_is_imported(tmp_path):
    """The check runs before the config's fine-tune validation imports torch (seconds): a typo costs well under a
    second. A fresh process runs the job's command line and reports whether torch was ever imported."""
    import subprocess

    code = ("import sys, runpy; sys.argv = ['main.py', '--out', sys.argv[1], '--set', 'p1.args.layerz=3']\n"
            "try:\n    runpy.run_path('analyses/main.py', run_name='__main__')\n"
            "except SystemExit as e:\n    print('exit', e.code, 'torch' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.stdout.strip() == "exit 2 False", done.stdout + done.stderr
    assert "Did you mean: layers" in done.stderr and not (tmp_path / "run").exists()
