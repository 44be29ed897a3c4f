"""Anisotropy of the activations by layer: mean pairwise cosine, top-1/top-10 variance share, effective rank,
log10 condition number (on the data span), mean-norm ratio and the largest single-dimension share of the norm; one line
per prompt subset (all / harmful / benign).

The builders behind ``figures/fig_anisotropy.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

from typing import Any

import numpy as np
import pandas as pd

from catlens import plotting

MEASURES = ("mean_pairwise_cosine", "top1_variance_share", "top10_variance_share", "effective_rank",
            "condition_number", "mean_norm_ratio", "max_dim_share")


def plotted(anisotropy: pd.DataFrame) -> pd.DataFrame:
    """The rows drawn; the condition number spans orders of magnitude, so it is drawn as log10."""
    data = anisotropy[anisotropy["measure"].isin(MEASURES)].copy()
    cond = data["measure"] == "condition_number"
    data.loc[cond, "value"] = np.log10(data.loc[cond, "value"].astype(float))
    data.loc[cond, "measure"] = "log10_condition_number"
    return data


def make_figure(anisotropy: pd.DataFrame) -> Any:
    """Pure: tidy table in, figure out."""
    return plotting.line(plotted(anisotropy), x="layer", y="value", color="subset", facet_col="measure",
                         facet_col_wrap=4, title="Anisotropy of activations by layer", labels={"value": ""})
