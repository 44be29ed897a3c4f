"""Anisotropy of the activations by layer: mean pairwise cosine, top-1/top-10 variance share, effective rank,
log10 condition number (on the data span), mean-norm ratio and the largest single-dimension share of the norm; one line
per prompt subset (all / harmful / benign).

Usage:  python figures/fig_anisotropy.py RUN_DIR [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/anisotropy.parquet (analyses/geometry.py; definitions in catlens/geometry.py)
Writes: DIR/fig_anisotropy.html, .csv, .png; DIR defaults to figures/out/<run name>/
"""

import argparse
from pathlib import Path

from catlens import plotting
from catlens.figures.anisotropy import make_figure, plotted
from catlens.runs import load_table


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True) -> dict[str, Path]:
    table = load_table(Path(run_dir) / "anisotropy")
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / Path(run_dir).name
    return plotting.save_figure(make_figure(table), out / "fig_anisotropy", data=plotted(table),
                                formats=("png",) if png else ())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args()
    main(a.run_dir, a.out_dir, png=not a.no_png)
