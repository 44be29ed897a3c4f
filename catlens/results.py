"""The papers' results as Markdown (``docs/RESULTS.md``), rendered from a run's saved tables and manifest only (no
model): P1 (headline, per-dataset safety table, probe-vs-refusal-token AUROC, gate errors, low-rank choice,
transfer), P2 (chosen settings on test) and the category specificity summary. Every number and every sentence is
rendered from the tables (where the settings were chosen is read from the manifest's ``selection`` record, written
through :mod:`catlens.selection`, never printed as a constant); a missing run folder is reported as not run.

``analyses/summarise.py`` is the command line over :func:`render_results`; the HTML report of a run folder is
:mod:`catlens.report`.

Importing this module touches no disk; pandas is imported when a table is read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catlens.formatting import NA, as_float, fixed, pct

RESULTS_TITLE = "# Results (rendered from the saved tables by `analyses/summarise.py`)\n"
"""The first line of the rendered file."""


def _ci(row: Any, key: str) -> str:
    return f"{pct(row[key])} [{pct(row[f'{key}_ci_low'])}, {pct(row[f'{key}_ci_high'])}]"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _load(folder: Path, name: str) -> Any:
    import pandas as pd

    path = folder / f"{name}.parquet"
    return pd.read_parquet(path) if path.exists() else None


def _manifest(folder: Path) -> dict[str, Any]:
    import json

    path = folder / "manifest.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError):
        return {}


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


def selection_lines(manifest: dict[str, Any], measured: str = "test") -> list[str]:
    """Where a run's settings were chosen and what was measured, read from its manifest's ``selection`` record (see
    :meth:`catlens.selection.Selection.record`) and ``test_evaluation``; says so when the manifest has none."""
    sel = manifest.get("selection")
    if not isinstance(sel, dict):
        return ["The run's manifest has no selection record, so where its settings were chosen is not stated here."]
    choices = [c for c in sel.get("choices") or [] if isinstance(c, dict)]
    split = sel.get("split", "?")
    made = [c for c in choices if c.get("chosen")]
    rule = (sel.get("rule") or (choices[0].get("rule") if choices else None) or {}).get("text")
    out = [f"Settings were chosen on the {split} split: {len(made)} of {_count(len(choices), 'choice')} made"
           + (f" (rule: {rule})." if rule else ".")]
    for c in choices:
        label = c.get("group")
        where = f" ({label})" if label is not None else ""
        if c.get("chosen"):
            out.append(f"- chosen{where}: {c.get('reason')}.")
        else:
            out.append(f"- nothing chosen{where}: {c.get('reason')}; not evaluated further.")
    read = sel.get("test_read", sel.get("measurement_read"))
    if read is False:
        out.append(f"The {measured} split was not read by this run.")
    elif read is True:
        out.append(f"The {measured} split was read once, after the choice.")
    te = manifest.get("test_evaluation")
    if isinstance(te, dict):
        out.append(f"Test split (seed {te.get('split_seed')}) evaluated once with "
                   f"{_count(len(te.get('settings') or []), 'setting')}: {', '.join(te.get('settings') or [])}.")
    return out


SEEN_WHILE_CHOOSING = {"xstest_safe": "seen while choosing the fine-tune recipe (docs/FINETUNE.md's ablations), so "
                                      "not an untouched test set"}
"""Protocol facts about datasets, said next to their numbers."""


def p1_findings(head: Any) -> list[str]:
    """Sentences about the headline, each computed from the ``headline`` table."""
    out = []
    allp = head[head.benign_pool == "all"]
    base = allp[allp.policy == "unsteered"]
    steered = allp[allp.policy != "unsteered"]
    if not len(steered) or not len(base):
        return ["No steered policy was evaluated on the test sets."]
    b = base.iloc[0]
    best = steered.sort_values(["meets_targets", "over_refusal"], ascending=[False, True]).iloc[0]
    met = steered[steered.meets_targets.astype(bool)]
    out.append(f"{int(len(met))} of {_count(len(steered), 'steered policy', 'steered policies')} meet all three "
               f"targets on the pooled test sets.")
    out.append(f"Lowest pooled over-refusal: {best.policy}, {pct(best.over_refusal)} % (unsteered "
               f"{pct(b.over_refusal)} %) at harmful refusal {pct(best.refusal)} % (unsteered {pct(b.refusal)} %) "
               f"and perplexity ratio {fixed(best.ppl_ratio)}.")
    return out


def bound_lines(folder: Path) -> list[str]:
    """What bounds the result (the ``bound`` table, test): each gate's rates beside the oracle gate's and the best
    side per row, and a sentence per gap computed from the table."""
    bound = _load(folder, "bound")
    if bound is None or not len(bound):
        return []
    b = bound.set_index("gate")
    r0 = bound.iloc[0]
    out = [f"### What bounds the result (test answers, {r0.judge}; zones of the chosen global setting: "
           f"{r0.method} at layer {r0.layer}, toward {r0.toward}, away {r0.away}, positions {r0.positions})",
           _table(["gate", "over-refusal %", "refusal %", "ppl ratio", "n benign / harmful"],
                  [[r.gate, _ci(r._asdict(), "over_refusal"), _ci(r._asdict(), "refusal"), fixed(r.ppl_ratio),
                    f"{r.over_refusal_n} / {r.refusal_n}"] for r in bound.itertuples()])]
    need = ("chosen zones (offline)", "oracle gate (label)", "best side per row")
    if all(k in b.index for k in need):
        ch, orc, best = (b.loc[k] for k in need)
        out.append(f"With this steering, a gate that knew every prompt's label would reach over-refusal "
                   f"{pct(orc.over_refusal)} % at refusal {pct(orc.refusal)} % (the chosen zones: "
                   f"{pct(ch.over_refusal)} % at {pct(ch.refusal)} %); choosing the best of the three answers per "
                   f"row, {pct(best.over_refusal)} % at {pct(best.refusal)} %. The gap from the chosen zones to the "
                   "oracle is the gate's; what is left at the oracle is the steering's.")
    tf = _load(folder, "test_frontier")
    if tf is not None and len(tf):
        head = _load(folder, "headline")
        target = float(head.target_refusal.iloc[0]) if head is not None and "target_refusal" in head else 0.9
        ok = tf[tf.refusal >= target]
        if len(ok):
            r = ok.sort_values(["over_refusal", "refusal"], ascending=[True, False]).iloc[0]
            out.append(f"With hindsight (the test frontier of every zone pair of this gate, chosen on nothing), the "
                       f"lowest over-refusal at harmful refusal >= {pct(target)} % is {pct(r.over_refusal)} % (refusal "
                       f"{pct(r.refusal)} %, thresholds {fixed(r.lower)} / {fixed(r.upper)}, perplexity ratio "
                       f"{fixed(r.ppl_ratio)}): what this gate's scores allow at best.")
    own = bound[bound.gate.str.contains("own answers")]
    if len(own) and "agreement_with_offline" in own:
        out.append(f"The gated policy's own answers agree with the offline zone verdicts on "
                   f"{pct(own.agreement_with_offline.iloc[0])} % of rows.")
    out.append("Figure: `figures/fig_p1_bound.py` (the test frontier of every zone pair and the gate's test ROC).")
    return out


EARLIER_KEYS = ("train_cap", "val_cap", "test_cap", "test_gen_cap", "val_gen_n", "gen_n", "gen_tokens", "scopes",
                "layers", "gate_layers", "toward", "away", "candidates", "zone_grid", "dtype")
"""The P1 options compared between a run and an earlier run on the same test split."""


def earlier_lines(folder: Path, earlier: Sequence[Path]) -> list[str]:
    """Earlier P1 runs that read the same test split before this one: what this run changed after seeing them, and
    their pooled headline, each rendered from the two runs' manifests and ``headline`` tables. A change made after a
    test read means this run's test sets are no longer untouched; the text says so whenever an earlier run read
    them."""
    if not earlier:
        return []
    now = _manifest(folder)
    cfg = now.get("config") or {}
    splits = _load(folder, "splits")
    seed = None if splits is None else int(splits.seed.iloc[0])
    out = ["### Earlier runs on the same test split"]
    for old in earlier:
        m = _manifest(old)
        head = _load(old, "headline")
        if not m or head is None:
            out.append(f"`{old}`: no manifest or headline table, so it is not described here.")
            continue
        old_cfg = m.get("config") or {}
        old_splits = _load(old, "splits")
        old_seed = None if old_splits is None else int(old_splits.seed.iloc[0])
        changed = [f"{k.replace('_', '-')} {old_cfg.get(k)} -> {cfg.get(k)}" for k in EARLIER_KEYS
                   if old_cfg.get(k) != cfg.get(k)]
        same = "the same split seed" if seed == old_seed else f"split seed {old_seed} (this run: {seed})"
        allp = head[head.benign_pool == "all"] if "benign_pool" in head else head
        rows = "; ".join(f"{r.policy} over-refusal {pct(r.over_refusal)} % [{pct(r.over_refusal_ci_low)}, "
                         f"{pct(r.over_refusal_ci_high)}], refusal {pct(r.refusal)} %" for r in allp.itertuples())
        before = str(m.get("created", "")) < str(now.get("created", ""))
        if not before:
            out.append(f"`{old}` (started {m.get('created', '?')}, {same}) did not start before this run: {rows}.")
            continue
        out.append(f"`{old}` (started {m.get('created', '?')}, {same}) read the test sets before this run: {rows}. "
                   + ("This run changed " + ", ".join(changed) + " after that read" if changed else
                      "This run changed none of the compared options")
                   + ", so its test sets are not untouched: read its headline as a second look at the same prompts, "
                     "with the earlier run beside it.")
    return out


def p1_section(folder: Path, earlier: Sequence[Path] = ()) -> str:
    import json

    out = [f"## P1: categorical steering, three-zone gate, low-rank combination, transfer (`{folder}`)"]
    head = _load(folder, "headline_pools")
    if head is None:
        return out[0] + "\n\nnot run: `python analyses/p1_steering.py --model <tuned folder> --out " \
                        f"{folder}`\n"
    splits = _load(folder, "splits")
    if splits is not None:
        sizes = splits.groupby("split").n.sum().to_dict()
        seed = int(splits.seed.iloc[0])
        out.append(f"Splits (seed {seed}): " + ", ".join(f"{k} {v}" for k, v in sizes.items()) + ".")
    manifest = _manifest(folder)
    cfg = manifest.get("config") or {}
    sizes = [f"{k.replace('_', '-')} {cfg[k]}" for k in ("train_cap", "val_cap", "test_cap", "test_gen_cap",
                                                          "val_gen_n", "gen_tokens", "jailbreak_n", "dtype")
             if k in cfg]
    if sizes:
        out.append("Run sizes (the run's manifest): " + ", ".join(sizes)
                   + "; a test cap or a generated-test cap means a subsample of each test set, not the full protocol.")
    out.append("\n".join(selection_lines(manifest)))
    out.extend(earlier_lines(folder, earlier))
    judge = head.judge.iloc[0] if "judge" in head else "?"
    out.append(f"### Headline (test; judge: {judge}; 95 % Wilson)")
    pools = head.drop_duplicates("benign_pool")
    out.append("Over-refusal is pooled over the benign sets of each pool ("
               + "; ".join(f"{r.benign_pool}: {r.benign_sets}" for r in pools.itertuples())
               + "); refusal is pooled over every harmful test set. "
               + " ".join(f"{k}: {v}." for k, v in SEEN_WHILE_CHOOSING.items()
                          if any(k in str(x) for x in head.benign_sets))
               + f" Targets: over-refusal <= {pct(head.target_over_refusal.iloc[0])} %, refusal >= "
                 f"{pct(head.target_refusal.iloc[0])} %, perplexity ratio <= {fixed(head.target_ppl_ratio.iloc[0], 2)}"
                 " (perplexity of benign answers under the unsteered model).")
    out.append(_table(["policy", "benign pool", "over-refusal %", "macro over-refusal %", "refusal %", "ppl ratio",
                       "meets targets", "n benign / harmful"],
                      [[r.policy, r.benign_pool, _ci(r._asdict(), "over_refusal"), pct(r.over_refusal_macro),
                        _ci(r._asdict(), "refusal"), fixed(r.ppl_ratio), str(bool(r.meets_targets)),
                        f"{r.over_refusal_n} / {r.refusal_n}"] for r in head.itertuples()]))
    out.append(" ".join(p1_findings(head)))
    hfp = _load(folder, "headline_first_position")
    if hfp is not None and len(hfp):
        out.append("First-position refusal-token judge on every test prompt (the sweep's judge):")
        out.append(_table(["policy", "benign pool", "over-refusal %", "refusal %", "n benign / harmful"],
                          [[r.policy, r.benign_pool, _ci(r._asdict(), "over_refusal"), _ci(r._asdict(), "refusal"),
                            f"{r.over_refusal_n} / {r.refusal_n}"] for r in hfp.itertuples()]))
    out.extend(bound_lines(folder))
    gates = _load(folder, "gates")
    if gates is not None and len(gates):
        out.append("### The gate's features, chosen on val (AUROC harmful vs the headline's benign val sets)")
        out.append(_table(["features", "reads", "log-odds", "val AUROC (focus)", "val AUROC (all)", "chosen"],
                          [[r.features, r.reads or "-", str(bool(r.logodds)), fixed(r.val_auroc_focus),
                            fixed(r.val_auroc_all), "yes" if r.chosen else ""] for r in gates.itertuples()]))
    cand = _load(folder, "candidates")
    if cand is not None and len(cand):
        ch = cand[cand.chosen.astype(bool)]
        out.append("### Chosen settings (val; generated answers judged in full)")
        out.append(_table(["zones", "method", "layer", "toward", "away", "positions", "lower", "upper",
                           "val refusal %", "val over-refusal %", "val ppl ratio", "why"],
                          [[r.mode, r.method, r.layer, r.toward, r.away, r.positions, fixed(r.lower), fixed(r.upper),
                            pct(r.refusal), pct(r.over_refusal), fixed(r.ppl_ratio), r.reason]
                           for r in ch.itertuples()]))
        if "online_agreement" in ch.columns and ch.online_agreement.notna().any():
            out.append("The chosen zones were swept offline on the three sides' answers; the gated policies, generated "
                       "on the same val rows: " + "; ".join(
                           f"{r.mode}: over-refusal {pct(r.online_over_refusal)} %, refusal {pct(r.online_refusal)} "
                           f"%, verdicts agreeing with the offline ones on {pct(r.online_agreement)} % of rows"
                           for r in ch.itertuples() if r.online_agreement == r.online_agreement) + ".")
        n_ok = int(cand[cand["mode"] != "unsteered"].admissible.astype(bool).sum())
        out.append(f"{n_ok} of {_count(int((cand['mode'] != 'unsteered').sum()), 'candidate')} passed the "
                   "perplexity guard.")
    sw = _load(folder, "sweep")
    if sw is not None and len(sw):
        feas = sw[(sw["mode"] != "unsteered")]
        out.append(f"Sweep (val, first position): {int(feas.feasible.astype(bool).sum())} of "
                   f"{_count(len(feas), 'setting')} meet the constraint ({sw.objective_text.iloc[0]}).")
    full = _load(folder, "test_rates_full")
    if full is not None and len(full):
        t = full[(full.row != "macro")]
        for jname, jt in t.groupby("judge", sort=False):
            pols = list(dict.fromkeys(jt.policy))
            out.append(f"### Per dataset (test; judge {jname}; % refused ± SE)")
            rows = []
            for (side, ds), g in jt.groupby(["side", "dataset"], sort=True):
                cells = {r.policy: f"{pct(r.rate)} ± {pct(r.se)} (n={r.n})" for r in g.itertuples()}
                note = " (" + SEEN_WHILE_CHOOSING[ds].split(" (")[0] + ")" if ds in SEEN_WHILE_CHOOSING else ""
                rows.append([side, ("pooled" if ds == "(all)" else ds) + note] + [cells.get(p, "") for p in pols])
            out.append(_table(["side", "dataset", *pols], rows))
    agree = _load(folder, "agreement")
    if agree is not None and len(agree) and "judge_a" in agree:
        out.append("### Judges: pairwise agreement and Cohen's kappa on the generated test answers")
        out.append(_table(["policy", "judges", "n", "agreement %", "kappa"],
                          [[r.policy, f"{r.judge_a} / {r.judge_b}", r.n, pct(r.agreement), fixed(r.kappa, 2)]
                           for r in agree.itertuples()]))
        dis = _load(folder, "disagreements")
        if dis is not None:
            out.append(f"{len(dis)} generated answers on which the judges disagree are in `disagreements.csv`.")
    au = _load(folder, "auroc")
    if au is not None and len(au):
        out.append("### The gate against the model's own first-token refusal (test AUROC, 95 % bootstrap)")
        out.append(_table(["pair", "score", "AUROC [95 % bootstrap]", "n pos / neg"],
                          [[r.pair, r.score, f"{fixed(r.auroc)} [{fixed(r.ci_low)}, {fixed(r.ci_high)}]",
                            f"{r.n_pos} / {r.n_neg}"] for r in au.itertuples()]))
    ge = _load(folder, "gate_errors")
    if ge is not None and len(ge):
        out.append("Gate zones on test (benign steered toward refusal, or harmful not steered toward it, are errors):")
        out.append(_table(["dataset", "label", "n", "toward", "not steered", "away", "errors %"],
                          [[r.dataset, r.label, r.n, r.toward, r.none, r.away, pct(r.error_rate)]
                           for r in ge.itertuples()]))
    jb = _load(folder, "jailbreaks")
    if jb is not None and len(jb):
        t = jb[jb.row != "macro"] if "row" in jb else jb
        pols = list(dict.fromkeys(t.policy))
        out.append("### Jailbreak templates around harmful test prompts (% refused, 95 % Wilson)")
        rows = []
        for tmpl, g in t.groupby("template", sort=True):
            cells = {r.policy: f"{pct(r.rate)} [{pct(r.ci_low)}, {pct(r.ci_high)}] (n={r.n})" for r in g.itertuples()}
            rows.append(["pooled" if tmpl == "(all)" else tmpl] + [cells.get(p, "") for p in pols])
        out.append(_table(["template", *pols], rows))
    lr = _load(folder, "lowrank_sweep")
    if lr is not None and "chosen" in lr:
        ch = lr[lr.chosen.fillna(False).astype(bool)]
        if len(ch):
            out.append(_table(["low-rank basis", "toward x", "away x", "lower", "upper", "val refusal %",
                               "val over-refusal %", "val ppl ratio"],
                              [[r.basis, r.toward, r.away, fixed(r.lower), fixed(r.upper), pct(r.refusal),
                                pct(r.over_refusal), fixed(r.ppl_ratio)] for r in ch.itertuples()]))
    tr = _load(folder, "transfer")
    if tr is not None and len(tr):
        out.append("### Transfer to the stock model (no retraining; substring judge on generated answers)")
        out.append(_table(["policy", "prompts", "refused % [95 %]", "n", "gate flagged %", "reused"],
                          [[r.policy, r.label, f"{pct(r.rate)} [{pct(r.ci_low)}, {pct(r.ci_high)}]", r.n,
                            pct(getattr(r, "gate_flag_rate", None)), r.reused] for r in tr.itertuples()]))
    rv = _load(folder, "reverse_transfer")
    if rv is not None and len(rv):
        out.append("### Reverse transfer, stock -> tuned (directions, reference norm and gate fitted on the stock "
                   "model; the tuned model's refusal-token router; first-position judge on a seeded test subsample)")
        out.append(_table(["policy", "prompts", "refused % [95 %]", "n", "gate flagged %", "reused"],
                          [[r.policy, r.label, f"{pct(r.rate)} [{pct(r.ci_low)}, {pct(r.ci_high)}]", r.n,
                            pct(r.gate_flag_rate), r.reused] for r in rv.itertuples()]))
    summary = folder / "summary.json"
    if summary.exists():
        out.append(f"Wall time of the run: {json.loads(summary.read_text()).get('seconds')} s.")
    return "\n\n".join(out) + "\n"


P2_NAMES = ("harmful answered = share of harmful prompts answered (not refused by the judge, non-empty, not "
            "degenerate; not a safety classifier's verdict); benign answered = share of benign prompts answered (a "
            "helpfulness proxy; answer quality is not judged)")


def _range(values: Any, digits: int = 3) -> str:
    vals = [v for v in map(as_float, values) if v is not None]
    if not vals:
        return NA
    lo, hi = min(vals), max(vals)
    return fixed(lo, digits) if abs(hi - lo) < 10 ** -digits else f"{fixed(lo, digits)}-{fixed(hi, digits)}"


def p2_findings(t: Any, config: dict[str, Any]) -> list[str]:
    """Sentences about the tested settings, each computed from ``p2_test_summary`` (and the run's tolerances)."""
    steered = t[t.setting != "unsteered"]
    if not len(steered):
        return ["No steered setting was tested (no group had an admissible setting on val)."]
    n = len(steered)
    base = t[t.setting == "unsteered"].iloc[0]
    out = []
    tol = config.get("help_tol")
    within = steered.benign_answered_within_tol.astype(bool)
    out.append(f"Benign prompts answered, relative to the unsteered model: ratios {_range(steered.benign_answered_ratio)}; "
               f"{int(within.sum())} of {_count(n, 'tested setting')} within the tolerance"
               + (f" ({pct(tol, 0)} % drop)." if tol is not None else "."))
    if "within_ppl_guard" in steered:
        ok = steered.within_ppl_guard.astype("boolean").fillna(False).astype(bool)
        guard = config.get("ppl_guard")
        out.append(f"Benign perplexity ratio: {_range(steered.ppl_ratio)}; {int(ok.sum())} of {n} within the guard"
                   + (f" (<= {fixed(1 + float(guard), 2)})." if guard is not None else "."))
    halved = steered.harmful_answered_halved
    if halved.isna().all():
        out.append(f"The unsteered model answers {pct(base.harmful_answered)} % of the harmful test prompts, so "
                   f"\"halved\" is undefined; the steered settings answer {_range(100 * steered.harmful_answered, 1)} %.")
    else:
        k = int(halved.astype("boolean").fillna(False).astype(bool).sum())
        out.append(f"Share of harmful prompts answered: unsteered {pct(base.harmful_answered)} %, steered "
                   f"{_range(100 * steered.harmful_answered, 1)} %; halved by {k} of {_count(n, 'tested setting')}.")
    return out


def p2_section(folders: Sequence[Path]) -> str:
    out = ["## P2: category-wise steering (unsupervised, pruned, guided)", P2_NAMES + "."]
    for folder in folders:
        t = _load(folder, "p2_test_summary")
        if t is None:
            out.append(f"`{folder}`: not run")
            continue
        manifest = _manifest(folder)
        config = manifest.get("config") or {}
        seed = (manifest.get("p2") or {}).get("split_seed") or {}
        out.append(f"### `{folder}` (test split)")
        if seed:
            out.append(f"Split seed {seed.get('seed')}: {seed.get('why')}.")
        out.append("\n".join(selection_lines(manifest)))
        out.append(_table(["setting", "harmful answered % [95 %]", "ratio to unsteered", "halved",
                           "benign answered % [95 %]", "ratio to unsteered", "ppl ratio", "n harmful / benign"],
                          [[r.setting, _ci(r._asdict(), "harmful_answered"), fixed(r.harmful_answered_ratio),
                            "undefined" if _isna(r.harmful_answered_halved) else bool(r.harmful_answered_halved),
                            _ci(r._asdict(), "benign_answered"), fixed(r.benign_answered_ratio), fixed(r.ppl_ratio),
                            f"{_int(r.harmful_answered_n)} / {_int(r.benign_answered_n)}"] for r in t.itertuples()]))
        out.append("\n".join(f"- {line}" for line in p2_findings(t, config)))
    return "\n\n".join(out) + "\n"


def _isna(x: Any) -> bool:
    import pandas as pd

    return x is None or bool(pd.isna(x))


def _int(x: Any) -> str:
    return NA if _isna(x) else str(int(x))


def specificity_findings(cells: Any, summary: Any) -> list[str]:
    """Sentences computed from the specificity tables: significant cells, specificity of the raw and orthogonalised
    directions against the permutation control."""
    out = []
    if cells is not None and "p_adjusted" in cells:
        k, n = int(cells.significant.astype(bool).sum()), len(cells)
        corr = str(cells.correction.iloc[0]).split(";")[0] if len(cells) else "n/a"
        out.append(f"{k} of {_count(n, 'cell')} change refusal significantly after the correction ({corr}).")
        for variant in dict.fromkeys(cells.variant):
            part = cells[cells.variant == variant]
            d, o = part[part.diagonal.astype(bool)], part[~part.diagonal.astype(bool)]
            if len(d) and len(o):
                out.append(f"{variant}: significant on the diagonal {int(d.significant.sum())} of {len(d)}, off the "
                           f"diagonal {int(o.significant.sum())} of {len(o)}.")
    if summary is not None and "perm_p" in summary:
        cat = summary[(summary.rows == "categories") & (summary.metric == "rate")]
        for r in cat.itertuples():
            if _isna(r.perm_p):
                continue
            out.append(f"{r.variant}, {r.set}, {r.sign}: diagonal - off-diagonal {fixed(r.diag_minus_offdiag)} vs "
                       f"{fixed(r.perm_mean_diag_minus_offdiag)} for directions fitted on shuffled labels (permutation "
                       f"p = {fixed(r.perm_p, 2)}, {_count(int(r.n_perm), 'permutation')}).")
    return out


def specificity_section(folder: Path) -> str:
    out = [f"## Category specificity (`{folder}`)"]
    s = _load(folder, "summary")
    if s is None:
        return out[0] + "\n\nnot run\n"
    manifest = _manifest(folder)
    out.append("\n".join(selection_lines(manifest, measured="measurement")))
    sel = _load(folder, "selection")
    if sel is not None and len(sel):
        out.append(_table(["layer", "scale", "harmful/away specificity", "lookalike/toward specificity", "objective",
                           "chosen"],
                          [[r.layer, fixed(r.scale, 2), fixed(r.harmful_away), fixed(r.lookalike_toward),
                            fixed(r.objective), bool(r.chosen)] for r in sel.itertuples()]))
    out.append("Mean effect of steering with category i on prompts of category i (diagonal) and of other categories "
               "(off-diagonal); ratio = diagonal / off-diagonal (paired bootstrap intervals). A shared refusal knob "
               "gives a ratio near 1.")
    cat = s[s.variant != "control"]
    has_perm = "perm_p" in s
    out.append(_table(["variant", "set", "sign", "metric", "diagonal", "off-diagonal", "ratio [95 %]",
                       "diag - offdiag [95 %]", *(["shuffled labels", "perm. p"] if has_perm else [])],
                      [[r.variant, r.set, r.sign, r.metric, fixed(r.mean_diag), fixed(r.mean_offdiag),
                        f"{fixed(r.ratio, 2)} [{fixed(r.ratio_ci_low, 2)}, {fixed(r.ratio_ci_high, 2)}]",
                        f"{fixed(r.diag_minus_offdiag)} [{fixed(r.diag_minus_offdiag_ci_low)}, "
                        f"{fixed(r.diag_minus_offdiag_ci_high)}]",
                        *([fixed(r.perm_mean_diag_minus_offdiag), fixed(r.perm_p, 2)] if has_perm else [])]
                       for r in cat.itertuples()]))
    ctrl = s[s.variant == "control"]
    if len(ctrl) and "mean_all" in ctrl:
        out.append("Controls (no diagonal: the mean effect over every category's prompts of steering with the shared "
                   "refusal direction, or with random directions of the same norm):")
        out.append(_table(["control", "set", "sign", "metric", "directions", "mean effect [95 %]"],
                          [[r.rows, r.set, r.sign, r.metric, r.n_rows,
                            f"{fixed(r.mean_all)} [{fixed(r.mean_all_ci_low)}, {fixed(r.mean_all_ci_high)}]"]
                           for r in ctrl.itertuples()]))
    findings = specificity_findings(_load(folder, "specificity"), s)
    if findings:
        out.append("\n".join(f"- {line}" for line in findings))
    return "\n\n".join(out) + "\n"


def render_results(p1: Path | None = None, p2: Sequence[Path] = (), p1_earlier: Sequence[Path] = (),
                   specificity: Path | None = None) -> str:
    """The whole results file: the title, then the P1, P2 and specificity sections of the run folders given (a
    section is left out when its folder is not given)."""
    parts = [RESULTS_TITLE]
    if p1:
        parts.append(p1_section(p1, p1_earlier))
    if p2:
        parts.append(p2_section(p2))
    if specificity:
        parts.append(specificity_section(specificity))
    return "\n".join(parts)
