"""Inter-category cosine structure of one direction set at one layer, as heatmaps: raw, whitened (cos(Wv_i, Wv_j)),
P1's orthonormal basis used verbatim (identity by construction) and that basis mapped back to the residual stream
(W^-1 Q, which is not Euclidean-orthogonal). A second figure gives the mean off-diagonal cosine by layer.

The builders behind ``figures/fig_cosine.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

from typing import Any

import pandas as pd

from catlens import plotting

SPACES = ("raw", "whitened", "basis_whitened", "basis_residual")


def default_layer(cosine: pd.DataFrame, separability: pd.DataFrame | None) -> int:
    """The layer where harm categories separate best (highest silhouette among the cosine table's layers), else the
    middle layer."""
    if separability is not None and {"task", "metric", "value", "layer"} <= set(separability.columns):
        sil = separability[(separability["task"] == "harmful_category") & (separability["metric"] == "silhouette")]
        sil = sil.dropna(subset=["value"])
        sil = sil[sil["layer"].isin(set(cosine["layer"]))]
        if len(sil):
            return int(sil.loc[sil["value"].idxmax(), "layer"])
    layers = sorted(cosine["layer"].unique())
    return int(layers[len(layers) // 2])


def select(cosine: pd.DataFrame, direction: str, layer: int) -> pd.DataFrame:
    if direction not in set(cosine["direction"]):
        raise ValueError(f"direction {direction!r} is not in the table; available: {sorted(cosine['direction'].unique())}")
    if layer not in set(cosine["layer"]):
        raise ValueError(f"layer {layer} is not in the table; available: {sorted(cosine['layer'].unique())}")
    data = cosine[(cosine["direction"] == direction) & (cosine["layer"] == layer)]
    order = {s: i for i, s in enumerate(SPACES)}
    return data.sort_values("space", key=lambda s: s.map(order), kind="stable")


def make_figure(cosine: pd.DataFrame, direction: str, layer: int) -> Any:
    """Pure: heatmaps of the chosen direction set and layer, one panel per space."""
    data = select(cosine, direction, layer)
    cats = list(dict.fromkeys(data["category_a"]))
    return plotting.heatmap(data, x="category_b", y="category_a", z="cosine", facet="space", order=cats,
                            zmin=-1.0, zmax=1.0, zmid=0.0, facet_cols=2, text_format=".1f" if len(cats) > 6 else ".2f",
                            title=f"Cosine between category directions: {direction}, layer {layer}")


def by_layer(cosine: pd.DataFrame) -> pd.DataFrame:
    off = cosine[cosine["category_a"] != cosine["category_b"]]
    return off.groupby(["direction", "space", "layer"], as_index=False)["cosine"].mean().rename(
        columns={"cosine": "mean_offdiag_cosine"})


def make_layer_figure(cosine: pd.DataFrame) -> Any:
    return plotting.line(by_layer(cosine), x="layer", y="mean_offdiag_cosine", color="direction", facet_col="space",
                         facet_col_wrap=2, title="Mean off-diagonal cosine between category directions, by layer")
