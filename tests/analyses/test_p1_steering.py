"""analyses/p1_steering.py end to end on a tiny random model with the real benchmark files (tiny caps), the exact
identity between the sweep's offline gate combination and the gated policy itself, and bad inputs. The recipe's steps
(:mod:`catlens.recipes.p1`) are tested here too, imported from the library: they are checked against the tables the
script's end-to-end run wrote (the ``p1_run`` fixture)."""

import importlib.util
import json
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest
from _scripts import load_script

from catlens.recipes import p1 as recipe

ROOT = Path(__file__).resolve().parents[2]


def _script():
    return load_script("p1_steering", name="p1_steering")


@pytest.fixture(scope="module")
def tiny8(tmp_path_factory):
    from catlens.finetune.config import DEFAULT_CATEGORIES
    from catlens.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny8"), categories=DEFAULT_CATEGORIES)


ARGV = ["--stock-model", "none", "--layers", "1,2", "--gate-layers", "1,3", "--methods",
        "one_vs_benign,one_vs_rest", "--toward", "0.5", "--away", "0.5", "--scopes", "last_prompt+0,last_prompt",
        "--train-cap", "48", "--val-cap", "3", "--test-cap", "3", "--val-gen-n", "8", "--gen-n", "8",
        "--gen-tokens", "3", "--candidates", "1", "--ppl-guard", "0.5", "--lowrank-steps", "0", "--threads", "1",
        "--zone-grid", "9", "--jailbreak-n", "4", "--test-gen-cap", "2", "--judge", "substring"]
# the substring judge: the tiny random model's text is gibberish, which the full-answer judge calls refused, so no
# benign answer would be left for the perplexity guard and nothing would be chosen; the default is full_answer


class _Faithful:
    """catlens.generate behind the engine's interface: what ``--engine vllm`` calls, with catlens's answers (no vLLM
    starts); records which generation folders it made."""

    calls: ClassVar[list[str]] = []

    def __init__(self, model):
        self.model = model

    def generate(self, prompts, steer=None, *, max_new_tokens, out=None, allow_transfer=False):
        from catlens.generation import generate

        self.calls.append(Path(out).name)
        return generate(self.model, prompts, steer, max_new_tokens=max_new_tokens, batch_size=32, out=out,
                        allow_transfer=allow_transfer, show_progress=False)


@pytest.fixture(scope="module")
def p1_run(tiny8, data_dir, tmp_path_factory):
    """The script end to end, with ``--engine vllm`` through a pool whose engine is :class:`_Faithful` (so the tables
    are catlens's own; the main job's pipeline test runs P1 on the default engine)."""
    import catlens.engines

    out = tmp_path_factory.mktemp("p1") / "run"
    mod = _script()
    argv = ["--model", str(tiny8), "--out", str(out), "--data-dir", str(data_dir), *ARGV]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catlens.engines, "vllm_available", lambda: True)
        mp.setattr(catlens.engines.EnginePool, "get", lambda self, model: _Faithful(model))
        summary = mod.main([*argv, "--engine", "vllm"])
    return mod, out, summary, argv


