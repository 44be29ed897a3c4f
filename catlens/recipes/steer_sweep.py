"""The steering-sweep recipe, the steps behind ``analyses/steer_sweep.py`` (its docstring states the protocol):
on a prompt set's ``train`` and ``val`` splits, fit directions, reference norms, a probe gate and a router on train,
generate the ``toward`` and ``away`` grids on val once each and combine them per row (:func:`run_sweep`), and choose
the setting on val (:func:`sweep_rule`, :mod:`catlens.selection`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)
METHODS = ("one_vs_benign", "one_vs_rest")


def sweep_judge(model: Any) -> tuple[str, Any]:
    """``(name, judge)``: the ``refusal_token`` judge for a refusal-token model, else ``substring``."""
    from catlens.judges import get_judge
    from catlens.refusal import refusal_token_ids

    tokens, _ = refusal_token_ids(model)
    if tokens is not None:
        return "refusal_token", get_judge("refusal_token", tokens=tokens)
    return "substring", get_judge("substring")


def benign_ppl_parts(model: Any, records: Sequence[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Per benign record: (sum of NLL, tokens) of its answer under the unsteered model."""
    from catlens.metrics import perplexity_under

    rows = [r for r in records if r["label"] == "benign" and r["token_ids"]]
    if not rows:
        return {}
    table = perplexity_under(model, [r["prompt"] for r in rows], [r["token_ids"] for r in rows])
    return {r["id"]: (float(nll) * int(n), int(n)) for r, nll, n in zip(rows, table["nll"], table["n_tokens"])}


