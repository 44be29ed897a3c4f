"""P1 Figure 1: over-refusal (x) against refusal (y) on the test sets, one point per policy (unsteered, categorical
with each gate rule, low-rank, ...), with Wilson 95 % intervals both ways and the desirable region shaded; and the
validation sweep cloud behind the choice (every method x layer x toward x away x gate-rule setting, the chosen
settings marked).

The builders behind ``figures/fig_p1_tradeoff.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

import logging
import re
from pathlib import Path
from typing import Any

import pandas as pd

from catlens import plotting
from catlens.formatting import as_float
from catlens.runs import load_table

log = logging.getLogger(__name__)
DEFAULT_REGION = {"over_refusal_max": 0.10, "refusal_min": 0.90}
HEADLINE_COLUMNS = ("policy", "over_refusal", "over_refusal_ci_low", "over_refusal_ci_high", "refusal",
                    "refusal_ci_low", "refusal_ci_high")
SWEEP_COLUMNS = ("method", "layer", "gate_rule", "toward", "away", "refusal", "over_refusal")
SETTING_KEYS = ("gate_rule", "method", "layer", "toward", "away")
REGION_FILL = "rgba(85, 168, 104, 0.16)"
TEXT_POSITIONS = ("top right", "bottom right", "top left", "bottom left", "middle right")  # coinciding points stay legible


def _as_rules(df: pd.DataFrame) -> pd.DataFrame:
    """Tables of the three-zone protocol name the zone mode ``mode`` where older ones named the gate rule."""
    if "gate_rule" not in df.columns and "mode" in df.columns:
        df = df.assign(gate_rule=df["mode"])
    return df[df["method"].notna()] if "method" in df.columns else df


def require_columns(df: pd.DataFrame, columns: Any, name: str) -> None:
    """A clear error when a P1 table lacks ``columns`` or is empty (shared by the P1 trade-off and sweep figures)."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"table {name!r} has no column(s) {missing}; it has {list(df.columns)} (is it from "
                         f"analyses/p1_steering.py?).")
    if not len(df):
        raise ValueError(f"table {name!r} is empty: nothing to plot.")


def _target(text: Any, default: float) -> float:
    """The number in a target like ``"<= 0.10"``; ``default`` when there is none."""
    m = re.search(r"-?[0-9]*\.?[0-9]+", str(text)) if text is not None else None
    return float(m.group(0)) if m else default


def region(headline: pd.DataFrame) -> dict[str, float]:
    """The desirable region: ``over_refusal_max`` and ``refusal_min``, from the table's target columns."""
    out = dict(DEFAULT_REGION)
    if "target_over_refusal" in headline.columns and len(headline):
        out["over_refusal_max"] = _target(headline["target_over_refusal"].iloc[0], out["over_refusal_max"])
    if "target_refusal" in headline.columns and len(headline):
        out["refusal_min"] = _target(headline["target_refusal"].iloc[0], out["refusal_min"])
    return out


def tradeoff_data(headline: pd.DataFrame) -> pd.DataFrame:
    """The plotted points: one row per policy with its intervals and whether it lies in the desirable region."""
    require_columns(headline, HEADLINE_COLUMNS, "headline")
    r = region(headline)
    keep = [c for c in (*HEADLINE_COLUMNS, "over_refusal_se", "over_refusal_n", "refusal_se", "refusal_n",
                        "ppl_ratio") if c in headline.columns]
    data = headline[keep].reset_index(drop=True).copy()
    data["in_region"] = (data["over_refusal"] <= r["over_refusal_max"]) & (data["refusal"] >= r["refusal_min"])
    data["region"] = f"over_refusal <= {r['over_refusal_max']:g} and refusal >= {r['refusal_min']:g}"
    return data


def _shade(fig: Any, r: dict[str, float], **where: Any) -> None:
    fig.add_shape(type="rect", x0=0, x1=r["over_refusal_max"], y0=r["refusal_min"], y1=1.0, line={"width": 0},
                  fillcolor=REGION_FILL, layer="below", **where)


