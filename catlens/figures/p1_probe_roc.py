"""ROC curves of the probe gate's score against the first-position refusal-token probability, on XSTest unsafe vs
safe and on the built-in harmful prompts vs their benign lookalikes (test prompts): does the probe separate harmful
prompts from lookalikes better than the refusal token does? Each panel marks the gate's operating point (its
threshold, as the chosen policy applied it) and the refusal token's own decision (greedy first token is a refusal
token); the legend gives each score's AUROC with its bootstrap interval from the ``auroc`` table.

The builders behind ``figures/fig_p1_probe_roc.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from catlens import plotting

log = logging.getLogger(__name__)
PAIRS = {"xstest unsafe vs safe": ("xstest_unsafe", "xstest_safe"),
         "built-in harmful vs lookalikes": ("builtin_harmful", "builtin_lookalike")}
"""Pair name (as in the ``auroc`` table) -> (positive dataset, negative dataset)."""
PROBE, TOKEN = "probe (gate score)", "refusal-token probability"
"""Score names, as in the ``auroc`` table."""
BASE = "unsteered"
SCORE_COLUMNS = ("policy", "id", "label", "gate_score", "refusal_score")


def load_scores(run_dir: Path) -> pd.DataFrame:
    """Every policy's per-prompt first-position results on the test sets (``run_dir/test_first_position``), with a
    ``dataset`` column (= ``source``)."""
    path = Path(run_dir) / "test_first_position.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no per-prompt table at {str(path)!r}; run analyses/p1_steering.py (its test stage "
                                f"writes test_first_position.parquet).")
    table = pd.read_parquet(path)
    if "dataset" not in table.columns:
        table["dataset"] = table["source"]
    missing = [c for c in SCORE_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"the table {str(path)!r} has no column(s) {missing}.")
    return table


def gated_policy(scores: pd.DataFrame, auroc: pd.DataFrame | None = None) -> str:
    """The gated policy whose gate scores are drawn: the ``auroc`` table's ``gate_from``, else the first policy with
    gate scores."""
    if auroc is not None and "gate_from" in auroc.columns and len(auroc):
        name = str(auroc["gate_from"].iloc[0])
        if name in set(scores["policy"]):
            return name
    with_gate = scores[scores["gate_score"].notna()]
    if not len(with_gate):
        raise ValueError(f"no policy in the test_first_position table has gate scores (policies: "
                         f"{sorted(set(scores['policy']))}); the ROC needs a gated policy.")
    return str(with_gate["policy"].iloc[0])


def gate_threshold(run_dir: Path, policy: str) -> float | None:
    """The gate threshold saved in ``policies/<policy>/policy.json`` (None when that file is absent)."""
    path = Path(run_dir) / "policies" / policy / "policy.json"
    if not path.is_file():
        return None
    gate = json.loads(path.read_text()).get("gate") or {}
    return float(gate["threshold"]) if gate.get("threshold") is not None else None


def _curve(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thr


def roc_data(scores: pd.DataFrame, gate_from: str, threshold: float | None = None) -> tuple[pd.DataFrame,
                                                                                                pd.DataFrame]:
    """``(curves, points)``: the ROC curves (pair, score, fpr, tpr, threshold, n_pos, n_neg, auroc_curve) and the
    operating points (the gate as the policy applied it: ``gate_flagged``; the refusal token's greedy decision:
    the unsteered ``refused``)."""
    from sklearn.metrics import roc_auc_score

    gated = scores[scores["policy"] == gate_from].set_index("id")
    base = scores[scores["policy"] == BASE].set_index("id")
    if not len(base):
        raise ValueError(f"the test_first_position table has no {BASE!r} policy; the refusal-token ROC reads the unsteered "
                         f"model's refusal_score.")
    curves, points = [], []
    for pair, (pos, neg) in PAIRS.items():
        ids = [i for i in gated.index[gated["dataset"].isin([pos, neg])] if i in base.index]
        y = (gated.loc[ids, "dataset"] == pos).to_numpy()
        if not len(ids) or y.all() or not y.any():
            log.info("ROC %s skipped: the test prompts lack %s or %s", pair, pos, neg)
            continue
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        for name, s, decided in ((PROBE, gated.loc[ids, "gate_score"], gated.loc[ids, "gate_flagged"]),
                                 (TOKEN, base.loc[ids, "refusal_score"], base.loc[ids, "refused"])):
            s = s.to_numpy(dtype=float)
            fpr, tpr, thr = _curve(y, s)
            auc = float(roc_auc_score(y, s))
            curves.append(pd.DataFrame({"pair": pair, "score": name, "fpr": fpr, "tpr": tpr, "threshold": thr,
                                        "n_pos": n_pos, "n_neg": n_neg, "auroc_curve": auc}))
            flag = decided.astype("boolean").to_numpy(dtype=bool, na_value=False)
            point = {"pair": pair, "score": name, "fpr": float(flag[~y].mean()), "tpr": float(flag[y].mean()),
                     "n_pos": n_pos, "n_neg": n_neg}
            if name == PROBE:
                point.update(point="gate threshold", threshold=threshold,
                             what=f"{gate_from}: flagged = gate_score >= threshold")
            else:
                point.update(point="refusal-token decision", threshold=None,
                             what="unsteered greedy first token is a refusal token")
            points.append(point)
    if not curves:
        raise ValueError(f"none of the pairs {list(PAIRS)} has both datasets in the test_first_position table.")
    return pd.concat(curves, ignore_index=True), pd.DataFrame(points)


def _legend(auroc: pd.DataFrame | None, pair: str, score: str, fallback: float) -> str:
    if auroc is not None and {"pair", "score", "auroc", "ci_low", "ci_high"} <= set(auroc.columns):
        r = auroc[(auroc["pair"] == pair) & (auroc["score"] == score)]
        if len(r):
            r0 = r.iloc[0]
            return f"{score}: AUROC {r0['auroc']:.3f} [{r0['ci_low']:.3f}, {r0['ci_high']:.3f}]"
    return f"{score}: AUROC {fallback:.3f} (no interval: auroc table absent)"


def roc_figure(curves: pd.DataFrame, points: pd.DataFrame, auroc: pd.DataFrame | None = None,
               gate_from: str = "", threshold: float | None = None) -> Any:
    """Pure: one panel per pair, the two ROC curves, the chance line and the operating points."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    pairs = list(dict.fromkeys(curves["pair"]))
    titles = []
    for pair in pairs:
        c = curves[curves["pair"] == pair].iloc[0]
        titles.append(f"{pair} (n = {int(c['n_pos'])} + {int(c['n_neg'])})")
    fig = make_subplots(rows=1, cols=len(pairs), subplot_titles=titles, horizontal_spacing=0.12)
    colours = {PROBE: "#4C72B0", TOKEN: "#DD8452"}
    for k, pair in enumerate(pairs, start=1):
        fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", line={"dash": "dot", "color": "#999"},
                                 name="chance", showlegend=k == 1, legendgroup="chance"), row=1, col=k)
        for score in (PROBE, TOKEN):
            c = curves[(curves["pair"] == pair) & (curves["score"] == score)]
            if not len(c):
                continue
            fig.add_trace(go.Scatter(
                x=c["fpr"], y=c["tpr"], mode="lines", line={"color": colours[score]},
                name=f"{pair}: " + _legend(auroc, pair, score, float(c["auroc_curve"].iloc[0])),
                legendgroup=f"{pair}{score}"), row=1, col=k)
            p = points[(points["pair"] == pair) & (points["score"] == score)]
            if len(p):
                p0 = p.iloc[0]
                label = str(p0["point"])
                if score == PROBE and threshold is not None:
                    label = f"gate threshold {threshold:.3g}"
                fig.add_trace(go.Scatter(
                    x=[p0["fpr"]], y=[p0["tpr"]], mode="markers", name=f"{pair}: {label}",
                    marker={"symbol": "diamond" if score == PROBE else "circle-open", "size": 13,
                            "color": colours[score], "line": {"width": 2, "color": "black"}},
                    legendgroup=f"{pair}{score}", hovertemplate=f"{label}<br>FPR %{{x:.3f}}<br>TPR %{{y:.3f}}"
                                                                f"<extra></extra>"), row=1, col=k)
        fig.update_xaxes(title_text="false positive rate (benign flagged)", range=[-0.01, 1.01], row=1, col=k)
        fig.update_yaxes(title_text="true positive rate (harmful flagged)" if k == 1 else None, range=[-0.01, 1.02],
                         row=1, col=k)
    sub = f"gate from {gate_from}; " if gate_from else ""
    fig.update_layout(template=plotting.template(), width=520 * len(pairs) + 120, height=640,
                      legend={"orientation": "h", "y": -0.2, "x": 0, "font": {"size": 11}},
                      title=f"Probe gate vs refusal token: ROC on test prompts<br><sup>{sub}markers: the gate's "
                            f"threshold as applied, and the refusal token's greedy decision; AUROC with bootstrap "
                            f"95 % interval</sup>", margin={"b": 180, "t": 120})
    return fig
