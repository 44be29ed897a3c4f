"""The main job (analyses/main.py) end to end on the tiny random model: every stage, every expected file and table
schema, stage reuse and rerun by config hash, the ``--model`` path, and the guarded script stages (p1, p2,
specificity) with the argv they receive. The fine-tune stage trains the tiny model on a handful of built-in prompts
(seconds), so every stage runs for real."""

import dataclasses
import json
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from _scripts import load_main
from catlens.config import DEMO_ARGS, QUICK_ARGS, from_dict, resolve
from catlens.model import resolve_dtype
from catlens.pipeline import STAGE_RECORD, finetune_cli_args, stage_hash

REPO = Path(__file__).resolve().parents[2]

TINY_FINETUNE = {
    "name": "tiny", "data": "builtin", "categories": ["privacy", "cybercrime"], "min_per_category": 2,
    "max_per_category": 6, "n_ordinary": 8, "n_topic": 8, "answer_tokens": 4, "steps": 4, "batch_size": 4,
    "lr": 3e-3, "warmup_steps": 1, "prototype_prompts": 4, "checkpoint_every": 0, "max_length": 320,
    "max_prompt_tokens": 300, "method": "full",
}
"""A fine-tune of the tiny model in a few seconds (byte-level tiny tokenizer: long prompts, hence the lengths)."""

EVAL_TABLES = {
    "per_category": ["category", "n_scored", "refused_first_token", "right_category_first_token", "n_generated",
                     "refused_generated", "right_category_generated"],
    "per_source": ["source", "category", "n", "refused_first_token", "right_category_first_token"],
    "confusion": ["true_category", "predicted", "n", "decision"],
    "over_refusal": ["set", "n", "over_refusal_first_token", "over_refusal_generated", "mean_refusal_score"],
    "over_refusal_by_category": ["set", "category", "n", "over_refusal_first_token", "over_refusal_generated"],
    "auroc": ["harmful", "benign", "auroc", "n_harmful", "n_benign"],
    "fluency": ["perplexity_finetuned_answers_under_stock", "perplexity_stock_answers_under_stock", "n_answers",
                "answer_tokens", "repeated_special_rate_gated", "repeated_special_rate_ungated", "n_ungated",
                "no_opening_token_rate", "swallowed_first_word_rate"],
    "scores": ["set", "id", "label", "category", "form", "source", "refused", "refusal_score",
               "predicted_category"],
}
"""Columns each evaluation table must have (a subset check: the scores table carries one column per token)."""

GEOMETRY_TABLES = {
    "separability": ["task", "layer", "metric", "value", "n_prompts", "n_classes"],
    "cosine": ["direction", "layer", "space", "category_a", "category_b", "cosine"],
    "basis_alignment": ["direction", "layer", "category", "cos_basis_whitened", "cos_basis_residual",
                        "off_span_share", "r_diag", "lapack_sign_flipped"],
    "probe_cosine": ["direction", "layer", "category", "cosine"],
    "anisotropy": ["subset", "layer", "measure", "value", "n_prompts", "d_model"],
    "spectrum": ["subset", "layer", "index", "eigenvalue", "share"],
    "massive_dims": ["layer", "dim", "mean_share", "max_share", "mean_abs", "median_ratio", "massive"],
    "whitening": ["layer", "method", "eps", "shrinkage", "restrict_to_span", "n_samples", "rank", "rank_deficient"],
    "projections": ["subset", "method", "layer", "x", "y", "id", "label", "category", "group"],
    "direction_norms": ["direction", "method", "site", "category", "layer", "norm"],
    "model_diff": ["direction", "category", "layer", "cosine"],
}
"""The schemas in analyses/geometry.py's docstring."""

FIGURES = ["fig_anisotropy", "fig_cosine", "fig_model_diff", "fig_projection", "fig_separability"]


def tiny_config_text(root: Path, base: Path, device: str = "cpu") -> str:
    overrides = "\n".join(f"{k} = {json.dumps(v)}" for k, v in {**TINY_FINETUNE, "base": str(base)}.items())
    return f"""
[model]
cache_dir = "{root / 'cache'}"
device = "{device}"
[data]
per_set = 10
per_category = 3
prompts_per_group = 4
[run]
out = "{root / 'run'}"
png = false
[finetune]
config = "quick"
[finetune.overrides]
{overrides}
[eval]
max_new_tokens = 8
ungated = 8
batch_size = 16
[geometry]
tsne_layers = "none"
cv_folds = 2
"""