def tradeoff_figure(headline: pd.DataFrame, judge: str | None = None) -> Any:
    """Pure: Figure 1 from the headline table (one marker per policy, Wilson intervals both ways, region shaded)."""
    import plotly.graph_objects as go

    data = tradeoff_data(headline)
    r = region(headline)
    fig = go.Figure()
    for k, row in enumerate(data.itertuples(index=False)):
        colour = plotting.template().layout.colorway[k % len(plotting.template().layout.colorway)]
        fig.add_trace(go.Scatter(
            x=[row.over_refusal], y=[row.refusal], mode="markers+text", name=str(row.policy),
            text=[str(row.policy)], textposition=TEXT_POSITIONS[k % len(TEXT_POSITIONS)], marker={"size": 11, "color": colour},
            error_x={"type": "data", "symmetric": False, "array": [row.over_refusal_ci_high - row.over_refusal],
                     "arrayminus": [row.over_refusal - row.over_refusal_ci_low], "color": colour},
            error_y={"type": "data", "symmetric": False, "array": [row.refusal_ci_high - row.refusal],
                     "arrayminus": [row.refusal - row.refusal_ci_low], "color": colour},
            hovertemplate=(f"{row.policy}<br>over-refusal %{{x:.3f}} [{row.over_refusal_ci_low:.3f}, "
                           f"{row.over_refusal_ci_high:.3f}]<br>refusal %{{y:.3f}} [{row.refusal_ci_low:.3f}, "
                           f"{row.refusal_ci_high:.3f}]<extra></extra>")))
    _shade(fig, r)
    fig.add_annotation(x=r["over_refusal_max"] / 2, y=1.0, yanchor="bottom", showarrow=False,
                       text="target", font={"size": 11, "color": "#2f6b3a"})
    sub = f"test sets; Wilson 95 % intervals; judge: {judge}" if judge else "test sets; Wilson 95 % intervals"
    fig.update_layout(
        template=plotting.template(), width=720, height=560, legend={"title": "policy"},
        title=f"P1 Figure 1: refusal vs over-refusal<br><sup>{sub}; shaded: over-refusal ≤ "
              f"{r['over_refusal_max']:g} and refusal ≥ {r['refusal_min']:g}</sup>",
        xaxis={"title": "over-refusal (pooled: XSTest safe, CoCoNot contrast, JBB benign, lookalikes)",
               "range": [-0.02, 1.02]},
        yaxis={"title": "refusal (pooled over the harmful sets)", "range": [-0.02, 1.06]})
    return fig


def _key(df: pd.DataFrame) -> pd.Series:
    """A hashable key per setting (missing toward/away = not steered on that side)."""
    def num(v: Any) -> str:
        f = as_float(v)
        return "-" if f is None else f"{f:.6g}"

    return pd.Series([f"{g}|{m}|{int(lay)}|{num(t)}|{num(a)}" for g, m, lay, t, a in
                      zip(df["gate_rule"], df["method"], df["layer"], df["toward"], df["away"])], index=df.index)


def sweep_data(sweep: pd.DataFrame, candidates: pd.DataFrame | None = None) -> pd.DataFrame:
    """The val sweep with ``setting`` (a label), ``chosen`` (from ``candidates``) and ``unsteered`` columns."""
    sweep = _as_rules(sweep)
    require_columns(sweep, SWEEP_COLUMNS, "sweep")
    data = sweep.reset_index(drop=True).copy()

    def coef(v: Any) -> str:
        return f"{as_float(v, 0.0):g}"  # missing: not steered on that side

    data["setting"] = [f"{m}, layer {int(lay)}, toward {coef(t)}, away {coef(a)}, gate {g}" for m, lay, t, a, g in
                       zip(data["method"], data["layer"], data["toward"], data["away"], data["gate_rule"])]
    data["unsteered"] = data["toward"].isna() & data["away"].isna()
    chosen = set()
    if candidates is not None and len(candidates) and "chosen" in candidates.columns:
        picked = _as_rules(candidates[candidates["chosen"].astype(bool)])
        if len(picked):
            require_columns(picked, SETTING_KEYS, "candidates")
            chosen = set(_key(picked))
    data["chosen"] = _key(data).isin(chosen)
    return data


