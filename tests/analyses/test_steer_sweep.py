"""The steering sweep (catlens/recipes/steer_sweep.py, analyses/steer_sweep.py) end to end on the tiny model: tables,
the coherence guard, the selection record, and the chosen policy applied through generate."""

import json
import math
from pathlib import Path

import pytest
from _scripts import load_script

from catlens.steer import SteeringPolicy

SCRIPT = Path(__file__).resolve().parents[2] / "analyses" / "steer_sweep.py"


def _script():
    return load_script(SCRIPT.stem, name="steer_sweep")


def test_sweep_writes_tables_and_a_policy_that_applies(tiny_lm_dir, tiny_lm, tmp_path):
    sweep = _script()
    out = tmp_path / "sweep"
    assert sweep.main(["--model", str(tiny_lm_dir), "--layers", "1,2", "--toward", "0.5", "--away", "0.5",
                       "--methods", "one_vs_benign", "--n-per-split", "5", "--max-new-tokens", "4",
                       "--out", str(out)]) == 0
    from catlens.runs import load_table

    table = load_table(out / "sweep")
    assert len(table) == 1 * 2 * 2 * 2  # method x layer x (None, 0.5) x (None, -0.5)
    for col in ("refusal", "refusal_ci_low", "over_refusal", "over_refusal_se", "benign_ppl", "ppl_ratio",
                "admissible", "rejected_by", "pareto", "chosen", "ppl_stands_for", "split"):
        assert col in table.columns
    assert (table.split == "val").all()
    unsteered = table[table.toward.isna() & table.away.isna()]
    assert (unsteered.ppl_ratio == 1.0).all()
    # the guard: admissible exactly when the perplexity ratio is within 10 % (inclusive), a missing ratio fails
    assert table.admissible.tolist() == [bool(r <= 1.10 + 1e-9) if not math.isnan(r) else False
                                         for r in table.ppl_ratio]
    # the chosen row is the best admissible objective; ties go to the smaller |toward| + |away|, then table order
    assert table.chosen.sum() == 1
    best = table[table.chosen].iloc[0]
    ok = table[table.admissible]
    assert best.admissible and best.objective == ok.objective.max()
    tied = ok[(ok.objective - best.objective).abs() < 1e-9]
    assert best.steer_magnitude == tied.steer_magnitude.min()
    assert best.name == tied[tied.steer_magnitude == tied.steer_magnitude.min()].index[0]
    # the manifest records the choice (made on val, test never read) and the rule
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["selection"]["split"] == "val" and manifest["selection"]["test_read"] is False
    record = manifest["selection"]["choices"][0]
    assert record["n_admissible"] == int(table.admissible.sum()) and record["n_candidates"] == len(table)
    assert record["rule"]["constraints"][0]["label"] == "ppl_ratio <= 1.1"
    # the saved policy is the chosen row's, and it applies: generate records the gate's decision and coefficient
    policy = SteeringPolicy.load(out / "policy")
    assert policy.gate is not None and policy.meta["chosen_on"] == "val"
    assert policy.meta["selection"]["row"]["objective"] == pytest.approx(best.objective)
    want_toward = 0.0 if math.isnan(best.toward) else best.toward
    want_away = 0.0 if math.isnan(best.away) else best.away
    assert (policy.toward or 0.0) == pytest.approx(want_toward) and (policy.away or 0.0) == pytest.approx(want_away)
    assert policy.interventions[0].layer == int(best.layer)
    from catlens.datasets import load_builtin
    from catlens.generation import generate

    prompts = load_builtin().where(split="val").sample(4, seed=0)
    records = generate(tiny_lm, prompts, policy, max_new_tokens=2, show_progress=False)
    assert len(records) == 4
    for r in records:
        assert r["gate"]["threshold"] == pytest.approx(policy.gate.threshold)
        side = policy.toward if r["gate"]["flagged"] else policy.away
        assert r["gate"]["coeff"] == side
    runs = load_table(out / "runs")
    assert len(runs) == 2 * 2  # layers x (toward pass + away pass)
    with pytest.raises(ValueError, match="Did you mean: one_vs_rest"):
        sweep.main(["--model", str(tiny_lm_dir), "--methods", "one_vs_res", "--out", str(tmp_path / "bad")])


def test_sweep_rule_rejects_the_ppl_guard_and_breaks_ties_by_magnitude():
    """The rule the sweep uses, on a synthetic table: a setting with a better objective but a perplexity ratio above
    the guard is not chosen; among equal objectives the smaller total magnitude wins."""
    import pandas as pd

    from catlens.recipes.steer_sweep import sweep_rule
    from catlens.selection import select, total_magnitude

    t = pd.DataFrame({"toward": [None, 0.2, 0.1, 0.2], "away": [None, -0.2, -0.1, -0.05],
                      "objective": [0.1, 0.9, 0.5, 0.5], "ppl_ratio": [1.0, 1.11, 1.10, 1.05]})
    t["steer_magnitude"] = total_magnitude(t, ["toward", "away"])
    sel = select(t, sweep_rule(0.10))
    assert sel.index == 2 and sel.n_admissible == 3  # 0.9 breaks the guard; 0.2 < 0.25 in magnitude
    assert select(t, sweep_rule(0.20)).index == 1  # a looser guard admits it
