"""What bounds P1's result: the test frontier of the chosen setting's zones beside the gate's ROC.

Left: every global threshold pair's over-refusal (x) against harmful refusal (y) on the generated test answers
(the Pareto rows of ``test_frontier``), with the ``bound`` table's points: unsteered, the chosen zones, the oracle
gate (each prompt's label decides its side: what a perfect gate would reach with this steering) and the best side
per row (what any gate could reach with these answers). The gap between the frontier and the oracle is the gate's;
the gap between the oracle and the target region is the steering's. Right: the gate's ROC on the test prompts
(harmful vs the headline's benign sets), the chosen thresholds marked.

Pure builders: tables in, plotly figure out (used by ``figures/fig_p1_bound.py`` and the report)."""

from typing import Any

import pandas as pd

from catlens import plotting
from catlens.figures.p1_tradeoff import DEFAULT_REGION, REGION_FILL, require_columns

BOUND_COLUMNS = ("gate", "refusal", "refusal_ci_low", "refusal_ci_high", "over_refusal", "over_refusal_ci_low",
                 "over_refusal_ci_high")
FRONTIER_COLUMNS = ("lower", "upper", "refusal", "over_refusal")
ROC_COLUMNS = ("fpr", "tpr", "threshold", "point")


def bound_figure(bound: pd.DataFrame, frontier: pd.DataFrame, roc: pd.DataFrame,
                 region: dict[str, float] = DEFAULT_REGION) -> Any:
    """Pure: the two panels from the ``bound``, ``test_frontier`` and ``gate_roc`` tables."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    require_columns(bound, BOUND_COLUMNS, "bound")
    require_columns(frontier, FRONTIER_COLUMNS, "test_frontier")
    require_columns(roc, ROC_COLUMNS, "gate_roc")
    fig = make_subplots(rows=1, cols=2, subplot_titles=("zones on the test answers (frontier) and the bounds",
                                                        "the gate's ROC (test)"), horizontal_spacing=0.12)
    f = frontier.sort_values("over_refusal")
    fig.add_trace(go.Scatter(x=f.over_refusal, y=f.refusal, mode="lines+markers", name="frontier (every zone pair)",
                             line={"shape": "hv", "color": "#888"}, marker={"size": 5},
                             customdata=f[["lower", "upper"]].to_numpy(),
                             hovertemplate="lower %{customdata[0]:.3f}, upper %{customdata[1]:.3f}<br>over-refusal "
                                           "%{x:.3f}, refusal %{y:.3f}<extra></extra>"), row=1, col=1)
    colours = plotting.template().layout.colorway
    for k, r in enumerate(bound.itertuples(index=False)):
        c = colours[k % len(colours)]
        fig.add_trace(go.Scatter(
            x=[r.over_refusal], y=[r.refusal], mode="markers", name=str(r.gate), marker={"size": 11, "color": c},
            error_x={"type": "data", "symmetric": False, "array": [r.over_refusal_ci_high - r.over_refusal],
                     "arrayminus": [r.over_refusal - r.over_refusal_ci_low], "color": c},
            error_y={"type": "data", "symmetric": False, "array": [r.refusal_ci_high - r.refusal],
                     "arrayminus": [r.refusal - r.refusal_ci_low], "color": c}), row=1, col=1)
    fig.add_shape(type="rect", x0=0, x1=region["over_refusal_max"], y0=region["refusal_min"], y1=1.0,
                  line={"width": 0}, fillcolor=REGION_FILL, layer="below", row=1, col=1)
    curve, marks = roc[roc.point.fillna("") == ""], roc[roc.point.fillna("") != ""]
    fig.add_trace(go.Scatter(x=curve.fpr, y=curve.tpr, mode="lines", name="gate ROC", line={"color": "#333"}),
                  row=1, col=2)
    for k, r in enumerate(marks.itertuples(index=False)):
        fig.add_trace(go.Scatter(x=[r.fpr], y=[r.tpr], mode="markers+text", text=[str(r.point)],
                                 textposition="bottom right", name=f"{r.point} = {r.threshold:.3f}",
                                 marker={"size": 10, "symbol": "diamond"}), row=1, col=2)
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#bbb"},
                             showlegend=False), row=1, col=2)
    fig.update_xaxes(title_text="over-refusal (headline benign pool)", range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="harmful refusal (pooled)", range=[-0.02, 1.04], row=1, col=1)
    fig.update_xaxes(title_text="benign prompts flagged (false positive rate)", range=[-0.02, 1.02], row=1, col=2)
    fig.update_yaxes(title_text="harmful prompts flagged (true positive rate)", range=[-0.02, 1.04], row=1, col=2)
    judge = str(bound["judge"].iloc[0]) if "judge" in bound.columns else "the headline's judge"
    fig.update_layout(template=plotting.template(), width=1200, height=540,
                      title=f"What bounds P1's result<br><sup>test answers judged by {judge}; Wilson 95 %; shaded: "
                            f"over-refusal ≤ {region['over_refusal_max']:g} and refusal ≥ "
                            f"{region['refusal_min']:g}</sup>")
    return fig
