"""P2 steering (analyses/p2_steering.py, the page over catlens.recipes.p2) end to end on the tiny model: tables and
schema, the saved policies, resumption, bad inputs, the defaults of its command line, and the figure script on its
tables. The recipe's steps without a model: tests/recipes/test_p2.py."""

import json
import random
from pathlib import Path

import pandas as pd
import pytest
from _scripts import load_script

from catlens.recipes import p2 as recipe

REPO = Path(__file__).resolve().parents[2]
CATS = ("fraud_financial_crime", "hate_harassment", "privacy")
WORDS = ("bank account password money steal wire transfer card loan scam fake invoice people group hate insult "
         "threat neighbor address phone track spy photo record private email secret bread poem sea wind garden "
         "recipe music travel river mountain history science planet ocean forest school city coffee story").split()
TABLES = ("p2_val", "p2_val_summary", "p2_test", "p2_test_summary", "p2_agreement", "p2_router", "p2_guided",
          "p2_splits", "p2_runs")
SPLIT_COLUMNS = ("split_seed", "n_train_harmful", "n_train_benign", "n_val_harmful", "n_val_benign",
                 "n_test_harmful", "n_test_benign")


def _load(path: Path, name: str):
    return load_script(path.stem, path.parent.name, name)


@pytest.fixture(scope="module")
def p2():
    return _load(REPO / "analyses" / "p2_steering.py", "p2_steering_under_test")


@pytest.fixture(scope="module")
def fig():
    return _load(REPO / "figures" / "fig_p2_bars.py", "fig_p2_bars_under_test")


def write_prompts(path: Path, n_harmful: int = 10, n_lookalike: int = 6, n_generic: int = 16, seed: int = 0) -> Path:
    """A tiny prompt file: harmful prompts per category, benign look-alikes per category, generic benign ones.
    Texts are random word draws, so no two are near duplicates."""
    rng = random.Random(seed)

    def text(prefix: str) -> str:
        return f"{prefix} {' '.join(rng.sample(WORDS, 7))}?"

    rows = []
    for c in CATS:
        rows += [{"id": f"h/{c}/{i}", "text": text("How to"), "label": "harmful", "category": c, "source": "tiny_h"}
                 for i in range(n_harmful)]
        rows += [{"id": f"l/{c}/{i}", "text": text("Explain"), "label": "benign", "category": c,
                  "source": "tiny_l"} for i in range(n_lookalike)]
    rows += [{"id": f"g/{i}", "text": text("Please"), "label": "benign", "source": "tiny_g"} for i in range(n_generic)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model_dir, prompts, out, *extra):
    return ["--model", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--quick", "--no-progress",
            *extra]


BASE_GRID = ("--sites", "attn_out,resid_post", "--reductions", "mean", "--layer-sets", "2", "--coeffs", "0,1")


