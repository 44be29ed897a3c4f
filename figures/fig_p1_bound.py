"""What bounds P1's result: the chosen setting's test frontier with the unsteered, chosen, oracle-gate and
best-side-per-row points, beside the gate's test ROC with the chosen thresholds marked
(:mod:`catlens.figures.p1_bound`).

Usage:  python figures/fig_p1_bound.py RUN_DIR [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/bound.parquet, RUN_DIR/test_frontier.parquet, RUN_DIR/gate_roc.parquet (analyses/p1_steering.py)
Writes: DIR/fig_p1_bound.html/.csv/.png (the CSV: the bound table); DIR defaults to figures/out/<run name>/;
        nothing (the reason logged) when the run has no bound table
"""

import logging
from pathlib import Path

from catlens import plotting
from catlens.figures.p1_bound import bound_figure
from catlens.runs import load_table

STAGE = "p1"
log = logging.getLogger("figures.fig_p1_bound")


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True) -> dict[str, Path]:
    run_dir = Path(run_dir)
    if not (run_dir / "bound.parquet").exists():
        log.info("fig_p1_bound skipped: %s has no bound table (no global categorical policy was chosen, or the run "
                 "predates it)", run_dir)
        return {}
    bound = load_table(run_dir / "bound")
    fig = bound_figure(bound, load_table(run_dir / "test_frontier"), load_table(run_dir / "gate_roc"))
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / run_dir.name
    return plotting.save_figure(fig, out / "fig_p1_bound", data=bound, formats=("png",) if png else ())


if __name__ == "__main__":
    plotting.figure_cli(main, __doc__)
