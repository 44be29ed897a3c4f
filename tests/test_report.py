"""The run report: every section from small synthetic tables, "not run" sections without them, the command's exit
codes, and the page in a real headless Chromium (skipped, with the reason, when none is installed)."""

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from catlens import report as R
from catlens.browser import browser_unavailable, chromium_executable, headless_chromium, page_errors
from catlens.cli import main as cli_main
from test_figures_p1 import _bound_tables, make_p1_run

CHROMIUM = chromium_executable()
_NO_BROWSER = browser_unavailable(CHROMIUM)
_skip_browser = pytest.mark.skipif(_NO_BROWSER is not None, reason=_NO_BROWSER or "")


def browser(fn):
    return pytest.mark.browser(_skip_browser(fn))

CATS = ["violence", "cyber", "<fraud & co>"]  # a category with markup: it must be escaped, not rendered
LAYERS = [0, 1, 2, 3]


def _save(folder: Path, name: str, df: pd.DataFrame) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    df.to_parquet(folder / f"{name}.parquet", index=False)


def make_run(root: Path, *, placeholders: bool = True) -> Path:
    """A run folder with every table the report reads, a few rows each."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    ft = root.parent / "finetunes" / "refusal-quick"  # the fine-tune lives in the model cache, outside the run
    ft.mkdir(parents=True, exist_ok=True)
    (ft / "catlens_finetune.json").write_text(json.dumps({
        "name": "refusal-quick", "base": {"spec": "smollm2-135m-instruct"}, "method": {"name": "lora"},
        "data": {"origin": "builtin", "harmful": {"n": 120}, "benign": {"n": 80}},
        "training": {"steps": 60, "train_seconds": 70.5, "final_loss": 0.25}, "total_seconds": 84.0}))
    manifest = {"config": {"out": str(root), "quick": True}, "command": ["analyses/main.py", "--out", str(root)],
                "created": "2026-12-01T00:00:00+00:00", "seed": 0, "versions": {"torch": "2.13.0"},
                "git_commit": "0123456789abcdef", "git_dirty": False, "status": "done",
                "stages": {"eval": {"folder": "eval", "seconds": 76.0},
                           "geometry": {"folder": "geometry", "seconds": 102.5},
                           "finetune": {"folder": str(ft), "seconds": 84.0}},
                "figures": {"fig_cosine:html": f"runs/{root.name}/figures/fig_cosine.html",
                            "fig_cosine:png": f"runs/{root.name}/figures/fig_cosine.png"}}
    (root / "figures").mkdir()
    (root / "figures" / "fig_cosine.html").write_text("<html></html>")
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "summary.json").write_text(json.dumps({"model": "/cache/finetunes/refusal-quick", "seconds": 262.5}))

    ev = root / "eval"
    ev.mkdir()
    (ev / "manifest.json").write_text(json.dumps({"status": "done", "git_commit": "0123456789abcdef",
                                                  "models": {"finetune": {"name": "refusal-quick", "n_layers": 30,
                                                                          "source": {"kind": "folder",
                                                                                     "spec": str(ft)}}},
                                                  "data": {"harmful_heldout": {"n": 40, "content_hash": "ab" * 8}}}))
    per_cat = pd.DataFrame([{"category": c, "n_scored": 10, "refused_first_token": 0.9, "right_category_first_token":
                             0.8, "n_generated": 5, "refused_generated": 0.8, "right_category_generated": 0.6}
                            for c in CATS])
    per_cat = pd.concat([per_cat, pd.DataFrame([{"category": "ALL", "n_scored": 30, "refused_first_token": 0.9123,
                                                 "right_category_first_token": 0.8, "n_generated": 15,
                                                 "refused_generated": 0.8, "right_category_generated": 0.6}])])
    _save(ev, "per_category", per_cat)
    _save(ev, "over_refusal", pd.DataFrame({"set": ["alpaca_test", "xstest_safe"], "n": [20, 20],
                                            "over_refusal_first_token": [0.05, 0.3],
                                            "over_refusal_generated": [0.05, 0.35],
                                            "mean_refusal_score": [0.04, 0.3]}))
    _save(ev, "auroc", pd.DataFrame({"harmful": "harmful_heldout", "benign": ["alpaca_test", "xstest_safe"],
                                     "auroc": [0.99, 0.8], "n_harmful": 30, "n_benign": 20}))
    _save(ev, "fluency", pd.DataFrame([{"perplexity_finetuned_answers_under_stock": 3.1,
                                        "perplexity_stock_answers_under_stock": 2.5, "n_answers": 12,
                                        "repeated_special_rate_gated": 0.0}]))
    (ev / "summary.json").write_text(json.dumps({"harmful_refusal_generated": 0.8, "targets": {
        "harmful_refusal": ">= 0.95", "repeated_special_rate": "== 0"}, "repeated_special_rate_gated": 0.0}))

    geo = root / "geometry"
    sep = [{"task": task, "layer": layer, "metric": m, "value": float(rng.uniform(0.1, 0.9)), "n_prompts": 40,
            "n_classes": 2} for task in ("harmful_vs_benign", "harmful_category") for layer in LAYERS
           for m in ("probe_accuracy", "probe_auroc", "silhouette", "davies_bouldin", "fisher_ratio")]
    _save(geo, "separability", pd.DataFrame(sep))
    cos = [{"direction": d, "layer": layer, "space": s, "category_a": a, "category_b": b,
            "cosine": 1.0 if a == b else float(rng.uniform(-0.3, 0.8))}
           for d in ("one_vs_benign", "p1") for layer in LAYERS
           for s in ("raw", "whitened", "basis_whitened", "basis_residual") for a in CATS for b in CATS]
    _save(geo, "cosine", pd.DataFrame(cos))
    an = [{"subset": sub, "layer": layer, "measure": m, "value": float(rng.uniform(1, 50)), "n_prompts": 40,
           "d_model": 16} for sub in ("all", "harmful") for layer in LAYERS
          for m in ("mean_pairwise_cosine", "top1_variance_share", "effective_rank", "condition_number")]
    _save(geo, "anisotropy", pd.DataFrame(an))
    _save(geo, "whitening", pd.DataFrame([{"layer": layer, "method": "zca", "eps": 1e-4, "shrinkage": None,
                                           "restrict_to_span": False, "n_samples": 12, "rank": 11,
                                           "rank_deficient": True, "d_model": 16} for layer in LAYERS]))
    _save(geo, "basis_alignment", pd.DataFrame([{"direction": "p1", "layer": layer, "category": c,
                                                 "cos_basis_whitened": 0.9, "cos_basis_residual": 0.7,
                                                 "off_span_share": 0.1, "r_diag": 1.0,
                                                 "lapack_sign_flipped": False} for layer in LAYERS for c in CATS]))
    _save(geo, "model_diff", pd.DataFrame([{"direction": d, "category": c, "layer": layer,
                                            "cosine": float(rng.uniform(0.5, 1.0)), "model_a": "tuned",
                                            "model_b": "stock"} for d in ("one_vs_benign", "p1") for c in CATS
                                           for layer in LAYERS]))
    if not placeholders:
        return root
    make_p1_run(root / "p1", lowrank=True)
    for name, table in zip(("bound", "test_frontier", "gate_roc"), _bound_tables()):
        _save(root / "p1", name, table)
    make_p2_tables(root / "p2")
    make_specificity_tables(root / "specificity")
    _save(root / "eval", "judge_agreement", pd.DataFrame([{"judge_a": "keyword", "judge_b": "llama_guard",
                                                           "set": "catqa", "n": 40, "agreement": 0.8,
                                                           "cohen_kappa": 0.4}]))
    return root


P2_SETTINGS = {"unsteered": ("unsteered", "unsteered", 0.8, 0.9), "unsupervised-attn_out-L2-m1":
               ("unsupervised", "unsupervised/attn_out", 0.6, 0.88),
               "pruned-attn_out-L2-m1-q0.5": ("pruned", "pruned/attn_out", 0.5, 0.7),
               "guided-attn_out-L2-m1": ("guided", "guided/attn_out", 0.3, 0.86)}
"""setting -> (method, group, pooled share of harmful prompts answered, pooled share of benign prompts answered);
guided meets P2's target"""


