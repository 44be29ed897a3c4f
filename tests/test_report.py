"""The run report: every section from small synthetic tables, "not run" sections without them, the command's exit
codes, and the page in a real headless Chromium (skipped, with the reason, when none is installed)."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from catlens import report as R
from catlens.cli import main as cli_main

CHROMIUM = os.environ.get("CATLENS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
try:
    import playwright.sync_api  # noqa: F401

    _HAVE_PLAYWRIGHT = True
except ImportError:
    _HAVE_PLAYWRIGHT = False
_skip_browser = pytest.mark.skipif(
    not (_HAVE_PLAYWRIGHT and Path(CHROMIUM).exists()),
    reason="needs playwright (the dev extra) and Chromium at /usr/bin/chromium (apt-get install -y chromium)")


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
    p1 = root / "p1"
    _save(p1, "tradeoff", pd.DataFrame([{"method": m, "setting": f"alpha={a}", "harmful_refusal": h,
                                         "harmful_refusal_low": h - 0.05, "harmful_refusal_high": min(1, h + 0.05),
                                         "benign_refusal": b, "benign_refusal_low": max(0, b - 0.04),
                                         "benign_refusal_high": b + 0.04, "n_harmful": 100, "n_benign": 100,
                                         "interval": "95% Wilson"}
                                        for m, pts in {"p1": [(0, 0.5, 0.05), (1, 0.8, 0.1), (2, 0.95, 0.3)],
                                                       "p2": [(0, 0.5, 0.05), (1, 0.7, 0.2)]}.items()
                                        for a, h, b in pts]))
    _save(p1, "safety_table", pd.DataFrame([{"method": m, "benchmark": bm, "metric": "refusal_rate",
                                             "value": v, "ci_low": v - 0.05, "ci_high": v + 0.04, "n": 100,
                                             "stands_for": "first-token refusal, for a judge's verdict"}
                                            for m, v0 in (("stock", 0.1), ("tuned", 0.8))
                                            for bm, v in (("catqa", v0), ("xstest_unsafe", v0 + 0.05))]))
    fpr = np.linspace(0, 1, 11)
    _save(p1, "probe_roc", pd.DataFrame([{"probe": f"layer {layer}", "fpr": f, "tpr": float(f ** (1 / k)),
                                          "auroc": round(k / (k + 1), 3), "n_pos": 50, "n_neg": 50}
                                         for layer, k in ((5, 2), (15, 4)) for f in fpr]))
    _save(root / "sweep", "sweep", pd.DataFrame([{"sweep": "coefficient", "x": x, "method": m,
                                                  "metric": metric, "value": v + 0.1 * x, "ci_low": v + 0.1 * x - 0.02,
                                                  "ci_high": v + 0.1 * x + 0.02}
                                                 for m, v in (("p1", 0.2), ("p2", 0.1)) for x in (0.0, 1.0, 2.0)
                                                 for metric in ("harmful_refusal", "benign_refusal")]))
    _save(root / "p2", "p2_table", pd.DataFrame([{"category": c, "method": m, "metric": metric, "value": v,
                                                  "ci_low": v - 0.05, "ci_high": v + 0.05, "n": 30}
                                                 for c in CATS for m, v in (("none", 0.6), ("guided", 0.2))
                                                 for metric in ("unsafe_rate", "helpfulness")]))
    _save(root / "specificity", "specificity_matrix", pd.DataFrame(
        [{"steered_category": a, "evaluated_category": b, "metric": "refusal_change", "value": 0.5 if a == b else 0.1,
          "n": 20, "stands_for": "first-token refusal change, for judged refusal change"} for a in CATS for b in CATS]))
    _save(p1, "judge_agreement", pd.DataFrame([{"judge_a": "refused_first_token", "judge_b": "refused_substring",
                                                "n": 40, "agreement": 0.9, "percent_agreement": 90.0, "kappa": 0.7,
                                                "both": 20, "only_a": 2, "only_b": 2, "neither": 16}]))
    _save(root / "p2", "judge_agreement", pd.DataFrame([{"judge_a": "keyword", "judge_b": "llama_guard",
                                                         "set": "catqa", "n": 40, "agreement": 0.8,
                                                         "cohen_kappa": 0.4}]))
    return root


@pytest.fixture
def full_run(tmp_path) -> Path:
    return make_run(tmp_path / "run")


def test_every_section_renders_from_synthetic_tables(full_run):
    rep = R.build_report(full_run)
    assert rep.path == full_run / "report.html" and rep.path.exists()
    status = {s.id: s.status for s in rep.sections}
    assert status == {s: "ok" for s in ("run", "finetune", "separability", "cosine", "anisotropy", "whitening",
                                         "model_diff", "p1", "probe_roc", "sweep", "p2", "specificity", "judges")}
    page = rep.path.read_text()
    assert rep.n_figures == sum(len(s.figures) for s in rep.sections) >= 13
    from plotly.offline import get_plotlyjs

    assert page.count(get_plotlyjs()[:300]) == 1  # plotly.js inlined once
    assert "<script src" not in page and 'src="http' not in page  # no network needed (plotly.js inline)
    assert "&lt;fraud &amp; co&gt;" in page and "<fraud & co>" not in page  # escaped
    # numbers in the text come from the tables
    assert "refused 0.912 (first token, n=30)" in page
    assert "stands for" in page and "stands_for" in page
    assert "0.800 [0.750, 0.840]" in page  # intervals shown
    assert "Fine-tune (its folder&#x27;s manifest)" in page
    assert '<a href="figures/fig_cosine.html">fig_cosine:html</a>' in page and "fig_cosine:png" not in page and "refusal-quick" in page and "70.5" in page
    targets = page.split("Targets (eval/summary.json)")[1].split("</table>")[0]
    assert "<td>no</td>" in targets and "<td>yes</td>" in targets  # 0.8 misses >= 0.95; 0.0 meets == 0
    judges = next(s for s in rep.sections if s.id == "judges").figures[0]
    assert list(judges.data[0].x) == ["refused_first_token vs refused_substring [p1]",
                                      "keyword vs llama_guard (catqa) [p2]"]


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
    for sid in ("p1", "probe_roc", "sweep", "p2", "specificity", "judges"):
        assert status[sid] == "not run", sid
    page = rep.path.read_text()
    assert "p1/tradeoff.parquet" in page and "specificity/specificity_matrix.parquet" in page
    assert "no analysis writes p1/tradeoff and p1/safety_table yet" in page  # placeholders say so, no made-up command
    assert f"save them in {run}" in page


def test_partial_and_broken_tables(tmp_path):
    run = make_run(tmp_path / "run", placeholders=False)
    (run / "geometry" / "basis_alignment.parquet").unlink()
    _save(run / "p2", "p2_table", pd.DataFrame({"category": ["a"], "value": [1.0]}))  # no method/metric
    rep = R.build_report(run)
    status = {s.id: s.status for s in rep.sections}
    assert status["whitening"] == "partial"
    assert status["p2"] == "error"
    assert "has no column(s)" in rep.path.read_text()


def test_csv_tables_are_read(tmp_path):
    run = tmp_path / "run"
    (run / "p2").mkdir(parents=True)
    pd.DataFrame({"category": ["a", "b"], "method": "guided", "metric": "unsafe_rate", "value": [0.1, 0.2]}).to_csv(
        run / "p2" / "p2_table.csv", index=False)
    rep = R.build_report(run)
    assert {s.id: s.status for s in rep.sections}["p2"] == "ok"


def test_cli_report_on_empty_folder_and_bad_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["report", str(empty)]) == 0
    page = (empty / "report.html").read_text()
    assert page.count('data-status="not run"') == len(R.SECTIONS)
    assert "manifest.json" in page and "eval/per_category.parquet" in page
    assert f"Produce with: <code class=\"cmd\">python analyses/geometry.py --out {empty}/geometry</code>" in page
    assert "<script" not in page  # no figure, so no plotly.js either
    out = capsys.readouterr().out
    assert "report.html" in out and "not run" in out

    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "catlens report" in err
    afile = tmp_path / "a.txt"
    afile.write_text("x")
    assert cli_main(["report", str(afile)]) == 2
    assert "is a file" in capsys.readouterr().err


def _open(page_path: Path, pw_page) -> list[str]:
    errors: list[str] = []
    pw_page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pw_page.on("pageerror", lambda e: errors.append(str(e)))
    pw_page.goto(page_path.resolve().as_uri())
    pw_page.wait_for_load_state("load")
    return errors


@browser
def test_report_renders_in_headless_chromium(full_run, tmp_path):
    from playwright.sync_api import sync_playwright

    rep = R.build_report(full_run)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
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
        finally:
            b.close()


@browser
def test_not_run_page_and_screenshot_helper(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    rep = R.build_report(empty)
    errors = R.screenshot(rep.path, tmp_path / "empty.png", executable=CHROMIUM)
    assert errors == [] and (tmp_path / "empty.png").stat().st_size > 1_000
    monkeypatch.setenv("CATLENS_CHROMIUM", CHROMIUM)
    assert cli_main(["report", str(empty), "--screenshot", str(tmp_path / "cli.png")]) == 0
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
    import importlib.util

    from catlens.runs import RunDir

    spec = importlib.util.spec_from_file_location("catlens_main_for_test",
                                                  Path(R.__file__).parents[1] / "analyses" / "main.py")
    main = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(main)
    run = RunDir(make_run(tmp_path / "run", placeholders=False))
    main._report(run)
    assert (run.path / "report.html").exists()
    assert run.manifest["stages"]["report"]["folder"] == "report.html"
    (run.path / "geometry" / "cosine.parquet").write_text("not parquet")  # a broken table: page still written
    main._report(run)
    assert 'id="cosine" class="section error"' in (run.path / "report.html").read_text()


def test_geometry_sections_on_tables_from_the_analysis_itself(tmp_path):
    """The geometry sections read the tables analyses/geometry.py really writes (planted activations, no model)."""
    from test_analyses_geometry import D_MODEL, LAYERS, _load, _synthetic

    analysis = _load(Path(R.__file__).parents[1] / "analyses" / "geometry.py")

    def fake_load(args, *, model_spec, acts_path):
        other = model_spec == "other-model"
        acts, index = _synthetic(seed=1 if other else 0, rotate=other)
        return analysis.Activations(acts=acts, index=index, layers=LAYERS,
                                    model={"name": model_spec, "n_layers": len(LAYERS), "d_model": D_MODEL},
                                    data={"prompts": "synthetic", "positions": ["last"], "fmt": "chat"})

    analysis.load_activations = fake_load
    run = tmp_path / "run"
    analysis.main(analysis.parse_args(["--out", str(run / "geometry"), "--model", "main-model", "--other-model",
                                       "other-model", "--tsne-layers", "none", "--cv-folds", "3", "--pca-dims", "8"]))
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
