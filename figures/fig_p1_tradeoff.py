"""P1 Figure 1: over-refusal (x) against refusal (y) on the test sets, one point per policy (unsteered, categorical
with each gate rule, low-rank, ...), with Wilson 95 % intervals both ways and the desirable region shaded; and the
validation sweep cloud behind the choice (every method x layer x toward x away x gate-rule setting, the chosen
settings marked).

Usage:  python figures/fig_p1_tradeoff.py RUN_DIR [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/headline.parquet (pooled over-refusal over XSTest safe, CoCoNot contrast, JBB benign and the built-in
        lookalikes; pooled refusal over the harmful sets; Wilson intervals; targets), and, for the cloud,
        RUN_DIR/sweep.parquet and RUN_DIR/candidates.parquet (written by analyses/p1_steering.py)
Writes: DIR/fig_p1_tradeoff.html/.csv/.png and DIR/fig_p1_sweep_cloud.html/.csv/.png (skipped, with the reason
        logged, when the sweep table is absent); DIR defaults to figures/out/<run name>/
Region: over-refusal <= 0.10 and refusal >= 0.90, read from the headline table's ``target_*`` columns when present.
Judge: refusal is the first-position refusal-token decision (exactly the ``refusal_token`` judge's verdict on the
greedy answer); the judge named in test_rates is put in the title when that table is there.
"""

import logging
from pathlib import Path

from catlens import plotting
from catlens.figures.p1_tradeoff import (
    judge_of,
    region,
    sweep_data,
    sweep_figure,
    tradeoff_data,
    tradeoff_figure,
)
from catlens.runs import load_table

STAGE = "p1"
log = logging.getLogger("figures.fig_p1_tradeoff")


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True) -> dict[str, Path]:
    run_dir = Path(run_dir)
    headline = load_table(run_dir / "headline")
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / run_dir.name
    fmt = ("png",) if png else ()
    written = plotting.save_figure(tradeoff_figure(headline, judge_of(run_dir)), out / "fig_p1_tradeoff",
                                   data=tradeoff_data(headline), formats=fmt)
    if not (run_dir / "sweep.parquet").exists():
        log.info("fig_p1_sweep_cloud skipped: no sweep table in %s (the P1 analysis writes sweep.parquet)", run_dir)
        return written
    sweep = load_table(run_dir / "sweep")
    candidates = load_table(run_dir / "candidates") if (run_dir / "candidates.parquet").exists() else None
    if candidates is None:
        log.info("fig_p1_sweep_cloud: no candidates table in %s, so no chosen setting is marked", run_dir)
    more = plotting.save_figure(sweep_figure(sweep, candidates, region(headline)), out / "fig_p1_sweep_cloud",
                                data=sweep_data(sweep, candidates), formats=fmt)
    return {**written, **{f"cloud_{k}": v for k, v in more.items()}}


if __name__ == "__main__":
    plotting.figure_cli(main, __doc__)