def test_p1_writes_every_table(p1_run):
    mod, out, summary, _ = p1_run
    for name in ("splits", "gates", "sweep", "frontier", "candidates", "test_rates", "headline",
                 "headline_first_position", "headline_pools", "judges", "agreement", "disagreements", "auroc", "gate_errors",
                 "jailbreaks", "perplexity", "test_rates_full"):
        assert (out / f"{name}.parquet").exists(), name
        assert (out / f"{name}.csv").exists(), name
    sweep = pd.read_parquet(out / "sweep.parquet")
    assert {"method", "layer", "mode", "toward", "away", "refusal", "refusal_low", "over_refusal", "lower", "upper",
            "feasible", "split", "objective", "objective_text"} <= set(sweep.columns)
    # unsteered + 2 methods x 2 layers x 1 toward x 1 away x (global + p1 gate [+ per category when feasible])
    assert (sweep["mode"] == "unsteered").sum() == 1
    assert (sweep["mode"] == "global").sum() == 4 and (sweep["mode"] == "p1_gate").sum() == 4
    assert (sweep.dropna(subset=["lower"]).lower <= sweep.dropna(subset=["lower"]).upper).all()
    head = pd.read_parquet(out / "headline_pools.parquet")
    assert "unsteered" in set(head.policy)
    assert {"all", "without_xstest", "hardbenign"} <= set(head.benign_pool)
    one = pd.read_parquet(out / "headline.parquet")
    assert (one.benign_pool == "all").all() and one.policy.is_unique
    assert head.judge.str.startswith("substring").all()
    assert mod.parse_args(["--model", "m", "--out", "o"]).judge == "full_answer"  # the headline's default judge
    gates = pd.read_parquet(out / "gates.parquet")
    assert gates.chosen.sum() == 1 and "logodds" in set(gates.features)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done"
    assert manifest["selection"]["split"] == "val" and manifest["selection"]["test_read"] is True
    # each zone mode's choice, made or not, with its catlens.selection record (choose's zone_pick)
    choices = manifest["selection"]["choices"]
    assert sorted(c["group"] for c in choices) == ["global", "per_category"]
    cand = pd.read_parquet(out / "candidates.parquet")
    for c in choices:
        assert c["selection"]["chosen"] == c["chosen"] and c["selection"]["group"] == c["group"]
        assert c["selection"]["n_candidates"] == int((cand["mode"] == c["group"]).sum())
    jail = pd.read_parquet(out / "jailbreaks.parquet")
    assert {"none (plain)", "role_play"} <= set(jail.template) or len(set(jail.template)) >= 2
    # what bounds the result: written exactly when a global categorical policy was chosen
    chosen_global = (out / "policies" / "categorical_global").exists()
    for name in ("bound", "test_frontier", "gate_roc"):
        assert (out / f"{name}.parquet").exists() == chosen_global, name


def test_answer_zone_sweep_predicts_the_gated_policy_exactly(p1_run):
    """The zones are chosen offline from three generated sides; the gated policy, generated on the same rows, gives
    the same verdict on every row (val), and so does the test bound's offline row."""
    mod, out, _, _ = p1_run
    cand = pd.read_parquet(out / "candidates.parquet")
    chosen = cand[cand.chosen.fillna(False).astype(bool) & cand["mode"].isin(["global", "per_category"])]
    assert len(chosen), "the tiny run chose no zones: the identity is not exercised"
    assert (chosen.online_agreement == 1.0).all()
    assert chosen.online_over_refusal.tolist() == pytest.approx(chosen.over_refusal.tolist())
    assert chosen.online_refusal.tolist() == pytest.approx(chosen.refusal.tolist())
    bound = pd.read_parquet(out / "bound.parquet").set_index("gate")
    assert bound.loc["chosen zones (the policy's own answers)", "agreement_with_offline"] == 1.0
    # the oracle and the best side per row can only do better than any zone choice, on both sides
    best, orc = bound.loc["best side per row"], bound.loc["chosen zones (offline)"]
    assert best.over_refusal <= orc.over_refusal and best.refusal >= orc.refusal
    assert bound.loc["unsteered", "ppl_ratio"] == pytest.approx(1.0)


