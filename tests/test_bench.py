"""The benchmark scripts' own logic on small inputs: bench/render_pipeline_doc.py's comparison with a baseline run
(which tables are equal, from the tables themselves), bench/bench_auroc.py's equality of the two methods,
bench/bench_p1_engine.py's section rendered from a run's tables, and smoke
runs of the scripts that time the model (bench_steer, bench_explore) on the tiny model, and of bench_figures' walk
over the figure scripts, so a script that no longer runs against the library fails here instead of by hand."""

import contextlib
import importlib.util
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(stem: str, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import bench/_markdown.py as their neighbour
    spec = importlib.util.spec_from_file_location(f"_test_bench_{stem}", BENCH / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def renderer(monkeypatch):
    yield _load("render_pipeline_doc", monkeypatch)
    sys.modules.pop("_markdown", None)


def test_bench_auroc_compares_the_two_methods_on_the_same_resamples(monkeypatch, tmp_path):
    bench = _load("bench_auroc", monkeypatch)
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Foundation\n")
    monkeypatch.setattr(bench, "DOC", doc)
    assert bench.main(["--out", str(tmp_path / "run"), "--sizes", "7:5,3:2", "--n-boot", "30", "--repeats", "1",
                       "--doc"]) == 0
    table = pd.read_parquet(tmp_path / "run" / "auroc.parquet")
    assert list(zip(table.n_pos, table.n_neg)) == [(7, 5), (3, 2)]
    assert (table.max_abs_diff < 1e-12).all() and (table.speedup > 0).all()
    text = doc.read_text()
    assert text.index("## AUROC intervals") < text.index("## Foundation") and "| 7 | 5 | 30 |" in text
    sys.modules.pop("_markdown", None)


def _run(root: Path, seconds: dict, tables: dict) -> Path:
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps(
        {"git_commit": "abc1234", "created": "2026-12-07T00:00:00", "command": ["analyses/main.py", "--out", "x/main"],
         "stages": {k: {"status": "done", "seconds": v} for k, v in seconds.items()}}))
    (root / "summary.json").write_text(json.dumps({"seconds": sum(seconds.values())}))
    for rel, frame in tables.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(root / rel)
    return root


def test_tables_are_compared_without_their_time_columns_and_a_change_or_a_missing_table_is_named(tmp_path, renderer):
    t = pd.DataFrame({"policy": ["a", "b"], "rate": [0.25, 0.5], "seconds": [1.0, 2.0]})
    base = _run(tmp_path / "base", {"p1": 100.0, "p2": 10.0},
                {"p1/headline.parquet": t, "p1/sweep.parquet": t, "p2/gone.parquet": t,
                 "p1/cache/first_position/x.parquet": t})
    new = _run(tmp_path / "new", {"p1": 50.0, "p2": 10.0},
               {"p1/headline.parquet": t.assign(seconds=[9.0, 9.0]),  # only a time column moved: equal
                "p1/sweep.parquet": t.assign(rate=[0.25, 0.5 + 1e-6]),  # a number moved: differs
                "p1/cache/first_position/x.parquet": t.assign(rate=0.0)})  # caches are not results: not compared
    n, differing = renderer.same_tables(new, base)
    assert n == 3 and differing == ["p1/sweep.parquet", "p2/gone.parquet (missing)"]
    assert renderer.same_tables(base, base) == (3, [])
    text = renderer.render(new, baseline=base)
    assert "| p1 | done | 50 s | 1 min 40 s | 0.50 |" in text
    assert "`python analyses/main.py --out x/main`" in text  # the command the run recorded, not its folder's name
    assert "Tables equal to the baseline's: 1 of 3 (differing: p1/sweep.parquet, p2/gone.parquet (missing))." in text
    with pytest.raises(FileNotFoundError, match="--baseline"):
        renderer.render(new, baseline=tmp_path / "nowhere")


def test_bench_steer_times_every_configuration_on_the_tiny_model(monkeypatch, tmp_path, tiny_lm_dir):
    bench = _load("bench_steer", monkeypatch)
    out = tmp_path / "run"
    assert bench.main(["--model", str(tiny_lm_dir), "--n-prompts", "4", "--new-tokens", "2", "--batch-sizes", "2,4",
                       "--loop-prompts", "2", "--layer", "3", "--out", str(out)]) == 0
    table = pd.read_parquet(out / "bench_steer.parquet")
    assert list(table.batch_size) == [2, 4] and (table.tokens == 4 * 2).all()
    timed = ["unsteered_s", "steered_s", "gated_routed_s", "transformers_generate_s", "batch1_loop_tokens_per_s"]
    assert (table[timed] > 0).all().all() and table[timed].notna().all().all()
    assert json.loads((out / "manifest.json").read_text())["models"]
    sys.modules.pop("_markdown", None)


def test_bench_explore_times_a_cold_and_a_warm_first_answer_on_the_tiny_model(monkeypatch, tmp_path, tiny_lm_dir):
    bench = _load("bench_explore", monkeypatch)
    out = tmp_path / "run"
    assert bench.main(["--model", str(tiny_lm_dir), "--max-new-tokens", "2", "--dtypes", "float32,bfloat16",
                       "--out", str(out)]) == 0
    table = pd.read_parquet(out / "first_answer.parquet")
    assert list(zip(table.dtype, table.cache)) == [("float32", "cold"), ("float32", "warm"), ("bfloat16", "cold"),
                                                   ("bfloat16", "warm")]
    assert (table["map"] == "map").all()
    assert ((0 < table.unsteered_s) & (table.unsteered_s <= table.answers_s) & (table.answers_s <= table.map_s)).all()
    sys.modules.pop("_markdown", None)


def test_bench_figures_walks_every_figure_script_through_the_main_job_s_loader(monkeypatch, tmp_path):
    """No browser: the export is replaced, and the run folder has no stage folders, so every script is loaded and its
    stage looked up (the step that broke unnoticed at stop 25), and none is drawn."""
    import catlens.pipeline
    import catlens.plotting

    bench = _load("bench_figures", monkeypatch)
    monkeypatch.setattr(catlens.plotting, "static_export_available", lambda: True)
    monkeypatch.setattr(catlens.plotting, "static_export_session", contextlib.nullcontext)
    looked_up = []
    stage_of = catlens.pipeline.figure_stage_of

    def record(script, module):
        looked_up.append((script.name, stage_of(script, module)))
        return looked_up[-1][1]

    monkeypatch.setattr(catlens.pipeline, "figure_stage_of", record)
    (tmp_path / "run").mkdir()
    assert bench.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    scripts = sorted(p.name for p in (BENCH.parent / "figures").glob("fig_*.py"))
    assert sorted(name for name, _ in looked_up) == sorted(scripts * 2)  # once per export mode
    assert {stage for _, stage in looked_up} <= {"eval", "geometry", "p1", "p2", "specificity"}
    table = pd.read_parquet(tmp_path / "out" / "figures.parquet")
    assert list(table.pngs) == [0, 0]


def test_bench_p1_engine_renders_its_section_from_the_run_tables(monkeypatch, tmp_path):
    """bench_p1_engine's section: each step's seconds per engine with the baseline's ratio, and each policy's rates
    per engine, read from a run folder's tables; written into the doc once (a second render replaces it). Running
    both engines is left to the bench itself (two P1 runs); its guard on the options after ``--`` is checked."""
    bench = _load("bench_p1_engine", monkeypatch)
    run = tmp_path / "run"
    (run / "catlens").mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"command": ["bench/bench_p1_engine.py", "--out", "x"],
                                                   "created": "2026-12-08T03:00:00", "git_commit": "abcdef0123"}))
    (run / "catlens" / "manifest.json").write_text(json.dumps({"models": {"model": {"name": "m", "dtype": "bf16"}}}))
    pd.DataFrame({"engine": ["catlens", "catlens", "vllm", "vllm"], "step": ["test", "total", "test", "total"],
                  "seconds": [600.0, 1000.0, 400.0, 800.0]}).to_parquet(run / "steps.parquet")
    rates = {"over_refusal": 0.25, "over_refusal_ci_low": 0.1, "over_refusal_ci_high": 0.4, "refusal": 0.9,
             "refusal_ci_low": 0.8, "refusal_ci_high": 0.95, "ppl_ratio": 1.0}
    pd.DataFrame([{"engine": e, "policy": "unsteered", **rates} for e in ("catlens", "vllm")]).to_parquet(
        run / "headline.parquet")
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n")
    monkeypatch.setattr(bench, "DOC", doc)
    assert bench.main(["--render", str(run)]) == 0 and bench.main(["--render", str(run)]) == 0
    text = doc.read_text()
    assert text.count("## P1 on vLLM") == 1 and "git abcdef0" in text and "on `m` in bf16" in text
    assert "| test | 600 s | 400 s | 1.50x |" in text and "| **total** | 1000 s | 800 s | 1.25x |" in text
    assert "| unsteered | 25.0 % [10.0 %, 40.0 %] | 25.0 % [10.0 %, 40.0 %] | 90.0 % [80.0 %, 95.0 %] |" in text
    with pytest.raises(SystemExit):
        bench.main(["--out", str(tmp_path / "o"), "--", "--model", "m", "--out", "elsewhere"])
    sys.modules.pop("_markdown", None)
