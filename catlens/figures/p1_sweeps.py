"""P1's strength and layer sweeps on the validation prompts, and the low-rank combination's training curve.

The builders behind ``figures/fig_p1_sweeps.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

import logging
from typing import Any

import pandas as pd

from catlens import plotting
from catlens.figures.p1_tradeoff import require_columns

log = logging.getLogger(__name__)
SWEEP_COLUMNS = ("method", "layer", "gate_rule", "toward", "away", "refusal", "over_refusal")
METRIC_LABELS = {"refusal": "refusal (harmful, val)", "over_refusal": "over-refusal (benign, val)",
                 "objective": "objective (refusal − over-refusal)"}
LOWRANK_METRICS = ("loss", "harm", "kl")


def _with_objective(sweep: pd.DataFrame) -> pd.DataFrame:
    require_columns(sweep, SWEEP_COLUMNS, "sweep")
    data = sweep[sweep["method"].notna()].copy()  # the unsteered reference row has no setting
    if "objective" not in data.columns:
        data["objective"] = data["refusal"] - data["over_refusal"]
    data["size"] = data["toward"].fillna(0).abs() + data["away"].fillna(0).abs()
    return data


def best_gate_rule(sweep: pd.DataFrame) -> str:
    """The gate rule whose best setting has the largest objective (ties: the rule met first in the table)."""
    data = _with_objective(sweep)
    best = data.groupby("gate_rule", sort=False)["objective"].max()
    return str(best.idxmax())


def strength_data(sweep: pd.DataFrame, rule: str | None = None) -> pd.DataFrame:
    """Long rows (method, layer, knob, coefficient, metric, value) at gate rule ``rule`` (default: the best): the
    toward grid with nothing steered away, the away grid with nothing steered toward, and the gate alone at 0."""
    data = _with_objective(sweep)
    rule = rule or best_gate_rule(sweep)
    if rule not in set(data["gate_rule"]):
        raise ValueError(f"gate rule {rule!r} is not in the sweep; it has {sorted(set(data['gate_rule']))}.")
    data = data[data["gate_rule"] == rule]
    toward = data[data["away"].isna()].assign(knob="toward", coefficient=lambda d: d["toward"].fillna(0.0))
    away = data[data["toward"].isna() & data["away"].notna()].assign(knob="away", coefficient=lambda d: d["away"])
    if toward.empty and away.empty:  # a sweep of (toward, away) pairs only: vary one side, the other at its best
        best = data.sort_values(["objective", "size"], ascending=[False, True], kind="stable").iloc[0]
        toward = data[data["away"] == best["away"]].assign(knob=f"toward (away {best['away']:g})",
                                                           coefficient=lambda d: d["toward"])
        away = data[data["toward"] == best["toward"]].assign(knob=f"away (toward {best['toward']:g})",
                                                             coefficient=lambda d: d["away"])
    both = pd.concat([toward, away], ignore_index=True)
    both.loc[both["toward"].isna() & both["away"].isna(), "knob"] = "none (gate only)"
    long = both.melt(id_vars=["method", "layer", "knob", "coefficient"], value_vars=["refusal", "over_refusal"],
                     var_name="metric", value_name="value")
    long["layer"] = long["layer"].map(lambda v: f"layer {int(v)}")
    long["gate_rule"] = rule
    return long.sort_values(["method", "layer", "metric", "coefficient"], kind="stable").reset_index(drop=True)


def layer_data(sweep: pd.DataFrame, rule: str | None = None) -> pd.DataFrame:
    """Per method and layer, the best setting at gate rule ``rule`` (default: the best) as long rows (metric: refusal,
    over_refusal, objective) with its toward and away coefficients."""
    data = _with_objective(sweep)
    rule = rule or best_gate_rule(sweep)
    data = data[(data["gate_rule"] == rule) & (data["toward"].notna() | data["away"].notna())]
    if not len(data):
        raise ValueError(f"the sweep has no steered setting at gate rule {rule!r}.")
    rows = []
    for (method, layer), g in data.groupby(["method", "layer"], sort=False):
        r = g.sort_values(["objective", "size"], ascending=[False, True], kind="stable").iloc[0]
        for metric in ("refusal", "over_refusal", "objective"):
            rows.append({"method": method, "layer": int(layer), "metric": metric, "value": float(r[metric]),
                         "toward": r["toward"], "away": r["away"], "gate_rule": rule})
    order = {m: i for i, m in enumerate(METRIC_LABELS)}
    out = pd.DataFrame(rows)
    return out.assign(_o=out["metric"].map(order)).sort_values(["method", "_o", "layer"], kind="stable").drop(
        columns="_o").reset_index(drop=True)


def _lines(data: pd.DataFrame, *, x: str, color: str, facet_row: str | None, title: str, y_title: str,
           x_title: str, same_y: bool) -> Any:
    """plotly-express lines with markers in the catlens template; facets in the order of :data:`METRIC_LABELS`."""
    import plotly.express as px

    metrics = [METRIC_LABELS[m] for m in METRIC_LABELS if METRIC_LABELS[m] in set(data["metric"])]
    fig = px.line(data.sort_values([x], kind="stable"), x=x, y="value", color=color, facet_col="metric",
                  facet_row=facet_row, markers=True, template=plotting.template(), title=title,
                  category_orders={"metric": metrics}, labels={"value": y_title, x: x_title},
                  facet_col_spacing=0.07, facet_row_spacing=0.12)
    if not same_y:
        fig.update_yaxes(matches=None, showticklabels=True)
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    n_rows = int(data[facet_row].nunique()) if facet_row else 1
    fig.update_layout(width=360 * len(metrics) + 300, height=300 * n_rows + 190, margin={"t": 110})
    return fig


def strength_figure(sweep: pd.DataFrame, rule: str | None = None) -> Any:
    """Pure: refusal and over-refusal against the signed coefficient, lines per layer, panel rows per method."""
    data = strength_data(sweep, rule)
    data = data.assign(metric=data["metric"].map(METRIC_LABELS))
    fig = _lines(data, x="coefficient", color="layer", facet_row="method" if data["method"].nunique() > 1 else None,
                 title=f"P1 strength sweep on val, gate rule {data['gate_rule'].iloc[0]}<br><sup>coefficient as a "
                       f"fraction of the residual norm: > 0 toward refusal on flagged rows, < 0 away on unflagged "
                       f"rows, 0 = gate only; macro over datasets</sup>",
                 y_title="rate", x_title="coefficient (fraction of the residual norm)", same_y=True)
    fig.update_yaxes(range=[-0.02, 1.02])
    fig.add_vline(x=0, line={"dash": "dot", "color": "#999"})
    return fig


def layer_figure(sweep: pd.DataFrame, rule: str | None = None) -> Any:
    """Pure: the best setting's refusal, over-refusal and objective against the layer, one line per method."""
    data = layer_data(sweep, rule)
    data = data.assign(metric=data["metric"].map(METRIC_LABELS))
    fig = _lines(data, x="layer", color="method", facet_row=None,
                 title=f"P1 layer sweep on val, gate rule {data['gate_rule'].iloc[0]}<br><sup>at each layer the best "
                       f"setting (largest refusal − over-refusal); macro over datasets</sup>",
                 y_title="rate (objective: difference of rates)", x_title="layer", same_y=False)
    fig.update_xaxes(tickmode="array", tickvals=sorted(set(data["layer"])))
    return fig


