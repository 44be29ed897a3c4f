"""Static figure export: every figure script of a main-job run folder drawn with PNGs, one browser per figure (what
kaleido does by default) vs one browser for all of them (:func:`catlens.plotting.static_export_session`, what the
main job's figures stage uses). Needs a Chromium (``apt-get install -y chromium``).

Usage:
    python bench/bench_figures.py runs/main [--out runs/bench-figures]
Writes <out>/manifest.json and figures.csv (+ parquet) and prints them; the PNGs go to <out>/per_figure and
<out>/session.
"""

import argparse
import contextlib
import importlib.util
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a main-job run folder (analyses/main.py --out ...) with its stage folders")
    p.add_argument("--out", default="runs/bench-figures")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    import pandas as pd

    from catlens.plotting import static_export_available, static_export_session
    from catlens.runs import RunDir

    if not static_export_available():
        p.error("no Chrome/Chromium for kaleido: install one (apt-get install -y chromium) to export PNGs.")
    from catlens.pipeline import figure_stage_of

    spec = importlib.util.spec_from_file_location("catlens_main", REPO / "analyses" / "main.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)  # the main job's page: its FIGURES folder and its one script loader
    src_root = Path(args.run)
    run = RunDir.create(args.out, config=vars(args), overwrite=args.overwrite)

    def draw(dst: Path) -> int:
        n = 0
        for script in sorted(job.FIGURES.glob("fig_*.py")):
            module = job.load_script(script)
            src = src_root / figure_stage_of(script, module)
            if not src.is_dir():
                continue
            paths = module.main(src, out_dir=dst, png=True)
            n += sum(1 for v in (paths or {}).values() if str(v).endswith(".png"))
        return n

    rows = []
    for what, session in (("one browser per figure", contextlib.nullcontext), ("one browser for all", 
                                                                                 static_export_session)):
        t0 = time.perf_counter()
        with session():
            n = draw(run.path / ("session" if session is static_export_session else "per_figure"))
        rows.append({"export": what, "pngs": n, "seconds": time.perf_counter() - t0})
    table = pd.DataFrame(rows)
    table["speedup"] = table.seconds.iloc[0] / table.seconds
    run.save_table("figures", table)
    run.finish(speedup=float(table.speedup.iloc[1]))
    print(table.round(2).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
