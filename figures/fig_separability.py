"""Separability of harmful vs benign prompts and of harm categories, by layer (probe accuracy / AUROC, silhouette,
Davies-Bouldin, Fisher ratio), one line per task.

Usage:  python figures/fig_separability.py RUN_DIR [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/separability.parquet (analyses/geometry.py)
Writes: DIR/fig_separability.html, .csv (the plotted rows), .png; DIR defaults to figures/out/<run name>/
"""

import argparse
from pathlib import Path

from catlens import plotting
from catlens.figures.separability import METRICS, make_figure
from catlens.runs import load_table


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True) -> dict[str, Path]:
    table = load_table(Path(run_dir) / "separability")
    data = table[table["metric"].isin(METRICS)]
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / Path(run_dir).name
    return plotting.save_figure(make_figure(table), out / "fig_separability", data=data,
                                formats=("png",) if png else ())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args()
    main(a.run_dir, a.out_dir, png=not a.no_png)
