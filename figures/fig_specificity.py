"""Category specificity of steering as heatmaps: cell (i, j) is the change in refusal rate on prompts of category j
(columns) when steering with direction i (rows) at the run's scale; one panel per variant (raw, orthogonalised,
control) and (set, sign), the diagonal outlined, the summary (mean diagonal / mean off-diagonal effect, with its
bootstrap interval) in each panel's title. A second figure shows the refusal-score change (less saturated).

Usage:  python figures/fig_specificity.py RUN_DIR [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/specificity.parquet, RUN_DIR/summary.parquet (written by analyses/specificity.py)
Writes: DIR/fig_specificity.html/.csv/.png and DIR/fig_specificity_score.html/.csv/.png;
        DIR defaults to figures/out/<run name>/
"""

import argparse
from pathlib import Path

from catlens import plotting
from catlens.figures.specificity import make_figure, panel_data
from catlens.runs import load_table


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True) -> dict[str, Path]:
    run_dir = Path(run_dir)
    cells = load_table(run_dir / "specificity")
    summary = load_table(run_dir / "summary")
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / run_dir.name
    fmt = ("png",) if png else ()
    written = plotting.save_figure(make_figure(cells, summary, "rate"), out / "fig_specificity",
                                   data=panel_data(cells, summary, "rate"), formats=fmt)
    more = plotting.save_figure(make_figure(cells, summary, "score"), out / "fig_specificity_score",
                                data=panel_data(cells, summary, "score"), formats=fmt)
    return {**written, **{f"score_{k}": v for k, v in more.items()}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args()
    main(a.run_dir, a.out_dir, png=not a.no_png)
