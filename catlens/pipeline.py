"""The machinery of the main job (``analyses/main.py``): a :class:`Pipeline` of :class:`Stage` entries run in order
into one run folder, each stage skipped, reused, resumed or rerun from a hash of what determines its result, its
record in the run folder's manifest, a failed stage recorded while the independent stages still run, the job's
summary and the command line's parser and shorthands. ``analyses/main.py`` is the page that lists the stages and
what each calls; the rules they run under are here.

A stage's hash (:func:`stage_hash`) covers its config section (without ``enabled``), the config keys it reads
(``Stage.uses``), the tuned and stock models (spec, and for a folder the weights' sha256 and fine-tune config hash
its manifest records), the hashes of the stages it depends on and whether they finished, and its code (its script,
or every figure script). A stage whose folder's manifest says done for the same hash is reused; one interrupted (or
failed) with the same configuration resumes without ``overwrite`` (:func:`needs_overwrite`); anything else reruns.

Importing this module touches no disk, network or device; the model, fine-tune, dataset, plotting and report
modules are imported where a stage needs them."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from catlens.config import Config, ConfigError, resolve, to_toml
from catlens.runs import RunDir, configure_process, sha256_file, sha256_text, write_text_atomic
from catlens.stages import STAGE_OPTIONS, check_stage_args, from_mapping

log = logging.getLogger(__name__)
NOT_AVAILABLE = "skipped: not available"
STAGE_RECORD = "main_stage"
"""The key under which the main job records a stage's config hash in the stage folder's manifest."""


# ===================================================================================================== job
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
    """Run from ``Pipeline.scripts[name]``; skipped as not available when that file does not exist."""
    resumable: bool = False
    """The script resumes an interrupted run given the same arguments without ``--overwrite``."""
    draws_figures: bool = False
    """Its code is every figure script of ``Pipeline.figures`` (an edited figure script reruns it)."""
    unavailable: Callable[[Config, Job], str | None] | None = None
    """A reason to skip that depends on the job (beyond ``enabled`` and a missing script), or None to run."""


@dataclass(frozen=True)
class Pipeline:
    """The stages of the main job in running order, and where their code lives."""

    stages: Mapping[str, Stage]
    scripts: Mapping[str, Path]
    """Where each script stage's code lives (read when the stage runs: tests point these elsewhere)."""
    figures: Path
    """The folder of the ``fig_*.py`` scripts."""

    def code_files(self, stage: Stage) -> list[Path]:
        """The files whose sha256 is part of the stage's hash: a script and the recipe modules
        (``catlens.recipes.*``) it imports, or every figure script."""
        if stage.script:
            script = self.scripts[stage.name]
            return [script, *recipe_files(script)]
        if stage.draws_figures:
            return sorted(self.figures.glob("fig_*.py"))
        return []


