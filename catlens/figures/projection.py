"""PCA and t-SNE projections of the activations, coloured by harm category (benign prompts in one colour when
the run projected all prompts), one panel per layer (rows: method).

The builders behind ``figures/fig_projection.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

from typing import Any

import pandas as pd

from catlens import plotting


def select(projections: pd.DataFrame, layers: list[int] | None = None) -> pd.DataFrame:
    if layers is None:
        tsne = projections[projections["method"] == "tsne"]
        available = sorted((tsne if len(tsne) else projections)["layer"].unique())
        if not len(tsne):
            n = len(available)
            available = sorted({available[min(n - 1, round(q * (n - 1)))] for q in (0.25, 0.5, 0.75, 1.0)})
        layers = [int(x) for x in available]
    missing = [x for x in layers if x not in set(projections["layer"])]
    if missing:
        raise ValueError(f"layers {missing} are not in the table; available: {sorted(projections['layer'].unique())}")
    return projections[projections["layer"].isin(layers)].sort_values(["method", "layer", "group"], kind="stable")


def make_figure(projections: pd.DataFrame, layers: list[int] | None = None) -> Any:
    """Pure: one panel per (method, layer), points coloured by group (category, or 'benign')."""
    data = select(projections, layers)
    return plotting.scatter(data, x="x", y="y", color="group", facet_col="layer", facet_row="method",
                            hover_data=["id", "label", "category"],
                            title="Activations projected to 2-D, coloured by category")
