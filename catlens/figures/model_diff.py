"""Model diffing (P1, PAPERS.md §2.3 E): cosine between the two models' direction for each category, as bars at
one layer (one colour per direction set), plus the per-layer curves.

The builders behind ``figures/fig_model_diff.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

from typing import Any

import pandas as pd

from catlens import plotting


def at_layer(model_diff: pd.DataFrame, layer: int | None) -> tuple[pd.DataFrame, int]:
    layers = sorted(int(x) for x in model_diff["layer"].unique())
    chosen = int(model_diff.groupby("layer")["cosine"].mean().idxmin()) if layer is None else layer
    if chosen not in layers:
        raise ValueError(f"layer {chosen} is not in the table; available: {layers}")
    return model_diff[model_diff["layer"] == chosen], chosen


def make_figure(model_diff: pd.DataFrame, layer: int | None = None) -> Any:
    """Pure: bars of cos(v_c^A, v_c^B) per category at one layer."""
    data, chosen = at_layer(model_diff, layer)
    names = f"{data['model_a'].iloc[0]} vs {data['model_b'].iloc[0]}" if "model_a" in data else "two models"
    lo = min(0.0, float(data["cosine"].min()))
    return plotting.bars(data, x="category", y="cosine", color="direction", range_y=(lo, 1.0),
                         title=f"Cosine between the models' category directions ({names}), layer {chosen}")


def make_layer_figure(model_diff: pd.DataFrame) -> Any:
    return plotting.line(model_diff, x="layer", y="cosine", color="category", facet_col="direction",
                         facet_col_wrap=3, title="Cosine between the models' category directions, by layer")
