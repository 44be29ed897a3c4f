"""The refusal judges against the hand-labelled sample: the steps of ``analyses/judge_accuracy.py``, in order:
:func:`record_labels` (the labels' file and digest in the run's manifest), :func:`tables` (accuracy with Wilson
intervals, pairwise kappa, disagreements: :func:`catlens.judges.judge_accuracy` on the judges :data:`JUDGE_NAMES`),
:func:`render` (markdown of the tables) and :func:`write_docs` (the block between :data:`BEGIN` and :data:`END`
of a markdown file). Every number rendered comes from the tables. Importing this module touches no disk, network
or device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catlens.formatting import pct

JUDGE_NAMES = ("refusal_token", "substring", "full_answer")
BEGIN, END = "<!-- judge_accuracy:begin -->", "<!-- judge_accuracy:end -->"


def record_labels(run: Any, labels: str | None, rows: list[dict[str, Any]]) -> None:
    """Record the labelled sample (``labels``, or the packaged one when None: path, sha256, rows) in ``run``."""
    from catlens.runs import sha256_file, sha256_text

    if labels:
        digest = sha256_file(labels)
    else:
        from importlib import resources

        digest = sha256_text(resources.files("catlens").joinpath("data/judge_labels.jsonl").read_text("utf-8"))
    run.record_data("judge_labels", {"path": labels or "catlens/data/judge_labels.jsonl", "sha256": digest,
                                     "rows": len(rows)})


def tables(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every table of the run from the labelled rows (library calls only)."""
    import pandas as pd

    from catlens.judges import accuracy_table, judge_accuracy

    result = judge_accuracy(rows, [r["label"] for r in rows], JUDGE_NAMES)
    verdicts = result.verdicts
    verdicts["source"] = [f"{r['model']}|{r['policy']}" for r in rows]
    verdicts["prompt_label"] = [r["prompt_label"] for r in rows]
    verdicts["split"] = [r["split"] for r in rows]
    judge_columns = [f"refused_{j}" for j in JUDGE_NAMES]
    parts = [accuracy_table(verdicts, "reference", judge_columns, by=[g]).rename(columns={g: "group"})
             .assign(grouping=g) for g in ("split", "source", "prompt_label")]
    accuracy = pd.concat([parts[0], *[p[p.group != "(all)"] for p in parts[1:]]], ignore_index=True)
    accuracy.loc[accuracy.group == "(all)", "grouping"] = "all"
    accuracy = accuracy[["grouping", "group", *[c for c in accuracy.columns if c not in ("grouping", "group")]]]
    wrong = verdicts[judge_columns].astype(bool).ne(verdicts["reference"], axis=0).any(axis=1)
    text = {r["id"]: r for r in rows}
    rows_out = verdicts[wrong].assign(
        prompt=[text[i]["prompt"] for i in verdicts[wrong].id],
        response=[text[i]["response"] for i in verdicts[wrong].id],
        note=[text[i]["note"] for i in verdicts[wrong].id])
    keep = ["id", "split", "source", "prompt_label", *judge_columns, "reference", "note", "prompt", "response"]
    return {"accuracy": accuracy, "agreement": result.agreement, "disagreements": result.disagreements,
            "disagreement_rows": rows_out[keep].reset_index(drop=True),
            "verdicts": verdicts[["id", "split", "source", "prompt_label", *judge_columns, "reference"]]}


def _pct(x: Any) -> str:
    return pct(x, unit=" %")


def render(t: dict[str, Any], n_rows: int, run: str) -> str:
    """Markdown of the run's tables (every number from the tables)."""
    import pandas as pd

    acc = t["accuracy"]
    lines = [(f"Judges against {n_rows} hand-labelled answers (`catlens/data/judge_labels.jsonl`, labels by "
              f"LLM-based assistants, not humans, see `catlens/data/judge_labels.md`); run `{run}`, "
              f"`python analyses/judge_accuracy.py`. 95 % Wilson intervals."), "",
             "| rows | judge | n | accuracy [95 % CI] | refusals caught | answers kept | kappa vs labels |",
             "|---|---|---|---|---|---|---|"]
    for _, r in acc[acc.grouping.isin(["all", "split"])].iterrows():
        lines.append(f"| {r.group if r.grouping == 'split' else 'all'} | {r.judge.removeprefix('refused_')} | {r.n} "
                     f"| {_pct(r.accuracy)} [{_pct(r.ci_low)}, {_pct(r.ci_high)}] "
                     f"| {r.tp}/{r.tp + r.fn} ({_pct(r.refused_recall)}) | {r.tn}/{r.tn + r.fp} "
                     f"({_pct(r.answered_recall)}) | {r.kappa:.2f} |")
    lines += ["", "Per source (all rows):", "", "| source | judge | n | accuracy [95 % CI] | kappa vs labels |",
              "|---|---|---|---|---|"]
    for _, r in acc[acc.grouping.isin(["source", "prompt_label"])].iterrows():
        lines.append(f"| {r.group} | {r.judge.removeprefix('refused_')} | {r.n} | {_pct(r.accuracy)} "
                     f"[{_pct(r.ci_low)}, {_pct(r.ci_high)}] | {r.kappa:.2f} |")
    lines += ["", "Pairwise agreement (`reference` = the labels):", "",
              "| a | b | n | agreement | kappa | both refused | only a | only b | neither |", "|---|---|---|---|---|---|---|---|---|"]
    for _, r in t["agreement"].iterrows():
        lines.append(f"| {r.judge_a.removeprefix('refused_')} | {r.judge_b.removeprefix('refused_')} | {r.n} | "
                     f"{_pct(r.agreement)} | {r.kappa:.2f} | {r.both} | {r.only_a} | {r.only_b} | {r.neither} |")
    d = t["disagreements"]
    cols = [c for c in d.columns if c.startswith("refused_") or c == "reference"]
    lines += ["", (f"Verdict patterns that are not unanimous ({int(d.n.sum())} of {n_rows} answers; R = refused, "
                   f"A = answered):"), "", "| " + " | ".join(c.removeprefix("refused_") for c in cols) + " | n |",
              "|" + "---|" * (len(cols) + 1)]
    for _, r in d.iterrows():
        marks = ["?" if pd.isna(r[c]) else ("R" if bool(r[c]) else "A") for c in cols]
        lines.append("| " + " | ".join(marks) + f" | {r.n} |")
    return "\n".join(lines)


def write_docs(path: Path, block: str) -> None:
    text = path.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} block; add the two markers where the tables belong.")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}", encoding="utf-8")


def headline(t: dict[str, Any]) -> dict[str, Any]:
    """The manifest's summary: each judge's accuracy on all rows and each pair's kappa (rounded to 4 places)."""
    acc = t["accuracy"]
    overall = acc[acc.grouping == "all"]
    return {"accuracy": {r.judge: round(float(r.accuracy), 4) for r in overall.itertuples()},
            "kappa": {f"{r.judge_a}~{r.judge_b}": round(float(r.kappa), 4) for r in t["agreement"].itertuples()}}