def recipe_files(script: Path) -> list[Path]:
    """The source files of the ``catlens.recipes`` modules a script imports (read with ``ast``; nothing is run),
    sorted; none for a script that does not exist yet."""
    import ast
    import importlib.util

    if not script.is_file():
        return []
    names: set[str] = set()
    for node in ast.walk(ast.parse(script.read_text(), filename=str(script))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    modules = {".".join(n.split(".")[:3]) for n in names if n.startswith("catlens.recipes.")}  # the recipe module
    specs = [importlib.util.find_spec(m) for m in modules]  # (a name imported from it is not a module of its own)
    return sorted(Path(s.origin) for s in specs if s is not None and s.origin and s.origin.endswith(".py"))


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
    pipeline: Pipeline | None = None
    """The stages this job runs (their scripts' code is part of the stage hashes)."""

    @property
    def out(self) -> Path:
        return self.run.path


# ========================================================================================== stage helpers
def expand(path: str | None) -> str | None:
    """A path from the config with ``~`` expanded (``None`` stays ``None``)."""
    return None if path is None else str(Path(path).expanduser())


def common_options(cfg: Config, job: Job, folder: Path, *, threads: bool = False) -> dict[str, Any]:
    """The options every script stage gets from the job: model, out, seed, data folder (and threads)."""
    given: dict[str, Any] = {"model": str(job.tuned), "out": str(folder), "seed": cfg.run.seed}
    if cfg.data.data_dir:
        given["data_dir"] = str(expand(cfg.data.data_dir))
    if threads and cfg.run.threads is not None:
        given["threads"] = cfg.run.threads
    return given


def model_options(cfg: Config) -> dict[str, Any]:
    """The device and dtype of ``[model]``, as stage options."""
    return {"device": cfg.model.device, "dtype": cfg.model.dtype}


def stage_options(name: str, cfg: Config, **given: Any) -> Any:
    """The typed options of script stage ``name``: the values the job passes (``given``) under the stage's
    ``args`` table (the table wins, as it did when it came last on the command line), checked by
    :func:`catlens.stages.from_mapping`."""
    return from_mapping(STAGE_OPTIONS[name], cfg.section(name).args, where=f"{name}.args", **given)


def needs_overwrite(folder: Path, job: Job | None = None, stage: Stage | None = None) -> bool:
    """Whether a script stage runs with ``overwrite``: when its folder is not empty (the main job reruns a stage
    only when it is not done for the current config), except that a resumable ``stage`` of ``job`` interrupted (or
    failed) with the same configuration resumes (also after its code was edited: the script checks its own
    arguments)."""
    if not (folder.exists() and any(folder.iterdir())):
        return False
    if job is not None and stage is not None and stage.resumable:
        before = job.previous.get(stage.name) or {}
        status = str(before.get("status"))
        unfinished = status == "running" or status.startswith("failed")
        if unfinished and before.get("args_hash") is not None and before["args_hash"] == job.args_hashes.get(
                stage.name):
            log.info("stage %s: resuming the interrupted run in %s (same configuration)", stage.name, folder)
            return False
    return True


def check_returned(name: str, value: Any) -> None:
    """A script's ``run()`` returning a non-zero exit code fails its stage."""
    if isinstance(value, int) and not isinstance(value, bool) and value != 0:
        raise RuntimeError(f"stage {name}: the script's run() returned exit code {value}.")


def config_value(cfg: Config, key: str) -> Any:
    """The value of ``section.field`` (a mapping as a plain dict)."""
    section, name = key.split(".", 1)
    value = getattr(cfg.section(section), name)
    return dict(value) if hasattr(value, "items") else value


# ======================================================================================= models, fine-tune
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


def stock_of(cfg: Config, tuned_folder: str | None) -> str | None:
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


def set_models(job: Job, tuned: str | None, stock: str | None) -> None:
    """The job's tuned and stock models, and what identifies them for the stage hashes."""
    job.tuned, job.stock = tuned, stock
    job.identities = {"tuned": _identity(tuned), "stock": _identity(stock)}


def ensure_finetune(cfg: Config, job: Job) -> dict[str, Any]:
    """Train, or reuse from the model cache, the fine-tune of ``[finetune]``; the job's models become it and its
    stock partner (:func:`set_models`). The stage record: ``reused`` when the cache held it for the same config."""
    from catlens.finetune import default_name, ensure_refusal_model, read_manifest
    from catlens.model import cache_dir

    config = finetune_config(cfg)
    cache, data_dir = expand(cfg.model.cache_dir), expand(cfg.data.data_dir)
    target = cache_dir(cache) / "finetunes" / default_name(config)
    cached = read_manifest(target) if target.is_dir() else None
    tuned = str(ensure_refusal_model(config, cache, data_dir=data_dir))
    set_models(job, tuned, stock_of(cfg, tuned))
    reused = cached is not None and cached.get("config_hash") == config.hash
    return {"status": "reused" if reused else "done", "folder": job.tuned, "config_hash": config.hash}


# ================================================================================== geometry, figures, report
def geometry_prompts(cfg: Config, out: Path) -> str:
    """The prompt set the geometry stage reads: ``data.prompts`` as given, or, with ``data.prompts_per_group``
    (or a dataset read from ``data.data_dir``), a seeded sample of at most that many prompts per (label, category,
    split) written to ``<out>/inputs/geometry_prompts.jsonl``."""
    from catlens.datasets import DATASETS, load_prompts

    spec = cfg.data.prompts
    if cfg.data.prompts_per_group is None and not (cfg.data.data_dir and spec in DATASETS):
        return spec
    ps = load_prompts(spec, data_dir=expand(cfg.data.data_dir))
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


def draw_figures(scripts: Sequence[Path], load: Callable[[Path], Any], cfg: Config, job: Job, folder: Path) -> None:
    """The figures stage: each figure script (``load(path)`` gives its module; the library runs no file by path)
    called as ``main(<its stage folder>, out_dir=folder, png=run.png)``, one browser for every PNG; a figure whose
    stage did not run is skipped, a failed one fails the stage after the others are drawn."""
    from catlens.plotting import static_export_session

    run = RunDir.create(folder, config={"png": cfg.run.png}, overwrite=True, seed=cfg.run.seed)
    written: dict[str, str] = {}
    errors: list[str] = []
    with static_export_session() if cfg.run.png else contextlib.nullcontext():  # one browser for every PNG
        _draw_figures(scripts, load, cfg, job, folder, written, errors)
    run.update_manifest(figures=written)
    job.figures = written
    if errors:
        raise RuntimeError("figure script(s) failed: " + "; ".join(errors))
    run.finish(n_figures=len(written))


def _draw_figures(scripts: Sequence[Path], load: Callable[[Path], Any], cfg: Config, job: Job, folder: Path,
                  written: dict[str, str], errors: list[str]) -> None:
    from tqdm.auto import tqdm

    for script in tqdm(scripts, desc="figures", unit="script"):
        module = load(script)
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


def build_report_stage(cfg: Config, job: Job, folder: Path) -> dict[str, Any]:
    """The report stage: ``<out>/report.html`` from the run folder's saved tables (:func:`catlens.report.build_report`,
    rebuilt every time)."""
    from catlens.report import build_report

    rep = build_report(job.out)
    log.info("stage report -> %s (%d figures; %s)", rep.path, rep.n_figures,
             ", ".join(f"{s.id} {s.status}" for s in rep.sections if s.status != "ok") or "every section ok")
    return {"status": "done", "folder": rep.path.name}


def rebuild_report(run: RunDir) -> None:
    """Rebuild ``report.html`` of a run folder and record the report stage (a failure is logged, never raised)."""
    t = time.perf_counter()
    try:
        info = build_report_stage(Config(), Job(config=Config(), run=run), run.path)
    except Exception:  # noqa: BLE001 - the results are saved; a broken page must not turn the run into a failure
        log.exception("stage report: report.html could not be built; rerun `catlens report %s`", run.path)
        return
    run.update_manifest(stages={"report": {**info, "seconds": round(time.perf_counter() - t, 1)}})


# ================================================================================================ runner
def stage_hash(stage: Stage, job: Job, code: bool = True) -> str:
    """sha256 of what determines a stage's result: its section (without ``enabled``), the config keys it reads,
    the tuned and stock models (when it uses a model), the hashes of the stages it depends on and whether they
    finished (a stage that failed and now succeeded reruns its dependants) and (``code``) its code's sha256 (the
    files :meth:`Pipeline.code_files` names; needs ``job.pipeline``)."""
    cfg = job.config
    body = {k: v for k, v in cfg.to_dict()[stage.name].items() if k != "enabled"}
    payload = {"stage": stage.name, "section": body,
               "uses": {k: config_value(cfg, k) for k in stage.uses},
               "deps": {d: [job.hashes.get(d), job.status.get(d) in ("done", "reused")] for d in stage.deps}}
    if stage.needs_model:
        payload["models"] = {"tuned": job.identities.get("tuned"), "stock": job.identities.get("stock")}
    if code:  # an edited script reruns its stage
        if job.pipeline is None:
            raise ValueError("stage_hash(code=True) needs job.pipeline (where the stage's code lives)")
        payload["code"] = {f"{p.parent.name}/{p.name}": sha256_file(p) for p in job.pipeline.code_files(stage)}
    return sha256_text(json.dumps(payload, sort_keys=True, default=str))


def _manifest_of(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def stage_record(folder: Path) -> dict[str, Any] | None:
    """The main job's record in a finished stage folder (None when the folder is not done)."""
    manifest = _manifest_of(folder)
    if manifest is None or manifest.get("status") != "done" or not isinstance(manifest.get(STAGE_RECORD), dict):
        return None
    return manifest[STAGE_RECORD]


def _record(job: Job, name: str, **info: Any) -> None:
    job.status[name] = str(info.get("status"))
    job.run.update_manifest(stages={name: info})


def _skip_reason(stage: Stage, job: Job) -> tuple[str, str, dict[str, Any]] | None:
    """``(log line, status, extra record)`` when the stage does not run, else None."""
    name, cfg = stage.name, job.config
    if not cfg.section(name).enabled:
        return (f"skipped (disabled in the config: {name}.enabled = false)", "skipped: disabled in the config", {})
    if stage.script:
        script = job.pipeline.scripts[name] if job.pipeline is not None else None
        if script is None or not script.exists():
            reason = f"{script.name if script is not None else name} does not exist yet"
            return f"skipped (not available: {reason})", NOT_AVAILABLE, {"reason": reason}
    if stage.needs_model and job.tuned is None:
        return "", "skipped: no tuned model (the finetune stage failed)", {}
    why = stage.unavailable(cfg, job) if stage.unavailable is not None else None
    return (why, why, {}) if why is not None else None


def run_stage(stage: Stage, job: Job, position: str = "") -> None:
    """Run one stage into ``<out>/<name>`` and record it (skipped, reused, done or failed) in the job and its
    manifest; an exception (or a script's SystemExit) is recorded, never raised."""
    cfg = job.config
    name = stage.name
    folder = job.out / name
    prefix = f"stage {position} {name}".replace("  ", " ")
    skip = _skip_reason(stage, job)
    if skip is not None:
        line, status, extra = skip
        if line:
            log.info("%s: %s", prefix, line)
        _record(job, name, status=status, **extra, folder=name)
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
        log.info("%s: %s (%.1f s)", prefix, info["status"], info["seconds"])
        _record(job, name, **info)
        return
    h = stage_hash(stage, job)
    job.hashes[name] = h
    job.args_hashes[name] = args_hash = stage_hash(stage, job, code=False)
    record = stage_record(folder)
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
        if (_manifest_of(folder) or {}).get("status") != "done":
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
        "uses": {k: config_value(cfg, k) for k in stage.uses}, "models": {"tuned": job.tuned, "stock": job.stock}}})
    log.info("%s: done (%.1f s; %d model load(s))", prefix, seconds, job.loads[name]["n"])
    _record(job, name, status="done", folder=name, seconds=seconds, config_hash=h, args_hash=args_hash,
            model_loads=job.loads[name])


