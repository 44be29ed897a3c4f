"""P1's safety table: per dataset and policy, the refusal rate (harmful sets) or over-refusal rate (benign sets) on
the test prompts with its binomial SE, plus the pooled and macro rows of each side, as a figure (a plotly table,
cells shaded by the rate) with a markdown and CSV twin. Every number is formatted from ``test_rates``; none is
typed.

The builders behind ``figures/fig_p1_safety_table.py`` and the report: pure functions, tables in,
plotly figure (or the plotted table) out."""

import logging
from typing import Any

import pandas as pd

from catlens import plotting

log = logging.getLogger(__name__)
SIDES = ("harmful", "benign")
SIDE_TITLES = {"harmful": "refusal (harmful sets, higher is better)",
               "benign": "over-refusal (benign sets, lower is better)"}
DATASET_ORDER = ("harmful_heldout", "strongreject", "xstest_unsafe", "simple_safety_tests", "jbb_harmful",
                 "harmbench", "advbench", "builtin_harmful", "xstest_safe", "coconot_contrast", "jbb_benign",
                 "builtin_lookalike", "alpaca", "builtin_ordinary")
"""The order of catlens.recipes.p1's HARMFUL_SETS and BENIGN_SETS; other datasets (the hard-benign ones too) follow
alphabetically."""
HEADLINE_BENIGN_LABEL = "pooled (Figure 1: XSTest safe, CoCoNot contrast, JBB benign, lookalikes)"
RATE_COLUMNS = ("side", "row", "dataset", "policy", "n", "rate", "se")
SHADE = {"harmful": (76, 114, 176), "benign": (221, 132, 82)}


def _require(df: pd.DataFrame, columns: Any, name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"table {name!r} has no column(s) {missing}; it has {list(df.columns)} (is it from "
                         f"analyses/p1_steering.py?).")


def cell(rate: float, se: float) -> str:
    """``"41.7 ± 4.1"``: percent with one decimal; ``"–"`` when the rate is missing (no prompts)."""
    if rate != rate:  # NaN
        return "–"
    return f"{100 * rate:.1f} ± {100 * se:.1f}"


def _label(row: str, side: str, dataset: str, judge: str | None = None) -> str:
    if row == "group":
        return str(dataset)
    sets = "harmful" if side == "harmful" else "benign"
    if judge is not None:
        return f"pooled, generated subsample ({judge} judge)"
    return f"pooled (all {sets} sets)" if row == "pooled" else f"macro (mean over {sets} sets)"


def headline_rows(headline: pd.DataFrame) -> pd.DataFrame:
    """Figure 1's pooled over-refusal (XSTest safe, CoCoNot contrast, JBB benign, lookalikes) per policy, as rows of
    the benign side (``headline`` holds it with its SE and Wilson interval)."""
    cols = ("policy", "over_refusal", "over_refusal_se", "over_refusal_ci_low", "over_refusal_ci_high",
            "over_refusal_n")
    _require(headline, cols, "headline")
    return pd.DataFrame({"side": "benign", "row": "pooled", "dataset": HEADLINE_BENIGN_LABEL,
                         "policy": headline["policy"].to_numpy(), "n": headline["over_refusal_n"].to_numpy(),
                         "rate": headline["over_refusal"].to_numpy(), "se": headline["over_refusal_se"].to_numpy(),
                         "ci_low": headline["over_refusal_ci_low"].to_numpy(),
                         "ci_high": headline["over_refusal_ci_high"].to_numpy(), "interval": "wilson"})


