"""The P1 figure scripts (figures/fig_p1_*.py) on a synthetic P1 run folder whose tables are built the way
analyses/p1_steering.py builds them (catlens.metrics.rate_table, auroc_with_ci, agreement_table on planted per-prompt
results): every script writes its files and reads only the tables; the numbers drawn and tabulated are the tables'
own; the gate's operating point sits where its saved threshold puts it; missing optional tables are skipped with the
reason logged. :func:`make_p1_run` is also the P1 part of the report's synthetic run (tests/test_report.py)."""

import importlib.util
import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from _scripts import load_script

REPO = Path(__file__).resolve().parents[1]
HARMFUL = ("harmful_heldout", "xstest_unsafe", "jbb_harmful", "builtin_harmful")
BENIGN = ("xstest_safe", "coconot_contrast", "jbb_benign", "builtin_lookalike", "alpaca")
HEADLINE_BENIGN = ("xstest_safe", "coconot_contrast", "jbb_benign", "builtin_lookalike")
POLICIES = {"unsteered": (0.70, 0.30), "categorical_youden": (0.92, 0.08), "categorical_target_fpr": (0.85, 0.05)}
"""policy -> (refusal rate on harmful prompts, over-refusal rate on benign prompts) planted in the per-prompt tables"""
THRESHOLDS = {"categorical_youden": 0.5, "categorical_target_fpr": 0.7}
CATEGORIES = ("violence", "cyber", "<fraud & co>")  # markup in a category: the report must escape it
N_PER_SET = 12


def _load(name: str):
    key = f"{name}_under_test"
    if key in sys.modules:
        return sys.modules[key]
    return load_script(name, "figures", key)  # registered in sys.modules under key: loaded once


def _builders(name: str):
    """The package module that holds the script's builders (``figures/fig_x.py`` -> ``catlens.figures.x``)."""
    return importlib.import_module(f"catlens.figures.{name.removeprefix('fig_')}")