def run_pipeline(main, root: Path, base: Path, *extra: str, device: str = "cpu") -> dict:
    (root / "tiny.toml").write_text(tiny_config_text(root, base, device))
    return main.main(["--config", str(root / "tiny.toml"), *extra])


def _layers_and_gate(options: dict) -> tuple[str, bool]:
    """The layers and the quick flag of a p1 call's options."""
    return options["layers"], options["quick"]


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The reduced job run once; the p1/p2/specificity scripts pointed at paths that do not exist, so the result
    does not depend on whether those scripts have landed."""
    from catlens.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("pipeline")
    base = make_tiny_model_dir(root / "base")
    main = load_main()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("p1", "p2", "specificity"):
            mp.setitem(main.STAGE_SCRIPTS, name, root / "absent" / f"{name}.py")
        summary = run_pipeline(main, root, base)
        yield main, root, base, summary


def test_every_stage_ran_and_wrote_its_files(pipeline):
    main, root, base, summary = pipeline
    out = root / "run"
    m = manifest(out)
    stages = m["stages"]
    assert list(stages) == list(main.STAGES)
    assert {k: v["status"] for k, v in stages.items()} == {
        "finetune": "done", "eval": "done", "geometry": "done", "p1": "skipped: not available",
        "p2": "skipped: not available", "specificity": "skipped: not available", "figures": "done", "report": "done"}
    for name in ("finetune", "eval", "geometry", "figures", "report"):
        assert isinstance(stages[name]["seconds"], float)
    assert m["status"] == "done" and summary["stages"]["eval"] == "done"
    # one process, one load per model: eval loads the tuned model and its stock base and makes their plain copies
    # (counted by the pool, built from the loaded weights, so not load_model calls), geometry reuses both models
    loads = m["model_loads"]
    assert loads["shared_pool"] and loads["pool"]["loads"] == 4 and loads["pool"]["plain_copies"] == 2
    assert loads["pool"]["hits"] == 2
    assert loads["by_stage"]["eval"]["n"] == 2 and loads["by_stage"]["geometry"]["n"] == 0
    assert stages["geometry"]["model_loads"] == {"n": 0, "seconds": 0}
    assert summary["model_loads"] == loads
    # the fine-tune came from the tiny base, and the stock partner is that base
    tuned = Path(stages["finetune"]["folder"])
    assert tuned.parent == root / "cache" / "finetunes" and summary["model"] == str(tuned)
    assert summary["stock_model"] == str(base)

    # config.toml is the resolved tree, also in the manifest
    cfg = resolve(root / "tiny.toml")
    assert cfg.model.dtype == "auto"  # the default: resolved once when the job starts, and saved resolved
    cfg = cfg.replace(model=dataclasses.replace(cfg.model, dtype=resolve_dtype("auto", "cpu")))
    assert from_dict(tomllib.loads((out / "config.toml").read_text())) == cfg
    assert m["config"] == cfg.to_dict() and m["config_hash"] == cfg.hash
    assert resolve(out / "config.toml") == cfg

    assert (out / "report.html").stat().st_size > 10_000 and (out / "summary.json").is_file()
    for table, columns in EVAL_TABLES.items():
        df = pd.read_parquet(out / "eval" / f"{table}.parquet")
        assert set(columns) <= set(df.columns), (table, sorted(df.columns))
        assert (out / "eval" / f"{table}.csv").is_file()
    assert (out / "eval" / "summary.json").is_file() and (out / "eval" / "generations.jsonl").is_file()
    assert set(pd.read_parquet(out / "eval" / "per_category.parquet")["category"]) == {"privacy", "cybercrime",
                                                                                       "ALL"}
    # the generated decision is read from the first-position pass: the answers generated in full open with its argmax
    fluency = pd.read_parquet(out / "eval" / "fluency.parquet").iloc[0]
    assert fluency.n_generated > 0 and fluency.first_token_agreement == 1.0
    phases = json.loads((out / "eval" / "summary.json").read_text())["phase_seconds"]  # RunDir.timed, per phase
    assert set(phases) == {"first_token_scores", "generation", "fluency"} and all(v >= 0 for v in phases.values())
    for table, columns in GEOMETRY_TABLES.items():
        df = pd.read_parquet(out / "geometry" / f"{table}.parquet")
        assert set(columns) <= set(df.columns), (table, sorted(df.columns))
        assert len(df) > 0, table
    sep = pd.read_parquet(out / "geometry" / "separability.parquet")
    assert sorted(sep["layer"].unique()) == [0, 1, 2, 3]  # the tiny model's four layers
    assert set(pd.read_parquet(out / "geometry" / "projections.parquet")["method"]) == {"pca"}  # tsne_layers=none
    assert list((out / "geometry" / "directions").glob("*.safetensors"))
    for fig in FIGURES:
        assert (out / "figures" / f"{fig}.html").is_file() and (out / "figures" / f"{fig}.csv").is_file()
    assert not list((out / "figures").glob("*.png"))  # run.png = false

    # the geometry prompt set was capped per (label, category, split) at data.prompts_per_group = 4
    prompts = pd.read_json(out / "inputs" / "geometry_prompts.jsonl", lines=True)
    assert prompts.fillna("").groupby(["label", "category", "split"]).size().max() <= 4
    assert manifest(out / "geometry")["data"]["activations"]["n_prompts"] == len(prompts)

    # each stage folder records the config hash the main job ran it with
    for name in ("eval", "geometry", "figures"):
        record = manifest(out / name)[STAGE_RECORD]
        assert record["config_hash"] == stages[name]["config_hash"]


def test_finetune_cli_args_reproduce_the_trained_config(pipeline):
    from catlens.finetune import get_config, parse_overrides, read_manifest

    main, root, _, _ = pipeline
    tuned = Path(manifest(root / "run")["stages"]["finetune"]["folder"])
    args = finetune_cli_args(tuned)
    preset, sets = args[1], args[3::2]
    assert args[0] == "--config" and all(a == "--set" for a in args[2::2])
    assert get_config(preset).replace(**parse_overrides(sets)).hash == read_manifest(tuned)["config_hash"]
    assert finetune_cli_args(root / "base") is None  # not a catlens fine-tune


def test_rerun_reuses_finished_stages_and_reruns_a_changed_one(pipeline):
    main, root, base, _ = pipeline
    out = root / "run"
    before = {n: manifest(out / n)["finished"] for n in ("eval", "geometry", "figures")}
    old_hashes = {n: manifest(out)["stages"][n]["config_hash"] for n in ("eval", "geometry", "figures")}
    with pytest.MonkeyPatch.context() as mp:
        for name in ("p1", "p2", "specificity"):
            mp.setitem(main.STAGE_SCRIPTS, name, root / "absent" / f"{name}.py")
        run_pipeline(main, root, base, "--set", "eval.max_new_tokens=6", "--set", "report.enabled=false")
        stages = manifest(out)["stages"]
        assert {n: stages[n]["status"] for n in ("finetune", "eval", "geometry", "figures")} == {
            "finetune": "reused", "eval": "done", "geometry": "reused", "figures": "reused"}
        assert stages["eval"]["config_hash"] != old_hashes["eval"]
        assert stages["geometry"]["config_hash"] == old_hashes["geometry"]
        assert manifest(out / "geometry")["finished"] == before["geometry"]  # untouched
        assert manifest(out / "eval")["finished"] >= before["eval"]
        assert manifest(out / "eval")[STAGE_RECORD]["section"]["max_new_tokens"] == 6

        # the fine-tune folder given as model.spec: no fine-tune, and the same model identity reuses the stages
        tuned = stages["finetune"]["folder"]
        run_pipeline(main, root, base, "--set", "eval.max_new_tokens=6", "--set", "report.enabled=false",
                     "--model", tuned)
        stages = manifest(out)["stages"]
        assert stages["finetune"]["status"] == "skipped: model.spec given"
        assert {n: stages[n]["status"] for n in ("eval", "geometry", "figures")} == dict.fromkeys(
            ("eval", "geometry", "figures"), "reused")


FAKE_SCRIPT = '''
import dataclasses, json, sys
from pathlib import Path
from catlens.runs import RunDir

def run(options, models):
    out = Path(options.out)
    calls = Path(__file__).with_suffix(".calls.jsonl")
    with open(calls, "a") as f:
        f.write(json.dumps({**dataclasses.asdict(options), "_models": type(models).__name__}) + "\\n")
    run = RunDir.create(out, config={"options": dataclasses.asdict(options)}, overwrite=options.overwrite,
                        resume=not options.overwrite)
    run.finish()
    return 0
'''


def test_script_stages_get_their_options_and_are_skipped_when_absent(tmp_path, monkeypatch):
    from catlens.stages import P1Options, from_mapping
    from catlens.testing import make_tiny_model_dir

    main = load_main()
    model = make_tiny_model_dir(tmp_path / "tiny", categories=("privacy",))
    other = tmp_path / "stock"
    fake = tmp_path / "scripts" / "p1_steering.py"
    fake.parent.mkdir()
    fake.write_text(FAKE_SCRIPT)
    monkeypatch.setitem(main.STAGE_SCRIPTS, "p1", fake)
    monkeypatch.setitem(main.STAGE_SCRIPTS, "p2", tmp_path / "scripts" / "p2_steering.py")  # absent
    monkeypatch.setitem(main.STAGE_SCRIPTS, "specificity", fake.with_name("specificity.py"))  # absent
    out = tmp_path / "run"
    argv = ["--model", str(model), "--other-model", str(other), "--out", str(out), "--seed", "7", "--quick",
            "--data-dir", str(tmp_path / "data"), "--set", "geometry.enabled=false", "--set", "figures.enabled=false",
            "--set", "report.enabled=false", "--set", "p1.args.layers=1-2", "--set", "p1.args.quick=true",
            "--set", "p1.args.test-gen-cap=false"]
    main.main(argv)
    calls = [json.loads(line) for line in fake.with_suffix(".calls.jsonl").read_text().splitlines()]
    expected = from_mapping(P1Options, {**QUICK_ARGS["p1"], "layers": "1-2", "test-gen-cap": False, "quick": True},
                            model=str(model), out=str(out / "p1"), seed=7, data_dir=str(tmp_path / "data"),
                            quick=True, stock_model=str(other), dtype=resolve_dtype("auto"))
    assert calls == [{**dataclasses.asdict(expected), "_models": "ModelPool"}]  # quick sizes, the overrides win
    stages = manifest(out)["stages"]
    assert stages["p1"]["status"] == "done" and stages["p2"]["status"] == "skipped: not available"
    assert "p2_steering.py does not exist" in stages["p2"]["reason"]
    assert stages["specificity"]["status"] == "skipped: not available"
    assert stages["eval"]["status"].startswith("skipped:") and "not a catlens fine-tune" in stages["eval"]["status"]
    assert stages["geometry"]["status"] == "skipped: disabled in the config"
    assert stages["finetune"]["status"] == "skipped: model.spec given"

    main.main(argv)  # same config: the script is not called again
    assert len(fake.with_suffix(".calls.jsonl").read_text().splitlines()) == 1
    assert manifest(out)["stages"]["p1"]["status"] == "reused"
    main.main(argv + ["--set", "p1.args.layers=0-1"])  # changed args: rerun, replacing the old folder
    calls = [json.loads(line) for line in fake.with_suffix(".calls.jsonl").read_text().splitlines()]
    assert len(calls) == 2 and calls[1]["overwrite"] and _layers_and_gate(calls[1]) == ("0-1", True)
    assert manifest(out)["stages"]["p1"]["status"] == "done"

    # an edited script reruns its stage (same config); a failing stage is recorded, the others still run, and the
    # job ends with an error naming it
    fake.write_text(FAKE_SCRIPT.replace("return 0", "raise ValueError('planted failure')"))
    with pytest.raises(RuntimeError, match="p1: ValueError: planted failure"):
        main.main(argv + ["--set", "p1.args.layers=0-1"])
    m = manifest(out)
    assert m["status"] == "failed" and m["stages"]["p1"]["status"].startswith("failed: ValueError")
    assert m["stages"]["specificity"]["status"] == "skipped: not available"

    # after a failure (or an interruption) with the same configuration the script resumes: no --overwrite
    def last_call():
        return json.loads(fake.with_suffix(".calls.jsonl").read_text().splitlines()[-1])

    assert last_call()["overwrite"]
    fake.write_text(FAKE_SCRIPT.replace("return 0", "raise KeyboardInterrupt"))
    with pytest.raises(KeyboardInterrupt):
        main.main(argv + ["--set", "p1.args.layers=0-1"])
    assert not last_call()["overwrite"] and manifest(out)["stages"]["p1"]["status"] == "running"
    fake.write_text(FAKE_SCRIPT)
    main.main(argv + ["--set", "p1.args.layers=0-1"])
    assert not last_call()["overwrite"] and manifest(out)["stages"]["p1"]["status"] == "done"
    main.main(argv + ["--set", "p1.args.layers=1-3"])  # a finished stage with another configuration is replaced
    assert last_call()["overwrite"] and _layers_and_gate(last_call()) == ("1-3", True)


@pytest.mark.gpu
def test_reduced_pipeline_on_cuda(tmp_path, monkeypatch):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (torch.cuda.is_available() is False)")
    from catlens.testing import make_tiny_model_dir

    main = load_main()
    for name in ("p1", "p2", "specificity"):
        monkeypatch.setitem(main.STAGE_SCRIPTS, name, tmp_path / "absent" / f"{name}.py")
    base = make_tiny_model_dir(tmp_path / "base")
    run_pipeline(main, tmp_path, base, device="cuda")
    m = manifest(tmp_path / "run")
    assert {n: m["stages"][n]["status"] for n in ("finetune", "eval", "geometry", "figures", "report")} == \
        dict.fromkeys(("finetune", "eval", "geometry", "figures", "report"), "done")
    assert manifest(tmp_path / "run" / "geometry")["models"]["model"]["device"].startswith("cuda")


def test_every_stage_script_loads_as_the_main_job_loads_it():
    """analyses/main.py loads each stage script from its file; p2's dataclasses need the module registered while it
    executes (this failed in a real `make demo` while the smoke test, which points the scripts elsewhere, passed)."""
    main = load_main()
    for name, path in main.STAGE_SCRIPTS.items():
        module = main.load_script(path)
        assert callable(module.main), name


@pytest.mark.parametrize("quick", [False, True])
def test_script_stages_give_their_scripts_options_the_scripts_accept(quick, tmp_path, monkeypatch):
    """The typed options each steering stage builds (demo or quick sizes, stock partner, P1 policy) pass the real
    script's own checks; p2 studies the stock model."""
    import types

    from catlens.recipes.p2 import prepare as p2_prepare
    from catlens.runs import RunDir
    from catlens.stages import P1Options, P2Options, SpecificityOptions, to_argv

    main = load_main()
    cfg = resolve(sets=[f"run.quick={'true' if quick else 'false'}", "model.device=cpu"])
    job = main.Job(config=cfg, run=RunDir.create(tmp_path / "run", {}), tuned="tuned-folder", stock="stock-model")
    pol = job.out / "p1" / "policies" / "categorical_global"
    pol.mkdir(parents=True)
    (pol / "policy.json").write_text("{}")
    seen = {}
    real = main.load_script
    monkeypatch.setattr(main, "load_script", lambda path: types.SimpleNamespace(
        run=lambda options, models, _p=path: seen.__setitem__(_p.stem, options)))
    for name in ("p1", "p2", "specificity"):
        main.STAGES[name].fn(cfg, job, tmp_path / name)
    assert [type(seen[s]) for s in ("p1_steering", "p2_steering", "specificity")] == [
        P1Options, P2Options, SpecificityOptions]
    scripts = {stem: real(REPO / "analyses" / f"{stem}.py") for stem in seen}
    scripts["p1_steering"].parse_args(to_argv(seen["p1_steering"]))  # SystemExit (argparse) fails the test
    p2_prepare(seen["p2_steering"])  # p2_steering's own checks (its recipe's); ValueError fails the test
    scripts["specificity"]._parser().parse_args(to_argv(seen["specificity"]))
    assert seen["p2_steering"].model == "stock-model"
    assert seen["p1_steering"].stock_model == "stock-model"
    assert seen["specificity"].policy == str(pol)
    assert seen["p1_steering"].test_cap == (QUICK_ARGS if quick else DEMO_ARGS)["p1"]["test-cap"]


def test_a_dependency_that_failed_and_then_succeeded_reruns_its_dependants(tmp_path):
    """figures drew what existed after p2 failed; once p2 succeeds with the same config, figures must not be reused."""
    from catlens.runs import RunDir

    main = load_main()
    job = main.Job(config=resolve(), run=RunDir.create(tmp_path / "run", {}))
    job.hashes.update({d: f"h-{d}" for d in main.STAGES["figures"].deps})
    job.status.update({d: "done" for d in main.STAGES["figures"].deps})
    job.status["p2"] = "failed: boom"
    before = stage_hash(main.STAGES["figures"], job, code=False)
    job.status["p2"] = "done"
    after = stage_hash(main.STAGES["figures"], job, code=False)
    job.status["p2"] = "reused"
    assert before != after == stage_hash(main.STAGES["figures"], job, code=False)