def make_p2_tables(folder: Path) -> Path:
    """P2's test tables in analyses/p2_steering.py's schema (p2_test, p2_test_summary, p2_agreement)."""
    rows, summary, agree = [], [], []
    base_ur, base_help = P2_SETTINGS["unsteered"][2], P2_SETTINGS["unsteered"][3]
    for setting, (method, group, ur, helpful) in P2_SETTINGS.items():
        common = {"setting": setting, "method": method, "site": None if method == "unsteered" else "attn_out",
                  "split": "test", "group": group, "split_seed": 0}
        for judge in ("substring", "refusal_token"):
            for metric, prompts, value, cats in (("harmful_answered_rate", "harmful", ur, CATS),
                                                 ("benign_answered_rate", "benign", helpful, [*CATS, "(none)"])):
                for k, c in enumerate(cats):
                    v = min(1.0, value + 0.05 * k)
                    rows.append({**common, "prompts": prompts, "metric": metric, "judge": judge, "row": "group",
                                 "category": c, "n": 20, "k": round(20 * v), "value": v, "se": 0.05,
                                 "ci_low": max(0.0, v - 0.1), "ci_high": min(1.0, v + 0.1), "interval": "wilson",
                                 "stands_for": f"{metric} stands for ({prompts})"})
                rows.append({**common, "prompts": prompts, "metric": metric, "judge": judge, "row": "pooled",
                             "category": "(all)", "n": 60, "k": round(60 * value), "value": value, "se": 0.03,
                             "ci_low": value - 0.06, "ci_high": min(1.0, value + 0.06), "interval": "wilson",
                             "stands_for": f"{metric} stands for ({prompts})"})
        summary.append({**common, "harmful_answered": ur, "harmful_answered_se": 0.03,
                        "harmful_answered_ci_low": ur - 0.06, "harmful_answered_ci_high": ur + 0.06,
                        "harmful_answered_n": 60, "benign_answered": helpful,
                        "benign_answered_ci_low": helpful - 0.05, "benign_answered_ci_high": min(1.0, helpful + 0.05),
                        "judge": "substring", "harmful_answered_ratio": ur / base_ur,
                        "harmful_answered_halved": ur <= base_ur / 2, "benign_answered_ratio": helpful / base_help,
                        "benign_answered_within_tol": helpful >= 0.9 * base_help, "ppl_ratio": 1.02,
                        "within_ppl_guard": True})
        for split in ("val", "test"):
            agree.append({"judge_a": "refused_substring", "judge_b": "refused_refusal_token", "n": 30,
                          "agreement": 0.9, "percent_agreement": 90.0, "kappa": 0.6 if split == "test" else 0.5,
                          "both": 10, "only_a": 2, "only_b": 1, "neither": 17, "setting": setting, "split": split})
    _save(folder, "p2_test", pd.DataFrame(rows))
    _save(folder, "p2_test_summary", pd.DataFrame(summary))
    _save(folder, "p2_agreement", pd.DataFrame(agree))
    (folder / "manifest.json").write_text(json.dumps({"status": "done", "models": {"model": {"name": "tiny"}}}))
    return folder