def test_candidates_obey_the_perplexity_guard_and_policies_follow_the_choice(p1_run):
    from catlens.steer import SteeringPolicy

    mod, out, _, argv = p1_run
    cand = pd.read_parquet(out / "candidates.parquet")
    steered = cand[cand["mode"] != "unsteered"]
    assert len(steered)
    ratio = steered.ppl_ratio.to_numpy(dtype=float)
    assert (steered.admissible.to_numpy() == ((ratio == ratio) & (ratio <= 1.5))).all()
    assert steered[steered.chosen].admissible.all()
    for mode in ("global", "per_category", "p1_gate"):
        chosen = steered[(steered["mode"] == mode) & steered.chosen]
        folder = out / "policies" / f"categorical_{mode}"
        assert folder.exists() == (len(chosen) == 1), mode
        if len(chosen):
            pol = SteeringPolicy.load(folder)
            r = chosen.iloc[0]
            assert pol.meta["zones"] == mode and pol.meta["chosen_on"] == "val"
            assert pol.interventions[0].positions == r.positions and pol.interventions[0].layer == r.layer
            if mode != "p1_gate":
                assert (pol.gate.lower, pol.gate.threshold) == pytest.approx((r.lower, r.upper))


def test_splits_are_disjoint_and_the_leakage_check_covers_the_whole_train_pool(tiny8, data_dir):
    from catlens.prompts import check_leakage

    sets = recipe.build_sets(str(tiny8), str(data_dir), seed=0, train_cap=48, val_cap=3, test_cap=3)
    ids = {k: set(sets[k].ids) for k in ("train", "gate_train", "val", "test")}
    assert not ids["gate_train"] & ids["val"] and not ids["gate_train"] & ids["test"]
    assert not ids["val"] & ids["test"] and ids["train"] <= ids["gate_train"]
    assert sets["n_train_pool"] > len(sets["train"])  # checked against every train prompt, not the capped sample
    hard = {s: sets[s].where(source="hardbenign") for s in ("gate_train", "val", "test")}
    assert all(len(h) for h in hard.values())
    assert not len(check_leakage(sets["val"], sets["test"], raise_on_leak=False).pairs)


@pytest.fixture(scope="module")
def p1_fit(p1_run, tiny8, data_dir):
    """The end-to-end run's model, sets and fit made again through the recipe's steps (its activations read from
    the run's folder): what the tests below rebuild policies from."""
    from catlens.model import load_model

    mod, out, _, argv = p1_run
    model = load_model(tiny8)
    sets = recipe.build_sets(str(tiny8), str(data_dir), seed=0, train_cap=48, val_cap=3, test_cap=3)
    fit = recipe.fit_everything(model, sets, [1, 2], [1, 3], ["one_vs_benign"], type("R", (), {"path": out})(),
                                mod.parse_args(argv))
    return model, sets, fit


def test_sweep_offline_zones_equal_the_gated_policy(p1_run, p1_fit):
    """The sweep assigns sides offline from the gate's val scores; the saved gated policy must compute the same
    scores in first_position, and its verdicts are exactly the offline combination of the three passes."""
    import numpy as np

    from catlens.gate import zone_verdicts
    from catlens.generation import first_position
    from catlens.steer import SteeringPolicy

    _, out, _, _ = p1_run
    model, sets, fit = p1_fit
    sweep = pd.read_parquet(out / "sweep.parquet")
    row = sweep[(sweep.method == "one_vs_benign") & (sweep.layer == 2) & (sweep["mode"] == "global")].iloc[0]
    pol = recipe.build_policy(model, fit, row.to_dict(), positions="last_prompt", mode="global", seed=0)
    vf = fit["val_frame"].reset_index(drop=True)
    pols = {"gated": pol, "base": None,
            "toward": SteeringPolicy((recipe.intervention(fit, "one_vs_benign", 2, float(row.toward)),),
                                     router=fit["router"]),
            "away": SteeringPolicy((recipe.intervention(fit, "one_vs_benign", 2, float(row.away)),),
                                   router=fit["router"])}
    t = first_position(model, sets["val"], pols, show_progress=False)
    by = {n: g.set_index("id").loc[vf.id] for n, g in t.groupby("policy")}
    score = by["gated"].gate_score.to_numpy(dtype=float)
    np.testing.assert_allclose(score, fit["val_score"], atol=1e-4)
    v = zone_verdicts(score, *(by[n].refused.to_numpy(dtype=bool) for n in ("base", "toward", "away")),
                      lower=float(row.lower), upper=float(row.upper))
    np.testing.assert_array_equal(v.astype(bool), by["gated"].refused.to_numpy(dtype=bool))


