"""P2's figure layout: per-category share of harmful prompts answered on the test prompts, unsteered vs all activations
(unsupervised) vs pruned vs guided, with Wilson 95 % intervals; one panel per model when several runs are given
(e.g. the stock and the refusal-tuned model). A second figure shows the share of benign prompts answered (the
helpfulness proxy; pooled and per benign category) with its intervals.

Usage:  python figures/fig_p2_bars.py RUN_DIR [RUN_DIR ...] [--judge substring] [--out-dir DIR] [--no-png]
Reads:  RUN_DIR/p2_test.parquet and RUN_DIR/manifest.json (the model's name for the panel title) of each run,
        written by analyses/p2_steering.py
Writes: DIR/fig_p2_bars.html/.csv/.png and DIR/fig_p2_helpfulness.html/.csv/.png;
        DIR defaults to figures/out/<first run's name>/
Judge: the run's primary judge (the one its settings were chosen with) unless --judge is given.
"""

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from catlens import plotting
from catlens.runs import load_table

METHOD_LABELS = {"unsteered": "unsteered", "unsupervised": "all activations", "pruned": "pruned",
                 "guided": "guided"}
METHOD_ORDER = tuple(METHOD_LABELS.values())


def _model_name(run_dir: Path) -> str:
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
        return str(manifest["models"]["model"]["name"])
    except (OSError, KeyError, TypeError, ValueError):
        return run_dir.name


def _primary_judge(test: pd.DataFrame) -> str:
    judges = [j for j in test["judge"].dropna().unique()]
    return "substring" if "substring" in judges else sorted(judges)[0]


def load_runs(run_dirs: Sequence[Path], judge: str | None = None) -> pd.DataFrame:
    """The test rows of every run, with ``model`` (panel) and ``label`` (bar colour) columns."""
    frames = []
    names: list[str] = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        test = load_table(run_dir / "p2_test")
        summary_path = run_dir / "p2_test_summary.parquet"
        primary = judge
        if primary is None and summary_path.exists():
            primary = str(load_table(summary_path)["judge"].iloc[0])
        primary = primary or _primary_judge(test)
        if primary not in set(test["judge"].dropna()):
            raise ValueError(f"judge {primary!r} is not in {str(run_dir)!r}; it has "
                             f"{sorted(test['judge'].dropna().unique())}.")
        name = _model_name(run_dir)
        if name in names:  # two runs of one model: tell them apart by folder
            name = f"{name} ({run_dir.name})"
        names.append(name)
        frames.append(test.assign(model=name, primary_judge=primary))
    data = pd.concat(frames, ignore_index=True)
    several = data.groupby(["model", "method"])["group"].nunique().max() > 1
    data["label"] = [METHOD_LABELS.get(m, m) + (f" ({g.split('/', 1)[1]})" if several and m != "unsteered"
                                                  and "/" in str(g) else "")
                     for m, g in zip(data["method"], data["group"])]
    return data