def make_specificity_tables(folder: Path) -> Path:
    """analyses/specificity.py's tables: the cells (diagonal planted larger) and their summary."""
    cells, summary = [], []
    for variant, rows_, (on, off) in (("raw", CATS, (0.3, 0.1)), ("orthogonalised", CATS, (0.2, 0.02)),
                                      ("control", ["refusal", "random_0"], (0.05, 0.05))):
        for s_ in ("harmful", "lookalike"):
            for sign in ("toward", "away"):
                for i in rows_:
                    for j in CATS:
                        d = on if i == j else off
                        cells.append({"variant": variant, "set": s_, "sign": sign, "steer_category": i,
                                      "eval_category": j, "diagonal": i == j, "n": 10, "base_rate": 0.5,
                                      "steered_rate": 0.5 + d, "delta": d, "delta_ci_low": d - 0.05,
                                      "delta_ci_high": d + 0.05, "base_score": 0.4, "steered_score": 0.4 + d / 10,
                                      "delta_score": d / 10, "delta_score_ci_low": d / 10 - 0.01,
                                      "delta_score_ci_high": d / 10 + 0.01, "coeff": 0.2, "layer": 14,
                                      "scale": 0.2, "method": "one_vs_benign", "positions": '"last_prompt"',
                                      "n_boot": 50, "ci_method": "paired percentile bootstrap over prompts",
                                      "seeds": "{}"})
                for metric, f in (("rate", 1.0), ("score", 0.1)):
                    base = {"variant": variant, "set": s_, "sign": sign, "metric": metric, "layer": 14, "scale": 0.2,
                            "method": "one_vs_benign", "n_boot": 50, "seeds": "{}"}
                    if variant == "control":
                        for kind in ("refusal", "random"):
                            summary.append({**base, "rows": kind, "n_rows": 1, "mean_all": off * f,
                                            "mean_all_ci_low": (off - 0.02) * f, "mean_all_ci_high": (off + 0.02) * f})
                    else:
                        summary.append({**base, "rows": "categories", "n_rows": len(CATS), "mean_diag": on * f,
                                        "mean_diag_ci_low": (on - 0.05) * f, "mean_diag_ci_high": (on + 0.05) * f,
                                        "mean_offdiag": off * f, "mean_offdiag_ci_low": (off - 0.03) * f,
                                        "mean_offdiag_ci_high": (off + 0.03) * f, "ratio": on / off,
                                        "ratio_ci_low": on / off - 1, "ratio_ci_high": on / off + 1,
                                        "diag_minus_offdiag": (on - off) * f,
                                        "diag_minus_offdiag_ci_low": (on - off - 0.05) * f,
                                        "diag_minus_offdiag_ci_high": (on - off + 0.05) * f})
    _save(folder, "specificity", pd.DataFrame(cells))
    _save(folder, "summary", pd.DataFrame(summary))
    return folder


