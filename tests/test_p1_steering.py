"""analyses/p1_steering.py end to end on a tiny random model with the real benchmark files (tiny caps), the exact
identity between the sweep's offline gate combination and the gated policy itself, and bad inputs."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("p1_steering", ROOT / "analyses" / "p1_steering.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    from catlens.finetune.config import DEFAULT_CATEGORIES
    from catlens.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny8"), categories=DEFAULT_CATEGORIES)


@pytest.fixture(scope="module")
def p1_run(tiny8, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("p1") / "run"
    mod = _script()
    argv = ["--model", str(tiny8), "--stock-model", "none", "--out", str(out), "--data-dir", str(data_dir),
            "--layers", "1,2", "--methods", "one_vs_benign,one_vs_rest", "--toward", "0.5", "--away", "0.5",
            "--train-cap", "48", "--val-cap", "3", "--test-cap", "3", "--gen-n", "8", "--gen-tokens", "3",
            "--candidates", "1", "--ppl-guard", "100", "--lowrank-steps", "0", "--threads", "1"]
    summary = mod.main(argv)
    return mod, out, summary, argv


def test_p1_writes_every_table_and_splits_are_disjoint(p1_run):
    mod, out, summary, _ = p1_run
    for name in ("splits", "gates", "sweep", "candidates", "test_rates", "headline", "judges", "agreement", "auroc",
                 "gate_errors"):
        assert (out / f"{name}.parquet").exists(), name
        assert (out / f"{name}.csv").exists(), name
    sweep = pd.read_parquet(out / "sweep.parquet")
    assert {"method", "layer", "gate_rule", "toward", "away", "refusal", "over_refusal", "objective",
            "refusal_pooled", "over_refusal_pooled", "benign_first_token_kl", "split", "n_val"} <= set(sweep.columns)
    # 2 methods x 2 layers x 2 gate rules x (1 + 1 toward) x (1 + 1 away)
    assert len(sweep) == 2 * 2 * 2 * 2 * 2
    head = pd.read_parquet(out / "headline.parquet")
    assert "unsteered" in set(head.policy)
    assert {"over_refusal", "over_refusal_ci_low", "over_refusal_ci_high", "refusal", "refusal_se",
            "ppl_ratio"} <= set(head.columns)
    rates = pd.read_parquet(out / "test_rates.parquet")
    assert {"pooled", "macro", "group"} <= set(rates.row)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done"
    splits = pd.read_parquet(out / "splits.parquet")
    assert {"train", "val", "test"} <= set(splits.split) and (splits.seed == 0).all()
    for name in ("categorical_youden", "categorical_target_fpr"):
        if (out / "policies" / name).exists():
            from catlens.steer import SteeringPolicy

            pol = SteeringPolicy.load(out / "policies" / name)
            assert pol.gate is not None and pol.router is not None and pol.meta["chosen_on"].startswith("val")


def test_sweep_gate_combination_equals_the_gated_policy(p1_run, tiny8, data_dir):
    """The sweep evaluates toward and away grids with every row steered and assigns sides offline from the gate's
    scores; the real gated policy must give the same refusals on val (rows at the threshold excepted)."""
    from catlens.generation import first_position
    from catlens.model import load_model
    from catlens.steer import SteeringPolicy

    mod, out, _, argv = p1_run
    args = mod.parse_args(argv)
    model = load_model(tiny8)
    sets = mod.build_sets(str(tiny8), str(data_dir), seed=0, train_cap=48, val_cap=3)
    fit = mod.fit_everything(model, sets, [1, 2], ["one_vs_benign"], type("R", (), {"path": out})(),
                             target_fpr=args.target_fpr, top_k=None)
    sweep = pd.read_parquet(out / "sweep.parquet")
    row = sweep[(sweep.method == "one_vs_benign") & (sweep.layer == 2) & (sweep.gate_rule == "youden")
                & sweep.toward.notna() & sweep.away.notna()].iloc[0]
    iv = mod.intervention(fit, "one_vs_benign", 2, 1.0)
    gate = fit["gates"][2]["youden"]
    pol = SteeringPolicy((iv,), gate=gate, router=fit["router"], toward=float(row.toward), away=float(row.away))
    t = first_position(model, sets["val"], {"p": pol}, show_progress=False)
    vf = fit["val_frame"].reset_index(drop=True)
    t = t.set_index("id").loc[vf.id]
    near = abs(fit["val_scores"][2] - gate.threshold) < 1e-4
    assert (t.gate_flagged.to_numpy(dtype=bool)[~near] == (fit["val_scores"][2] >= gate.threshold)[~near]).all()
    got = mod._rates(vf, t.refused.to_numpy(dtype=bool))
    if not near.any():
        assert got["refusal"] == pytest.approx(row.refusal) and got["over_refusal"] == pytest.approx(row.over_refusal)


def test_reverse_transfer_fits_on_the_stock_model_and_agrees_with_the_test_tables(p1_run, tiny8, data_dir,
                                                                                   tmp_path):
    """The reverse transfer (stock -> tuned) on a same-architecture twin: three policies x two sides; on the same
    rows the unsteered and tuned policies give exactly what the full test pass gave. Then the forward transfer
    (tuned -> stock) with its gate flag rates and the ungated diagnostic."""
    from catlens.finetune.config import DEFAULT_CATEGORIES
    from catlens.model import load_model
    from catlens.runs import RunDir
    from catlens.steer import SteeringPolicy

    mod, out, _, argv = p1_run
    pol = out / "policies" / "categorical_youden"
    if not pol.exists():
        pytest.skip("the tiny run chose no Youden policy")
    from catlens.testing import make_tiny_model_dir

    stock = make_tiny_model_dir(tmp_path / "stock", categories=DEFAULT_CATEGORIES, seed=7)
    args = mod.parse_args([*argv, "--stock-model", str(stock), "--reverse-n", "6"])
    model = load_model(tiny8)
    sets = mod.build_sets(str(tiny8), str(data_dir), seed=0, train_cap=48, val_cap=3, test_cap=3)
    fit = {"cats": list(SteeringPolicy.load(pol).interventions[0].labels)}
    base = SteeringPolicy.load(pol)
    run = RunDir.create(tmp_path / "rev", {}, seed=0)
    table = mod.evaluate_reverse(model, sets, fit, {"categorical_youden": base}, run, args)
    assert set(table.policy) == {"unsteered", "categorical_youden", "reverse_stock_youden"}
    assert set(table.label) == {"harmful", "benign"} and len(table) == 6
    assert (run.path / "reverse_transfer.parquet").exists()
    fp = pd.concat([pd.read_parquet(f) for f in (run.path / "reverse_fp").glob("*.parquet")])
    full = pd.concat([pd.read_parquet(f) for f in (out / "test_fp").glob("*.parquet")])
    for name in ("unsteered", "categorical_youden"):
        a = fp[fp.policy == name].set_index("id").sort_index()
        b = full[full.policy == name].set_index("id").loc[a.index]
        assert (a.refused.astype(bool) == b.refused.astype(bool)).all(), name
        assert a.refusal_score.to_numpy() == pytest.approx(b.refusal_score.to_numpy(), abs=1e-5)
    rev = fp[fp.policy == "reverse_stock_youden"]
    assert len(rev) == len(fp[fp.policy == "unsteered"])

    # forward transfer (tuned -> stock): the gated policy with a probe router, plus the ungated diagnostic
    fit = mod.fit_everything(model, sets, [1, 2], ["one_vs_benign"], run, target_fpr=args.target_fpr, top_k=None)
    from catlens.steer import with_coeff

    toward = with_coeff(base, toward=base.toward or 0.5)  # the ungated diagnostic needs a toward coefficient
    tr = mod.evaluate_transfer(sets, fit, {"unsteered": None, "categorical_youden": toward}, [1, 2], run, args)
    assert set(tr.policy) == {"unsteered", "categorical_youden", "categorical_youden_ungated_x1",
                              "categorical_youden_ungated_x4"}
    gated = tr[tr.policy == "categorical_youden"].gate_flag_rate
    assert gated.notna().all() and gated.between(0, 1).all()
    assert tr[tr.policy.str.contains("ungated")].gate_flag_rate.isna().all()
    assert (run.path / "transfer.parquet").exists()


@pytest.mark.parametrize("extra, message", [
    (["--methods", "one_vs_benignn"], "Did you mean"),
    (["--toward", "-0.1"], "must be a finite number > 0"),
    (["--away", "abc"], "cannot read 'abc'"),
    (["--target-fpr", "2"], "target-fpr"),
    (["--val-cap", "0"], "val-cap"),
    (["--reverse-n", "-1"], "reverse-n"),
])
def test_p1_bad_inputs(extra, message, tmp_path, capsys):
    mod = _script()
    argv = ["--model", "x", "--out", str(tmp_path / "o"), *extra]
    with pytest.raises((SystemExit, ValueError)) as e:
        mod.main(argv)
    text = str(e.value) + capsys.readouterr().err
    assert message in text
    assert not (tmp_path / "o").exists()  # nothing created before the arguments are checked


def test_summarise_renders_numbers_read_from_the_tables(p1_run, tmp_path):
    spec = importlib.util.spec_from_file_location("summarise", ROOT / "analyses" / "summarise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, out, _, _ = p1_run
    text = mod.main(["--p1", str(out), "--specificity", str(tmp_path / "none"), "--out", str(tmp_path / "r.md")])
    assert (tmp_path / "r.md").read_text() == text
    head = pd.read_parquet(out / "headline.parquet")
    for r in head.itertuples():
        assert f"| {r.policy} | {100 * r.over_refusal:.1f} [{100 * r.over_refusal_ci_low:.1f}, " in text
    assert "not run" in text  # the missing specificity folder
