"""P1's strength and layer sweeps on the validation prompts, and the low-rank combination's training curve.

* strength: refusal (harmful) and over-refusal (benign) against the steering coefficient, one line per layer, one
  row of panels per direction method, at the best gate rule. The x axis is signed: positive = ``toward`` (applied
  to the rows the gate flags, the away side unsteered), negative = ``away`` (applied to the rows the gate does not
  flag, the toward side unsteered), 0 = the gate alone (nothing steered);
* layers: the best setting per layer (largest val objective refusal − over-refusal, then the smaller coefficients),
  its refusal, over-refusal and objective against the layer, per method;
* low rank: the training curve of ``U(Vᵀ z)`` (loss and its refusal-token and KL terms against the step).

Usage:  python figures/fig_p1_sweeps.py RUN_DIR [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/sweep.parquet (method, layer, gate_rule, toward, away, refusal, over_refusal, objective: macro over
        the val datasets, as the selection reads them) and, when present, RUN_DIR/lowrank_curve.parquet (step, loss,
        harm, kl) (written by analyses/p1_steering.py)
Writes: DIR/fig_p1_strength.html/.csv/.png, DIR/fig_p1_layers.html/.csv/.png and DIR/fig_p1_lowrank.html/.csv/.png
        (skipped, with the reason logged, when lowrank_curve is absent); DIR defaults to figures/out/<run name>/
Best gate rule: the one whose best setting has the largest val objective (named in the titles).
"""

import logging
from pathlib import Path

from catlens import plotting
from catlens.figures.p1_sweeps import (
    best_gate_rule,
    layer_data,
    layer_figure,
    lowrank_data,
    lowrank_figure,
    strength_data,
    strength_figure,
)
from catlens.runs import load_table

STAGE = "p1"
log = logging.getLogger("figures.fig_p1_sweeps")


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True) -> dict[str, Path]:
    run_dir = Path(run_dir)
    sweep = load_table(run_dir / "sweep")
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / run_dir.name
    fmt = ("png",) if png else ()
    rule = best_gate_rule(sweep)
    written = plotting.save_figure(strength_figure(sweep, rule), out / "fig_p1_strength",
                                   data=strength_data(sweep, rule), formats=fmt)
    layers = plotting.save_figure(layer_figure(sweep, rule), out / "fig_p1_layers", data=layer_data(sweep, rule),
                                  formats=fmt)
    written = {**written, **{f"layers_{k}": v for k, v in layers.items()}}
    if not (run_dir / "lowrank_curve.parquet").exists():
        log.info("fig_p1_lowrank skipped: no lowrank_curve table in %s (the low-rank combination was not trained: "
                 "--lowrank-steps 0, or catlens.combine absent)", run_dir)
        return written
    curve = load_table(run_dir / "lowrank_curve")
    more = plotting.save_figure(lowrank_figure(curve), out / "fig_p1_lowrank", data=lowrank_data(curve), formats=fmt)
    return {**written, **{f"lowrank_{k}": v for k, v in more.items()}}


if __name__ == "__main__":
    plotting.figure_cli(main, __doc__)