def lowrank_data(curve: pd.DataFrame) -> pd.DataFrame:
    """Long rows (step, metric, value, run) of the low-rank training curve; ``run`` joins any identifying columns
    (e.g. rank, variant), "low rank" when there are none."""
    require_columns(curve, ["step"], "lowrank_curve")
    metrics = [m for m in LOWRANK_METRICS if m in curve.columns]
    if not metrics:
        raise ValueError(f"table 'lowrank_curve' has none of {list(LOWRANK_METRICS)}; it has {list(curve.columns)}.")
    ids = [c for c in curve.columns if c not in ("step", *LOWRANK_METRICS)
           and (not pd.api.types.is_float_dtype(curve[c])) and curve[c].nunique() <= 12]
    data = curve.assign(run=[" · ".join(f"{c} {v}" for c, v in zip(ids, vals)) or "low rank"
                             for vals in (curve[ids].itertuples(index=False) if ids else [()] * len(curve))])
    return data.melt(id_vars=["step", "run"], value_vars=metrics, var_name="metric", value_name="value")


def lowrank_figure(curve: pd.DataFrame) -> Any:
    """Pure: loss, refusal-token term and KL term against the training step."""
    data = lowrank_data(curve)
    fig = plotting.line(data, x="step", y="value", color="run", facet_col="metric",
                        title="P1 low-rank combination U(Vᵀz): training curve<br><sup>loss = refusal-token loss on "
                              "harmful prompts (harm) + KL to the unsteered model on benign prompts (kl)</sup>",
                        labels={"value": ""})
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    fig.update_layout(margin={"t": 110})
    return fig
