"""ROC curves of the probe gate's score against the first-position refusal-token probability, on XSTest unsafe vs
safe and on the built-in harmful prompts vs their benign lookalikes (test prompts): does the probe separate harmful
prompts from lookalikes better than the refusal token does? Each panel marks the gate's operating point (its
threshold, as the chosen policy applied it) and the refusal token's own decision (greedy first token is a refusal
token); the legend gives each score's AUROC with its bootstrap interval from the ``auroc`` table.

Usage:  python figures/fig_p1_probe_roc.py RUN_DIR [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/test_first_position.parquet (per-prompt first-position results of every policy: ``gate_score``,
        ``gate_flagged``, ``refusal_score``, ``refused``, ``source`` = dataset, ``label``), RUN_DIR/auroc.parquet
        (AUROC with interval per pair and score; its ``gate_from`` names the gated policy) and, for the threshold's
        value, RUN_DIR/policies/<policy>/policy.json (plain JSON) (written by analyses/p1_steering.py)
Writes: DIR/fig_p1_probe_roc.html/.csv/.png (the CSV: the curves, one row per threshold, and the operating points);
        DIR defaults to figures/out/<run name>/; nothing (the reason logged) when no policy has a gate
Scores: the probe score is the gated policy's ``gate_score`` (the gate reads the unsteered activations, so it does
not depend on the steering); the refusal-token probability is the unsteered model's ``refusal_score``.
"""

import logging
from pathlib import Path

import pandas as pd

from catlens import plotting
from catlens.figures.p1_probe_roc import gate_threshold, gated_policy, load_scores, roc_data, roc_figure
from catlens.runs import load_table

STAGE = "p1"
log = logging.getLogger("figures.fig_p1_probe_roc")


def main(run_dir: Path, out_dir: Path | None = None, png: bool = True) -> dict[str, Path]:
    run_dir = Path(run_dir)
    scores = load_scores(run_dir)
    auroc = load_table(run_dir / "auroc") if (run_dir / "auroc.parquet").exists() else None
    if auroc is not None and not len(auroc):
        auroc = None  # the analysis writes an empty table when no gated policy was chosen
    if auroc is None:
        log.info("probe ROC: no auroc rows in %s; the legend gives the curves' AUROC without an interval", run_dir)
    if not scores["gate_score"].notna().any():
        log.info("fig_p1_probe_roc skipped: no policy in %s/test_first_position has gate scores (no gated policy passed the "
                 "perplexity guard)", run_dir)
        return {}
    gate_from = gated_policy(scores, auroc)
    threshold = gate_threshold(run_dir, gate_from)
    curves, points = roc_data(scores, gate_from, threshold)
    data = pd.concat([curves.assign(kind="curve"), points.assign(kind="operating point")], ignore_index=True)
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / run_dir.name
    return plotting.save_figure(roc_figure(curves, points, auroc, gate_from, threshold), out / "fig_p1_probe_roc",
                                data=data, formats=("png",) if png else ())


if __name__ == "__main__":
    plotting.figure_cli(main, __doc__)
