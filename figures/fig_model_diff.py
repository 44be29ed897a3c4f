"""Model diffing (P1, PAPERS.md §2.3 E): cosine between the two models' direction for each category, as bars at
one layer (one colour per direction set), plus the per-layer curves.

Usage:  python figures/fig_model_diff.py RUN_DIR [--layer L] [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/model_diff.parquet (analyses/geometry.py with --other-model or --other-acts)
Writes: DIR/fig_model_diff.html/.csv/.png and DIR/fig_model_diff_by_layer.html/.csv/.png;
        DIR defaults to figures/out/<run name>/
Default layer: the layer where the two models' directions differ most (lowest mean cosine).
"""

import argparse
from pathlib import Path

from catlens import plotting
from catlens.figures.model_diff import at_layer, make_figure, make_layer_figure
from catlens.runs import load_table


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True, layer: int | None = None) -> dict[str, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "model_diff.parquet").exists():
        raise FileNotFoundError(f"{str(run_dir)!r} has no model_diff table; run analyses/geometry.py with "
                                f"--other-model (or --other-acts) first.")
    table = load_table(run_dir / "model_diff")
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / run_dir.name
    fmt = ("png",) if png else ()
    written = plotting.save_figure(make_figure(table, layer), out / "fig_model_diff", data=at_layer(table, layer)[0],
                                   formats=fmt)
    more = plotting.save_figure(make_layer_figure(table), out / "fig_model_diff_by_layer", data=table, formats=fmt)
    return {**written, **{f"by_layer_{k}": v for k, v in more.items()}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--layer", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args()
    main(a.run_dir, a.out_dir, png=not a.no_png, layer=a.layer)