def _with_errors(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(err_plus=(df["ci_high"] - df["value"]).clip(lower=0),
                     err_minus=(df["value"] - df["ci_low"]).clip(lower=0))


def unsafe_table(data: pd.DataFrame) -> pd.DataFrame:
    """Per-category and pooled shares of harmful prompts answered (``harmful_answered_rate``), primary judge."""
    sel = data[(data["metric"] == "harmful_answered_rate") & (data["judge"] == data["primary_judge"])
               & data["row"].isin(["group", "pooled"])].copy()
    if sel.empty:
        raise ValueError("no harmful_answered_rate rows in the test tables; were they written by "
                         "analyses/p2_steering.py?")
    sel["category"] = sel["category"].where(sel["row"] == "group", "pooled")
    cols = ["model", "label", "method", "group", "setting", "category", "n", "k", "value", "se", "ci_low",
            "ci_high", "primary_judge"]
    return _with_errors(sel[cols].reset_index(drop=True))


def helpfulness_table(data: pd.DataFrame) -> pd.DataFrame:
    """Share of benign prompts answered (``benign_answered_rate``, primary judge), per benign category and pooled."""
    sel = data[(data["metric"] == "benign_answered_rate") & (data["judge"] == data["primary_judge"])
               & data["row"].isin(["group", "pooled"])].copy()
    if sel.empty:
        raise ValueError("no benign_answered_rate rows in the test tables.")
    sel["category"] = sel["category"].where(sel["row"] == "group", "pooled").replace({"(none)": "generic"})
    cols = ["model", "label", "method", "group", "setting", "category", "n", "k", "value", "se", "ci_low",
            "ci_high", "primary_judge"]
    return _with_errors(sel[cols].reset_index(drop=True))


def _bars(df: pd.DataFrame, *, title: str, y_title: str) -> Any:
    import plotly.express as px

    order = [lab for base in METHOD_ORDER for lab in dict.fromkeys(df["label"]) if lab.split(" (")[0] == base]
    order += [lab for lab in dict.fromkeys(df["label"]) if lab not in order]
    cats = sorted(c for c in df["category"].unique() if c != "pooled") + ["pooled"]
    n_models = df["model"].nunique()
    fig = px.bar(df, x="category", y="value", color="label", facet_col="model" if n_models > 1 else None,
                 facet_col_wrap=1 if n_models > 1 else 0, barmode="group", error_y="err_plus",
                 error_y_minus="err_minus", category_orders={"label": order, "category": cats},
                 range_y=[0, 1.05], title=title, template=plotting.template(),
                 labels={"value": y_title, "category": "category", "label": "method"},
                 hover_data=["setting", "n", "k", "ci_low", "ci_high"])
    fig.for_each_annotation(lambda a: a.update(text=a.text.split("=", 1)[-1]))
    width = max(900, 26 * len(cats) * len(order))
    fig.update_layout(width=width, height=380 * n_models + 80)
    return fig


def make_figure(data: pd.DataFrame) -> Any:
    """Pure: per-category bars of the share of harmful prompts answered, one panel per model."""
    t = unsafe_table(data)
    judge = ", ".join(sorted(t["primary_judge"].unique()))
    return _bars(t, title=f"Harmful prompts answered (not refused, non-empty, not degenerate)<br><sup>test split; "
                     f"judge {judge}; bars: Wilson 95 % intervals</sup>",
                 y_title="harmful prompts answered")


def make_helpfulness_figure(data: pd.DataFrame) -> Any:
    """Pure: the share of benign prompts answered, per benign category and pooled, one panel per model."""
    title = ("Benign prompts answered (helpfulness proxy)<br><sup>test split; bars: Wilson 95 % intervals</sup>")
    return _bars(helpfulness_table(data), title=title, y_title="benign prompts answered")


def main(run_dir: Path | Sequence[Path], out_dir: Path | None = None, png: bool = True,
         judge: str | None = None) -> dict[str, Path]:
    runs = [Path(run_dir)] if isinstance(run_dir, (str, Path)) else [Path(r) for r in run_dir]
    if not runs:
        raise ValueError("give at least one run folder of analyses/p2_steering.py.")
    data = load_runs(runs, judge)
    out = Path(out_dir) if out_dir is not None else Path("figures/out") / runs[0].name
    fmt = ("png",) if png else ()
    written = plotting.save_figure(make_figure(data), out / "fig_p2_bars", data=unsafe_table(data), formats=fmt)
    more = plotting.save_figure(make_helpfulness_figure(data), out / "fig_p2_helpfulness",
                                data=helpfulness_table(data), formats=fmt)
    return {**written, **{f"helpfulness_{k}": v for k, v in more.items()}}


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, nargs="+")
    p.add_argument("--judge", default=None)
    p.add_argument("--out-dir", type=Path, default=None)
    p.add_argument("--no-png", action="store_true")
    a = p.parse_args()
    main(a.run_dir, a.out_dir, png=not a.no_png, judge=a.judge)