def _failed(job: Job, name: str, prefix: str, e: BaseException, t0: float, **info: Any) -> None:
    log.exception("%s failed", prefix)
    message = f"{type(e).__name__}: {e}"
    job.failures[name] = message
    _record(job, name, status=f"failed: {message}"[:500], seconds=round(time.perf_counter() - t0, 1), **info)


# ============================================================================================ command line
def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The main job's command line: ``--config``, ``--set`` and the shorthands of :data:`SHORTHANDS`."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def resolve_args(argv: Sequence[str] | None = None, description: str | None = None) -> Config:
    """The resolved config of a command line (file, shorthands, ``--set``), every stage's ``args`` table checked
    against its script's options; raises :class:`ConfigError`. ``description``: the ``--help`` text."""
    args = build_parser(description).parse_args(argv)
    shorthands = []
    for dest, key in SHORTHANDS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        shorthands.append((key, (not value) if dest == "no_png" else value))
    # every stage's args table against its script's options (catlens.stages), before any work or heavy import
    return resolve(args.config, sets=args.set, shorthands=shorthands, checks=(check_stage_args,))


def job_config(argv: Sequence[str] | None = None, description: str | None = None) -> Config:
    """:func:`resolve_args`, the device checked and ``model.dtype = "auto"`` resolved (so the saved config and the
    stage hashes name the dtype used); every error of the configuration is a :class:`ConfigError`."""
    try:
        cfg = resolve_args(argv, description)
        from catlens.model import check_device, resolve_dtype

        check_device(cfg.model.device)  # a clear error before any work when e.g. CUDA is absent
        if cfg.model.dtype == "auto":
            dtype = resolve_dtype("auto", cfg.model.device)
            log.info("model.dtype auto -> %s on %s", dtype, cfg.model.device)
            cfg = cfg.replace(model=dataclasses.replace(cfg.model, dtype=dtype))
    except (ValueError, FileNotFoundError) as e:  # ConfigError, FileFormatError, an absent device
        raise ConfigError(str(e)) from None
    return cfg