def test_p1_refuses_to_resume_with_another_configuration(p1_run):
    mod, out, _, argv = p1_run
    changed = [*argv]
    changed[changed.index("--toward") + 1] = "0.25"
    with pytest.raises(SystemExit, match="cannot resume .* toward \\(saved '0.5', now '0.25'\\)"):
        mod.main(changed)


def test_reverse_transfer_fits_on_the_stock_model_and_agrees_with_the_test_tables(p1_run, p1_fit, tmp_path):
    """The reverse transfer (stock -> tuned) on a same-architecture twin: three policies x two sides; on the same
    rows the unsteered and tuned policies give exactly what the full test pass gave. Then the forward transfer
    (tuned -> stock) with its gate flag rates and the ungated diagnostic."""
    from catlens.finetune.config import DEFAULT_CATEGORIES
    from catlens.runs import RunDir
    from catlens.steer import with_coeff
    from catlens.testing import make_tiny_model_dir

    mod, out, _, argv = p1_run
    stock = make_tiny_model_dir(tmp_path / "stock", categories=DEFAULT_CATEGORIES, seed=7)
    args = mod.parse_args([*argv, "--stock-model", str(stock), "--reverse-n", "6"])
    model, sets, fit = p1_fit
    run = RunDir.create(tmp_path / "rev", {}, seed=0)
    sweep = pd.read_parquet(out / "sweep.parquet")
    row = sweep[(sweep.method == "one_vs_benign") & (sweep.layer == 2) & (sweep["mode"] == "global")].iloc[0]
    base = recipe.build_policy(model, fit, row.to_dict(), positions="last_prompt", mode="global", seed=0)
    table = recipe.evaluate_reverse(model, sets, fit, {"categorical_global": base}, run, args)
    assert set(table.policy) == {"unsteered", "categorical_global", "reverse_stock_youden"}
    assert set(table.label) == {"harmful", "benign"} and len(table) == 6
    assert (run.path / "reverse_transfer.parquet").exists()
    fp = pd.read_parquet(run.path / "reverse_first_position.parquet")
    full = pd.read_parquet(out / "test_first_position.parquet")
    a = fp[fp.policy == "unsteered"].set_index("id").sort_index()
    b = full[full.policy == "unsteered"].set_index("id").loc[a.index]
    assert (a.refused.astype(bool) == b.refused.astype(bool)).all()
    assert a.refusal_score.to_numpy() == pytest.approx(b.refusal_score.to_numpy(), abs=1e-5)
    assert len(fp[fp.policy == "reverse_stock_youden"]) == len(a)

    toward = with_coeff(base, toward=base.toward or 0.5)  # the ungated diagnostic needs a toward coefficient
    tr = recipe.evaluate_transfer(sets, fit, {"unsteered": None, "categorical_global": toward}, [1, 2], run, args)
    assert set(tr.policy) == {"unsteered", "categorical_global", "categorical_global_ungated_x1",
                              "categorical_global_ungated_x4"}
    gated = tr[tr.policy == "categorical_global"].gate_flag_rate
    assert gated.notna().all() and gated.between(0, 1).all()
    assert tr[tr.policy.str.contains("ungated")].gate_flag_rate.isna().all()
    assert (run.path / "transfer.parquet").exists()


