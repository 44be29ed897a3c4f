"""The main job on the embedded default model: P1 in miniature, end to end.

Usage:
    python analyses/main.py --out runs/main                # what `make demo` runs
    python analyses/main.py --out runs/main-quick --quick  # minutes: quick fine-tune, fewer eval prompts
    python analyses/main.py --out runs/main-stock --stock  # no fine-tune: geometry of the stock model only

Stages (each writes its own run folder under --out with its own manifest; a finished stage is skipped when the
command is run again, so an interrupted job resumes where it stopped, and the fine-tune resumes from its last
checkpoint):

1. ``finetune``  train, or reuse from the model cache, the refusal-token fine-tune of SmolLM2-135M-Instruct
                 (``catlens.finetune.ensure_refusal_model``; config ``default`` or ``quick``);
2. ``eval``      ``analyses/finetune_eval.py``: held-out refusal, category accuracy, over-refusal, AUROC, fluency;
3. ``geometry``  ``analyses/geometry.py`` on the tuned model over the built-in prompts, all layers, with the stock
                 model as the model-diffing partner;
4. ``figures``   every ``figures/fig_*.py`` on the geometry run (HTML, plus PNG when Chromium is installed);
5. ``report``    ``catlens.report.build_report``: <out>/report.html, one self-contained page from the saved tables
                 (rebuilt every time; the same as ``catlens report <out>``).

Writes: <out>/manifest.json, <out>/summary.json, <out>/report.html and the stage folders eval/, geometry/,
figures/.
"""

import argparse
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from catlens.runs import RunDir, configure_process

log = logging.getLogger("analyses.main")
HERE = Path(__file__).resolve().parent
FIGURES = HERE.parent / "figures"


def _load_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"catlens_script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _done(folder: Path) -> bool:
    manifest = folder / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text()).get("status") == "done"


def _stage(name: str, folder: Path, run: RunDir, fn: Any) -> None:
    if _done(folder):
        log.info("stage %s: already done in %s, skipped", name, folder)
        return
    log.info("stage %s -> %s", name, folder)
    t0 = time.perf_counter()
    fn()
    run.update_manifest(stages={name: {"folder": str(folder.relative_to(run.path)),
                                       "seconds": round(time.perf_counter() - t0, 1)}})


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/main"))
    p.add_argument("--quick", action="store_true", help="quick fine-tune and a small evaluation (minutes)")
    p.add_argument("--stock", action="store_true", help="skip fine-tuning; study the stock model")
    p.add_argument("--cache-dir", default=None, help="model cache (default: $CATLENS_CACHE or ~/.cache/catlens)")
    p.add_argument("--data-dir", default=None, help="benchmark data (default: $CATLENS_DATA_DIR or ../shared/data)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS, else torch's)")
    p.add_argument("--no-png", action="store_true", help="write HTML figures only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("kaleido", "choreographer"):  # static export logs every browser step at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_process(threads=args.threads, seed=args.seed)  # process-wide threads and seeds: here, once

    run = RunDir.create(args.out, config=vars(args), resume=True, seed=args.seed)
    t0 = time.perf_counter()
    config = "quick" if args.quick else "default"

    if args.stock:
        from catlens.model import DEFAULT_MODEL

        model_spec = DEFAULT_MODEL
    else:
        from catlens.finetune import ensure_refusal_model

        t = time.perf_counter()
        model_spec = str(ensure_refusal_model(config, cache=args.cache_dir, data_dir=args.data_dir))
        run.update_manifest(stages={"finetune": {"folder": model_spec, "seconds": round(time.perf_counter() - t, 1)}})
        eval_dir = args.out / "eval"
        finetune_eval = _load_script(HERE / "finetune_eval.py")
        eval_argv = ["--model", model_spec, "--config", config, "--out", str(eval_dir), "--seed", str(args.seed)]
        eval_argv += ["--per-category", "10"] if args.quick else []
        eval_argv += ["--data-dir", args.data_dir] if args.data_dir else []
        eval_argv += ["--cache-dir", args.cache_dir] if args.cache_dir else []
        _stage("eval", eval_dir, run, lambda: finetune_eval.main(eval_argv + (["--overwrite"] if eval_dir.exists()
                                                                                  else [])))

    geometry_dir = args.out / "geometry"
    geometry = _load_script(HERE / "geometry.py")
    geo_argv = ["--model", model_spec, "--out", str(geometry_dir), "--seed", str(args.seed)]
    geo_argv += [] if args.stock else ["--other-model", "smollm2-135m-instruct"]
    _stage("geometry", geometry_dir, run,
           lambda: geometry.main(geometry.parse_args(geo_argv + (["--overwrite"] if geometry_dir.exists() else []))))

    figure_dir = args.out / "figures"
    written: dict[str, str] = {}
    for script in sorted(FIGURES.glob("fig_*.py")):
        if script.stem == "fig_model_diff" and args.stock:
            continue
        module = _load_script(script)
        paths = module.main(geometry_dir, out_dir=figure_dir, png=not args.no_png)
        written.update({f"{script.stem}:{k}": str(v) for k, v in (paths or {}).items()})
    run.update_manifest(figures=written)

    summary = _summary(args.out, model_spec, time.perf_counter() - t0)
    run.save_json("summary", summary)
    run.finish(**{k: v for k, v in summary.items() if not isinstance(v, (dict, list))})
    _report(run)
    _print_summary(summary)
    return summary


def _report(run: RunDir) -> None:
    """The final, cheap stage: rebuild report.html from the tables (never fails the job; a failure is logged)."""
    from catlens.report import build_report

    t = time.perf_counter()
    try:
        rep = build_report(run.path)
    except Exception:  # noqa: BLE001 - the results are saved; a broken page must not turn the run into a failure
        log.exception("stage report: report.html could not be built; rerun `catlens report %s`", run.path)
        return
    run.update_manifest(stages={"report": {"folder": rep.path.name, "seconds": round(time.perf_counter() - t, 1)}})
    log.info("stage report -> %s (%d figures; %s)", rep.path, rep.n_figures,
             ", ".join(f"{s.id} {s.status}" for s in rep.sections if s.status != "ok") or "every section ok")


def _summary(out: Path, model_spec: str, seconds: float) -> dict[str, Any]:
    import pandas as pd

    summary: dict[str, Any] = {"model": model_spec, "seconds": round(seconds, 1)}
    eval_summary = out / "eval" / "summary.json"
    if eval_summary.exists():
        summary["finetune_eval"] = json.loads(eval_summary.read_text())
    sep_path = out / "geometry" / "separability.parquet"
    if sep_path.exists():
        sep = pd.read_parquet(sep_path)
        best = {}
        for (task, metric), group in sep.groupby(["task", "metric"]):
            if metric in ("probe_accuracy", "probe_auroc", "silhouette"):
                row = group.loc[group["value"].idxmax()]
                best[f"{task}/{metric}"] = {"layer": int(row["layer"]), "value": round(float(row["value"]), 4)}
        summary["best_layers"] = best
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    print(f"\ncatlens main job: model {summary['model']} ({summary['seconds']} s)")
    for key, value in summary.get("best_layers", {}).items():
        print(f"  best layer for {key:<40} {value['layer']:>3}  ({value['value']})")
    ev = summary.get("finetune_eval")
    if isinstance(ev, dict):
        for key, value in ev.items():
            if isinstance(value, (int, float, str)):
                print(f"  {key:<55} {value}")


if __name__ == "__main__":
    main()
