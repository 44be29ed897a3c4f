"""Inter-category cosine structure of one direction set at one layer, as heatmaps: raw, whitened (cos(Wv_i, Wv_j)),
P1's orthonormal basis used verbatim (identity by construction) and that basis mapped back to the residual stream
(W^-1 Q, which is not Euclidean-orthogonal). A second figure gives the mean off-diagonal cosine by layer.

Usage:  python figures/fig_cosine.py RUN_DIR [--direction one_vs_benign] [--layer L] [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/cosine.parquet, RUN_DIR/separability.parquet (to choose the default layer)
Writes: DIR/fig_cosine.html/.csv/.png and DIR/fig_cosine_by_layer.html/.csv/.png;
        DIR defaults to figures/out/<run name>/
Default layer: the layer where harm categories are best separated (highest silhouette of the harmful_category
task), else the middle layer.
"""

import argparse
from pathlib import Path

from catlens import plotting
from catlens.figures.cosine import by_layer, default_layer, make_figure, make_layer_figure, select
from catlens.runs import load_table


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True, direction: str | None = None,
         layer: int | None = None) -> dict[str, Path]:
    run_dir = Path(run_dir)
    cosine = load_table(run_dir / "cosine")
    sep = load_table(run_dir / "separability") if (run_dir / "separability.parquet").exists() else None
    direction = direction or ("one_vs_benign" if "one_vs_benign" in set(cosine["direction"])
                              else sorted(cosine["direction"].unique())[0])
    layer = default_layer(cosine, sep) if layer is None else layer
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / run_dir.name
    fmt = ("png",) if png else ()
    written = plotting.save_figure(make_figure(cosine, direction, layer), out / "fig_cosine",
                                   data=select(cosine, direction, layer), formats=fmt)
    more = plotting.save_figure(make_layer_figure(cosine), out / "fig_cosine_by_layer", data=by_layer(cosine),
                                formats=fmt)
    return {**written, **{f"by_layer_{k}": v for k, v in more.items()}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--direction", default=None)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args()
    main(a.run_dir, a.out_dir, png=not a.no_png, direction=a.direction, layer=a.layer)