@pytest.mark.parametrize("extra, message", [
    (["--methods", "one_vs_benignn"], "Did you mean"),
    (["--toward", "-0.1"], "must be a finite number > 0"),
    (["--away", "abc"], "cannot read 'abc'"),
    (["--min-refusal-low", "2"], "min-refusal-low"),
    (["--scopes", "last_prompt+x"], "--scopes entry"),
    (["--judge", "full_answr"], "Did you mean"),
    (["--val-cap", "0"], "val-cap"),
    (["--reverse-n", "-1"], "reverse-n"),
    (["--top-k", "lots"], "'proportional', 'absolute', a positive integer"),
    (["--read-context", "template"], "read-context"),
    (["--p1-gate-centring", "none"], "p1-gate-centring"),
    (["--whiten-dtype", "float16"], "whiten-dtype"),
])
def test_p1_bad_inputs(extra, message, tmp_path, capsys):
    mod = _script()
    argv = ["--model", "x", "--out", str(tmp_path / "o"), *extra]
    with pytest.raises((SystemExit, ValueError)) as e:
        mod.main(argv)
    text = str(e.value) + capsys.readouterr().err
    assert message in text
    assert not (tmp_path / "o").exists()  # nothing created before the arguments are checked


def test_parse_args_checks_the_options_once(monkeypatch):
    mod = _script()
    calls, real = [], mod.prepare
    monkeypatch.setattr(mod, "prepare", lambda *a, **k: calls.append(a) or real(*a, **k))
    args = mod.parse_args(["--model", "m", "--out", "o", "--quick", "--train-cap", "7"])
    assert len(calls) == 1 and args.quick and args.train_cap == 7


def test_sweep_layers_outside_the_steering_layers_fail_before_any_fit():
    from types import SimpleNamespace

    from catlens.stages import P1Options

    model = SimpleNamespace(resolve_layers=lambda xs: [x % 4 for x in xs])  # four layers: -1 is 3
    args = recipe.prepare(P1Options(model="m", out="o", layers="1,-1", gate_layers="2", sweep_layers="3"))
    assert recipe.resolve_layers(model, args) == ([1, 3], [2], [3])
    args = recipe.prepare(P1Options(model="m", out="o", layers="1,2", sweep_layers="3"))
    with pytest.raises(SystemExit, match=r"--sweep-layers \[3\] are not among --layers \[1, 2\]"):
        recipe.resolve_layers(model, args)


def test_pareto_mask_keeps_the_rows_nothing_beats_on_both_sides():
    t = pd.DataFrame({"refusal": [0.9, 0.8, 0.95, 0.9, 0.7], "over_refusal": [0.1, 0.2, 0.3, 0.05, 0.01]})
    assert recipe.pareto_mask(t).tolist() == [False, False, True, True, True]


def test_summarise_renders_numbers_read_from_the_tables(p1_run, tmp_path):
    spec = importlib.util.spec_from_file_location("summarise", ROOT / "analyses" / "summarise.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    _, out, _, _ = p1_run
    text = mod.main(["--p1", str(out), "--specificity", str(tmp_path / "none"), "--out", str(tmp_path / "r.md")])
    assert (tmp_path / "r.md").read_text() == text
    head = pd.read_parquet(out / "headline_pools.parquet")
    for r in head.itertuples():
        assert f"| {r.policy} | {r.benign_pool} | {100 * r.over_refusal:.1f} [{100 * r.over_refusal_ci_low:.1f}, " in text
    assert "The test split was read once, after the choice." in text  # read from the manifest, not typed
    assert "not run" in text  # the missing specificity folder


def test_engine_option_sends_every_full_generation_to_the_pool(p1_run):
    """``--engine vllm``: every full generation of the run (each folder under ``gen/``: val, test, the bound's sides,
    jailbreaks) was made by the pool's engine, once; the run records the engine."""
    _, out, _, _ = p1_run
    folders = sorted(p.name for p in (out / "gen").iterdir())
    assert sorted(_Faithful.calls) == folders and len(folders) >= 8
    assert any(f.startswith("jailbreak_") for f in folders) and any("sides" in f for f in folders)
    assert json.loads((out / "manifest.json").read_text())["config"]["engine"] == "vllm"