@pytest.fixture
def full_run(tmp_path) -> Path:
    return make_run(tmp_path / "run")


def test_every_section_renders_from_synthetic_tables(full_run):
    rep = R.build_report(full_run)
    assert rep.path == full_run / "report.html" and rep.path.exists()
    status = {s.id: s.status for s in rep.sections}
    assert status == {s: "ok" for s in ("run", "finetune", "separability", "cosine", "anisotropy", "whitening",
                                         "model_diff", "p1", "probe_roc", "bound", "sweep", "p2", "specificity",
                                         "judges")}
    page = rep.path.read_text()
    assert rep.n_figures == sum(len(s.figures) for s in rep.sections) >= 14
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:300]) == 1  # plotly.js inlined once
    assert "<script src" not in page and 'src="http' not in page  # no network needed (plotly.js inline)
    assert "&lt;fraud &amp; co&gt;" in page and "<fraud & co>" not in page  # escaped
    # numbers in the text come from the tables
    assert "refused 0.912 (first token, n=30)" in page
    assert "stands for" in page and "stands_for" in page
    head = pd.read_parquet(full_run / "p1" / "headline.parquet").set_index("policy")
    u = head.loc["unsteered"]
    assert (f"Unsteered: over-refusal {R.fmt(u.over_refusal)} [{R.fmt(u.over_refusal_ci_low)}, "
            f"{R.fmt(u.over_refusal_ci_high)}], refusal {R.fmt(u.refusal)} [{R.fmt(u.refusal_ci_low)}, "
            f"{R.fmt(u.refusal_ci_high)}]") in page  # intervals shown, numbers from the table
    rates = pd.read_parquet(full_run / "p1" / "test_rates.parquet")
    r = rates[(rates.grouping == "dataset") & (rates.dataset == "jbb_harmful") & (rates.policy == "unsteered")].iloc[0]
    assert f"<td>{100 * r.rate:.1f} ± {100 * r.se:.1f}</td>" in page.split("Safety table: % refused")[1]
    assert ("Target met (share of harmful prompts answered at least halved, share of benign prompts answered within "
            "tolerance) by 1 of 4 tested settings; lowest ratio: guided-attn_out-L2-m1 (harmful answered 0.300 "
            "[0.240, 0.360], ratio 0.375)") in page
    assert "raw, harmful prompts, steering away: mean diagonal effect 0.300, mean off-diagonal 0.100, ratio 3.000 " \
           "[2.000, 4.000]" in page
    auroc = pd.read_parquet(full_run / "p1" / "auroc.parquet")
    a = auroc[auroc.score == "probe (gate score)"].iloc[-1]
    assert f"{a.pair}: probe AUROC {R.fmt(a.auroc)} [{R.fmt(a.ci_low)}, {R.fmt(a.ci_high)}]" in page
    chosen = pd.read_parquet(full_run / "p1" / "candidates.parquet").query("chosen").iloc[0]
    assert f"Chosen for gate rule {chosen.gate_rule}: {chosen.method}, layer {chosen.layer}" in page
    assert "Fine-tune (its folder&#x27;s manifest)" in page
    assert '<a href="figures/fig_cosine.html">fig_cosine:html</a>' in page and "fig_cosine:png" not in page and "refusal-quick" in page and "70.5" in page
    targets = page.split("Targets (eval/summary.json)")[1].split("</table>")[0]
    assert "<td>no</td>" in targets and "<td>yes</td>" in targets  # 0.8 misses >= 0.95; 0.0 meets == 0
    judges = next(s for s in rep.sections if s.id == "judges").figures[0]
    labels = list(judges.data[0].y)  # p1 per policy, p2's test comparisons (val ones: table only), legacy tables
    assert labels[0] == "refused_refusal_token vs refused_substring · unsteered [p1]"
    assert labels[3] == "refused_substring vs refused_refusal_token · unsteered (test) [p2]"
    assert labels[-1] == "keyword vs llama_guard · catqa [eval]" and len(labels) == 3 + 4 + 1
    assert list(judges.data[1].x[3:7]) == [0.6] * 4  # the test kappas of p2_agreement