def run_sweep(model: Any, prompts: Any, *, layers: Sequence[int], toward: Sequence[float | None],
              away: Sequence[float | None], methods: Sequence[str] = METHODS, scale: str = "norm",
              positions: str = "last_prompt", max_new_tokens: int = 16, batch_size: int = 32,
              ppl_guard: float = 0.10, target_fpr: float | None = None, run: Any = None,
              show_progress: bool = True) -> dict[str, Any]:
    """The sweep itself (see ``analyses/steer_sweep.py``'s docstring); returns the tables and the chosen policy;
    with ``run`` (a :class:`catlens.runs.RunDir`) also writes the tables, the policy folder and the manifest's
    selection record."""
    import pandas as pd

    from catlens.cache import collect
    from catlens.directions import fit_directions
    from catlens.generation import generate
    from catlens.metrics import binomial_se, wilson_interval
    from catlens.probes import fit_gate, fit_router_probe, gate_scores
    from catlens.prompts import check_leakage
    from catlens.refusal import refusal_token_ids
    from catlens.selection import mark, select, total_magnitude
    from catlens.steer import Intervention, Router, SteeringPolicy, model_fingerprint

    for m in methods:
        if m not in METHODS:
            from catlens.errors import unknown_name_message

            raise ValueError(unknown_name_message("method", m, METHODS))
    if not layers:
        raise ValueError("layers is empty; give at least one layer to sweep.")
    layers = [model.layer(layer) for layer in layers]
    if not toward and not away:
        raise ValueError("give at least one toward or away coefficient.")
    toward = list(dict.fromkeys([None, *toward]))
    away = list(dict.fromkeys([None, *away]))
    train, val = prompts.where(split="train"), prompts.where(split="val")
    if not len(train) or not len(val):
        raise ValueError(f"the prompt set needs 'train' and 'val' splits; it has {len(train)} train and {len(val)} "
                         f"val prompts.")
    check_leakage(train, val)
    t0 = time.perf_counter()
    acts_tr = collect(model, train, layers=layers, show_progress=show_progress)
    acts_va = collect(model, val, layers=layers, show_progress=show_progress)
    X = acts_tr.get("resid_post")  # [n layer d]
    V = acts_va.get("resid_post")
    tr_frame, va_frame = train.to_frame(), val.to_frame()
    is_h = torch.tensor((tr_frame.label == "harmful").to_numpy())
    va_h = torch.tensor((va_frame.label == "harmful").to_numpy())
    cats = sorted(tr_frame[tr_frame.label == "harmful"].category.dropna().unique())
    harm_by_cat = {c: X[torch.tensor(((tr_frame.label == "harmful") & (tr_frame.category == c)).to_numpy())]
                   for c in cats}
    ref_norm = X.norm(dim=-1).mean(0)  # [layer]
    tokens, _ = refusal_token_ids(model)
    judge_name, judge = sweep_judge(model)

    def judged(records: list[dict[str, Any]]) -> dict[str, bool]:
        return {r["id"]: bool(v) for r, v in zip(records, judge(records))}

    gen_kw = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=False)
    base = generate(model, val, **gen_kw)
    base_refused = judged(base)
    base_ppl = benign_ppl_parts(model, base)
    runs, gate_rows, combos = [], [], []
    policies: dict[tuple, Any] = {}
    total = len(methods) * len(layers) * (len(toward) + len(away) - 2)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="sweep", unit="pass", disable=not show_progress)
    for li, layer in enumerate(layers):
        gate = fit_gate(X[is_h, li], X[~is_h, li], layer=layer, val=(V[va_h, li], V[~va_h, li]),
                        rule="target_fpr" if target_fpr is not None else "youden", target_fpr=target_fpr)
        from sklearn.metrics import roc_auc_score

        s = gate_scores(gate, V[:, li])
        gate_rows.append({"layer": layer, "val_auroc": float(roc_auc_score(va_h.numpy(), s)),
                          "threshold": gate.threshold, "val_flagged_harmful": float((s[va_h.numpy()] >= gate.threshold).mean()),
                          "val_flagged_benign": float((s[~va_h.numpy()] >= gate.threshold).mean())})
        routed = [c for c in cats if tokens is not None and c in tokens.categories]
        if tokens is not None and len(routed) == len(cats):
            router = Router("refusal_tokens", tuple(cats))
        else:
            harm_rows = torch.tensor((tr_frame.label == "harmful").to_numpy())
            router = fit_router_probe(X[harm_rows, li], list(tr_frame[tr_frame.label == "harmful"].category),
                                      layer=layer)
        for method in methods:
            dirs = fit_directions(harm_by_cat, method, benign=X[~is_h], normalize=True, layers=layers)
            vecs = dirs.at(layer)
            iv = Intervention("resid_post", layer, vecs, labels=tuple(dirs.categories), positions=positions,
                              normalize=True, scale=scale, ref_norm=float(ref_norm[li]) if scale == "norm" else None)
            outcome: dict[tuple[str, float | None], tuple[dict, dict, dict]] = {}
            for side, grid in (("toward", toward), ("away", away)):
                for c in grid:
                    if c is None:
                        outcome[(side, None)] = ({r["id"]: r for r in base}, base_refused, base_ppl)
                        continue
                    coef = c if side == "toward" else -abs(c)
                    pol = SteeringPolicy((iv,), gate=gate, router=router,
                                         toward=coef if side == "toward" else None,
                                         away=coef if side == "away" else None)
                    t1 = time.perf_counter()
                    recs = generate(model, val, pol, **gen_kw)
                    refused = judged(recs)
                    outcome[(side, c)] = ({r["id"]: r for r in recs}, refused, benign_ppl_parts(model, recs))
                    runs.append({"method": method, "layer": layer, "side": side, "coeff": coef,
                                 "seconds": time.perf_counter() - t1, "n": len(recs)})
                    bar.update(1)
            steered = [o[0] for (sd, c), o in outcome.items() if c is not None]
            if steered:  # the gate's own decisions, as recorded during generation
                flagged = {rid: rec["gate"]["flagged"] for rid, rec in steered[0].items()}
            else:
                flagged = {rid: bool(sc >= gate.threshold) for rid, sc in zip(va_frame.id, s)}
            for tc in toward:
                for ac in away:
                    refused, ppl_nll, ppl_n = {}, 0.0, 0
                    for rid in va_frame.id:
                        side, c = ("toward", tc) if flagged[rid] else ("away", ac)
                        recs, ref, ppl = outcome[(side, c)]
                        refused[rid] = ref[rid]
                        if rid in ppl and not ref[rid]:
                            ppl_nll, ppl_n = ppl_nll + ppl[rid][0], ppl_n + ppl[rid][1]
                    row = {"method": method, "layer": layer, "toward": tc, "away": None if ac is None else -abs(ac)}
                    for side_name, mask in (("harmful", va_h.numpy()), ("benign", ~va_h.numpy())):
                        ids = list(va_frame.id[mask])
                        k, n = sum(refused[i] for i in ids), len(ids)
                        lo, hi = wilson_interval(k, n)
                        key = "refusal" if side_name == "harmful" else "over_refusal"
                        row.update({f"{key}_n": n, f"{key}_k": k, key: k / n, f"{key}_se": binomial_se(k, n),
                                    f"{key}_ci_low": lo, f"{key}_ci_high": hi})
                    row["benign_ppl"] = math.exp(ppl_nll / ppl_n) if ppl_n else math.nan
                    combos.append(row)
                    policies[(method, layer, tc, ac)] = (iv, gate, router)
    bar.close()
    table = pd.DataFrame(combos)
    unsteered_ppl = table[(table.toward.isna()) & (table.away.isna())].benign_ppl.iloc[0]
    table["ppl_ratio"] = table.benign_ppl / unsteered_ppl
    table["objective"] = table.refusal - table.over_refusal
    table["steer_magnitude"] = total_magnitude(table, ["toward", "away"])
    rule = sweep_rule(ppl_guard)
    selection = select(table, rule)
    table = mark(table, rule, selection)
    table["pareto"] = pareto(table)
    table["ppl_stands_for"] = "coherence: perplexity of benign answers under the unsteered model"
    table["judge"] = judge_name
    table["split"] = "val"
    table["n_val"] = len(val)
    policy = None
    best = table.loc[selection.index] if selection.chosen else None
    if best is None:
        log.warning("no setting is admissible on val: %s", selection.reason)
    elif not (_none(best.toward) is None and _none(best.away) is None):
        iv, gate, router = policies[(best.method, int(best.layer), _none(best.toward),
                                     None if _none(best.away) is None else abs(best.away))]
        policy = SteeringPolicy((iv,), gate=gate, router=router, toward=_none(best.toward), away=_none(best.away),
                                name=f"sweep-{best.method}-L{int(best.layer)}", model=model_fingerprint(model),
                                meta={"chosen_on": "val", "n_val": len(val), "n_train": len(train),
                                      "objective": rule.describe(), "judge": judge_name,
                                      "selection": selection.record(),
                                      "val_refusal": float(best.refusal), "val_over_refusal": float(best.over_refusal)})
    result = {"sweep": table, "runs": pd.DataFrame(runs), "gates": pd.DataFrame(gate_rows), "policy": policy,
              "seconds": time.perf_counter() - t0, "chosen": None if best is None else best.to_dict(),
              "selection": selection}
    if run is not None:
        for name in ("sweep", "runs", "gates"):
            run.save_table(name, result[name])
        if best is not None and policy is None:
            log.warning("the best admissible setting on val is 'no steering'; saving a policy with coefficients 0.")
            iv, gate, router = policies[(best.method, int(best.layer), None, None)]
            policy = SteeringPolicy((iv,), gate=gate, router=router, toward=0.0, away=0.0, name="sweep-no-steering",
                                    model=model_fingerprint(model),
                                    meta={"no_steering": True, "chosen_on": "val", "selection": selection.record()})
            result["policy"] = policy
        if policy is not None:
            policy.save(run.path / "policy", overwrite=True)
        run.update_manifest(selection={"split": "val", "test_read": False, "choices": [selection.record()]})
        run.finish(chosen=selection.record()["row"], selection_reason=selection.reason, seconds=result["seconds"])
    return result