def safety_rows(test_rates: pd.DataFrame, substring: pd.DataFrame | None = None,
                headline: pd.DataFrame | None = None) -> pd.DataFrame:
    """The long table behind the figure: one row per (side, dataset row, policy) in display order, with ``label``,
    ``cell`` (percent ± SE) and the interval; on the benign side Figure 1's pooled over-refusal (from ``headline``)
    after the pooled row; the second judge's pooled rows last on each side."""
    _require(test_rates, RATE_COLUMNS, "test_rates")
    rates = test_rates
    if "grouping" in rates.columns:
        rates = rates[rates["grouping"] == "dataset"]
    if not len(rates):
        raise ValueError("test_rates has no rows grouped by dataset (grouping == 'dataset'); is it from "
                         "analyses/p1_steering.py?")
    policies = list(dict.fromkeys(rates["policy"]))
    order = {d: i for i, d in enumerate(DATASET_ORDER)}
    frames = []
    for side in SIDES:
        part = rates[rates["side"] == side]
        if not len(part):
            continue
        groups = sorted(set(part.loc[part["row"] == "group", "dataset"]), key=lambda d: (order.get(d, len(order)), d))
        keys = [("group", d) for d in groups] + [(r, "(all)") for r in ("pooled", "macro")
                                                  if (part["row"] == r).any()]
        if side == "benign" and headline is not None and len(headline):
            keys.insert(len(groups) + 1, ("pooled", HEADLINE_BENIGN_LABEL))
            extra = headline_rows(headline)
            meta = {c: part[c].iloc[0] for c in ("metric", "better", "stands_for", "judge") if c in part.columns}
            part = pd.concat([part, extra.assign(**meta)], ignore_index=True)
        for rank, (row, dataset) in enumerate(keys):
            if row == "group" or dataset == HEADLINE_BENIGN_LABEL:
                sel = part[(part["row"] == row) & (part["dataset"] == dataset)]
            else:
                sel = part[(part["row"] == row) & (part["dataset"] != HEADLINE_BENIGN_LABEL)]
            label = dataset if dataset == HEADLINE_BENIGN_LABEL else _label(row, side, dataset)
            for policy in policies:
                got = sel[sel["policy"] == policy]
                if not len(got):
                    continue
                frames.append(got.iloc[[0]].assign(order=rank, label=label, judge_block="main"))
        if substring is not None and len(substring):
            _require(substring, ("side", "row", "policy", "n", "rate", "se"), "test_rates_substring")
            sub = substring[(substring["side"] == side) & (substring["row"] == "pooled")]
            judge = str(sub["judge"].iloc[0]) if "judge" in sub.columns and len(sub) else "second"
            for policy in policies:
                got = sub[sub["policy"] == policy]
                if len(got):
                    frames.append(got.iloc[[0]].assign(order=len(keys), label=_label("pooled", side, "", judge),
                                                       judge_block="second"))
    out = pd.concat(frames, ignore_index=True)
    out["policy_order"] = out["policy"].map({p: i for i, p in enumerate(policies)})
    out["side_order"] = out["side"].map({s: i for i, s in enumerate(SIDES)})
    out = out.sort_values(["side_order", "order", "policy_order"], kind="stable").reset_index(drop=True)
    out["cell"] = [cell(float(r), float(s)) for r, s in zip(out["rate"], out["se"])]
    keep = [c for c in ("side", "row", "label", "dataset", "policy", "n", "k", "rate", "se", "ci_low", "ci_high",
                        "interval", "cell", "judge", "metric", "stands_for") if c in out.columns]
    return out[keep]


def safety_wide(rows: pd.DataFrame) -> pd.DataFrame:
    """The table as shown: one line per (side, dataset row), one column per policy (``cell`` strings), ``n``."""
    policies = list(dict.fromkeys(rows["policy"]))
    lines = []
    for (side, label), g in rows.groupby(["side", "label"], sort=False):
        line: dict[str, Any] = {"side": side, "dataset": label}
        ns = sorted(set(int(n) for n in g["n"]))
        line["n"] = str(ns[0]) if len(ns) == 1 else "/".join(str(int(n)) for n in g["n"])
        by_policy = dict(zip(g["policy"], g["cell"]))
        for p in policies:
            line[p] = by_policy.get(p, "–")
        lines.append(line)
    return pd.DataFrame(lines)


def judges_note(rows: pd.DataFrame) -> str:
    """Which judge decided refusal, and what each side's rate stands for (from the table's own columns)."""
    parts = []
    main = rows[rows["label"].map(lambda s: "generated subsample" not in s)]
    if "judge" in rows.columns:
        parts.append("judge: " + ", ".join(dict.fromkeys(str(j) for j in main["judge"].dropna())))
    if "stands_for" in rows.columns:
        for side in SIDES:
            s = main.loc[main["side"] == side, "stands_for"].dropna()
            if len(s):
                parts.append(f"{side}: {s.iloc[0]}")
    return "; ".join(parts)


def to_markdown(rows: pd.DataFrame) -> str:
    """The markdown twin: the wide table, then what the numbers are."""
    wide = safety_wide(rows)
    cols = list(wide.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" if c in ("side", "dataset") else "---:"
                                                           for c in cols) + "|"]
    for rec in wide.itertuples(index=False):
        lines.append("| " + " | ".join(str(v).replace("|", "\\|") for v in rec) + " |")
    note = ("Cells: percent refused ± binomial SE on the test prompts (pooled: every prompt of the side; macro: "
            "the mean of the dataset rates). Wilson 95 % intervals are in fig_p1_safety_table.csv.")
    return ("# P1 safety table\n\n" + "\n".join(lines) + f"\n\n{note}\n\n{judges_note(rows)}\n")


