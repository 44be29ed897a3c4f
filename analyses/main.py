"""The main job, end to end: fine-tune, evaluation, geometry, P1 and P2 steering, category specificity, figures and
the report, configured by one file.

Usage:
    python analyses/main.py                                   # what `make demo` runs (configs/default.toml)
    python analyses/main.py --quick --out runs/main-quick     # minutes: quick fine-tune, smaller evaluation
    python analyses/main.py --config configs/gpu-8b.toml      # an 8B refusal-token model on a GPU
    python analyses/main.py --model runs/ft/my-model --set geometry.layers=10-20 --set p1.enabled=false
    python analyses/main.py --config runs/main/config.toml    # rerun a run exactly as it was configured

Configuration (``catlens/config.py``): a TOML or YAML file (``--config``), then the shorthands below, then
``--set section.field=value`` items, later winning; the resolved tree is written to ``<out>/config.toml`` and into
``<out>/manifest.json``. Shorthands: ``--quick`` (``run.quick``), ``--stock`` (``run.stock``), ``--out``
(``run.out``), ``--data-dir`` (``data.data_dir``), ``--cache-dir`` (``model.cache_dir``), ``--seed``, ``--threads``,
``--no-png`` (``run.png=false``), ``--model`` (``model.spec``), ``--other-model``, ``--device``, ``--dtype``.

Stages (:data:`STAGES`, run in this order; each writes its own run folder ``<out>/<stage>`` with a manifest):

1. ``finetune``    train, or reuse from the model cache, the refusal-token fine-tune of ``[finetune]``
                   (``catlens.finetune.ensure_refusal_model``); skipped when ``model.spec`` names the tuned model;
2. ``eval``        ``analyses/finetune_eval.py``: held-out refusal, category accuracy, over-refusal, AUROC, fluency
                   (needs a catlens fine-tune: the held-out split it was trained without);
3. ``geometry``    ``analyses/geometry.py``: directions, separability, cosines, anisotropy, whitening, with the stock
                   model as the model-diffing partner;
4. ``p1``          ``analyses/p1_steering.py``: categorical steering, gating, low-rank combination, transfer;
5. ``p2``          ``analyses/p2_steering.py``: unsupervised, pruned and guided category steering;
6. ``specificity`` ``analyses/specificity.py``: does steering along category i move category j?
7. ``figures``     every ``figures/fig_*.py`` on the stage folder it reads (a module constant ``STAGE``, else the
                   file name: ``fig_p1_*`` reads ``p1/``, ``fig_p2_*`` ``p2/``, ``fig_specificity*``
                   ``specificity/``, anything else ``geometry/``);
8. ``report``      ``catlens.report.build_report``: ``<out>/report.html`` from the saved tables (rebuilt every time).

Script stages run in this process, as ``module.run(options, models)``: ``options`` is the stage's typed options
dataclass (``catlens.stages.STAGE_OPTIONS``) built from what the job passes (the tuned model, ``<out>/<stage>``, the
seed, the data folder, ``quick``, ``overwrite``, the stock partner for p1 and the device and dtype) under the
stage's ``args`` table, which wins; ``models`` is the job's ``catlens.model.ModelPool``, so each model (tuned,
stock) is loaded once per job and shared by the stages (the manifest's ``model_loads`` records how many loads
happened, their seconds and which stage made them). Every stage's ``args`` table is checked against its
script's options (names with a did-you-mean, types, choices, ranges) when the configuration
is resolved, before any work. ``overwrite`` is left false when the stage was
interrupted (or failed) with the same configuration, so the script resumes its own run. A stage whose script does not exist is skipped and
recorded as "skipped: not available". A stage is skipped when its folder's manifest says done for the same
resolved stage configuration (a hash of its section, the config keys it reads, the models, its script's code and
the stages it depends on); a changed configuration or an edited script reruns that stage. A failed stage is
recorded and the independent stages still run; the job then exits with an error naming it.

Writes: <out>/config.toml, <out>/manifest.json (config, per stage: folder, status, seconds, config hash, model
loads; the job's model_loads),
<out>/summary.json, <out>/report.html and the stage folders.

This page lists the stages and what each calls; the rules they run under (stage hashes and records, reuse, resume,
failures, the summary, the command line's shorthands) are ``catlens.pipeline``.
"""