def sweep_rule(ppl_guard: float) -> Any:
    """The sweep's selection rule: maximise refusal - over-refusal on val within the perplexity guard; ties: the
    smaller total steering magnitude ``|toward| + |away|``, then table order (method, layer, toward, away)."""
    from catlens.selection import Objective, SelectionRule, TieBreak
    from catlens.selection import ppl_guard as guard

    return SelectionRule(Objective("objective", "max"), constraints=(guard(ppl_guard),),
                         tie_breaks=(TieBreak("steer_magnitude", "min"),))


def _none(x: Any) -> Any:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def pareto(table: Any) -> list[bool]:
    """Settings no other admissible setting beats on both refusal (higher) and over-refusal (lower)."""
    pts = list(zip(table.refusal, table.over_refusal, table.admissible))
    out = []
    for i, (r, o, a) in enumerate(pts):
        dominated = any(r2 >= r and o2 <= o and (r2 > r or o2 < o) and a2 for j, (r2, o2, a2) in enumerate(pts)
                        if j != i)
        out.append(bool(a and not dominated))
    return out


def sweep_prompts(spec: str, n_per_split: int | None = None, seed: int = 0) -> Any:
    """The prompt set ``spec`` (:func:`catlens.datasets.load_prompts`); with ``n_per_split`` a seeded subsample of
    at most that many prompts per (split, label) of train and val (smoke runs)."""
    from catlens.datasets import load_prompts

    prompts = load_prompts(spec)
    if n_per_split:
        from catlens.prompts import PromptSet

        parts = [prompts.where(split=s, label=lab) for s in ("train", "val") for lab in ("harmful", "benign")]
        prompts = PromptSet.concat(*[ps.sample(min(n_per_split, len(ps)), seed=seed) for ps in parts])
    return prompts
