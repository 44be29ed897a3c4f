"""P2's figure layout: per-category share of harmful prompts answered on the test prompts, unsteered vs all activations
(unsupervised) vs pruned vs guided, with Wilson 95 % intervals; one panel per model when several runs are given
(e.g. the stock and the refusal-tuned model). A second figure shows the share of benign prompts answered (the
helpfulness proxy; pooled and per benign category) with its intervals.

Usage:  python figures/fig_p2_bars.py RUN_DIR [RUN_DIR ...] [--judge substring] [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/p2_test.parquet and RUN_DIR/manifest.json (the model's name for the panel title) of each run,
        written by analyses/p2_steering.py
Writes: DIR/fig_p2_bars.html/.csv/.png and DIR/fig_p2_helpfulness.html/.csv/.png;
        DIR defaults to figures/out/<first run's name>/
Judge: the run's primary judge (the one its settings were chosen with) unless --judge is given.
"""

import argparse
from collections.abc import Sequence
from pathlib import Path

from catlens import plotting
from catlens.figures.p2_bars import (
    helpfulness_table,
    load_runs,
    make_figure,
    make_helpfulness_figure,
    unsafe_table,
)


def main(run_dir: Path | Sequence[Path], out_dir: Path | None = None, png: bool = True,
         judge: str | None = None) -> dict[str, Path]:
    runs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(r) for r in run_dir]
    if not runs:
        raise ValueError("give at least one run folder of analyses/p2_steering.py.")
    data = load_runs(runs, judge)
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / runs[0].name
    fmt = ("png",) if png else ()
    written = plotting.save_figure(make_figure(data), out / "fig_p2_bars", data=unsafe_table(data), formats=fmt)
    more = plotting.save_figure(make_helpfulness_figure(data), out / "fig_p2_helpfulness",
                                data=helpfulness_table(data), formats=fmt)
    return {**written, **{f"helpfulness_{k}": v for k, v in more.items()}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, nargs="+")
    p.add_argument("--judge", default=None)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args()
    main(a.run_dir, a.out_dir, png=not a.no_png, judge=a.judge)