def test_every_proxy_column_says_what_it_stands_for(full_run):
    import re

    page = R.build_report(full_run).path.read_text()
    blocks = page.split('<div class="tbl">')[1:]
    checked = 0
    for block in blocks:
        block = block.split('<div class="block">')[0]
        headers = re.findall(r"<th>([^<]*)</th>", block)
        for name in headers:
            if name in R.STANDS_FOR:
                assert f"<code>{name}</code> stands for" in block, name
                checked += 1
        if "metric" in headers:  # long tables: one stands_for per row whose metric is a proxy
            assert "stands_for" in headers
    assert checked >= 10


def test_sections_say_not_run_with_the_command(tmp_path):
    run = make_run(tmp_path / "run", placeholders=False)
    rep = R.build_report(run)
    status = {s.id: s.status for s in rep.sections}
    assert status["model_diff"] == "ok"
    for sid in ("p1", "probe_roc", "bound", "sweep", "p2", "specificity", "judges"):
        assert status[sid] == "not run", sid
    page = rep.path.read_text()
    for table in ("p1/headline.parquet", "p1/test_rates.parquet", "p1/auroc.parquet", "p1/test_first_position.parquet",
                  "p1/sweep.parquet", "p2/p2_test.parquet", "specificity/specificity.parquet",
                  "specificity/summary.parquet", "p2/p2_agreement.parquet"):
        assert table in page, table
    assert (f'Produce with: <code class="cmd">python analyses/p1_steering.py --model &lt;refusal-tuned folder&gt; '
            f'--out {run}/p1</code>') in page
    assert f"python analyses/specificity.py --model &lt;refusal-tuned folder&gt; --policy {run}/p1/" in page
    assert "class=\"todo\"" not in page and "no analysis writes" not in page


def test_partial_and_broken_tables(tmp_path):
    run = make_run(tmp_path / "run", placeholders=False)
    (run / "geometry" / "basis_alignment.parquet").unlink()
    _save(run / "p2", "p2_test", pd.DataFrame({"category": ["a"], "value": [1.0]}))  # no method/metric
    rep = R.build_report(run)
    status = {s.id: s.status for s in rep.sections}
    assert status["whitening"] == "partial"
    assert status["p2"] == "error"
    assert "has no column(s)" in rep.path.read_text()


def test_csv_tables_are_read(tmp_path):
    run = tmp_path / "run"
    make_p1_run(run / "p1")
    for name in ("headline", "test_rates", "test_rates_substring", "sweep", "candidates"):
        (run / "p1" / f"{name}.parquet").unlink()  # only the CSV twins are left
    rep = R.build_report(run)
    status = {s.id: s.status for s in rep.sections}
    assert status["p1"] == status["sweep"] == status["probe_roc"] == "ok"
    assert "pooled (all harmful sets)" in rep.path.read_text()


