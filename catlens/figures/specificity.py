"""Category specificity of steering as heatmaps: cell (i, j) is the change in refusal rate on prompts of category j
(columns) when steering with direction i (rows) at the run's scale; one panel per variant (raw, orthogonalised,
control) and (set, sign), the diagonal outlined, the summary (mean diagonal / mean off-diagonal effect, with its
bootstrap interval) in each panel's title. A second figure shows the refusal-score change (less saturated).

The builders behind ``figures/fig_specificity.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

import math
from typing import Any

import pandas as pd

from catlens import plotting

VARIANTS = ("raw", "orthogonalised", "control")
PANELS = (("harmful", "away"), ("lookalike", "toward"), ("harmful", "toward"), ("lookalike", "away"))
METRICS = {"rate": ("delta", "refusal-rate change"), "score": ("delta_score", "refusal-score change")}


def _fmt(x: Any, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return "∞" if math.isinf(x) and x > 0 else ("-∞" if math.isinf(x) else format(x, spec))


def panel_title(summary: pd.DataFrame, variant: str, s: str, sign: str, metric: str) -> str:
    """``"<variant> · <set> · <sign>"`` and the summary line of that panel."""
    head = f"{variant} · {s} · {sign}"
    part = summary[(summary.variant == variant) & (summary.set == s) & (summary.sign == sign)
                   & (summary.metric == metric)]
    cat = part[part.rows == "categories"]
    if len(cat):
        r = cat.iloc[0]
        return (f"{head}<br><sub>diag/off {_fmt(r.ratio)} [{_fmt(r.ratio_ci_low)}, {_fmt(r.ratio_ci_high)}]; "
                f"diag {_fmt(r.mean_diag, '+.2f')}, off {_fmt(r.mean_offdiag, '+.2f')}<br>diag − off "
                f"{_fmt(r.diag_minus_offdiag, '+.3f')} [{_fmt(r.diag_minus_offdiag_ci_low, '+.3f')}, "
                f"{_fmt(r.diag_minus_offdiag_ci_high, '+.3f')}]</sub>")
    parts = [f"{r.rows} {_fmt(r.mean_all, '+.2f')} [{_fmt(r.mean_all_ci_low, '+.2f')}, "
             f"{_fmt(r.mean_all_ci_high, '+.2f')}]" for r in part.itertuples()]
    return f"{head}<br><sub>mean effect: {'; '.join(parts)}</sub>" if parts else head


def panel_data(cells: pd.DataFrame, summary: pd.DataFrame, metric: str = "rate") -> pd.DataFrame:
    """The cells to draw, with a ``panel`` column (title with the summary) in drawing order."""
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r}: choose one of {list(METRICS)}.")
    frames = []
    for variant in VARIANTS:
        for s, sign in PANELS:
            part = cells[(cells.variant == variant) & (cells.set == s) & (cells.sign == sign)]
            if len(part):
                frames.append(part.assign(panel=panel_title(summary, variant, s, sign, metric)))
    if not frames:
        raise ValueError(f"the specificity table has no cells of variants {VARIANTS}; is it from analyses/"
                         f"specificity.py?")
    return pd.concat(frames, ignore_index=True)


def make_figure(cells: pd.DataFrame, summary: pd.DataFrame, metric: str = "rate") -> Any:
    """Pure: one heatmap panel per variant x (set, sign); rows = steering direction, columns = evaluated category."""
    data = panel_data(cells, summary, metric)
    z, what = METRICS[metric]
    cats = list(dict.fromkeys(data.eval_category))
    lim = max(float(data[z].abs().max()), 0.05 if metric == "rate" else 0.005)  # an all-zero table stays pale
    meta = cells.iloc[0]
    fig = plotting.heatmap(data, x="eval_category", y="steer_category", z=z, facet="panel", order=cats,
                           zmin=-lim, zmax=lim, zmid=0.0, facet_cols=len(PANELS),
                           text_format=".2f" if metric == "rate" else ".3f",
                           title=f"Category specificity: {what} (steered − unsteered), {meta.method}, layer "
                                 f"{meta.layer}<br><sub>rows = steering direction, columns = evaluated category; "
                                 f"diagonal outlined; intervals: {meta.ci_method}</sub>")
    fig.update_layout(margin={"t": 240}, height=fig.layout.height + 160)  # room for three-line panel titles
    # outline the diagonal of every panel whose rows are the categories themselves
    for k, panel in enumerate(dict.fromkeys(data.panel)):
        part = data[data.panel == panel]
        rows = list(dict.fromkeys(r for r in [*cats, *part.steer_category] if r in set(part.steer_category)))
        suffix = "" if k == 0 else str(k + 1)
        for i, name in enumerate(rows):
            if name in cats:
                j = cats.index(name)
                fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5, xref=f"x{suffix}",
                              yref=f"y{suffix}", line={"color": "black", "width": 2}, fillcolor="rgba(0,0,0,0)")
    return fig
