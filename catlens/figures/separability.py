"""Separability of harmful vs benign prompts and of harm categories, by layer (probe accuracy / AUROC, silhouette,
Davies-Bouldin, Fisher ratio), one line per task.

The builders behind ``figures/fig_separability.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

from typing import Any

import pandas as pd

from catlens import plotting

METRICS = ("probe_accuracy", "probe_auroc", "silhouette", "davies_bouldin", "fisher_ratio")


def make_figure(separability: pd.DataFrame) -> Any:
    """Pure: tidy table in, figure out."""
    data = separability[separability["metric"].isin(METRICS)]
    return plotting.line(data, x="layer", y="value", color="task", facet_col="metric", facet_col_wrap=3,
                         title="Separability by layer (probe: cross-validated; clusters: raw activations)",
                         labels={"value": "", "layer": "layer"})