import dataclasses
import importlib.util
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from catlens.config import Config, ConfigError
from catlens.pipeline import (Job, Pipeline, Stage, build_report_stage, check_returned, common_options,
                              configure_logging, draw_figures, ensure_finetune, expand, finetune_cli_args,
                              finetune_eval_options, geometry_prompts, job_config, model_options, needs_overwrite,
                              run_job, stage_options)
from catlens.stages import to_argv

log = logging.getLogger("analyses.main")
HERE = Path(__file__).resolve().parent
FIGURES = HERE.parent / "figures"
STAGE_SCRIPTS: dict[str, Path] = {
    "eval": HERE / "finetune_eval.py",
    "geometry": HERE / "geometry.py",
    "p1": HERE / "p1_steering.py",
    "p2": HERE / "p2_steering.py",
    "specificity": HERE / "specificity.py",
}
"""Where each script stage's code lives (tests point these elsewhere)."""


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """A stage or figure script as a fresh module named ``name`` (default ``catlens_script_<stem>``), registered in
    ``sys.modules`` under that name (p2's dataclasses look their module up while the class is made). The one
    loader of scripts by path: the job's stages and figures, and the tests (``tests/_scripts.py``)."""
    spec = importlib.util.spec_from_file_location(name or f"catlens_script_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def _call(name: str, module: ModuleType, options: Any, job: Job) -> Any:
    """``module.run(options, job.models)``: the stage's script in this process, on the job's model pool."""
    log.info("stage %s: %s.run(%s)", name, STAGE_SCRIPTS[name].name, " ".join(to_argv(options)))
    return module.run(options, job.models)


# ================================================================================================ stages
def stage_finetune(cfg: Config, job: Job, folder: Path) -> dict[str, Any]:
    if cfg.run.stock:
        return {"status": "skipped: run.stock (the stock model is studied)", "folder": str(job.tuned)}
    if cfg.model.spec is not None:
        return {"status": "skipped: model.spec given", "folder": cfg.model.spec}
    return ensure_finetune(cfg, job)


def eval_unavailable(cfg: Config, job: Job) -> str | None:
    if cfg.run.stock:
        return "skipped: run.stock (no fine-tune to evaluate)"
    if finetune_cli_args(str(job.tuned)) is None:
        return (f"skipped: {job.tuned} is not a catlens fine-tune (the evaluation needs the held-out split it was "
                f"trained without)")
    return None


def stage_eval(cfg: Config, job: Job, folder: Path) -> None:
    module = load_script(STAGE_SCRIPTS["eval"])
    given = {**common_options(cfg, job, folder, threads=True), "per_category": cfg.data.per_category,
             "per_set": cfg.data.per_set, "batch_size": cfg.eval.batch_size,
             "max_new_tokens": cfg.eval.max_new_tokens, "ungated": cfg.eval.ungated, **model_options(cfg),
             "overwrite": needs_overwrite(folder)}
    trained = finetune_eval_options(str(job.tuned)) or {}
    given["config"] = trained.get("config", "default")
    if cfg.model.cache_dir:
        given["cache_dir"] = str(expand(cfg.model.cache_dir))
    options = stage_options("eval", cfg, **given)
    if trained.get("set"):  # the fine-tune's own overrides first, an ``eval.args.set`` after them (it wins)
        options = dataclasses.replace(options, set=(*trained["set"], *options.set))
    check_returned("eval", _call("eval", module, options, job))


def stage_geometry(cfg: Config, job: Job, folder: Path) -> None:
    module = load_script(STAGE_SCRIPTS["geometry"])
    g = cfg.geometry
    given: dict[str, Any] = {
        "model": str(job.tuned), "out": str(folder), "seed": cfg.run.seed, "prompts": geometry_prompts(cfg, job.out),
        "layers": g.layers, "tsne_layers": g.tsne_layers, "cv_folds": g.cv_folds, "batch_size": g.batch_size,
        **model_options(cfg), "threads": cfg.run.threads, "overwrite": needs_overwrite(folder)}
    if g.directions:
        given["directions"] = ",".join(g.directions)
    if cfg.model.cache_dir:
        given["cache_dir"] = str(expand(cfg.model.cache_dir))
    if job.stock is not None and job.stock != job.tuned:
        given["other_model"] = job.stock
    _call("geometry", module, stage_options("geometry", cfg, **given), job)


P1_POLICIES_FOR_SPECIFICITY = ("categorical_global", "categorical_per_category")
"""The P1 policies (``<out>/p1/policies/<name>``) whose layer, scale, site and positions specificity measures at, in
order of preference (P1's chosen global-zone policy first)."""


def _p1_policy(cfg: Config, job: Job) -> dict[str, Any]:
    """Specificity measures at the layer and scale P1 chose on validation prompts (its chosen policy), unless the
    config gives ``policy`` or ``layers`` itself. When P1 chose no policy (no setting passed its guard), specificity
    chooses its own layers and scales on its own selection split (the script's ``auto``), and the log says so."""
    given = {k.replace("-", "_") for k in cfg.section("specificity").args}
    if given & {"policy", "layer", "layers"}:
        return {}
    for name in P1_POLICIES_FOR_SPECIFICITY:
        folder = job.out / "p1" / "policies" / name
        if (folder / "policy.json").exists():
            return {"policy": str(folder)}
    log.warning("specificity: P1 wrote none of %s under %s (it chose no policy), so specificity chooses its own "
                "layers and scales ('auto', without a policy)", ", ".join(P1_POLICIES_FOR_SPECIFICITY),
                job.out / "p1" / "policies")
    return {}


def _script_stage(name: str, stock_model: bool, extra: Callable[[Config, Job], dict[str, Any]] | None = None,
                  on_stock: bool = False) -> Callable[[Config, Job, Path], None]:
    """``stock_model``: pass ``stock_model=<stock>`` (the transfer partner); ``on_stock``: study the stock model
    itself (``model=<stock>``; P2 addresses a model that never refuses), the tuned one when there is no stock.
    ``extra``: options that win over the stage's ``args`` table (it leaves out what the table gives)."""

    def run(cfg: Config, job: Job, folder: Path) -> None:
        module = load_script(STAGE_SCRIPTS[name])
        given = common_options(cfg, job, folder)
        if on_stock and job.stock is not None:
            given["model"] = str(job.stock)
        given["quick"] = bool(cfg.run.quick)
        given["overwrite"] = needs_overwrite(folder, job, STAGES[name])
        if stock_model and job.stock is not None:
            given["stock_model"] = job.stock
        options = stage_options(name, cfg, **given, **model_options(cfg))
        if extra is not None and (more := extra(cfg, job)):
            options = dataclasses.replace(options, **more)
        check_returned(name, _call(name, module, options, job))

    run.__name__ = f"stage_{name}"
    return run


def stage_figures(cfg: Config, job: Job, folder: Path) -> None:
    draw_figures(sorted(FIGURES.glob("fig_*.py")), load_script, cfg, job, folder)


_DATA_EVAL = ("data.data_dir", "data.per_set", "data.per_category", "model.dtype", "run.seed")
_DATA_SCRIPT = ("data.data_dir", "model.dtype", "run.seed", "run.quick")
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("finetune", stage_finetune, self_managed=True, needs_model=False),
    Stage("eval", stage_eval, uses=_DATA_EVAL, script=True, unavailable=eval_unavailable),
    Stage("geometry", stage_geometry, script=True,
          uses=("data.data_dir", "data.prompts", "data.prompts_per_group", "model.dtype", "run.seed")),
    Stage("p1", _script_stage("p1", stock_model=True), uses=_DATA_SCRIPT, script=True, resumable=True),
    Stage("p2", _script_stage("p2", stock_model=False, on_stock=True), uses=_DATA_SCRIPT, script=True,
          resumable=True),
    Stage("specificity", _script_stage("specificity", stock_model=False, extra=_p1_policy), deps=("p1",),
          uses=_DATA_SCRIPT, script=True, resumable=True),
    Stage("figures", stage_figures, deps=("geometry", "p1", "p2", "specificity"), uses=("run.png",),
          needs_model=False, draws_figures=True),
    Stage("report", build_report_stage, self_managed=True, needs_model=False),
)}
"""The registry, in running order: adding a stage is one entry (and one ``[section]`` in ``catlens.config``)."""
PIPELINE = Pipeline(stages=STAGES, scripts=STAGE_SCRIPTS, figures=FIGURES)


# ================================================================================================== main
def main(argv: Sequence[str] | None = None, *, share_models: bool = True) -> dict[str, Any]:
    """Run the job of a command line. ``share_models``: one ``catlens.model.ModelPool`` for every stage, so each
    model is loaded once per job (False: each stage loads its own, as separate processes would; the manifest's
    ``model_loads`` tells the two apart)."""
    configure_logging()
    return run_job(job_config(argv, __doc__), PIPELINE, share_models=share_models)


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: a bad configuration exits with code 2 and the message (no traceback)."""
    try:
        main(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # failed stages: each was logged with its traceback when it failed
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
