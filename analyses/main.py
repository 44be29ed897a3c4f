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
"""

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from catlens.config import Config, ConfigError, resolve, to_toml
from catlens.runs import RunDir, configure_process, sha256_file, sha256_text, write_text_atomic
from catlens.stages import STAGE_OPTIONS, check_stage_args, from_mapping, to_argv

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
NOT_AVAILABLE = "skipped: not available"
STAGE_RECORD = "main_stage"
"""The key under which the main job records a stage's config hash in the stage folder's manifest."""


# ===================================================================================================== job
@dataclass
class Job:
    """One run of the main job: the resolved config, the run folder and what the stages found out."""

    config: Config
    run: RunDir
    tuned: str | None = None
    """Spec of the model the stages study (the fine-tune's folder, ``model.spec`` or the stock model)."""
    stock: str | None = None
    """Spec of the stock partner (model diffing, transfer), or None when unknown."""
    identities: dict[str, Any] = field(default_factory=dict)
    hashes: dict[str, str | None] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)
    """The stage records of the run folder's manifest before this run (to tell an interrupted stage)."""
    args_hashes: dict[str, str] = field(default_factory=dict)
    """Per stage, the hash of its configuration without its code (an unchanged one resumes)."""
    models: Any = None
    """The job's ``catlens.model.ModelPool``, passed to every stage (each model loaded once per job); None: every
    stage loads its own models."""
    loads: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per stage that ran, its ``load_model`` calls: ``{"n", "seconds"}``."""

    @property
    def out(self) -> Path:
        return self.run.path


@dataclass(frozen=True)
class Stage:
    """One entry of the registry: ``fn(config, job, folder)`` does the work into ``folder``."""

    name: str
    fn: Callable[[Config, Job, Path], Any]
    deps: tuple[str, ...] = ()
    """Stages whose results this one reads (their hashes are part of this stage's hash)."""
    uses: tuple[str, ...] = ()
    """Config keys outside the stage's own section that change its result."""
    needs_model: bool = True
    """Needs the tuned model (skipped when the fine-tune failed)."""
    self_managed: bool = False
    """Runs every time and manages its own reuse (the fine-tune cache, the report)."""
    script: bool = False
    """Run from ``STAGE_SCRIPTS[name]``; skipped as not available when that file does not exist."""
    resumable: bool = False
    """The script resumes an interrupted run given the same arguments without ``--overwrite``."""


# ========================================================================================== stage helpers
def _expand(path: str | None) -> str | None:
    """A path from the config with ``~`` expanded (``None`` stays ``None``)."""
    return None if path is None else str(Path(path).expanduser())


def _load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"catlens_script_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses (p2's Plan) look their module up while the class is made
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return module


def _common(cfg: Config, job: Job, folder: Path, *, threads: bool = False) -> dict[str, Any]:
    """The options every script stage gets from the job: model, out, seed, data folder (and threads)."""
    given: dict[str, Any] = {"model": str(job.tuned), "out": str(folder), "seed": cfg.run.seed}
    if cfg.data.data_dir:
        given["data_dir"] = str(_expand(cfg.data.data_dir))
    if threads and cfg.run.threads is not None:
        given["threads"] = cfg.run.threads
    return given


def stage_options(name: str, cfg: Config, **given: Any) -> Any:
    """The typed options of script stage ``name``: the values the job passes (``given``) under the stage's
    ``args`` table (the table wins, as it did when it came last on the command line), checked by
    :func:`catlens.stages.from_mapping`."""
    return from_mapping(STAGE_OPTIONS[name], cfg.section(name).args, where=f"{name}.args", **given)


def _call(name: str, module: ModuleType, options: Any, job: Job) -> Any:
    """``module.run(options, job.models)``: the stage's script in this process, on the job's model pool."""
    log.info("stage %s: %s.run(%s)", name, STAGE_SCRIPTS[name].name, " ".join(to_argv(options)))
    return module.run(options, job.models)


def _overwrite(folder: Path, job: Job | None = None, name: str = "") -> list[str]:
    """``--overwrite`` for a non-empty stage folder (the main job reruns a stage only when it is not done for the
    current config); left out when a resumable stage was interrupted (or failed) with the same configuration, so
    that its script resumes (also after its code was edited: the script checks its own arguments)."""
    if not (folder.exists() and any(folder.iterdir())):
        return []
    if job is not None and STAGES[name].resumable:
        before = job.previous.get(name) or {}
        status = str(before.get("status"))
        unfinished = status == "running" or status.startswith("failed")
        if unfinished and before.get("args_hash") is not None and before["args_hash"] == job.args_hashes.get(name):
            log.info("stage %s: resuming the interrupted run in %s (same configuration)", name, folder)
            return []
    return ["--overwrite"]


def _check_returned(name: str, value: Any) -> None:
    if isinstance(value, int) and not isinstance(value, bool) and value != 0:
        raise RuntimeError(f"stage {name}: the script's run() returned exit code {value}.")


def _model_options(cfg: Config) -> dict[str, Any]:
    return {"device": cfg.model.device, "dtype": cfg.model.dtype}


def finetune_config(cfg: Config) -> Any:
    """The ``FinetuneConfig`` of ``[finetune]`` (preset plus overrides; the device of ``[model]`` unless the
    overrides name one)."""
    from catlens.finetune import check_value, get_config

    overrides = {k: check_value(k, v) for k, v in cfg.finetune.overrides.items()}  # lists -> tuples, typed
    overrides.setdefault("device", cfg.model.device)
    return get_config(cfg.finetune.config).replace(**overrides)


def finetune_eval_options(folder: str | Path) -> dict[str, Any] | None:
    """``{"config": <preset>, "set": ("FIELD=VALUE", ...)}`` reproducing the config a catlens fine-tune folder was
    trained with (read from its manifest), for ``analyses/finetune_eval.py``; ``None`` when the folder is not a
    catlens fine-tune."""
    from catlens.finetune import CONFIGS, read_manifest

    manifest = read_manifest(folder) if Path(folder).is_dir() else None
    if manifest is None or not isinstance(manifest.get("config"), dict):
        return None
    recorded = manifest["config"]
    preset = recorded.get("name") if recorded.get("name") in CONFIGS else "default"
    base = CONFIGS[preset].to_dict()
    sets = tuple(f"{k}={json.dumps(v)}" for k, v in recorded.items()
                 if k in base and k not in ("device", "checkpoint_every") and base[k] != v)
    return {"config": preset, "set": sets}


def finetune_cli_args(folder: str | Path) -> list[str] | None:
    """:func:`finetune_eval_options` as ``--config <preset> --set FIELD=VALUE ...`` (``catlens finetune``'s
    command line); ``None`` when the folder is not a catlens fine-tune."""
    given = finetune_eval_options(folder)
    if given is None:
        return None
    return ["--config", given["config"]] + [x for s in given["set"] for x in ("--set", s)]


def _identity(spec: str | None) -> dict[str, Any] | None:
    """What identifies a model for the stage hashes: its spec, and for a folder the weights' sha256 from its
    manifest (a catlens fine-tune records it) and the fine-tune config hash."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if not p.is_dir():
        return {"spec": spec}
    ident: dict[str, Any] = {"spec": str(p.resolve())}
    try:
        manifest = json.loads((p / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        manifest = {}
    weights = (manifest.get("outputs") or {}).get("model.safetensors") or {}
    ident["weights_sha256"] = weights.get("sha256")
    ident["finetune_config_hash"] = (manifest.get("finetune") or {}).get("config_hash")
    return ident


def _stock_of(cfg: Config, tuned_folder: str | None) -> str | None:
    """The stock partner: ``model.other_model``, else the base recorded by a catlens fine-tune, else (no
    ``model.spec``) the base of ``[finetune]``."""
    if cfg.model.other_model is not None:
        other = cfg.model.other_model
        return str(Path(other).expanduser()) if other.startswith("~") else other
    if tuned_folder is not None and Path(tuned_folder).is_dir():
        from catlens.finetune import read_manifest
        from catlens.model import DEFAULT_MODEL

        manifest = read_manifest(tuned_folder)
        if manifest is not None:
            base = manifest.get("base") or {}
            if base.get("spec") == DEFAULT_MODEL or not base.get("folder"):
                return base.get("spec")
            return str(base.get("folder"))
    if cfg.model.spec is None:
        return str(finetune_config(cfg).base)
    return None


def _set_models(job: Job, tuned: str | None, stock: str | None) -> None:
    job.tuned, job.stock = tuned, stock
    job.identities = {"tuned": _identity(tuned), "stock": _identity(stock)}


def _get(cfg: Config, key: str) -> Any:
    section, name = key.split(".", 1)
    value = getattr(cfg.section(section), name)
    return dict(value) if hasattr(value, "items") else value


# ================================================================================================ stages
def stage_finetune(cfg: Config, job: Job, folder: Path) -> dict[str, Any]:
    if cfg.run.stock:
        return {"status": "skipped: run.stock (the stock model is studied)", "folder": str(job.tuned)}
    if cfg.model.spec is not None:
        return {"status": "skipped: model.spec given", "folder": cfg.model.spec}
    from catlens.finetune import default_name, ensure_refusal_model, read_manifest
    from catlens.model import cache_dir

    config = finetune_config(cfg)
    cache, data_dir = _expand(cfg.model.cache_dir), _expand(cfg.data.data_dir)
    target = cache_dir(cache) / "finetunes" / default_name(config)
    cached = read_manifest(target) if target.is_dir() else None
    job.tuned = str(ensure_refusal_model(config, cache, data_dir=data_dir))
    job.stock = _stock_of(cfg, job.tuned)
    reused = cached is not None and cached.get("config_hash") == config.hash
    return {"status": "reused" if reused else "done", "folder": job.tuned, "config_hash": config.hash}


def _eval_unavailable(cfg: Config, job: Job) -> str | None:
    if cfg.run.stock:
        return "skipped: run.stock (no fine-tune to evaluate)"
    if finetune_cli_args(str(job.tuned)) is None:
        return (f"skipped: {job.tuned} is not a catlens fine-tune (the evaluation needs the held-out split it was "
                f"trained without)")
    return None


def stage_eval(cfg: Config, job: Job, folder: Path) -> None:
    module = _load_script(STAGE_SCRIPTS["eval"])
    given = {**_common(cfg, job, folder, threads=True), "per_category": cfg.data.per_category,
             "per_set": cfg.data.per_set, "batch_size": cfg.eval.batch_size,
             "max_new_tokens": cfg.eval.max_new_tokens, "ungated": cfg.eval.ungated, **_model_options(cfg),
             "overwrite": bool(_overwrite(folder))}
    trained = finetune_eval_options(str(job.tuned)) or {}
    given["config"] = trained.get("config", "default")
    if cfg.model.cache_dir:
        given["cache_dir"] = str(_expand(cfg.model.cache_dir))
    options = stage_options("eval", cfg, **given)
    if trained.get("set"):  # the fine-tune's own overrides first, an ``eval.args.set`` after them (it wins)
        options = dataclasses.replace(options, set=(*trained["set"], *options.set))
    _check_returned("eval", _call("eval", module, options, job))


def geometry_prompts(cfg: Config, out: Path) -> str:
    """The prompt set the geometry stage reads: ``data.prompts`` as given, or, with ``data.prompts_per_group``
    (or a dataset read from ``data.data_dir``), a seeded sample of at most that many prompts per (label, category,
    split) written to ``<out>/inputs/geometry_prompts.jsonl``."""
    from catlens.datasets import DATASETS, load_prompts

    spec = cfg.data.prompts
    if cfg.data.prompts_per_group is None and not (cfg.data.data_dir and spec in DATASETS):
        return spec
    ps = load_prompts(spec, data_dir=_expand(cfg.data.data_dir))
    if cfg.data.prompts_per_group is not None:
        groups: dict[tuple[Any, ...], list[str]] = {}
        for p in ps:
            groups.setdefault((p.label, p.category or "", p.split or ""), []).append(p.id)
        rng = random.Random(cfg.run.seed)
        keep: set[str] = set()
        for key in sorted(groups):
            ids = sorted(groups[key])
            keep |= set(rng.sample(ids, min(cfg.data.prompts_per_group, len(ids))))
        ps = ps.filter(lambda p: p.id in keep, f"at most {cfg.data.prompts_per_group} per label/category/split")
    target = out / "inputs" / "geometry_prompts.jsonl"
    target.parent.mkdir(parents=True, exist_ok=True)
    ps.save(target)
    return str(target)


def stage_geometry(cfg: Config, job: Job, folder: Path) -> None:
    module = _load_script(STAGE_SCRIPTS["geometry"])
    g = cfg.geometry
    given: dict[str, Any] = {
        "model": str(job.tuned), "out": str(folder), "seed": cfg.run.seed, "prompts": geometry_prompts(cfg, job.out),
        "layers": g.layers, "tsne_layers": g.tsne_layers, "cv_folds": g.cv_folds, "batch_size": g.batch_size,
        **_model_options(cfg), "threads": cfg.run.threads, "overwrite": bool(_overwrite(folder))}
    if g.directions:
        given["directions"] = ",".join(g.directions)
    if cfg.model.cache_dir:
        given["cache_dir"] = str(_expand(cfg.model.cache_dir))
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
        module = _load_script(STAGE_SCRIPTS[name])
        given = _common(cfg, job, folder)
        if on_stock and job.stock is not None:
            given["model"] = str(job.stock)
        given["quick"] = bool(cfg.run.quick)
        given["overwrite"] = bool(_overwrite(folder, job, name))
        if stock_model and job.stock is not None:
            given["stock_model"] = job.stock
        options = stage_options(name, cfg, **given, **_model_options(cfg))
        if extra is not None and (more := extra(cfg, job)):
            options = dataclasses.replace(options, **more)
        _check_returned(name, _call(name, module, options, job))

    run.__name__ = f"stage_{name}"
    return run


def figure_stage_of(script: Path, module: ModuleType | None = None) -> str:
    """The stage folder a figure script reads: its ``STAGE`` constant, else its file name."""
    stage = getattr(module, "STAGE", None) if module is not None else None
    if isinstance(stage, str):
        return stage
    stem = script.stem
    for prefix, name in (("fig_p1", "p1"), ("fig_p2", "p2"), ("fig_specificity", "specificity")):
        if stem.startswith(prefix):
            return name
    return "geometry"


def stage_figures(cfg: Config, job: Job, folder: Path) -> None:
    from catlens.plotting import static_export_session

    run = RunDir.create(folder, config={"png": cfg.run.png}, overwrite=True, seed=cfg.run.seed)
    written: dict[str, str] = {}
    errors = []
    with static_export_session() if cfg.run.png else contextlib.nullcontext():  # one browser for every PNG
        _draw_figures(cfg, job, folder, written, errors)
    run.update_manifest(figures=written)
    job.figures = written
    if errors:
        raise RuntimeError("figure script(s) failed: " + "; ".join(errors))
    run.finish(n_figures=len(written))


def _draw_figures(cfg: Config, job: Job, folder: Path, written: dict[str, str], errors: list[str]) -> None:
    from tqdm.auto import tqdm

    for script in tqdm(sorted(FIGURES.glob("fig_*.py")), desc="figures", unit="script"):
        module = _load_script(script)
        source = figure_stage_of(script, module)
        src = job.out / source
        if job.status.get(source) not in ("done", "reused"):
            log.info("figure %s skipped: stage %s was not run (%s)", script.stem, source,
                     job.status.get(source, "not in this job"))
            continue
        if script.stem == "fig_model_diff" and not (src / "model_diff.parquet").exists():
            log.info("figure %s skipped: no model diffing in %s (no stock partner)", script.stem, src)
            continue
        try:
            paths = module.main(src, out_dir=folder, png=cfg.run.png)
        except Exception as e:  # noqa: BLE001 - draw the other figures, then fail the stage
            log.exception("figure %s failed", script.stem)
            errors.append(f"{script.stem}: {type(e).__name__}: {e}")
            continue
        written.update({f"{script.stem}:{k}": str(v) for k, v in (paths or {}).items()})


def stage_report(cfg: Config, job: Job, folder: Path) -> dict[str, Any]:
    from catlens.report import build_report

    rep = build_report(job.out)
    log.info("stage report -> %s (%d figures; %s)", rep.path, rep.n_figures,
             ", ".join(f"{s.id} {s.status}" for s in rep.sections if s.status != "ok") or "every section ok")
    return {"status": "done", "folder": rep.path.name}


def _report(run: RunDir) -> None:
    """Rebuild ``report.html`` of a run folder and record the report stage (a failure is logged, never raised)."""
    t = time.perf_counter()
    try:
        info = stage_report(Config(), Job(config=Config(), run=run), run.path)
    except Exception:  # noqa: BLE001 - the results are saved; a broken page must not turn the run into a failure
        log.exception("stage report: report.html could not be built; rerun `catlens report %s`", run.path)
        return
    run.update_manifest(stages={"report": {**info, "seconds": round(time.perf_counter() - t, 1)}})


_DATA_EVAL = ("data.data_dir", "data.per_set", "data.per_category", "model.dtype", "run.seed")
_DATA_SCRIPT = ("data.data_dir", "model.dtype", "run.seed", "run.quick")
STAGES: dict[str, Stage] = {s.name: s for s in (
    Stage("finetune", stage_finetune, self_managed=True, needs_model=False),
    Stage("eval", stage_eval, uses=_DATA_EVAL, script=True),
    Stage("geometry", stage_geometry, script=True,
          uses=("data.data_dir", "data.prompts", "data.prompts_per_group", "model.dtype", "run.seed")),
    Stage("p1", _script_stage("p1", stock_model=True), uses=_DATA_SCRIPT, script=True, resumable=True),
    Stage("p2", _script_stage("p2", stock_model=False, on_stock=True), uses=_DATA_SCRIPT, script=True,
          resumable=True),
    Stage("specificity", _script_stage("specificity", stock_model=False, extra=_p1_policy), deps=("p1",),
          uses=_DATA_SCRIPT, script=True, resumable=True),
    Stage("figures", stage_figures, deps=("geometry", "p1", "p2", "specificity"), uses=("run.png",),
          needs_model=False),
    Stage("report", stage_report, self_managed=True, needs_model=False),
)}
"""The registry, in running order: adding a stage is one entry (and one ``[section]`` in ``catlens.config``)."""

UNAVAILABLE: dict[str, Callable[[Config, Job], str | None]] = {"eval": _eval_unavailable}
"""Per-stage reasons to skip that depend on the job (beyond ``enabled`` and a missing script)."""


# ================================================================================================ runner
def stage_hash(stage: Stage, job: Job, code: bool = True) -> str:
    """sha256 of what determines a stage's result: its section (without ``enabled``), the config keys it reads,
    the tuned and stock models (when it uses a model), the hashes of the stages it depends on and whether they
    finished (a stage that failed and now succeeded reruns its dependants) and (``code``) its script's sha256."""
    cfg = job.config
    body = {k: v for k, v in cfg.to_dict()[stage.name].items() if k != "enabled"}
    payload = {"stage": stage.name, "section": body,
               "uses": {k: _get(cfg, k) for k in stage.uses},
               "deps": {d: [job.hashes.get(d), job.status.get(d) in ("done", "reused")] for d in stage.deps}}
    if stage.needs_model:
        payload["models"] = {"tuned": job.identities.get("tuned"), "stock": job.identities.get("stock")}
    if code:  # an edited script reruns its stage
        payload["code"] = {p.name: sha256_file(p) for p in _code_files(stage)}
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def _code_files(stage: Stage) -> list[Path]:
    if stage.script:
        return [STAGE_SCRIPTS[stage.name]]
    if stage.name == "figures":
        return sorted(FIGURES.glob("fig_*.py"))
    return []


def _stage_record(folder: Path) -> dict[str, Any] | None:
    """The main job's record in a finished stage folder (None when the folder is not done)."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("status") != "done" or not isinstance(manifest.get(STAGE_RECORD), dict):
        return None
    return manifest[STAGE_RECORD]


def _record(job: Job, name: str, **info: Any) -> None:
    job.status[name] = str(info.get("status"))
    job.run.update_manifest(stages={name: info})


def run_stage(stage: Stage, job: Job, position: str = "") -> None:
    cfg = job.config
    name = stage.name
    folder = job.out / name
    section = cfg.section(name)
    prefix = f"stage {position} {name}".replace("  ", " ")
    if not section.enabled:
        log.info("%s: skipped (disabled in the config: %s.enabled = false)", prefix, name)
        _record(job, name, status="skipped: disabled in the config", folder=name)
        job.hashes[name] = None
        return
    if stage.script and not STAGE_SCRIPTS[name].exists():
        reason = f"{STAGE_SCRIPTS[name].name} does not exist yet"
        log.info("%s: skipped (not available: %s)", prefix, reason)
        _record(job, name, status=NOT_AVAILABLE, reason=reason, folder=name)
        job.hashes[name] = None
        return
    if stage.needs_model and job.tuned is None:
        _record(job, name, status="skipped: no tuned model (the finetune stage failed)", folder=name)
        job.hashes[name] = None
        return
    why = UNAVAILABLE[name](cfg, job) if name in UNAVAILABLE else None
    if why is not None:
        log.info("%s: %s", prefix, why)
        _record(job, name, status=why, folder=name)
        job.hashes[name] = None
        return
    t0 = time.perf_counter()
    if stage.self_managed:
        log.info("%s ...", prefix)
        try:
            info = stage.fn(cfg, job, folder) or {}
        except Exception as e:  # noqa: BLE001 - recorded; the independent stages still run
            return _failed(job, name, prefix, e, t0, folder=name)
        info = {"status": "done", "folder": name, **info, "seconds": round(time.perf_counter() - t0, 1)}
        job.hashes[name] = info.get("config_hash")
        if name == "finetune":
            _set_models(job, job.tuned, job.stock)
        log.info("%s: %s (%.1f s)", prefix, info["status"], info["seconds"])
        _record(job, name, **info)
        return
    h = stage_hash(stage, job)
    job.hashes[name] = h
    job.args_hashes[name] = args_hash = stage_hash(stage, job, code=False)
    record = _stage_record(folder)
    if record is not None and record.get("config_hash") == h:
        log.info("%s: already done in %s for the same config, reused", prefix, folder)
        _record(job, name, status="reused", folder=name, seconds=record.get("seconds"), config_hash=h,
                args_hash=args_hash)
        return
    log.info("%s -> %s%s", prefix, folder, " (config changed: rerun)" if record is not None else "")
    _record(job, name, status="running", folder=name, config_hash=h, args_hash=args_hash)  # seen if interrupted
    from catlens.model import LOADS

    n_loads = len(LOADS)
    try:
        stage.fn(cfg, job, folder)
        if _stage_record_status(folder) != "done":
            raise RuntimeError(f"stage {name} returned without finishing its run folder {folder} (its manifest "
                               f"does not say done).")
    except (Exception, SystemExit) as e:  # noqa: BLE001 - recorded; the independent stages still run (a script's
        # SystemExit, its way of saying what to fix, ends its stage, not the job that runs it in this process)
        return _failed(job, name, prefix, e, t0, folder=name, config_hash=h, args_hash=args_hash)
    finally:
        job.loads[name] = {"n": len(LOADS) - n_loads,
                           "seconds": round(sum(x["seconds"] for x in LOADS[n_loads:]), 2)}
    seconds = round(time.perf_counter() - t0, 1)
    RunDir.open(folder).update_manifest(**{STAGE_RECORD: {
        "name": name, "config_hash": h, "seconds": seconds, "section": cfg.to_dict()[name],
        "uses": {k: _get(cfg, k) for k in stage.uses}, "models": {"tuned": job.tuned, "stock": job.stock}}})
    log.info("%s: done (%.1f s; %d model load(s))", prefix, seconds, job.loads[name]["n"])
    _record(job, name, status="done", folder=name, seconds=seconds, config_hash=h, args_hash=args_hash,
            model_loads=job.loads[name])


def _stage_record_status(folder: Path) -> str | None:
    try:
        return json.loads((folder / "manifest.json").read_text()).get("status")
    except (OSError, json.JSONDecodeError):
        return None


def _failed(job: Job, name: str, prefix: str, e: BaseException, t0: float, **info: Any) -> None:
    log.exception("%s failed", prefix)
    message = f"{type(e).__name__}: {e}"
    job.failures[name] = message
    _record(job, name, status=f"failed: {message}"[:500], seconds=round(time.perf_counter() - t0, 1), **info)


# ================================================================================================== main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="TOML or YAML config file (default: built-in defaults, "
                                                             "the same as configs/default.toml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set eval.batch_size=8 --set p1.args.layers=10-20 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (run.out; default runs/main)")
    p.add_argument("--quick", action="store_true", default=None, help="run.quick: quick fine-tune, small evaluation")
    p.add_argument("--stock", action="store_true", default=None,
                   help="run.stock: no fine-tune, study the stock model")
    p.add_argument("--model", default=None, help="model.spec: the tuned model (folder, hub id); skips the fine-tune")
    p.add_argument("--other-model", default=None, help="model.other_model: the stock partner")
    p.add_argument("--device", default=None, help="model.device: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", default=None, help="model.dtype: float32, bfloat16, float16")
    p.add_argument("--cache-dir", default=None, help="model.cache_dir (default: $CATLENS_CACHE or ~/.cache/catlens)")
    p.add_argument("--data-dir", default=None, help="data.data_dir (default: $CATLENS_DATA_DIR or ../shared/data)")
    p.add_argument("--seed", type=int, default=None, help="run.seed (default 0)")
    p.add_argument("--threads", type=int, default=None, help="run.threads (default: $OMP_NUM_THREADS, else torch's)")
    p.add_argument("--no-png", action="store_true", default=None, help="run.png=false: write HTML figures only")
    return p


SHORTHANDS = {"out": "run.out", "quick": "run.quick", "stock": "run.stock", "model": "model.spec",
              "other_model": "model.other_model", "device": "model.device", "dtype": "model.dtype",
              "cache_dir": "model.cache_dir", "data_dir": "data.data_dir", "seed": "run.seed",
              "threads": "run.threads", "no_png": "run.png"}
"""Command-line flag (argparse dest) -> config key."""


def resolve_args(argv: Sequence[str] | None = None) -> Config:
    """The resolved config of a command line (file, shorthands, ``--set``), every stage's ``args`` table checked
    against its script's options; raises :class:`ConfigError`."""
    args = build_parser().parse_args(argv)
    shorthands = []
    for dest, key in SHORTHANDS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        shorthands.append((key, (not value) if dest == "no_png" else value))
    # every stage's args table against its script's options (catlens.stages), before any work or heavy import
    return resolve(args.config, sets=args.set, shorthands=shorthands, checks=(check_stage_args,))


def main(argv: Sequence[str] | None = None, *, share_models: bool = True) -> dict[str, Any]:
    """Run the job of a command line. ``share_models``: one ``catlens.model.ModelPool`` for every stage, so each
    model is loaded once per job (False: each stage loads its own, as separate processes would; the manifest's
    ``model_loads`` tells the two apart)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("kaleido", "choreographer"):  # static export logs every browser step at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = resolve_args(argv)
        from catlens.model import check_device, resolve_dtype

        check_device(cfg.model.device)  # a clear error before any work when e.g. CUDA is absent
        if cfg.model.dtype == "auto":  # resolved once, so the saved config and the stage hashes name the dtype used
            dtype = resolve_dtype("auto", cfg.model.device)
            log.info("model.dtype auto -> %s on %s", dtype, cfg.model.device)
            cfg = cfg.replace(model=dataclasses.replace(cfg.model, dtype=dtype))
    except (ValueError, FileNotFoundError) as e:  # ConfigError, FileFormatError, an absent device
        raise ConfigError(str(e)) from None
    configure_process(threads=cfg.run.threads, seed=cfg.run.seed)  # process-wide threads and seeds: here, once

    out = Path(cfg.run.out).expanduser()
    try:
        previous = json.loads((out / "manifest.json").read_text()).get("stages") or {}
    except (OSError, json.JSONDecodeError):
        previous = {}
    run = RunDir.create(out, config=cfg.to_dict(), resume=True, seed=cfg.run.seed)
    write_text_atomic(run.path / "config.toml", to_toml(cfg, header=(
        "The resolved configuration of this run (analyses/main.py). Rerun it with:\n"
        f"  python analyses/main.py --config {run.path / 'config.toml'}")))
    run.update_manifest(config_hash=cfg.hash, outputs={"config.toml": {
        "sha256": sha256_file(run.path / "config.toml"), "bytes": (run.path / "config.toml").stat().st_size}})
    from catlens.model import LOADS, ModelPool

    job = Job(config=cfg, run=run, previous=previous, models=ModelPool() if share_models else None)
    loads_before = len(LOADS)
    if cfg.run.stock:
        stock = _stock_of(cfg, None)
        _set_models(job, stock, stock)
    elif cfg.model.spec is not None:
        spec = str(Path(cfg.model.spec).expanduser()) if cfg.model.spec.startswith("~") else cfg.model.spec
        _set_models(job, spec, _stock_of(cfg, spec))
    t0 = time.perf_counter()
    names = [n for n in STAGES if n != "report"]
    for i, name in enumerate(names, 1):
        run_stage(STAGES[name], job, f"{i}/{len(STAGES)}")

    summary = _summary(job, time.perf_counter() - t0)
    summary["model_loads"] = _loads(job, LOADS[loads_before:])
    run.update_manifest(model_loads=summary["model_loads"])
    if job.models is not None:
        job.models.clear()  # the stages are done; the report needs no model
    run.save_json("summary", summary)
    if job.failures:
        run.update_manifest(status="failed", failures=job.failures)
    else:
        run.finish(**{k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    if job.figures:
        run.update_manifest(figures=job.figures)
    run_stage(STAGES["report"], job, f"{len(STAGES)}/{len(STAGES)}")
    if "report" in job.failures:
        log.error("report.html could not be built; rerun `catlens report %s`", run.path)
    _print_summary(summary, job)
    blocking = {k: v for k, v in job.failures.items() if k != "report"}
    if blocking:
        raise RuntimeError(f"stage(s) failed: {'; '.join(f'{k}: {v}' for k, v in blocking.items())}. The other "
                           f"stages' results are in {run.path}; fix the cause and rerun the same command (finished "
                           f"stages are reused).")
    return summary


def _loads(job: Job, loads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the manifest records of the job's model loads: every ``load_model`` of the job (count, seconds, per
    model), the per-stage counts and, with a shared pool, its loads and the requests it answered without loading."""
    by_model: dict[str, int] = {}
    for x in loads:
        by_model[x["spec"]] = by_model.get(x["spec"], 0) + 1
    out: dict[str, Any] = {"n": len(loads), "seconds": round(sum(x["seconds"] for x in loads), 2),
                           "by_model": by_model, "shared_pool": job.models is not None,
                           "by_stage": dict(job.loads)}
    if job.models is not None:
        stats = job.models.stats()
        out["pool"] = {"loads": stats["loads"], "hits": stats["hits"], "load_seconds": stats["load_seconds"]}
    return out


def _summary(job: Job, seconds: float) -> dict[str, Any]:
    import pandas as pd

    out = job.out
    summary: dict[str, Any] = {"model": job.tuned, "stock_model": job.stock, "seconds": round(seconds, 1),
                               "config_hash": job.config.hash, "stages": dict(job.status)}
    eval_summary = out / "eval" / "summary.json"
    if job.status.get("eval") in ("done", "reused") and eval_summary.exists():
        summary["finetune_eval"] = json.loads(eval_summary.read_text())
    sep_path = out / "geometry" / "separability.parquet"
    if job.status.get("geometry") in ("done", "reused") and sep_path.exists():
        sep = pd.read_parquet(sep_path)
        best = {}
        for (task, metric), group in sep.groupby(["task", "metric"]):
            if metric in ("probe_accuracy", "probe_auroc", "silhouette"):
                row = group.loc[group["value"].idxmax()]
                best[f"{task}/{metric}"] = {"layer": int(row["layer"]), "value": round(float(row["value"]), 4)}
        summary["best_layers"] = best
    return summary


def _print_summary(summary: dict[str, Any], job: Job) -> None:
    print(f"\ncatlens main job: model {summary['model']} ({summary['seconds']} s) -> {job.out}")
    for name, status in job.status.items():
        print(f"  stage {name:<12} {status}")
    for key, value in summary.get("best_layers", {}).items():
        print(f"  best layer for {key:<40} {value['layer']:>3}  ({value['value']})")
    ev = summary.get("finetune_eval")
    if isinstance(ev, dict):
        for key, value in ev.items():
            if isinstance(value, (int, float, str)):
                print(f"  {key:<55} {value}")


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
