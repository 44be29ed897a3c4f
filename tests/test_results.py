"""catlens.results (the sections analyses/summarise.py writes to docs/RESULTS.md) renders every number and sentence
from a run's tables and manifest: rendered on synthetic P2 and specificity run folders, a changed table value or
manifest record changes the text, and nothing about the protocol is printed unless the manifest says it."""

import json
from pathlib import Path

import pandas as pd

from _scripts import load_script
from catlens import results
from catlens.selection import Objective, SelectionRule, ppl_guard, select


def _save(folder: Path, name: str, df: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    df.to_parquet(folder / f"{name}.parquet", index=False)


def _selection_record(split: str = "val") -> dict:
    t = pd.DataFrame({"setting": ["a", "b"], "objective": [0.2, 0.5], "ppl_ratio": [1.0, 4.1]})
    sel = select(t, SelectionRule(Objective("objective"), constraints=(ppl_guard(0.1),)), group="pruned/attn_out")
    none = select(t.assign(ppl_ratio=9.0), SelectionRule(Objective("objective"), constraints=(ppl_guard(0.1),)),
                  group="guided/attn_out")
    return {"split": split, "rule": sel.rule.record(), "choices": [sel.record(), none.record()]}


def make_p2(folder: Path, *, benign_ratio: float = 1.053, base_harmful: float = 0.6, split: str = "val") -> Path:
    rows = []
    for setting, h, b, ppl in (("unsteered", base_harmful, 0.95, 1.0), ("pruned-attn_out-m1", 0.25, 0.95 * benign_ratio,
                                                                        1.07)):
        base = 0.0 if base_harmful == 0 else base_harmful
        rows.append({"setting": setting, "method": setting.split("-")[0], "group": setting, "harmful_answered": h,
                     "harmful_answered_ci_low": max(0.0, h - 0.1), "harmful_answered_ci_high": min(1.0, h + 0.1),
                     "harmful_answered_n": 65, "benign_answered": b, "benign_answered_ci_low": b - 0.05,
                     "benign_answered_ci_high": min(1.0, b + 0.05), "benign_answered_n": 150,
                     "harmful_answered_ratio": h / base if base else float("nan"),
                     "harmful_answered_halved": (h <= base / 2) if base else None,
                     "benign_answered_ratio": b / 0.95, "benign_answered_within_tol": b >= 0.9 * 0.95,
                     "ppl_ratio": ppl, "within_ppl_guard": ppl <= 1.1})
    t = pd.DataFrame(rows)
    t["harmful_answered_halved"] = t["harmful_answered_halved"].astype("boolean")
    _save(folder, "p2_test_summary", t)
    manifest = {"config": {"help_tol": 0.1, "ppl_guard": 0.1},
                "p2": {"split_seed": {"seed": 1, "why": "not in the seeds whose test split was already looked at"}},
                "selection": _selection_record(split),
                "test_evaluation": {"split_seed": 1, "settings": ["pruned-attn_out-m1", "unsteered"]}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_p2_text_follows_the_tables_and_manifest(tmp_path):
    text = results.p2_section([make_p2(tmp_path / "a")])
    assert "| pruned-attn_out-m1 | 25.0 [15.0, 35.0] | 0.417 | True | 100.0 [95.0, 100.0] | 1.053 | 1.070 | 65 / 150 |" \
        in text
    assert "Settings were chosen on the val split: 1 of 2 choices made (rule: maximise objective; subject to " \
           "ppl_ratio <= 1.1; ties: table order)." in text
    assert "nothing chosen (guided/attn_out): none of 2 candidates is admissible (ppl_ratio <= 1.1 rejected 2)" in text
    assert "Split seed 1: not in the seeds whose test split was already looked at." in text
    assert "ratios 1.053; 1 of 1 tested setting within the tolerance (10 % drop)" in text
    assert "breaks helpfulness" not in text and "unsafe" not in text
    # a changed table value changes the text; nothing is typed
    text2 = results.p2_section([make_p2(tmp_path / "b", benign_ratio=0.8)])
    assert "ratios 0.800; 0 of 1 tested setting within the tolerance" in text2 and text2 != text
    # the split the choice was made on is read from the manifest, not printed as a constant
    text3 = results.p2_section([make_p2(tmp_path / "c", split="test")])
    assert "chosen on the test split" in text3 and "chosen on the val split" not in text3
    # a zero baseline: "halved" is undefined, and the text says so
    text4 = results.p2_section([make_p2(tmp_path / "d", base_harmful=0.0)])
    assert "| undefined |" in text4 and '"halved" is undefined' in text4


def test_no_selection_record_is_said_not_assumed(tmp_path):
    folder = make_p2(tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["selection"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    text = results.p2_section([folder])
    assert "has no selection record" in text and "chosen on the" not in text


def make_specificity(folder: Path, *, sig: tuple[bool, bool] = (True, False), perm_p: float = 0.25) -> Path:
    cells = pd.DataFrame([{"variant": "raw", "set": "harmful", "sign": "away", "steer_category": a,
                           "eval_category": b, "diagonal": a == b, "significant": (sig[0] if a == b else sig[1]),
                           "p_value": 0.01, "p_adjusted": 0.03,
                           "correction": "Benjamini-Hochberg (false discovery rate) across the 4 cells; exact"}
                          for a in ("x", "y") for b in ("x", "y")])
    _save(folder, "specificity", cells)
    summary = pd.DataFrame([{"variant": "raw", "set": "harmful", "sign": "away", "metric": "rate",
                             "rows": "categories", "n_rows": 2, "mean_diag": -0.1, "mean_offdiag": -0.08,
                             "ratio": 1.25, "ratio_ci_low": 1.1, "ratio_ci_high": 1.4, "diag_minus_offdiag": -0.02,
                             "diag_minus_offdiag_ci_low": -0.03, "diag_minus_offdiag_ci_high": -0.01,
                             "mean_all": -0.09, "mean_all_ci_low": -0.1, "mean_all_ci_high": -0.08,
                             "perm_mean_diag_minus_offdiag": 0.001, "perm_p": perm_p, "n_perm": 3}])
    _save(folder, "summary", summary)
    _save(folder, "selection", pd.DataFrame([{"layer": 15, "scale": 0.1, "harmful_away": 0.01,
                                              "lookalike_toward": 0.03, "objective": 0.02, "chosen": True},
                                             {"layer": 21, "scale": 0.1, "harmful_away": 0.0,
                                              "lookalike_toward": 0.01, "objective": 0.005, "chosen": False}]))
    manifest = {"selection": {"split": "selection", "measurement_read": True,
                              "choices": [{"chosen": True, "group": None, "reason": "maximise objective = 0.02 among "
                                                                                   "2 admissible of 2",
                                           "rule": {"text": "maximise objective; ties: smaller scale"}}]}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_specificity_text_follows_the_tables(tmp_path):
    text = results.specificity_section(make_specificity(tmp_path / "a"))
    assert "Settings were chosen on the selection split: 1 of 1 choice made (rule: maximise objective; ties: " \
           "smaller scale)." in text
    assert "The measurement split was read once, after the choice." in text
    assert "| 15 | 0.10 | 0.010 | 0.030 | 0.020 | True |" in text
    assert "2 of 4 cells change refusal significantly after the correction (Benjamini-Hochberg" in text
    assert "raw: significant on the diagonal 2 of 2, off the diagonal 0 of 2." in text
    assert "(permutation p = 0.25, 3 permutations)" in text
    changed = results.specificity_section(make_specificity(tmp_path / "b", sig=(False, True), perm_p=0.75))
    assert "raw: significant on the diagonal 0 of 2, off the diagonal 2 of 2." in changed
    assert "(permutation p = 0.75, 3 permutations)" in changed


def test_main_writes_the_rendered_file(tmp_path):
    p2 = make_p2(tmp_path / "p2")
    spec = make_specificity(tmp_path / "spec")
    out = tmp_path / "RESULTS.md"
    text = load_script("summarise").main(["--p2", str(p2), "--specificity", str(spec), "--p1", str(tmp_path / "nope"),
                      "--out", str(out)])
    assert out.read_text() == text
    assert "not run" in text  # the missing P1 folder
    assert "Every choice was made on val" not in text  # the old constant sentence is gone


def _p1_run(folder: Path, created: str, val_gen_n: int, over_refusal: float) -> Path:
    _save(folder, "headline", pd.DataFrame({
        "policy": ["unsteered", "categorical_global"], "benign_pool": ["all", "all"],
        "over_refusal": [0.25, over_refusal], "over_refusal_ci_low": [0.15, over_refusal - 0.1],
        "over_refusal_ci_high": [0.37, over_refusal + 0.1], "refusal": [0.87, 0.95]}))
    _save(folder, "splits", pd.DataFrame({"split": ["test"], "n": [10], "seed": [0]}))
    (folder / "manifest.json").write_text(json.dumps({"created": created, "config": {"val_gen_n": val_gen_n}}))
    return folder


def test_an_earlier_run_on_the_same_test_split_is_said_with_what_changed(tmp_path):
    old = _p1_run(tmp_path / "old", "2026-12-07T07:03:00", 32, 0.25)
    new = _p1_run(tmp_path / "new", "2026-12-07T12:01:00", 64, 0.15)
    text = "\n".join(results.earlier_lines(new, [old]))
    assert "val-gen-n 32 -> 64 after that read" in text
    assert "not untouched" in text and "categorical_global over-refusal 25.0 % [15.0, 35.0]" in text
    assert results.earlier_lines(new, []) == []
    # a run that started later is not described as read before this one
    later = "\n".join(results.earlier_lines(old, [new]))
    assert "did not start before this run" in later and "not untouched" not in later
