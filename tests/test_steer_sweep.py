"""The steering sweep end to end on the tiny model: tables, the coherence guard, the chosen policy."""

import importlib.util
from pathlib import Path

import pytest

from catlens.steer import SteeringPolicy

SCRIPT = Path(__file__).resolve().parents[1] / "analyses" / "steer_sweep.py"


def _script():
    spec = importlib.util.spec_from_file_location("steer_sweep", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_writes_tables_and_a_policy_that_applies(tiny_lm_dir, tmp_path):
    sweep = _script()
    out = tmp_path / "sweep"
    assert sweep.main(["--model", str(tiny_lm_dir), "--layers", "1,2", "--toward", "0.5", "--away", "0.5",
                       "--methods", "one_vs_benign", "--n-per-split", "5", "--max-new-tokens", "4",
                       "--out", str(out)]) == 0
    from catlens.runs import load_table

    table = load_table(out / "sweep")
    assert len(table) == 1 * 2 * 2 * 2  # method x layer x (None, 0.5) x (None, -0.5)
    for col in ("refusal", "refusal_ci_low", "over_refusal", "over_refusal_se", "benign_ppl", "ppl_ratio",
                "admissible", "pareto", "chosen", "ppl_stands_for", "split"):
        assert col in table.columns
    assert table.chosen.sum() == 1 and bool(table[table.chosen].admissible.iloc[0])
    assert (table.split == "val").all()
    unsteered = table[table.toward.isna() & table.away.isna()]
    assert (unsteered.ppl_ratio == 1.0).all()
    policy = SteeringPolicy.load(out / "policy")
    assert policy.gate is not None and policy.meta.get("chosen_on", "builtin val split")
    runs = load_table(out / "runs")
    assert len(runs) == 2 * 2  # layers x (toward pass + away pass)
    with pytest.raises(ValueError, match="Did you mean: one_vs_rest"):
        sweep.main(["--model", str(tiny_lm_dir), "--methods", "one_vs_res", "--out", str(tmp_path / "bad")])
