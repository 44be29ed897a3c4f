"""Render the papers' results as Markdown from saved tables only (no model): P1 (headline, per-dataset safety table,
probe-vs-refusal-token AUROC, gate errors, low-rank choice, transfer), P2 (chosen settings on test) and the category
specificity summary. Every number is read from a table; a missing run folder is reported as not run.

    python analyses/summarise.py --p1 runs/p1 --p2 runs/p2/stock runs/p2/tuned --specificity runs/specificity \
        --out docs/RESULTS.md
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _pct(x: Any, digits: int = 1) -> str:
    try:
        v = float(x)
    except (TypeError, ValueError):  # None, pd.NA
        return "n/a"
    return "n/a" if math.isnan(v) else f"{100 * v:.{digits}f}"


def _num(x: Any, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.{digits}f}"


def _ci(row: Any, key: str) -> str:
    return f"{_pct(row[key])} [{_pct(row[f'{key}_ci_low'])}, {_pct(row[f'{key}_ci_high'])}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _load(folder: Path, name: str) -> Any:
    import pandas as pd

    path = folder / f"{name}.parquet"
    return pd.read_parquet(path) if path.exists() else None


def p1_section(folder: Path) -> str:
    import json

    out = [f"## P1: categorical steering, gate, low-rank combination, transfer (`{folder}`)"]
    head = _load(folder, "headline")
    if head is None:
        return out[0] + "\n\nnot run: `python analyses/p1_steering.py --model <tuned folder> --out " \
                        f"{folder}`\n"
    splits = _load(folder, "splits")
    if splits is not None:
        sizes = splits.groupby("split").n.sum().to_dict()
        seed = int(splits.seed.iloc[0])
        out.append(f"Splits (seed {seed}): " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ". "
                   "Every choice was made on val; test was evaluated once with the chosen settings.")
    out.append("### Headline (test; refusal-token judge at the first response position, greedy; 95 % Wilson)")
    out.append(f"Over-refusal is pooled over {head.benign_sets.iloc[0] if 'benign_sets' in head else 'the benign sets'};"
               " refusal is pooled over every harmful test set. Targets: over-refusal <= 10 %, refusal >= 90 %, "
               "perplexity ratio <= 1.10 (coherence proxy: perplexity of benign answers under the unsteered model, "
               "on the generated subsample).")
    out.append(_table(["policy", "over-refusal %", "macro over-refusal %", "refusal %", "macro refusal %",
                       "ppl ratio", "n benign / harmful"],
                      [[r.policy, _ci(r._asdict(), "over_refusal"), _pct(r.over_refusal_macro), _ci(r._asdict(), "refusal"),
                        _pct(r.refusal_macro), _num(r.ppl_ratio), f"{r.over_refusal_n} / {r.refusal_n}"]
                       for r in head.itertuples()]))
    cand = _load(folder, "candidates")
    if cand is not None and len(cand):
        ch = cand[cand.chosen.astype(bool)]
        out.append("### Chosen on val")
        out.append(_table(["gate rule", "method", "layer", "toward", "away", "val refusal %", "val over-refusal %",
                           "val ppl ratio"],
                          [[r.gate_rule, r.method, r.layer, r.toward, r.away, _pct(r.val_refusal),
                            _pct(r.val_over_refusal), _num(r.ppl_ratio)] for r in ch.itertuples()]))
    lr = _load(folder, "lowrank_sweep")
    if lr is not None and "chosen" in lr:
        ch = lr[lr.chosen.fillna(False).astype(bool)]
        if len(ch):
            out.append(_table(["low-rank basis", "gate rule", "toward x", "away x", "val refusal %",
                               "val over-refusal %", "val ppl ratio"],
                              [[r.basis, r.gate_rule, r.toward, r.away, _pct(r.refusal), _pct(r.over_refusal),
                                _num(r.ppl_ratio)] for r in ch.itertuples()]))
    rates = _load(folder, "test_rates")
    if rates is not None:
        t = rates[(rates.grouping == "dataset") & (rates.row != "macro")]
        pols = list(dict.fromkeys(t.policy))
        out.append("### Per dataset (test; % refused ± SE)")
        rows = []
        for (side, ds), g in t.groupby(["side", "dataset"], sort=True):
            cells = {r.policy: f"{_pct(r.rate)} ± {_pct(r.se)} (n={r.n})" for r in g.itertuples()}
            rows.append([side, "pooled" if ds == "(all)" else ds] + [cells.get(p, "") for p in pols])
        out.append(_table(["side", "dataset", *pols], rows))
    sub = _load(folder, "test_rates_substring")
    agree = _load(folder, "agreement")
    if sub is not None and agree is not None:
        out.append("### Second judge (substring) on the generated subsample, and agreement with the refusal token")
        rows = []
        for r in sub.itertuples():
            a = agree[agree.policy == r.policy]
            rows.append([r.policy, r.side, f"{_pct(r.rate)} [{_pct(r.ci_low)}, {_pct(r.ci_high)}] (n={r.n})",
                         _pct(a.agreement.iloc[0]) if len(a) else "n/a", _num(a.kappa.iloc[0], 2) if len(a) else ""])
        out.append(_table(["policy", "side", "substring refusal %", "agreement %", "kappa"], rows))
    au = _load(folder, "auroc")
    if au is not None and len(au):
        out.append("### Does the probe separate harmful prompts from lookalikes better than the refusal token?")
        out.append(_table(["pair", "score", "AUROC [95 % bootstrap]", "n pos / neg"],
                          [[r.pair, r.score, f"{_num(r.auroc)} [{_num(r.ci_low)}, {_num(r.ci_high)}]",
                            f"{r.n_pos} / {r.n_neg}"] for r in au.itertuples()]))
    ge = _load(folder, "gate_errors")
    if ge is not None and len(ge):
        out.append("Gate errors on test (benign flagged, or harmful not flagged):")
        out.append(_table(["dataset", "label", "n", "flagged", "errors %"],
                          [[r.dataset, r.label, r.n, r.flagged, _pct(r.error_rate)] for r in ge.itertuples()]))
    tr = _load(folder, "transfer")
    if tr is not None and len(tr):
        out.append("### Transfer to the stock model (no retraining; substring judge on generated answers)")
        out.append(_table(["policy", "prompts", "refused % [95 %]", "n", "gate flagged %", "reused"],
                          [[r.policy, r.label, f"{_pct(r.rate)} [{_pct(r.ci_low)}, {_pct(r.ci_high)}]", r.n,
                            _pct(getattr(r, "gate_flag_rate", None)), r.reused] for r in tr.itertuples()]))
    rv = _load(folder, "reverse_transfer")
    if rv is not None and len(rv):
        out.append("### Reverse transfer, stock -> tuned (directions, reference norm and gate fitted on the stock "
                   "model; the tuned model's refusal-token router; first-position judge on a seeded test subsample)")
        out.append(_table(["policy", "prompts", "refused % [95 %]", "n", "gate flagged %", "reused"],
                          [[r.policy, r.label, f"{_pct(r.rate)} [{_pct(r.ci_low)}, {_pct(r.ci_high)}]", r.n,
                            _pct(r.gate_flag_rate), r.reused] for r in rv.itertuples()]))
    summary = folder / "summary.json"
    if summary.exists():
        out.append(f"Wall time of the run: {json.loads(summary.read_text()).get('seconds')} s.")
    return "\n\n".join(out) + "\n"


def p2_section(folders: Sequence[Path]) -> str:
    out = ["## P2: category-wise steering (unsupervised, pruned, guided)"]
    for folder in folders:
        t = _load(folder, "p2_test_summary")
        if t is None:
            out.append(f"`{folder}`: not run")
            continue
        out.append(f"### `{folder}` (test; unsafe-response rate = harmful prompts answered; helpfulness proxy = "
                   "share of benign prompts answered, stands for helpfulness)")
        out.append(_table(["setting", "admissible on val", "unsafe-response % [95 %]", "ratio to unsteered",
                           "halved", "helpfulness %", "help ratio", "ppl ratio", "n harmful / benign"],
                          [[r.setting, r.admissible_on_val, f"{_pct(r.ur)} [{_pct(r.ur_ci_low)}, {_pct(r.ur_ci_high)}]",
                            _num(r.ur_ratio), r.ur_halved, _pct(r.helpfulness), _num(r.help_ratio), _num(r.ppl_ratio),
                            f"{r.ur_n} / {r.helpfulness_n}"] for r in t.itertuples()]))
    return "\n\n".join(out) + "\n"


def specificity_section(folder: Path) -> str:
    out = [f"## Category specificity (`{folder}`)"]
    s = _load(folder, "summary")
    if s is None:
        return out[0] + "\n\nnot run\n"
    s = s[s.metric == s.metric.iloc[0]] if "metric" in s else s
    out.append("Mean effect of steering with category i on prompts of category i (diagonal) and of other categories "
               "(off-diagonal); ratio = diagonal / off-diagonal (paired bootstrap intervals). A shared refusal knob "
               "gives a ratio near 1.")
    full = _load(folder, "summary")
    cat = full[full.variant != "control"]
    out.append(_table(["variant", "set", "sign", "metric", "diagonal", "off-diagonal", "ratio [95 %]",
                       "diag - offdiag [95 %]"],
                      [[r.variant, r.set, r.sign, r.metric, _num(r.mean_diag), _num(r.mean_offdiag),
                        f"{_num(r.ratio, 2)} [{_num(r.ratio_ci_low, 2)}, {_num(r.ratio_ci_high, 2)}]",
                        f"{_num(r.diag_minus_offdiag)} [{_num(r.diag_minus_offdiag_ci_low)}, "
                        f"{_num(r.diag_minus_offdiag_ci_high)}]"] for r in cat.itertuples()]))
    ctrl = full[full.variant == "control"]
    if len(ctrl) and "mean_all" in ctrl:
        out.append("Controls (no diagonal: the mean effect over every category's prompts of steering with the shared "
                   "refusal direction, or with random directions of the same norm):")
        out.append(_table(["control", "set", "sign", "metric", "directions", "mean effect [95 %]"],
                          [[r.rows, r.set, r.sign, r.metric, r.n_rows,
                            f"{_num(r.mean_all)} [{_num(r.mean_all_ci_low)}, {_num(r.mean_all_ci_high)}]"]
                           for r in ctrl.itertuples()]))
    return "\n\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--p1", type=Path, default=None)
    p.add_argument("--p2", type=Path, nargs="*", default=[])
    p.add_argument("--specificity", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: print it)")
    args = p.parse_args(argv)
    parts = ["# Results (rendered from the saved tables by `analyses/summarise.py`)\n"]
    if args.p1:
        parts.append(p1_section(args.p1))
    if args.p2:
        parts.append(p2_section(args.p2))
    if args.specificity:
        parts.append(specificity_section(args.specificity))
    text = "\n".join(parts)
    if args.out:
        from catlens.runs import write_text_atomic

        write_text_atomic(args.out, text)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