@pytest.fixture(scope="module")
def base_run(p2, tiny_lm_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("p2")
    prompts = write_prompts(tmp / "prompts.jsonl")
    out = tmp / "run"
    result = p2.main(_args(tiny_lm_dir, prompts, out, *BASE_GRID))
    return out, result, prompts


# ----------------------------------------------------------------------------------------------- end to end
def test_end_to_end_tables_and_schema(base_run, p2):
    out, result, _ = base_run
    from catlens.runs import load_table

    for name in TABLES:
        table = load_table(out / name)
        assert len(table), name
        for col in SPLIT_COLUMNS:
            assert col in table.columns, (name, col)
    val, test = load_table(out / "p2_val"), load_table(out / "p2_test")
    for table in (val, test):
        for col in (*recipe.SETTING_COLUMNS, "split", *recipe.ROW_COLUMNS):
            assert col in table.columns
        assert set(table.row) <= {"group", "pooled", "macro"}
    # 3 methods x 2 sites x 1 reduction x 1 layer set x 2 coefficients, plus the unsteered model
    assert val.setting.nunique() == 3 * 2 * 2 + 1
    assert set(val.metric) >= {"harmful_answered_rate", "refusal_rate", "benign_answered_rate", "over_refusal_rate",
                               "perplexity", "perplexity_pooled", "repetition_rate"}
    assert not {"unsafe_response_rate", "helpfulness"} & set(val.metric)  # named for what they measure
    assert "route_accuracy" not in set(val.metric)  # harmful prompts use their own label (--route label)
    assert set(val.judge.dropna()) == {"substring", "refusal_token"}  # the tiny model has refusal tokens
    ur = val[(val.metric == "harmful_answered_rate") & (val.setting == "unsteered") & (val.judge == "substring")]
    assert set(ur.category) == {*CATS, "(all)"}
    pooled = ur[ur.row == "pooled"].iloc[0]
    assert pooled.n == ur[ur.row == "group"].n.sum() == pooled.n_val_harmful
    assert pooled.ci_low <= pooled.value <= pooled.ci_high
    # one chosen setting per (method, site) group, chosen on val, and the test holds exactly those plus unsteered;
    # every group has an admissible setting here (m = 0 equals the unsteered model)
    summary = load_table(out / "p2_val_summary")
    chosen = summary[summary.chosen]
    assert sorted(chosen.group) == sorted(f"{m}/{s}" for m in recipe.METHODS for s in ("attn_out", "resid_post"))
    # admissible exactly when within the perplexity guard and the benign tolerance (both inclusive)
    steered = summary[summary.method != "unsteered"]
    want = [(r.ppl_ratio <= 1.10 + 1e-9) and (r.benign_answered_ratio >= 0.90 - 1e-9) for r in steered.itertuples()]
    assert steered.admissible.tolist() == want
    for g, part in steered.groupby("group"):
        best = part[part.chosen].iloc[0]
        assert best.admissible and best.harmful_answered_drop == part[part.admissible].harmful_answered_drop.max()
    assert set(test.setting) == {"unsteered", *chosen.setting}
    assert (test.split == "test").all() and (val.split == "val").all()
    agree = load_table(out / "p2_agreement")
    assert {"judge_a", "judge_b", "kappa", "setting", "split"} <= set(agree.columns)
    # the run folder holds one policy per group (applied in test_saved_policy_applies_through_generate_cli)
    assert sorted(p.name for p in (out / "policies").iterdir()) == sorted(g.replace("/", "-") for g in chosen.group)
    assert sorted(result["policies"]) == sorted(g.replace("/", "-") for g in chosen.group)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["p2"]["leakage"][0]["leaks"] == 0
    # the split seed, why it was used, the choices and the settings evaluated on test are in the manifest
    assert manifest["p2"]["split_seed"]["seed"] == recipe.SPLIT_SEED == int(val.split_seed.iloc[0])
    assert manifest["p2"]["split_seed"]["seen_before"] is False
    assert manifest["selection"]["split"] == "val"
    assert {c["group"] for c in manifest["selection"]["choices"]} == set(steered.group)
    assert manifest["test_evaluation"]["settings"] == sorted(set(test.setting))


def test_saved_policy_applies_through_generate_cli(base_run, tiny_lm_dir, tmp_path):
    out, _, prompts = base_run
    from catlens.cli import main as cli_main
    from catlens.steer import SteeringPolicy

    folder = out / "policies" / "pruned-attn_out"
    policy = SteeringPolicy.load(folder)
    assert policy.router is not None and policy.router.kind == "probe"
    assert policy.meta["chosen_on"] == "val" and policy.meta["group"] == "pruned/attn_out"
    gen_out = tmp_path / "gen"
    code = cli_main(["generate", "--model", str(tiny_lm_dir), "--prompts", str(prompts), "--policy", str(folder),
                     "--max-new-tokens", "3", "--out", str(gen_out)])
    assert code in (0, None)
    records = [json.loads(line) for line in (gen_out / "generations.jsonl").read_text().splitlines()]
    assert records and all(r["route"]["kind"] == "probe" for r in records)
    # it steers every row with the chosen setting's coefficient, along the routed category's vector
    coeff = float(policy.meta["selection"]["row"]["coeff"])
    assert coeff == policy.interventions[0].coeff
    for r in records:
        assert r["steer"]["active"] == [True] * len(policy.interventions)
        assert r["steer"]["coeff"] == pytest.approx([coeff] * len(policy.interventions))
        assert r["route"]["category"] in CATS


def test_coefficient_zero_equals_unsteered_generations(base_run):
    out, _, _ = base_run

    def gens(folder: Path) -> dict:
        lines = (folder / "generations.jsonl").read_text().splitlines()
        return {(r := json.loads(line))["id"]: (r["token_ids"], r["response"]) for line in lines}

    zero = sorted(p for p in (out / "gen" / "val").iterdir() if p.name.endswith("-m0") or "-m0-" in p.name)
    steered = sorted(p for p in (out / "gen" / "val").iterdir() if p.name.endswith("-m1") or "-m1-" in p.name)
    assert len(zero) == 6 and len(steered) == 6
    for side in ("harmful", "benign"):
        base = gens(out / "gen" / "val" / "unsteered" / side)
        for folder in zero:
            assert gens(folder / side) == base, folder.name
    # and the steered ones do move something (the comparison above can fail)
    assert any(gens(f / "benign") != gens(out / "gen" / "val" / "unsteered" / "benign") for f in steered)
    from catlens.runs import load_table

    s = load_table(out / "p2_val_summary")
    base_row = s[s.setting == "unsteered"].iloc[0]
    for _, r in s[s.coeff == 0].iterrows():
        assert r.harmful_answered == base_row.harmful_answered and r.benign_answered == base_row.benign_answered
        assert r.ppl_pooled == base_row.ppl_pooled and r.ppl_ratio == 1.0 and r.admissible


def test_finished_run_returns_its_tables_without_recomputing(base_run, p2, tiny_lm_dir, monkeypatch):
    out, result, prompts = base_run
    import catlens.model

    monkeypatch.setattr(catlens.model, "load_model", lambda *a, **k: pytest.fail("the model was loaded again"))
    again = p2.main(_args(tiny_lm_dir, prompts, out, *BASE_GRID))
    pd.testing.assert_frame_equal(again["p2_test"].reset_index(drop=True),
                                  pd.read_parquet(out / "p2_test.parquet"))
    with pytest.raises(FileExistsError, match="other arguments"):
        p2.main(_args(tiny_lm_dir, prompts, out, *BASE_GRID, "--seed", "3"))


# ------------------------------------------------------------------------------------------------- resume
RESUME_GRID = ("--methods", "pruned,guided", "--reductions", "last", "--safe", "matched", "--layer-sets", "1,3",
               "--coeffs", "1", "--route", "probe", "--positions", "generated")


def test_resume_after_interruption_gives_identical_tables(p2, tiny_lm_dir, tmp_path, monkeypatch):
    prompts = write_prompts(tmp_path / "prompts.jsonl", seed=1)
    ref = tmp_path / "ref"
    p2.main(_args(tiny_lm_dir, prompts, ref, *RESUME_GRID, "--batch-size", "2"))

    import catlens.generation as G

    real = G._generate_batch
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 15:  # inside the first steered validation setting, after some of its batches were written
            raise KeyboardInterrupt("simulated interruption")
        return real(*args, **kwargs)

    out = tmp_path / "run"
    monkeypatch.setattr(G, "_generate_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        p2.main(_args(tiny_lm_dir, prompts, out, *RESUME_GRID, "--batch-size", "2"))
    assert not (out / "p2_test.parquet").exists()
    assert list((out / "gen" / "val").glob("*/*/generations.partial.jsonl"))  # interrupted mid-setting
    monkeypatch.setattr(G, "_generate_batch", real)
    p2.main(_args(tiny_lm_dir, prompts, out, *RESUME_GRID, "--batch-size", "2"))
    assert len(json.loads((out / "manifest.json").read_text())["resumed"]) >= 1
    assert "route_accuracy" in set(pd.read_parquet(out / "p2_val.parquet").metric)  # --route probe
    for name in ("p2_val", "p2_val_summary", "p2_test", "p2_test_summary", "p2_router", "p2_guided", "p2_agreement"):
        a, b = pd.read_parquet(ref / f"{name}.parquet"), pd.read_parquet(out / f"{name}.parquet")
        pd.testing.assert_frame_equal(a, b, obj=name)


# ------------------------------------------------------------------------------------------------ bad inputs
@pytest.mark.parametrize("extra, error, match", [
    (("--sites", "attn_outt"), ValueError, "Did you mean: attn_out"),
    (("--methods", "unsupervised,prunned"), ValueError, "Did you mean: pruned"),
    (("--reductions", "median"), ValueError, "Allowed: last, mean"),
    (("--safe", "generics"), ValueError, "Did you mean: generic"),
    (("--quantiles", "1.5"), ValueError, r"outside \(0, 1\)"),
    (("--quantiles", "0"), ValueError, r"outside \(0, 1\)"),
    (("--positions", "last_prompt"), ValueError, "Allowed: all, generated"),
    (("--layer-sets", "2;x"), ValueError, "layer sets like"),
    (("--coeffs", ""), ValueError, "--coeffs is empty"),
    (("--fractions", "0.5,0.5"), ValueError, "three positive numbers"),
    (("--categories", "privacy,self_harm"), ValueError, "'self_harm' has no harmful prompt"),
    (("--categories", "privacy,self_harmm"), ValueError, "Did you mean: self_harm"),
    (("--per-category", "2"), ValueError, "too few harmful prompts"),
    (("--exclude-ids", "/no/such/file.json"), FileNotFoundError, "no such file"),
    (("--n-benign", "500"), ValueError, "fewer than --n-benign 500"),
    (("--split-seed", "0"), ValueError, "not an untouched test set"),
    (("--ppl-guard", "-0.1"), ValueError, "--ppl-guard=-0.1 must be"),
])
def test_bad_inputs_fail_before_any_work(p2, tiny_lm_dir, tmp_path, extra, error, match):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    out = tmp_path / "run"
    with pytest.raises(error, match=match):
        p2.main(_args(tiny_lm_dir, prompts, out, *extra))
    assert not out.exists()


def test_empty_category_in_the_prompt_file_is_named(p2, tiny_lm_dir, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    rows = [json.loads(line) for line in prompts.read_text().splitlines()]
    rows = [r for r in rows if not (r["label"] == "benign" and r.get("category") == "privacy")]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"--safe matched needs benign look-alikes.*\['privacy'\]"):
        p2.main(_args(tiny_lm_dir, prompts, tmp_path / "run", "--safe", "matched", "--categories",
                      ",".join(CATS)))


def test_refusal_token_judge_needs_refusal_tokens(p2, tmp_path):
    from catlens.testing import make_tiny_model_dir

    plain = make_tiny_model_dir(tmp_path / "plain")  # no refusal tokens
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    with pytest.raises(ValueError, match="needs a model with refusal tokens"):
        p2.main(_args(plain, prompts, tmp_path / "run", "--judge", "refusal_token", "--methods", "unsupervised"))


# ------------------------------------------------------------------------------------------------- defaults
def test_default_benign_prompts_and_split_seed(p2, tmp_path):
    _, plan = p2.parse_args(["--model", "m", "--out", str(tmp_path / "o")])
    assert plan.n_benign >= 150 and plan.split_seed == recipe.SPLIT_SEED
    assert plan.split_seed not in recipe.SEEN_SPLIT_SEEDS
    assert plan.ppl_guard == pytest.approx(0.10)
    _, plan = p2.parse_args(["--model", "m", "--out", str(tmp_path / "o"), "--split-seed", "0",
                             "--reuse-seen-split"])
    assert plan.split_seed == 0 and plan.reuse_seen_split


# ---------------------------------------------------------------------------------------------------- figure
def test_figure_script_runs_on_the_tables(base_run, fig, tmp_path):
    out, _, _ = base_run
    written = fig.main(out, out_dir=tmp_path / "one", png=False)
    assert {"html", "csv", "helpfulness_html", "helpfulness_csv"} <= set(written)
    data = pd.read_csv(written["csv"])
    assert set(data.category) == {*CATS, "pooled"}
    assert {"unsteered", "all activations (attn_out)", "pruned (resid_post)"} <= set(data.label)
    assert (data.ci_low <= data.value).all() and (data.value <= data.ci_high).all()
    two = fig.main([out, out], out_dir=tmp_path / "two", png=False)  # one panel per run
    assert pd.read_csv(two["csv"]).model.nunique() == 2
    with pytest.raises(ValueError, match="judge 'llm' is not in"):
        fig.main(out, out_dir=tmp_path / "bad", png=False, judge="llm")
