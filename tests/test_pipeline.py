"""catlens.pipeline's rules on a planted two-stage registry (no model, no script of the repository): what a stage's
hash covers, the resume rule of a resumable stage, the skip reasons a stage is recorded with. The main job's own
registry, end to end, is tests/analyses/test_pipeline_smoke.py."""

from pathlib import Path

import pytest

from catlens.config import resolve
from catlens.pipeline import NOT_AVAILABLE, Job, Pipeline, Stage, needs_overwrite, run_stage, stage_hash
from catlens.runs import RunDir


def _noop(cfg, job, folder):
    return None


def _job(tmp_path: Path, pipeline: Pipeline | None = None, **sets: str) -> Job:
    cfg = resolve(sets=[f"{k}={v}" for k, v in sets.items()])
    return Job(config=cfg, run=RunDir.create(tmp_path / "run", {}), tuned="tuned", stock="stock", pipeline=pipeline)


def test_the_hash_covers_the_script_or_every_figure_script_and_needs_the_pipeline(tmp_path):
    scripts, figures = tmp_path / "scripts", tmp_path / "figures"
    scripts.mkdir()
    figures.mkdir()
    (scripts / "p1.py").write_text("A = 1\n")
    (figures / "fig_a.py").write_text("A = 1\n")
    p1, fig = Stage("p1", _noop, script=True), Stage("figures", _noop, needs_model=False, draws_figures=True)
    pipeline = Pipeline(stages={"p1": p1, "figures": fig}, scripts={"p1": scripts / "p1.py"}, figures=figures)
    job = _job(tmp_path, pipeline)
    assert pipeline.code_files(p1) == [scripts / "p1.py"] and pipeline.code_files(fig) == [figures / "fig_a.py"]
    before = {s.name: stage_hash(s, job) for s in (p1, fig)}
    (scripts / "p1.py").write_text("A = 2\n")
    assert stage_hash(p1, job) != before["p1"] and stage_hash(fig, job) == before["figures"]
    (figures / "fig_b.py").write_text("B = 1\n")  # a new figure script reruns the figures stage
    assert stage_hash(fig, job) != before["figures"]
    assert stage_hash(p1, job, code=False) == stage_hash(p1, _job(tmp_path / "other"), code=False)
    with pytest.raises(ValueError, match="needs job.pipeline"):
        stage_hash(p1, _job(tmp_path / "bare"))


def test_the_hash_covers_the_recipe_modules_the_script_imports(tmp_path, monkeypatch):
    """A script stage's code is its script and every ``catlens.recipes`` module it imports: an edited recipe reruns
    the stage, even where the recipe and the script share a file name."""
    import catlens.pipeline as P
    import catlens.recipes.specificity as recipe

    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "specificity.py").write_text("from catlens.recipes import specificity\nfrom catlens import stages\n")
    stage = Stage("specificity", _noop, script=True)
    pipeline = Pipeline(stages={"specificity": stage}, scripts={"specificity": scripts / "specificity.py"},
                        figures=tmp_path)
    assert pipeline.code_files(stage) == [scripts / "specificity.py", Path(recipe.__file__)]
    job = _job(tmp_path, pipeline)
    before = stage_hash(stage, job)
    real = P.sha256_file
    monkeypatch.setattr(P, "sha256_file", lambda p: "edited" if Path(p) == Path(recipe.__file__) else real(p))
    assert stage_hash(stage, job) != before
    monkeypatch.setattr(P, "sha256_file", real)
    (scripts / "specificity.py").write_text("from catlens.recipes import specificity  # edited\n")
    assert stage_hash(stage, job) != before  # the script's own edit still counts beside its namesake recipe


def test_a_resumable_stage_interrupted_with_the_same_configuration_resumes(tmp_path):
    folder = tmp_path / "p1"
    stage, plain = Stage("p1", _noop, script=True, resumable=True), Stage("p1", _noop, script=True)
    job = _job(tmp_path)
    assert not needs_overwrite(folder, job, stage)  # nothing there yet
    folder.mkdir()
    (folder / "partial.parquet").write_text("x")
    job.args_hashes["p1"] = "h"
    for status, same, resumes in (("running", "h", True), ("failed: boom", "h", True), ("running", "other", False),
                                  ("done", "h", False)):
        job.previous = {"p1": {"status": status, "args_hash": same}}
        assert needs_overwrite(folder, job, stage) is not resumes, (status, same)
        assert needs_overwrite(folder, job, plain)  # not resumable: always a fresh run
    assert needs_overwrite(folder)


def test_skipped_stages_are_recorded_with_their_reason(tmp_path):
    seen = []
    stages = {"p1": Stage("p1", lambda c, j, f: seen.append("p1"), script=True),
              "p2": Stage("p2", lambda c, j, f: seen.append("p2"), script=True),
              "eval": Stage("eval", lambda c, j, f: seen.append("eval"), unavailable=lambda c, j: "skipped: planted")}
    pipeline = Pipeline(stages=stages, scripts={"p1": tmp_path / "absent.py", "p2": tmp_path / "absent.py"},
                        figures=tmp_path)
    job = _job(tmp_path, pipeline, **{"p2.enabled": "false"})
    for stage in stages.values():
        run_stage(stage, job)
    assert seen == []
    assert job.status == {"p1": NOT_AVAILABLE, "p2": "skipped: disabled in the config", "eval": "skipped: planted"}
    recorded = job.run.manifest["stages"]
    assert recorded["p1"]["reason"] == "absent.py does not exist yet" and all(job.hashes[n] is None for n in stages)
