"""P1's safety table: per dataset and policy, the refusal rate (harmful sets) or over-refusal rate (benign sets) on
the test prompts with its binomial SE, plus the pooled and macro rows of each side, as a figure (a plotly table,
cells shaded by the rate) with a markdown and CSV twin. Every number is formatted from ``test_rates``; none is
typed.

Usage:  python figures/fig_p1_safety_table.py RUN_DIR [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/test_rates.parquet (rows with grouping "dataset": ``row`` group / pooled / macro, ``side``, ``dataset``,
        ``policy``, ``n``, ``rate``, ``se``, ``ci_low``, ``ci_high``, ``judge``, ``stands_for``), and, when present,
        RUN_DIR/test_rates_substring.parquet (the second judge on the generated subsample; extra pooled rows) and
        RUN_DIR/headline.parquet (Figure 1's pooled over-refusal over its four benign sets; an extra benign row)
        (written by analyses/p1_steering.py)
Writes: DIR/fig_p1_safety_table.html/.csv/.png (the CSV is the long table: one row per cell with SE and Wilson
        interval), DIR/fig_p1_safety_bars.html/.png (the same numbers as grouped bars with their intervals),
        DIR/safety_table.md and DIR/safety_table.csv (the table as shown: percent ± SE);
        DIR defaults to figures/out/<run name>/
Cells: ``100 x rate ± 100 x SE`` with one decimal; pooled = all prompts of the side (P1's "Average" rows), macro =
the unweighted mean of the dataset rates (its SE is that of a mean of independent rates).
"""

import logging
from pathlib import Path

from catlens import plotting
from catlens.figures.p1_safety_table import safety_bars, safety_figure, safety_rows, safety_wide, to_markdown
from catlens.runs import load_table, write_text_atomic

STAGE = "p1"
log = logging.getLogger("figures.fig_p1_safety_table")


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True) -> dict[str, Path]:
    run_dir = Path(run_dir)
    rates = load_table(run_dir / "test_rates")
    substring = None
    if (run_dir / "test_rates_substring.parquet").exists():
        substring = load_table(run_dir / "test_rates_substring")
    else:
        log.info("safety table: no test_rates_substring in %s, so no second-judge rows", run_dir)
    headline = load_table(run_dir / "headline") if (run_dir / "headline.parquet").exists() else None
    rows = safety_rows(rates, substring, headline)
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / run_dir.name
    written = plotting.save_figure(safety_figure(rows), out / "fig_p1_safety_table", data=rows,
                                   formats=("png",) if png else ())
    bars = plotting.save_figure(safety_bars(rows), out / "fig_p1_safety_bars", formats=("png",) if png else ())
    written.update({f"bars_{k}": v for k, v in bars.items()})
    write_text_atomic(out / "safety_table.md", to_markdown(rows))
    wide_csv = out / "safety_table.csv"
    write_text_atomic(wide_csv, safety_wide(rows).to_csv(index=False))
    return {**written, "md": out / "safety_table.md", "table_csv": wide_csv}


if __name__ == "__main__":
    plotting.figure_cli(main, __doc__)