def _save(folder: Path, name: str, df: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    df.to_parquet(folder / f"{name}.parquet", index=False)
    df.to_csv(folder / f"{name}.csv", index=False)


def _per_prompt(rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """First-position tables per policy (the columns of catlens.generation.first_position). Planted: the gate score
    separates built-in harmful prompts from their lookalikes perfectly and XSTest partly; the refusal-token score
    overlaps more; refusals hit each policy's planted rates exactly per side."""
    rows = []
    for ds in HARMFUL + BENIGN:
        label = "harmful" if ds in HARMFUL else "benign"
        for i in range(N_PER_SET):
            if ds == "builtin_harmful":
                gate = 0.55 + 0.4 * i / N_PER_SET
            elif ds == "builtin_lookalike":
                gate = 0.05 + 0.4 * i / N_PER_SET
            else:
                gate = float(np.clip(rng.normal(0.65 if label == "harmful" else 0.4, 0.2), 0.001, 0.999))
            token = float(np.clip(rng.normal(0.6 if label == "harmful" else 0.45, 0.2), 0.001, 0.999))
            rows.append({"id": f"{ds}/{i:03d}", "label": label, "source": ds,
                         "category": CATEGORIES[i % len(CATEGORIES)] if label == "harmful" or
                         ds == "builtin_lookalike" else None, "gate": gate, "token": token})
    prompts = pd.DataFrame(rows)
    out = {}
    for policy, (harm_rate, benign_rate) in POLICIES.items():
        refused = np.zeros(len(prompts), dtype=bool)
        for label, rate in (("harmful", harm_rate), ("benign", benign_rate)):
            idx = np.flatnonzero(prompts["label"].to_numpy() == label)
            refused[rng.choice(idx, size=int(round(rate * len(idx))), replace=False)] = True
        gated = policy in THRESHOLDS
        out[policy] = pd.DataFrame({
            "policy": policy, "id": prompts["id"], "label": prompts["label"], "category": prompts["category"],
            "source": prompts["source"], "top_token": np.where(refused, 5, 7), "refused": refused,
            "responded": ~refused, "refusal_score": prompts["token"] if policy == "unsteered" else
            np.clip(prompts["token"] + 0.1, 0, 1), "p_respond": 1 - prompts["token"],
            "special_refused": refused, "route": "violence" if gated else None,
            "gate_score": prompts["gate"] if gated else np.nan,
            "gate_flagged": (prompts["gate"] >= THRESHOLDS[policy]) if gated else None,
            "coeff": 0.0, "kl_from_base": 0.0 if policy == "unsteered" else 0.05})
    return out


def _sweep(rng: np.random.Generator) -> pd.DataFrame:
    """The val grid of catlens.recipes.p1.run_sweep (its columns); the target_fpr rule is planted better."""
    rows = []
    for method in ("one_vs_benign", "one_vs_rest"):
        for layer in (10, 14, 18):
            for rule in ("youden", "target_fpr"):
                for tc in (None, 0.1, 0.2):
                    for ac in (None, 0.2, 0.4):
                        ref = 0.6 + (tc or 0) * (1.5 if layer == 14 else 1.0) + (0.02 if rule == "target_fpr" else 0)
                        over = 0.3 - (ac or 0) * (0.5 if method == "one_vs_benign" else 0.3) + (tc or 0) * 0.2
                        rows.append({"method": method, "layer": layer, "gate_rule": rule, "toward": tc,
                                     "away": None if ac is None else -ac, "refusal": ref,
                                     "refusal_pooled": ref + 0.01, "refusal_n": 60, "over_refusal": over,
                                     "over_refusal_pooled": over - 0.01, "over_refusal_n": 80,
                                     "benign_first_token_kl": float(rng.uniform(0, 0.5))})
    sweep = pd.DataFrame(rows)
    sweep["objective"] = sweep.refusal - sweep.over_refusal
    sweep["split"] = "val"
    sweep["n_val"] = 140
    return sweep


def make_p1_run(folder: Path, *, lowrank: bool = False, substring: bool = True, sweep: bool = True,
                auroc: bool = True, seed: int = 0) -> Path:
    """A P1 run folder with the tables of analyses/p1_steering.py, computed as that script computes them from
    planted per-prompt results (no model)."""
    from catlens.judges import agreement_table
    from catlens.metrics import auroc_with_ci, rate_table

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per = _per_prompt(rng)
    fp = pd.concat(per.values(), ignore_index=True)
    fp = fp.assign(dataset=fp.source)
    _save(folder, "test_first_position", fp)
    rates = []
    for name, g in fp.groupby("policy", sort=False):
        for by in (["dataset"], ["dataset", "category"]):
            t = rate_table(g, "refused", by=by)
            rates.append(t.assign(policy=name, grouping="+".join(by), judge="refusal_token (first position)"))
    _save(folder, "test_rates", pd.concat(rates, ignore_index=True))
    headline = []
    for name, g in fp.groupby("policy", sort=False):
        row = {"policy": name}
        for key, part in (("over_refusal", g[g.dataset.isin(HEADLINE_BENIGN)]), ("refusal", g[g.label == "harmful"])):
            t = rate_table(part, "refused", by=["dataset"])
            pooled, macro = t[t.row == "pooled"].iloc[0], t[t.row == "macro"].iloc[0]
            row.update({key: pooled.rate, f"{key}_se": pooled.se, f"{key}_ci_low": pooled.ci_low,
                        f"{key}_ci_high": pooled.ci_high, f"{key}_n": int(pooled.n), f"{key}_macro": macro.rate,
                        f"{key}_macro_se": macro.se})
        row.update(ppl_ratio=1.0 if name == "unsteered" else 1.04, target_over_refusal="<= 0.10",
                   target_refusal=">= 0.90", target_ppl_ratio="<= 1.10")
        headline.append(row)
    _save(folder, "headline", pd.DataFrame(headline))
    # generated subsample, two judges
    sub = fp[fp.id.str.endswith(("000", "001"))]
    judged = sub.assign(refused_refusal_token=sub.refused, refused_substring=sub.refused ^ (sub.id.str[-1] == "1")
                        & (sub.label == "benign"))
    _save(folder, "judges", judged.drop(columns=["dataset"]))
    _save(folder, "agreement", pd.concat([agreement_table(g).assign(policy=n)
                                          for n, g in judged.groupby("policy", sort=False)], ignore_index=True))
    if substring:
        second = []
        for n, g in judged.groupby("policy", sort=False):
            t = rate_table(g.assign(dataset="generated subsample"), "refused_substring", by=["dataset"])
            second.append(t[t.row == "pooled"].assign(policy=n, judge="substring"))
        _save(folder, "test_rates_substring", pd.concat(second, ignore_index=True))
    base = fp[fp.policy == "unsteered"].set_index("id")
    g = fp[fp.policy == "categorical_youden"].set_index("id")
    au, err = [], []
    for pair, (pos, neg) in {"xstest unsafe vs safe": ("xstest_unsafe", "xstest_safe"),
                             "built-in harmful vs lookalikes": ("builtin_harmful", "builtin_lookalike")}.items():
        ids = list(g[g.dataset.isin([pos, neg])].index)
        y = (g.loc[ids].dataset == pos).to_numpy()
        for score_name, s in (("probe (gate score)", g.loc[ids].gate_score.to_numpy(dtype=float)),
                              ("refusal-token probability", base.loc[ids].refusal_score.to_numpy(dtype=float))):
            au.append({"pair": pair, "score": score_name, "gate_from": "categorical_youden",
                       **auroc_with_ci(y, s, rng=rng, n_boot=200)})
    for ds, part in g.groupby("dataset"):
        flagged = part.gate_flagged.astype(bool)
        wrong = flagged if part.label.iloc[0] == "benign" else ~flagged
        err.append({"dataset": ds, "label": part.label.iloc[0], "n": len(part), "flagged": int(flagged.sum()),
                    "gate_errors": int(wrong.sum()), "error_rate": float(wrong.mean()), "policy": "categorical_youden"})
    if auroc:
        _save(folder, "auroc", pd.DataFrame(au))
    _save(folder, "gate_errors", pd.DataFrame(err))
    for name, thr in THRESHOLDS.items():
        (folder / "policies" / name).mkdir(parents=True, exist_ok=True)
        (folder / "policies" / name / "policy.json").write_text(json.dumps(
            {"format": 1, "gate": {"layer": 14, "threshold": thr, "site": "resid_post"}, "toward": 0.2, "away": -0.4,
             "meta": {"gate_rule": name.split("_", 1)[1], "layer": 14}}))
    if sweep:
        sw = _sweep(rng)
        _save(folder, "sweep", sw)
        cand = []
        for rule in ("youden", "target_fpr"):
            part = sw[(sw.gate_rule == rule) & (sw.toward.notna() | sw.away.notna())]
            best = part.sort_values("objective", ascending=False).head(2)
            for k, r in enumerate(best.itertuples()):
                cand.append({"gate_rule": rule, "method": r.method, "layer": int(r.layer),
                             "toward": None if r.toward != r.toward else float(r.toward),
                             "away": r.away, "val_objective": r.objective, "val_refusal": r.refusal,
                             "val_over_refusal": r.over_refusal, "ppl_ratio": 1.2 if k == 0 else 1.05, "ppl_n": 20,
                             "admissible": k == 1, "chosen": k == 1,
                             "stands_for": "coherence: perplexity of benign val answers under the unsteered model"})
        _save(folder, "candidates", pd.DataFrame(cand))
        _save(folder, "gates", pd.DataFrame([{"layer": 14, "rule": r, "threshold": THRESHOLDS[f"categorical_{r}"],
                                              "val_auroc": 0.9, "val_flagged_harmful": 0.8,
                                              "val_flagged_benign": 0.1, "target_fpr": 0.05}
                                             for r in ("youden", "target_fpr")]))
    if lowrank:
        step = np.arange(0, 30, 3)
        _save(folder, "lowrank_curve", pd.DataFrame({"step": step, "loss": 2.0 * np.exp(-step / 8) + 0.4,
                                                     "harm": 1.6 * np.exp(-step / 8) + 0.1,
                                                     "kl": 0.3 - 0.005 * step}))
    (folder / "manifest.json").write_text(json.dumps({"status": "done", "models": {"model": {"name": "synthetic"}}}))
    return folder


@pytest.fixture
def run(tmp_path) -> Path:
    return make_p1_run(tmp_path / "p1", lowrank=True)


# ------------------------------------------------------------------------------------------------- tests
def test_every_script_is_a_p1_stage_figure_and_writes_its_files(run, tmp_path):
    """The main job's figures stage (catlens.pipeline.figure_stage_of) gives fig_p1_* the p1 stage folder and calls
    main(folder, out_dir=, png=)."""
    from catlens.pipeline import figure_stage_of

    expected = {"fig_p1_tradeoff": {"html", "csv", "cloud_html", "cloud_csv"},
                "fig_p1_safety_table": {"html", "csv", "bars_html", "md", "table_csv"},
                "fig_p1_probe_roc": {"html", "csv"},
                "fig_p1_sweeps": {"html", "csv", "layers_html", "layers_csv", "lowrank_html", "lowrank_csv"}}
    for name, keys in expected.items():
        module = _load(name)
        assert module.STAGE == "p1" and figure_stage_of(REPO / "figures" / f"{name}.py", module) == "p1"
        written = module.main(run, out_dir=tmp_path / "figs", png=False)
        assert set(written) == keys, name
        for path in written.values():
            assert isinstance(path, Path) and path.exists() and path.stat().st_size > 0, path
    assert (tmp_path / "figs" / "plotly.min.js").exists()  # the HTML pages work offline


@pytest.mark.browser
def test_png_export_when_a_browser_is_there(run, tmp_path):
    from catlens.plotting import static_export_available

    if not static_export_available():
        pytest.skip("no Chromium for kaleido (apt-get install -y chromium)")
    written = _load("fig_p1_tradeoff").main(run, out_dir=tmp_path, png=True)
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and written["cloud_png"].stat().st_size > 5_000


def test_figure_1_draws_the_headline_numbers_and_the_region_from_the_table(run):
    fig1 = _builders("fig_p1_tradeoff")
    head = pd.read_parquet(run / "headline.parquet")
    head["target_over_refusal"] = "<= 0.15"  # the region is read from the table, not typed
    fig = fig1.tradeoff_figure(head, "judge-x")
    assert [t.name for t in fig.data] == list(head.policy)
    for trace, row in zip(fig.data, head.itertuples()):
        assert trace.x[0] == row.over_refusal and trace.y[0] == row.refusal
        assert trace.error_x.array[0] == pytest.approx(row.over_refusal_ci_high - row.over_refusal)
        assert trace.error_x.arrayminus[0] == pytest.approx(row.over_refusal - row.over_refusal_ci_low)
        assert trace.error_y.array[0] == pytest.approx(row.refusal_ci_high - row.refusal)
        assert trace.error_y.arrayminus[0] == pytest.approx(row.refusal - row.refusal_ci_low)
    (rect,) = [s for s in fig.layout.shapes if s.type == "rect"]
    assert (rect.x0, rect.x1, rect.y0, rect.y1) == (0, 0.15, 0.9, 1.0)
    assert "judge-x" in fig.layout.title.text
    data = fig1.tradeoff_data(head)
    expected = (head.over_refusal <= 0.15) & (head.refusal >= 0.9)
    assert list(data.in_region) == list(expected) and expected.any() and not expected.all()


def test_sweep_cloud_marks_exactly_the_chosen_candidates(run):
    fig1 = _builders("fig_p1_tradeoff")
    sweep, cand = pd.read_parquet(run / "sweep.parquet"), pd.read_parquet(run / "candidates.parquet")
    data = fig1.sweep_data(sweep, cand)
    chosen = cand[cand.chosen]
    assert data.chosen.sum() == len(chosen) == 2
    got = sorted(zip(data[data.chosen].refusal, data[data.chosen].over_refusal))
    assert got == sorted(zip(chosen.val_refusal, chosen.val_over_refusal))
    fig = fig1.sweep_figure(sweep, cand)
    star = next(t for t in fig.data if t.name == "chosen")
    assert sorted(zip(star.y, star.x)) == got
    assert next(t for t in fig.data if t.name == "unsteered").x[0] == sweep[sweep.toward.isna()
                                                                             & sweep.away.isna()].over_refusal.iloc[0]
    assert sum(len(t.x) for t in fig.data if t.name not in ("chosen", "unsteered")) == (
        len(sweep) - (sweep.toward.isna() & sweep.away.isna()).sum())


def _md_cells(md: str) -> dict[tuple[str, str], dict[str, str]]:
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    out = {}
    for ln in lines[2:]:
        cells = [c.strip() for c in ln.strip("|").split("|")]
        rec = dict(zip(head, cells))
        out[(rec["side"], rec["dataset"])] = rec
    return out


def test_safety_table_numbers_are_the_tables(run, tmp_path):
    fst = _builders("fig_p1_safety_table")
    rates = pd.read_parquet(run / "test_rates.parquet")
    # an odd value proves the numbers are formatted from the table
    i = rates.index[(rates.policy == "unsteered") & (rates.grouping == "dataset") & (rates.dataset == "alpaca")][0]
    rates.loc[i, ["rate", "se"]] = [0.123456, 0.0271]
    rates.to_parquet(run / "test_rates.parquet", index=False)
    written = _load("fig_p1_safety_table").main(run, out_dir=tmp_path, png=False)
    cells = _md_cells(written["md"].read_text())
    assert cells[("benign", "alpaca")]["unsteered"] == "12.3 ± 2.7"
    by_dataset = rates[rates.grouping == "dataset"]
    label = {"pooled": "pooled (all {} sets)", "macro": "macro (mean over {} sets)"}
    checked = 0
    for r in by_dataset.itertuples():
        name = r.dataset if r.row == "group" else label[r.row].format(r.side)
        assert cells[(r.side, name)][r.policy] == f"{100 * r.rate:.1f} ± {100 * r.se:.1f}", (r.side, name)
        assert cells[(r.side, name)]["n"] == str(r.n)
        checked += 1
    assert checked == len(POLICIES) * (len(HARMFUL) + len(BENIGN) + 4)
    head = pd.read_parquet(run / "headline.parquet")
    fig1_row = cells[("benign", fst.HEADLINE_BENIGN_LABEL)]
    for r in head.itertuples():
        assert fig1_row[r.policy] == f"{100 * r.over_refusal:.1f} ± {100 * r.over_refusal_se:.1f}"
    sub = pd.read_parquet(run / "test_rates_substring.parquet")
    for r in sub.itertuples():
        assert cells[(r.side, "pooled, generated subsample (substring judge)")][r.policy] == \
            f"{100 * r.rate:.1f} ± {100 * r.se:.1f}"
    # the CSV twin and the long data hold the same numbers
    wide = pd.read_csv(written["table_csv"], dtype=str)
    assert wide.set_index(["side", "dataset"]).loc[("benign", "alpaca"), "unsteered"] == "12.3 ± 2.7"
    long = pd.read_csv(written["csv"])
    row = long[(long.policy == "unsteered") & (long.label == "alpaca")].iloc[0]
    assert row.rate == pytest.approx(0.123456) and row.ci_low == rates.loc[i, "ci_low"]
    assert "judge: refusal_token (first position)" in written["md"].read_text()
    # the figure's cells are the same strings
    fig = fst.safety_figure(fst.safety_rows(rates))
    columns = [h.replace("<b>", "").replace("</b>", "") for h in fig.data[0].header.values]
    col = list(fig.data[0].cells.values[columns.index("unsteered")])
    assert any(c.startswith("12.3 ± 2.7<br>") for c in col)
    bars = fst.safety_bars(fst.safety_rows(rates))
    assert {t.name for t in bars.data} == set(POLICIES)


def test_probe_roc_curves_points_and_legend_come_from_the_tables(run):
    from sklearn.metrics import auc

    roc = _builders("fig_p1_probe_roc")
    scores = roc.load_scores(run)
    auroc = pd.read_parquet(run / "auroc.parquet")
    gate_from = roc.gated_policy(scores, auroc)
    threshold = roc.gate_threshold(run, gate_from)
    assert (gate_from, threshold) == ("categorical_youden", THRESHOLDS["categorical_youden"])
    curves, points = roc.roc_data(scores, gate_from, threshold)
    for (pair, score), c in curves.groupby(["pair", "score"]):
        table = auroc[(auroc.pair == pair) & (auroc.score == score)].auroc.iloc[0]
        assert auc(c.fpr, c.tpr) == pytest.approx(table)  # the drawn curve has the table's AUROC
    planted = curves[(curves.pair == "built-in harmful vs lookalikes") & (curves.score == roc.PROBE)]
    assert ((planted.fpr == 0) & (planted.tpr == 1)).any()  # perfectly separated: the curve reaches (0, 1)
    g = scores[scores.policy == gate_from]
    for pair, (pos, neg) in roc.PAIRS.items():
        p = points[(points.pair == pair) & (points.score == roc.PROBE)].iloc[0]
        assert p.fpr == (g[g.dataset == neg].gate_score >= threshold).mean()  # the saved threshold's point
        assert p.tpr == (g[g.dataset == pos].gate_score >= threshold).mean()
        base = scores[scores.policy == "unsteered"]
        t = points[(points.pair == pair) & (points.score == roc.TOKEN)].iloc[0]
        assert t.tpr == base[base.dataset == pos].refused.mean()
    fig = roc.roc_figure(curves, points, auroc, gate_from, threshold)
    names = [t.name for t in fig.data]
    r = auroc.iloc[0]
    assert f"{r.pair}: {r.score}: AUROC {r.auroc:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]" in names
    assert f"xstest unsafe vs safe: gate threshold {THRESHOLDS['categorical_youden']:.3g}" in names


def test_probe_roc_reads_the_saved_per_prompt_table(run):
    roc = _builders("fig_p1_probe_roc")
    saved = pd.read_parquet(run / "test_first_position.parquet")
    pd.testing.assert_frame_equal(roc.load_scores(run), saved)
    saved.drop(columns="gate_score").to_parquet(run / "test_first_position.parquet", index=False)
    with pytest.raises(ValueError, match=r"has no column\(s\) \['gate_score'\]"):
        roc.load_scores(run)


def test_sweep_curves_read_the_grid(run):
    fsw = _builders("fig_p1_sweeps")
    sweep = pd.read_parquet(run / "sweep.parquet")
    assert fsw.best_gate_rule(sweep) == "target_fpr"  # planted +0.02 refusal
    data = fsw.strength_data(sweep)
    assert set(data.gate_rule) == {"target_fpr"}
    one = data[(data.method == "one_vs_benign") & (data.layer == "layer 14") & (data.metric == "refusal")]
    assert list(one.coefficient) == [-0.4, -0.2, 0.0, 0.1, 0.2]  # away (negative), gate only, toward
    src = sweep[(sweep.method == "one_vs_benign") & (sweep.layer == 14) & (sweep.gate_rule == "target_fpr")]
    zero = src[src.toward.isna() & src.away.isna()].refusal.iloc[0]
    toward = src[(src.toward == 0.2) & src.away.isna()].refusal.iloc[0]
    away = src[src.toward.isna() & (src.away == -0.4)].refusal.iloc[0]
    assert list(one.value) == [away, src[src.toward.isna() & (src.away == -0.2)].refusal.iloc[0], zero,
                               src[(src.toward == 0.1) & src.away.isna()].refusal.iloc[0], toward]
    layers = fsw.layer_data(sweep)
    part = sweep[(sweep.gate_rule == "target_fpr") & (sweep.method == "one_vs_rest") & (sweep.layer == 14)]
    best = layers[(layers.method == "one_vs_rest") & (layers.layer == 14) & (layers.metric == "objective")]
    assert best.value.iloc[0] == part.objective.max()
    fig = fsw.strength_figure(sweep)
    assert len(fig.data) == 2 * 3 * 2  # methods x layers x (refusal, over-refusal) panels
    with pytest.raises(ValueError, match="gate rule 'nope' is not in the sweep"):
        fsw.strength_data(sweep, "nope")


def test_missing_optional_tables_are_skipped_with_a_reason(tmp_path, caplog):
    run = make_p1_run(tmp_path / "p1", lowrank=False, substring=False, sweep=False, auroc=False)
    caplog.set_level(logging.INFO)
    written = _load("fig_p1_tradeoff").main(run, out_dir=tmp_path / "out", png=False)
    assert set(written) == {"html", "csv"} and not (tmp_path / "out" / "fig_p1_sweep_cloud.html").exists()
    assert re.search(r"fig_p1_sweep_cloud skipped: no sweep table in .*p1", caplog.text)
    md = _load("fig_p1_safety_table").main(run, out_dir=tmp_path / "out", png=False)["md"].read_text()
    assert "generated subsample" not in md and "no test_rates_substring" in caplog.text
    roc = _builders("fig_p1_probe_roc")
    _load("fig_p1_probe_roc").main(run, out_dir=tmp_path / "out", png=False)
    assert "no auroc rows" in caplog.text
    drawn = pd.read_csv(tmp_path / "out" / "fig_p1_probe_roc.csv")
    assert set(drawn.kind) == {"curve", "operating point"}
    scores = roc.load_scores(run)
    curves, points = roc.roc_data(scores, roc.gated_policy(scores))
    names = [t.name for t in roc.roc_figure(curves, points, None).data]
    assert any("(no interval: auroc table absent)" in n for n in names)
    # sweeps: the required table is missing -> a clear error; lowrank absent -> logged and skipped
    with pytest.raises(FileNotFoundError, match="sweep.parquet"):
        _load("fig_p1_sweeps").main(run, out_dir=tmp_path / "out", png=False)
    full = make_p1_run(tmp_path / "p1b", lowrank=False)
    written = _load("fig_p1_sweeps").main(full, out_dir=tmp_path / "out", png=False)
    assert not any(k.startswith("lowrank") for k in written)
    assert "fig_p1_lowrank skipped: no lowrank_curve table" in caplog.text


def test_lowrank_curve_and_bad_tables(run):
    fsw = _builders("fig_p1_sweeps")
    curve = pd.read_parquet(run / "lowrank_curve.parquet")
    data = fsw.lowrank_data(curve)
    assert set(data.metric) == {"loss", "harm", "kl"} and set(data.run) == {"low rank"}
    assert data[data.metric == "loss"].value.tolist() == curve.loss.tolist()
    ranked = pd.concat([curve.assign(rank=2), curve.assign(rank=4, loss=curve.loss / 2)])
    assert set(fsw.lowrank_data(ranked).run) == {"rank 2", "rank 4"}
    with pytest.raises(ValueError, match="has none of"):
        fsw.lowrank_data(curve[["step"]])
    with pytest.raises(ValueError, match=r"table 'headline' has no column\(s\) \['refusal_ci_low'"):
        _builders("fig_p1_tradeoff").tradeoff_data(pd.read_parquet(run / "headline.parquet").drop(
            columns="refusal_ci_low"))
    with pytest.raises(ValueError, match="no rows grouped by dataset"):
        fst = _builders("fig_p1_safety_table")
        rates = pd.read_parquet(run / "test_rates.parquet")
        fst.safety_rows(rates[rates.grouping != "dataset"])
    with pytest.raises(FileNotFoundError, match="no per-prompt table at"):
        _builders("fig_p1_probe_roc").load_scores(run / "nowhere")


def test_a_run_without_a_gated_policy(tmp_path, caplog):
    """When no candidate passes the perplexity guard the analysis keeps only the unsteered policy and writes an empty
    auroc table: the ROC script draws nothing and says why; the other scripts still draw."""
    run = make_p1_run(tmp_path / "p1")
    fp = pd.read_parquet(run / "test_first_position.parquet")
    _save(run, "test_first_position", fp[fp.policy == "unsteered"])
    pd.DataFrame().to_parquet(run / "auroc.parquet")
    caplog.set_level(logging.INFO)
    assert _load("fig_p1_probe_roc").main(run, out_dir=tmp_path / "out", png=False) == {}
    assert "fig_p1_probe_roc skipped: no policy in" in caplog.text
    assert not (tmp_path / "out" / "fig_p1_probe_roc.html").exists()
    from catlens.report import build_report

    rep = build_report(run.parent)
    sec = next(s for s in rep.sections if s.id == "probe_roc")
    assert sec.status == "ok" and not sec.figures and "no gated policy passed the perplexity guard" in sec.body


def test_figure_cli_parses_and_calls_main(tmp_path):
    from catlens.plotting import figure_cli

    seen = {}

    def fake_main(run_dir, out_dir=None, png=True):
        seen.update(run_dir=run_dir, out_dir=out_dir, png=png)
        return "ok"

    assert figure_cli(fake_main, "doc", [str(tmp_path), "--out-dir", str(tmp_path / "o"), "--no-png"]) == "ok"
    assert seen == {"run_dir": tmp_path, "out_dir": tmp_path / "o", "png": False}
    assert figure_cli(fake_main, "doc", [str(tmp_path)]) == "ok" and seen["png"] is True and seen["out_dir"] is None


def _bound_tables() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    gates = ["unsteered", "chosen zones (offline)", "oracle gate (label)", "best side per row"]
    bound = pd.DataFrame({"gate": gates, "refusal": [0.8, 0.9, 0.97, 1.0], "over_refusal": [0.25, 0.2, 0.05, 0.0],
                          "judge": "full_answer"})
    for k in ("refusal", "over_refusal"):
        bound[f"{k}_ci_low"], bound[f"{k}_ci_high"] = bound[k] - 0.05, (bound[k] + 0.05).clip(upper=1.0)
    frontier = pd.DataFrame({"lower": [0.1, 0.3, 0.5], "upper": [0.2, 0.6, 0.9], "refusal": [0.95, 0.9, 0.8],
                             "over_refusal": [0.3, 0.2, 0.1]})
    roc = pd.DataFrame({"fpr": [0.0, 0.1, 1.0, 0.12], "tpr": [0.0, 0.8, 1.0, 0.85],
                        "threshold": [2.0, 0.5, 0.0, 0.4], "point": ["", "", "", "upper (toward at or above)"]})
    return bound, frontier, roc


def test_bound_figure_draws_every_bound_point_the_frontier_and_the_roc(tmp_path):
    from catlens.figures.p1_bound import bound_figure

    bound, frontier, roc = _bound_tables()
    fig = bound_figure(bound, frontier, roc)
    names = [t.name for t in fig.data]
    assert set(bound.gate) <= set(names) and "frontier (every zone pair)" in names and "gate ROC" in names
    oracle = next(t for t in fig.data if t.name == "oracle gate (label)")
    assert list(oracle.x) == [0.05] and list(oracle.y) == [0.97]
    curve = next(t for t in fig.data if t.name == "gate ROC")
    assert list(curve.x) == [0.0, 0.1, 1.0]  # the operating point is a marker, not part of the curve
    with pytest.raises(ValueError, match="no column"):
        bound_figure(bound.drop(columns=["refusal_ci_low"]), frontier, roc)
    folder = tmp_path / "p1"
    folder.mkdir()
    mod = _load("fig_p1_bound")
    assert mod.main(folder, out_dir=tmp_path / "out", png=False) == {}  # no bound table: nothing, said in the log
    for name, t in zip(("bound", "test_frontier", "gate_roc"), _bound_tables()):
        t.to_parquet(folder / f"{name}.parquet")
    written = mod.main(folder, out_dir=tmp_path / "out", png=False)
    assert written and all(p.exists() for p in written.values())
    assert list(pd.read_csv(tmp_path / "out" / "fig_p1_bound.csv").gate) == list(bound.gate)
