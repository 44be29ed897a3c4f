"""PCA and t-SNE projections of the activations, coloured by harm category (benign prompts in one colour when
the run projected all prompts), one panel per layer (rows: method).

Usage:  python figures/fig_projection.py RUN_DIR [--layers 7,15,22,29] [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/projections.parquet (analyses/geometry.py)
Writes: DIR/fig_projection.html, .csv, .png; DIR defaults to figures/out/<run name>/
Default layers: those with a t-SNE projection (else four evenly spaced PCA layers).
"""

import argparse
from pathlib import Path

from catlens import plotting
from catlens.figures.projection import make_figure, select
from catlens.runs import load_table


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True,
         layers: list[int] | None = None) -> dict[str, Path]:
    table = load_table(Path(run_dir) / "projections")
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / Path(run_dir).name
    return plotting.save_figure(make_figure(table, layers), out / "fig_projection", data=select(table, layers),
                                formats=("png",) if png else ())


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--layers", default=None, help="comma-separated layers")
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args()
    main(a.run_dir, a.out_dir, png=not a.no_png,
         layers=[int(x) for x in a.layers.split(",")] if a.layers else None)