def test_cli_report_on_empty_folder_and_bad_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(empty)]) == 1  # the page is written, and the exit code says it is empty
    assert "holds none of the tables" in capsys.readouterr().err
    page = (empty / "report.html").read_text()
    assert page.count('data-status="not run"') == len(R.SECTIONS)
    assert "manifest.json" in page and "eval/per_category.parquet" in page
    assert f"Produce with: <code class=\"cmd\">python analyses/geometry.py --out {empty}/geometry</code>" in page
    assert "<script" not in page  # no figure, so no plotly.js either
    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "catlens report" in err
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    assert cli_main(["report", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err


def _open(page_path: Path, pw_page) -> list[str]:
    errors = page_errors(pw_page)
    pw_page.goto(page_path.resolve().as_uri())
    pw_page.wait_for_load_state("load")
    return errors


@browser
def test_report_renders_in_headless_chromium(full_run, tmp_path):
    rep = R.build_report(full_run)
    with headless_chromium(CHROMIUM) as b:
        page = b.new_page(viewport={"width": 1400, "height": 900})
        errors = _open(rep.path, page)
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= "
                               f"{rep.n_figures}", timeout=30_000)
        assert page.locator(".js-plotly-plot").count() == rep.n_figures
        for s in rep.sections:
            sec = page.locator(f"section#{s.id}")
            assert sec.count() == 1 and sec.is_visible(), s.id
            assert sec.locator(".js-plotly-plot").count() == len(s.figures), s.id
            assert sec.locator(".js-plotly-plot .main-svg").count() >= len(s.figures), s.id
        # every figure drew something: traces in its svg
        n_drawn = page.evaluate("Array.from(document.querySelectorAll('.js-plotly-plot')).filter("
                                "d => d.querySelector('.main-svg') && (d.data || []).length > 0).length")
        assert n_drawn == rep.n_figures
        assert page.locator("section#p1 td", has_text="<fraud & co>").count() == 0
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        assert errors == []


@browser
def test_not_run_page_and_screenshot_helper(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    rep = R.build_report(empty)
    errors = R.screenshot(rep.path, tmp_path / "empty.png", executable=CHROMIUM)
    assert errors == [] and (tmp_path / "empty.png").stat().st_size > 1_000
    monkeypatch.setenv("CATLENS_CHROMIUM", CHROMIUM)
    # an empty folder is a failed report (exit 1), but the not-run page and its screenshot are still written
    assert cli_main(["report", str(empty), "--screenshot", str(tmp_path / "cli.png")]) == 1
    assert (tmp_path / "cli.png").stat().st_size > 1_000 and "console error" not in capsys.readouterr().out


def test_report_loads_no_model(full_run):
    """The page comes from the tables alone: building it imports neither torch nor the model code."""
    import subprocess
    import sys

    code = ("import sys; from catlens.report import build_report; build_report(sys.argv[1]); "
            "bad = [m for m in ('torch', 'transformers', 'transformer_lens', 'catlens.model') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code, str(full_run)], check=True, cwd=Path(R.__file__).parents[1],
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_main_job_ends_with_the_report_stage(tmp_path):
    from catlens.pipeline import rebuild_report
    from catlens.runs import RunDir

    run = RunDir(make_run(tmp_path / "run", placeholders=False))
    rebuild_report(run)
    assert (run.path / "report.html").exists()
    assert run.manifest["stages"]["report"]["folder"] == "report.html"
    (run.path / "geometry" / "cosine.parquet").write_text("not parquet")  # a broken table: page still written
    rebuild_report(run)
    assert 'id="cosine" class="section error"' in (run.path / "report.html").read_text()


def test_geometry_sections_on_tables_from_the_analysis_itself(tmp_path, monkeypatch):
    """The geometry sections read the tables analyses/geometry.py really writes (planted activations, no model)."""
    from _scripts import load_script

    planted = load_script("test_geometry_script", folder="tests/analyses")  # its planted activations
    D_MODEL, LAYERS, _load, _synthetic = planted.D_MODEL, planted.LAYERS, planted._load, planted._synthetic

    from catlens.recipes import geometry_tables

    analysis = _load(Path(R.__file__).parents[1] / "analyses" / "geometry.py")

    def fake_load(args, *, model_spec, acts_path, models=None):
        other = model_spec == "other-model"
        acts, index = _synthetic(seed=1 if other else 0, rotate=other)
        return geometry_tables.Activations(acts=acts, index=index, layers=LAYERS,
                                           model={"name": model_spec, "n_layers": len(LAYERS), "d_model": D_MODEL},
                                           data={"prompts": "synthetic", "positions": ["last"], "fmt": "chat"})

    monkeypatch.setattr(geometry_tables, "load_activations", fake_load)
    run = tmp_path / "run"
    analysis.main(["--out", str(run / "geometry"), "--model", "main-model", "--other-model", "other-model",
                   "--tsne-layers", "none", "--cv-folds", "3", "--pca-dims", "8"])
    rep = R.build_report(run)
    status = {s.id: s.status for s in rep.sections}
    for sid in ("separability", "cosine", "anisotropy", "whitening", "model_diff"):
        assert status[sid] == "ok", (sid, [s.body for s in rep.sections if s.id == sid])
    assert status["run"] == "not run" and status["finetune"] == "not run"
    page = rep.path.read_text()
    assert "main-model vs other-model" in page


def test_a_stage_folder_given_directly(full_run):
    (full_run / "geometry" / "manifest.json").write_text(json.dumps({
        "status": "done", "git_commit": "fedcba9876543210", "models": {"model": {"name": "tuned", "d_model": 16}},
        "data": {"activations": {"prompts": "builtin", "n_prompts": 40}}}))
    rep = R.build_report(full_run / "geometry")
    status = {s.id: s.status for s in rep.sections}
    assert status["run"] == status["separability"] == status["model_diff"] == "ok"
    assert status["finetune"] == "not run"
    page = rep.path.read_text()
    assert "Models (from the stage manifests)" in page and "tuned" in page and "builtin" in page


def test_sweep_section_reads_the_steer_sweep_table(tmp_path):
    rows = []
    for layer in (20, 24):
        for toward, away, r, o in ((None, None, 0.5, 0.1), (0.1, None, 0.8, 0.12), (0.2, -0.1, 0.95, 0.3)):
            rows.append({"method": "one_vs_benign", "layer": layer, "toward": toward, "away": away, "refusal": r,
                         "refusal_ci_low": r - 0.1, "refusal_ci_high": min(1.0, r + 0.05), "over_refusal": o,
                         "over_refusal_ci_low": max(0.0, o - 0.05), "over_refusal_ci_high": o + 0.1,
                         "ppl_ratio": 1.05, "admissible": True, "pareto": toward is not None, "chosen": False,
                         "ppl_stands_for": "coherence: perplexity of benign answers under the unsteered model",
                         "judge": "refusal_token", "split": "val"})
    rows[1]["chosen"] = True
    _save(tmp_path / "run" / "sweep", "sweep", pd.DataFrame(rows))
    rep = R.build_report(tmp_path / "run")
    sec = next(s for s in rep.sections if s.id == "sweep")
    assert sec.status == "ok" and len(sec.figures) == 1
    assert "Chosen on val: one_vs_benign, layer 20, toward 0.100" in sec.body
    assert "0.800 [0.700, 0.850]" in sec.body and "<code>ppl_ratio</code> stands for coherence" in sec.body


def test_sweep_section_reads_todays_candidates_table(tmp_path):
    """The candidates table P1 writes today (``mode``, ``positions``, ``refusal``/``over_refusal`` on judged val
    answers, ``judge``) renders, and the chosen row is named with its positions and judge."""
    folder = make_p1_run(tmp_path / "run" / "p1", sweep=True)
    cand = pd.read_parquet(folder / "candidates.parquet")
    cand = cand.rename(columns={"gate_rule": "mode", "val_refusal": "refusal", "val_over_refusal": "over_refusal"})
    _save(folder, "candidates", cand.assign(positions="last_prompt+4", judge="full_answer"))
    rep = R.build_report(tmp_path / "run")
    sec = next(s for s in rep.sections if s.id == "sweep")
    assert sec.status == "ok", sec.body
    picked = cand[cand.chosen.astype(bool)].iloc[0]
    assert (f"Chosen for gate rule {picked['mode']}, positions last_prompt+4: {picked['method']}, layer "
            f"{int(picked['layer'])}") in sec.body
    assert "full_answer judge on generated answers" in sec.body


def test_the_p1_stage_folder_given_directly(full_run):
    """`catlens report runs/main/p1`: the P1 sections read the folder itself; its auroc table (probe vs refusal
    token) is not mistaken for the fine-tune evaluation's."""
    rep = R.build_report(full_run / "p1", out=full_run / "p1.html")
    status = {s.id: s.status for s in rep.sections}
    assert status["p1"] == status["probe_roc"] == status["sweep"] == status["judges"] == "ok"
    assert status["finetune"] == status["p2"] == status["specificity"] == "not run"
    assert "eval/auroc.parquet" in next(s for s in rep.sections if s.id == "finetune").missing