def configure_logging() -> None:
    """INFO to stderr, without the static export's per-step messages."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("kaleido", "choreographer"):  # static export logs every browser step at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ================================================================================================ the job
def run_job(cfg: Config, pipeline: Pipeline, *, share_models: bool = True) -> dict[str, Any]:
    """Run every stage of ``pipeline`` into ``run.out`` (the report last, after the summary), then raise
    ``RuntimeError`` naming the failed stages (the report's failure is logged, not raised). ``share_models``: one
    ``catlens.model.ModelPool`` for every stage (False: each stage loads its own)."""
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

    job = Job(config=cfg, run=run, previous=previous, models=ModelPool() if share_models else None,
              pipeline=pipeline)
    loads_before = len(LOADS)
    if cfg.run.stock:
        stock = stock_of(cfg, None)
        set_models(job, stock, stock)
    elif cfg.model.spec is not None:
        spec = str(Path(cfg.model.spec).expanduser()) if cfg.model.spec.startswith("~") else cfg.model.spec
        set_models(job, spec, stock_of(cfg, spec))
    t0 = time.perf_counter()
    stages = pipeline.stages
    names = [n for n in stages if n != "report"]
    for i, name in enumerate(names, 1):
        run_stage(stages[name], job, f"{i}/{len(stages)}")

    summary = job_summary(job, time.perf_counter() - t0)
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
    if "report" in stages:
        run_stage(stages["report"], job, f"{len(stages)}/{len(stages)}")
    if "report" in job.failures:
        log.error("report.html could not be built; rerun `catlens report %s`", run.path)
    print_summary(summary, job)
    blocking = {k: v for k, v in job.failures.items() if k != "report"}
    if blocking:
        raise RuntimeError(f"stage(s) failed: {'; '.join(f'{k}: {v}' for k, v in blocking.items())}. The other "
                           f"stages' results are in {run.path}; fix the cause and rerun the same command (finished "
                           f"stages are reused).")
    return summary


def _loads(job: Job, loads: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What the manifest records of the job's model loads: every ``load_model`` of the job (count, seconds, per
    model), the per-stage counts and, with a shared pool, its loads (plain Hugging Face copies included, also counted
    on their own) and the requests it answered without loading."""
    by_model: dict[str, int] = {}
    for x in loads:
        by_model[x["spec"]] = by_model.get(x["spec"], 0) + 1
    out: dict[str, Any] = {"n": len(loads), "seconds": round(sum(x["seconds"] for x in loads), 2),
                           "by_model": by_model, "shared_pool": job.models is not None,
                           "by_stage": dict(job.loads)}
    if job.models is not None:
        stats = job.models.stats()
        out["pool"] = {"loads": stats["loads"], "plain_copies": stats["plain_copies"], "hits": stats["hits"],
                       "load_seconds": stats["load_seconds"]}
    return out


def job_summary(job: Job, seconds: float) -> dict[str, Any]:
    """``summary.json`` of the job: the models, seconds, config hash, every stage's status, the fine-tune
    evaluation's summary and the best layer per geometry task and metric."""
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


def print_summary(summary: dict[str, Any], job: Job) -> None:
    """The job's summary on stdout: every stage's status, the best layers and the evaluation's numbers."""
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