def sweep_figure(sweep: pd.DataFrame, candidates: pd.DataFrame | None = None,
                 region_: dict[str, float] | None = None) -> Any:
    """Pure: the val cloud, refusal vs over-refusal (macro over datasets, as the selection reads them), colour =
    method, symbol = gate rule, the chosen settings (``candidates``) as stars, the unsteered point as a cross."""
    import plotly.graph_objects as go

    data = sweep_data(sweep, candidates)
    r = region_ or dict(DEFAULT_REGION)
    colours = plotting.template().layout.colorway
    symbols = ["circle", "diamond", "square", "triangle-up", "x"]
    fig = go.Figure()
    methods = list(dict.fromkeys(data["method"]))
    rules = list(dict.fromkeys(data["gate_rule"]))
    steered = data[~data["unsteered"]]
    for i, method in enumerate(methods):
        for j, rule in enumerate(rules):
            part = steered[(steered["method"] == method) & (steered["gate_rule"] == rule)]
            if not len(part):
                continue
            fig.add_trace(go.Scatter(
                x=part["over_refusal"], y=part["refusal"], mode="markers", name=f"{method} · gate {rule}",
                marker={"color": colours[i % len(colours)], "symbol": symbols[j % len(symbols)], "size": 8,
                        "opacity": 0.75},
                text=part["setting"], hovertemplate="%{text}<br>over-refusal %{x:.3f}<br>refusal %{y:.3f}"
                                                    "<extra></extra>"))
    base = data[data["unsteered"]]
    if len(base):
        fig.add_trace(go.Scatter(x=base["over_refusal"].iloc[:1], y=base["refusal"].iloc[:1], mode="markers",
                                 name="unsteered", marker={"symbol": "x", "size": 12, "color": "black"},
                                 hovertemplate="unsteered<br>over-refusal %{x:.3f}<br>refusal %{y:.3f}"
                                               "<extra></extra>"))
    chosen = data[data["chosen"]]
    if len(chosen):
        fig.add_trace(go.Scatter(
            x=chosen["over_refusal"], y=chosen["refusal"], mode="markers+text", name="chosen",
            text=[f"chosen ({g})" for g in chosen["gate_rule"]], textposition="bottom right",
            marker={"symbol": "star", "size": 16, "color": "gold", "line": {"color": "black", "width": 1}},
            customdata=chosen["setting"], hovertemplate="%{customdata}<br>over-refusal %{x:.3f}<br>refusal %{y:.3f}"
                                                        "<extra>chosen</extra>"))
    _shade(fig, r)
    split = str(data["split"].iloc[0]) if "split" in data.columns else "val"
    n = f", n = {int(data['n_val'].iloc[0])} prompts" if "n_val" in data.columns else ""
    fig.update_layout(
        template=plotting.template(), width=760, height=560,
        title=f"P1 sweep on {split}{n}: every setting<br><sup>macro over datasets (the selection objective: refusal "
              f"− over-refusal); stars: the settings chosen after the perplexity guard</sup>",
        xaxis={"title": f"over-refusal ({split}, macro over benign datasets)", "range": [-0.02, 1.02]},
        yaxis={"title": f"refusal ({split}, macro over harmful datasets)", "range": [-0.02, 1.06]})
    return fig


def judge_of(run_dir: Path) -> str | None:
    """The judge named in ``test_rates`` (None when that table is absent)."""
    path = Path(run_dir) / "test_rates.parquet"
    if not path.exists():
        return None
    rates = load_table(path)
    return str(rates["judge"].iloc[0]) if "judge" in rates.columns and len(rates) else None