def safety_figure(rows: pd.DataFrame) -> Any:
    """Pure: a plotly table, one column per policy, cells ``percent ± SE`` with the Wilson interval below, shaded
    by the rate (blue: refusal on harmful sets; orange: over-refusal on benign sets)."""
    import plotly.graph_objects as go

    wide = safety_wide(rows)
    policies = [c for c in wide.columns if c not in ("side", "dataset", "n")]
    lookup = {(s, lab, p): r for s, lab, p, r in zip(rows["side"], rows["label"], rows["policy"],
                                                     rows.itertuples(index=False))}
    text_cols: list[list[str]] = [list(wide["side"]), list(wide["dataset"]), list(wide["n"])]
    fill_cols: list[list[str]] = [["white"] * len(wide)] * 3
    for p in policies:
        texts, fills = [], []
        for side, lab in zip(wide["side"], wide["dataset"]):
            r = lookup.get((side, lab, p))
            if r is None or r.rate != r.rate:
                texts.append("–")
                fills.append("white")
                continue
            ci = (f"<br><span style='font-size:10px'>[{100 * r.ci_low:.1f}, {100 * r.ci_high:.1f}]</span>"
                  if hasattr(r, "ci_low") and r.ci_low == r.ci_low else "")
            texts.append(f"{r.cell}{ci}")
            red, green, blue = SHADE.get(side, (140, 140, 140))
            fills.append(f"rgba({red},{green},{blue},{0.08 + 0.5 * float(r.rate):.3f})")
        text_cols.append(texts)
        fill_cols.append(fills)
    bold = [f"<b>{lab}</b>" if not lab.startswith(("pooled", "macro")) else f"<i>{lab}</i>" for lab in wide["dataset"]]
    text_cols[1] = bold
    fig = go.Figure(go.Table(
        columnwidth=[70, 270, 40] + [150] * len(policies),
        header={"values": [f"<b>{c}</b>" for c in ("side", "dataset", "n", *policies)], "fill_color": "#eef1f4",
                "align": "left", "font": {"size": 12}},
        cells={"values": text_cols, "fill_color": fill_cols, "align": ["left", "left", "right"] +
               ["right"] * len(policies), "font": {"size": 12}, "height": 34}))
    note = "<br>".join(judges_note(rows).split("; "))
    fig.update_layout(template=plotting.template(), width=420 + 150 * len(policies) + 40,
                      height=170 + 46 * (len(wide) + 1),
                      title=f"P1 safety table: % refused ± SE on the test prompts (95 % interval below: Wilson; macro rows: normal)"
                            f"<br><sup>{note}</sup>", margin={"t": 130, "l": 20, "r": 20, "b": 20})
    return fig


def safety_bars(rows: pd.DataFrame) -> Any:
    """Pure: the same numbers as grouped bars (one panel per side, one colour per policy, Wilson 95 % whiskers;
    normal intervals on the macro rows)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    sides = [s for s in SIDES if (rows["side"] == s).any()]
    fig = make_subplots(rows=len(sides), cols=1, vertical_spacing=0.28 if len(sides) > 1 else 0.1,
                        subplot_titles=[SIDE_TITLES[s] for s in sides])
    colours = plotting.template().layout.colorway
    policies = list(dict.fromkeys(rows["policy"]))
    has_ci = {"ci_low", "ci_high"} <= set(rows.columns)
    for i, side in enumerate(sides, start=1):
        part = rows[rows["side"] == side]
        for k, policy in enumerate(policies):
            g = part[part["policy"] == policy]
            if not len(g):
                continue
            error = ({"type": "data", "symmetric": False, "array": (g["ci_high"] - g["rate"]).clip(lower=0),
                      "arrayminus": (g["rate"] - g["ci_low"]).clip(lower=0)} if has_ci else None)
            fig.add_trace(go.Bar(x=g["label"], y=g["rate"], name=str(policy), legendgroup=str(policy),
                                 showlegend=i == 1, marker_color=colours[k % len(colours)], error_y=error,
                                 customdata=g["cell"], hovertemplate="%{x}<br>%{customdata} %<extra>" + str(policy)
                                                                     + "</extra>"), row=i, col=1)
        fig.update_yaxes(range=[0, 1.05], title_text="rate", row=i, col=1)
        fig.update_xaxes(tickangle=-35, row=i, col=1)
    n = max(int((rows["side"] == s).sum()) for s in sides) if sides else 1
    fig.update_layout(template=plotting.template(), barmode="group", width=max(900, 22 * n + 300),
                      height=460 * len(sides) + 160, legend={"title": "policy"},
                      title=f"P1 safety table as bars (test prompts; whiskers: 95 % intervals)<br><sup>"
                            f"{judges_note(rows)[:200]}</sup>")
    return fig
