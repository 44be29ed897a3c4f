"""The category-specificity recipe (issue 10; PAPERS.md §3b, Joad et al. arXiv 2602.02132), the steps behind
``analyses/specificity.py`` (its docstring states the protocol): build the train, selection and measurement prompt
sets (:func:`assemble_prompts`, :func:`prepare_sets`), fit one direction per category and the control and
label-permutation variants (:func:`fit_directions`, through :func:`catlens.directions.fit_directions`), turn them into
steering settings (:func:`build_policies`), measure every setting at the first response position with a cache per
setting (:func:`run_first_position`), build the matrix, its summary and the tests (:func:`specificity_tables`,
:func:`mcnemar_exact`, :func:`adjust_p_values`, :func:`add_permutation_control`), choose the layer and scale on the
selection split (:func:`choose_setting`, :func:`selection_rule`) and measure the choice once
(:func:`run_specificity`). :func:`check_options`, :func:`prepare_run` and :func:`policy_scale` are the command
line's checks and setup.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from catlens.stages import SIZES

log = logging.getLogger(__name__)

METHODS = ("one_vs_benign", "one_vs_rest", "p1_mean_difference")
"""The direction constructors the specificity test accepts (entries of :data:`catlens.directions.METHODS`)."""
P1_OPTIONS = {"tau": 1e-3, "top_k": 200}
"""``p1_mean_difference``'s options here (``top_k`` is capped at ``d_model`` by the registry)."""
VARIANTS = ("raw", "orthogonalised", "control")
SETS = ("harmful", "lookalike")
SIGNS = ("toward", "away")
BASE = "unsteered"
SPECIFICITY_COLUMNS = (
    "variant", "set", "sign", "steer_category", "eval_category", "diagonal", "n", "base_rate", "steered_rate",
    "delta", "delta_ci_low", "delta_ci_high", "base_score", "steered_score", "delta_score", "delta_score_ci_low",
    "delta_score_ci_high", "n_discordant", "p_value", "p_adjusted", "significant", "correction", "family_size",
    "coeff", "layer", "scale", "method", "positions", "n_boot", "ci_method", "seeds")
SUMMARY_COLUMNS = (
    "variant", "set", "sign", "metric", "rows", "n_rows", "mean_diag", "mean_diag_ci_low", "mean_diag_ci_high",
    "mean_offdiag", "mean_offdiag_ci_low", "mean_offdiag_ci_high", "ratio", "ratio_ci_low", "ratio_ci_high",
    "diag_minus_offdiag", "diag_minus_offdiag_ci_low", "diag_minus_offdiag_ci_high", "mean_all", "mean_all_ci_low",
    "mean_all_ci_high", "perm_mean_diag_minus_offdiag", "perm_p", "n_perm", "layer", "scale", "method", "n_boot",
    "seeds")
COSINE_COLUMNS = ("variant", "method", "layer", "category_a", "category_b", "cosine")
CI_METHOD = "paired percentile bootstrap over prompts (resampled within each set and category)"
QUICK = SIZES["specificity"]["script_quick"]
"""The --quick caps (catlens.stages.SIZES)."""
CORRECTIONS = {"fdr_bh": "Benjamini-Hochberg (false discovery rate)", "holm": "Holm (family-wise error rate)"}
P_VALUE = "exact McNemar test on the paired refusals (steered vs unsteered, same prompts), two-sided"
SELECTION_COLUMNS = ("layer", "scale", "split", "n_prompts", "harmful_away", "lookalike_toward", "objective",
                     "admissible", "rejected_by", "chosen")
AUTO_LAYER_FRACTIONS = (0.5, 0.7)
"""``--layers auto`` without a policy: these fractions of the last layer index."""


# --------------------------------------------------------------------------------------------------- inputs
def _unknown(kind: str, value: Any, allowed: Sequence[str]) -> ValueError:
    from catlens.errors import unknown_name_message

    return ValueError(unknown_name_message(kind, value, allowed))


def check_method(method: str) -> str:
    if method not in METHODS:
        raise _unknown("direction method", method, METHODS)
    return method


def check_fraction(name: str, value: float | int) -> float:
    """A steering magnitude: a finite number >= 0 (a fraction of the residual norm)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number (a fraction of the residual norm, e.g. 0.2).")
    if value < 0:
        raise ValueError(f"{name}={value!r} must be >= 0: it is a magnitude; the sign comes from toward (+) and "
                         f"away (-).")
    return float(value)


def read_policy_setting(path: str | Path) -> dict[str, Any]:
    """Layer, site, positions, toward/away magnitudes and method of a saved policy (P1 analysis or sweep).

    ``toward``/``away`` are magnitudes (>= 0); for an intervention with ``scale="raw"`` they are raw coefficients and
    ``raw_scale`` is True (converted with this run's reference norm later). A side the policy does not steer takes
    the other side's magnitude (``filled`` names it); an ungated policy gives ``|coeff|`` to both.
    """
    from catlens.steer import SteeringPolicy

    policy = SteeringPolicy.load(path)
    iv = policy.interventions[0]
    if iv.kind != "add":
        raise ValueError(f"policy {str(path)!r}: its first intervention is kind={iv.kind!r}; the specificity test "
                         f"reads an additive direction policy (kind 'add'); give --layer and --scale instead.")
    toward = None if policy.toward is None else abs(float(policy.toward))
    away = None if policy.away is None else abs(float(policy.away))
    filled = None
    if toward is None and away is None:
        toward = away = abs(float(iv.coeff))
    elif toward is None:
        toward, filled = away, "toward"
    elif away is None:
        away, filled = toward, "away"
    method = policy.meta.get("method") if isinstance(policy.meta, Mapping) else None
    if method not in METHODS:
        method = next((m for m in METHODS if m in policy.name), None)
    vec_norm = float(iv.vectors.norm(dim=-1).mean()) if iv.vectors is not None else 1.0
    return {"path": str(path), "name": policy.name, "layer": int(iv.layer), "site": iv.site.value,
            "positions": iv.positions if isinstance(iv.positions, str) else list(iv.positions),
            "toward": toward, "away": away, "filled": filled, "raw_scale": iv.scale == "raw",
            "raw_vector_norm": 1.0 if iv.normalize else vec_norm, "method": method}


def assemble_prompts(categories_allowed: Sequence[str], *, prompts: str | None = None, data_dir: str | None = None,
                     finetune_config: str = "default") -> tuple[Any, Any, Any, dict[str, Any]]:
    """``(train, selection, measurement, provenance)`` PromptSets (see ``analyses/specificity.py``'s docstring): the
    selection split chooses the layer and scale, the measurement split is measured once with the chosen setting."""
    from catlens.datasets import load_builtin
    from catlens.taxonomy import CATEGORIES

    allowed = set(CATEGORIES) | set(categories_allowed)
    info: dict[str, Any] = {}
    if prompts is not None:
        from catlens.datasets import load_prompts

        ps = load_prompts(prompts, categories=allowed)
        train = ps.where(split="train").rename("train")
        select_set = ps.where(split="val").rename("selection")
        measure = ps.where(split="test").rename("measurement")
        if not len(train) or not len(select_set) or not len(measure):
            raise ValueError(f"--prompts {prompts!r} needs a 'train' split (for the directions), a 'val' split (to "
                             f"choose the layer and scale) and a 'test' split (to measure); it has {len(train)} "
                             f"train, {len(select_set)} val and {len(measure)} test prompts.")
        info["source"] = {"prompts": str(prompts), "provenance": ps.provenance, "selection": "val",
                          "measurement": "test"}
        return train, select_set, measure, info
    b = load_builtin()
    train_parts = [b.where(split="train").rename("builtin_train")]
    select_parts = [b.where(label="harmful", split="val").rename("builtin_harmful_val"),
                    b.where(label="benign", kind="lookalike", split="val").rename("builtin_lookalike_val")]
    eval_parts = [b.where(label="harmful", split="test").rename("builtin_harmful_test"),
                  b.where(label="benign", kind="lookalike", split="test").rename("builtin_lookalike_test")]
    try:
        from catlens.finetune import assemble_data, get_config

        td = assemble_data(get_config(finetune_config), data_dir)
    except FileNotFoundError as err:
        if data_dir is not None:
            raise
        log.warning("benchmark data not found (%s): directions from the built-in train split only, evaluation on the "
                    "built-in val/test prompts only.", str(err).splitlines()[0])
        td = None
    if td is not None:
        info["finetune_data"] = {"config": finetune_config, "origin": td.origin, "content_hash": td.content_hash,
                                 "n_harmful": len(td.harmful), "n_benign": len(td.benign)}
        train_parts += [td.harmful, td.benign]
        for name in ("harmful_heldout", "builtin_lookalike_test", "xstest_safe"):
            if name in td.eval_sets:
                part = td.eval_sets[name]
                if name == "xstest_safe":
                    part = part.where(label="benign")
                eval_parts.append(part.rename(name))
    train = _merge(train_parts, "train", allowed)
    select_set = _merge(select_parts, "selection", allowed)
    measure = _merge(eval_parts, "measurement", allowed)
    info["source"] = {"train_parts": {p.name: len(p) for p in train_parts},
                      "selection_parts": {p.name: len(p) for p in select_parts},
                      "measurement_parts": {p.name: len(p) for p in eval_parts}}
    return train, select_set, measure, info


def _merge(parts: Sequence[Any], name: str, allowed: set[str]) -> Any:
    """One PromptSet of ``parts`` without repeated ids or exactly repeated texts (the first copy stays)."""
    from catlens.prompts import PromptSet, normalize_text

    seen_id, seen_text = set(), set()

    def keep(p: Any) -> bool:
        t = normalize_text(p.text)
        if p.id in seen_id or t in seen_text:
            return False
        seen_id.add(p.id)
        seen_text.add(t)
        return True

    return PromptSet.concat(*[part.with_categories(allowed).filter(keep, "unique ids and texts") for part in parts],
                            name=name)


def _cap(ps: Any, n: int, seed: int) -> Any:
    return ps if len(ps) <= n else ps.sample(n, seed=seed)


def prepare_sets(train: Any, evals: Any, categories: Sequence[str] | None, *, quick: bool = False, seed: int = 0,
                 against: Any = None) -> tuple[Any, Any, pd.DataFrame, list[str], dict[str, Any]]:
    """Choose the steering categories, keep the evaluation prompts of those categories, tag each with its set, drop
    evaluation prompts that leak from training (or from ``against``, e.g. the selection split when preparing the
    measurement split), check every category has prompts everywhere.

    Returns ``(train, evals, index, categories, notes)``; ``index`` has columns ``id, set, eval_category, source``.
    """
    from catlens.prompts import PromptSet, check_leakage

    present = list(dict.fromkeys(p.category for p in train if p.label == "harmful" and p.category is not None))
    if categories is None:
        categories = present
    else:
        for c in categories:
            if c not in present and c not in {p.category for p in evals}:
                raise _unknown("category", c, sorted(set(present) | {p.category for p in evals if p.category}))
    categories = list(categories)
    if len(categories) < 2:
        raise ValueError(f"the specificity matrix needs at least 2 categories; got {categories}. Add training prompts "
                         f"of more categories or pass --categories.")
    train = train.filter(lambda p: p.label == "benign" or p.category in categories, "steering categories")
    evals = evals.filter(lambda p: p.category in categories, "steering categories")
    if quick:
        parts = [_cap(train.where(label="harmful", category=c), QUICK["train_harmful_per_category"], seed)
                 for c in categories]
        parts.append(_cap(train.where(label="benign"), QUICK["train_benign"], seed))
        train = PromptSet.concat(*parts, name="train")
        evals = PromptSet.concat(*[_cap(evals.where(label=lab, category=c), QUICK["eval_per_cell"], seed)
                                   for lab in ("harmful", "benign") for c in categories], name="evaluation")
    reference = train if against is None else PromptSet.concat(train, against, name="train+selection")
    leaks = check_leakage(reference, evals, raise_on_leak=False)
    notes: dict[str, Any] = {"dropped_as_leaked": int(len(leaks.pairs))}
    if len(leaks.pairs):
        bad = set(leaks.pairs.test_id)
        log.warning("dropping %d evaluation prompts that duplicate %s prompts (e.g. %s)", len(bad),
                    "training" if against is None else "training or selection", sorted(bad)[:3])
        evals = evals.filter(lambda p: p.id not in bad, "not leaked")
    check_leakage(reference, evals)  # must pass now
    index = pd.DataFrame([{"id": p.id, "set": "harmful" if p.label == "harmful" else "lookalike",
                           "eval_category": p.category, "source": p.source} for p in evals])
    counts = []
    for c in categories:
        n_train = sum(p.label == "harmful" and p.category == c for p in train)
        n_h = int(((index.set == "harmful") & (index.eval_category == c)).sum()) if len(index) else 0
        n_l = int(((index.set == "lookalike") & (index.eval_category == c)).sum()) if len(index) else 0
        counts.append({"category": c, "train_harmful": n_train, "eval_harmful": n_h, "eval_lookalike": n_l})
        if not (n_train and n_h and n_l):
            raise ValueError(f"category {c!r} has {n_train} harmful training prompts, {n_h} harmful evaluation prompts "
                             f"and {n_l} lookalike evaluation prompts; every steering category needs at least one of "
                             f"each. Add prompts or leave it out with --categories (present: {categories}).")
    if not any(p.label == "benign" for p in train):
        raise ValueError("no benign training prompts: the directions and the refusal direction need them.")
    notes["counts"] = counts
    notes["n_train"], notes["n_eval"] = len(train), len(evals)
    return train, evals, index, categories, notes


# ----------------------------------------------------------------------------------------------- directions
def permuted_labels(labels: Sequence[str], n_perm: int, seed: int) -> list[list[str]]:
    """``n_perm`` seeded shuffles of ``labels`` (class sizes kept); permutation ``p`` uses
    ``numpy.random.default_rng([seed, p])``, so adding permutations never changes the earlier ones."""
    if isinstance(n_perm, bool) or not isinstance(n_perm, int) or n_perm < 0:
        raise ValueError(f"n_perm={n_perm!r} must be an int >= 0.")
    arr = np.asarray(list(labels), dtype=object)
    return [list(arr[np.random.default_rng([seed, p]).permutation(len(arr))]) for p in range(n_perm)]


def fit_directions(model: Any, train: Any, categories: Sequence[str], *, layer: int, method: str,
                   site: str = "resid_post", n_random: int = 3, n_perm: int = 0, seed: int = 0, batch_size: int = 32,
                   show_progress: bool = True) -> dict[str, Any]:
    """Unit directions at ``layer``: ``raw`` (``method``), ``orthogonalised`` (against the refusal direction),
    ``control`` (the refusal direction and ``n_random`` seeded random directions), ``permuted_<p>`` for ``p <
    n_perm`` (``method`` fitted on the same harmful training rows with their category labels shuffled, see
    :func:`permuted_labels`: the label-permutation control), each a Directions with ``ref_norm`` = mean norm of the
    training prompts' activations at the layer; also ``refusal`` (raw, [d])."""
    from catlens import directions as D
    from catlens.cache import collect

    check_method(method)
    acts = collect(model, train, sites=[site], layers=[layer], batch_size=batch_size, show_progress=show_progress)
    X = acts.get(site).float()  # [n 1 d]
    frame = train.to_frame()
    harm = (frame.label == "harmful").to_numpy()
    by_cat = {c: X[torch.from_numpy(harm & (frame.category == c).to_numpy())] for c in categories}
    benign = X[torch.from_numpy(~harm)]
    prov = {"fit_on": "training prompts", "n_train": len(train), "read_position": "last prompt token", "fmt": "chat",
            "prompts_sha256": getattr(train, "content_hash", None)}
    # the rows the method fits on: harmful activations with their category labels, and the benign side
    if method == "p1_mean_difference":
        h_acts, h_labels, b_acts, fit_prov = _p1_acts(model, train, categories, layer=layer, site=site,
                                                      batch_size=batch_size, show_progress=show_progress,
                                                      provenance=prov)
    else:
        mask = harm & frame.category.isin(list(categories)).to_numpy()
        h_acts, h_labels, b_acts, fit_prov = X[torch.from_numpy(mask)], list(frame.category[mask]), benign, prov
    options = P1_OPTIONS if method == "p1_mean_difference" else {}

    def construct(labels: Sequence[str], extra: Mapping[str, Any]) -> Any:
        lab = np.asarray(list(labels), dtype=object)
        groups = {c: h_acts[torch.from_numpy(lab == c)] for c in categories}
        return D.fit_directions(groups, method, benign=b_acts, normalize=True, layers=[layer], site=site,
                                provenance={**fit_prov, **extra}, **options)

    raw = construct(h_labels, {}).with_ref_norm(X)
    refusal = D.refusal_direction(torch.cat([by_cat[c] for c in categories]), benign)  # [1 d]
    orth = D.orthogonalize_against(raw, refusal, normalize=True)
    g = torch.Generator().manual_seed(seed)
    rnd = torch.randn(n_random, X.shape[-1], generator=g, dtype=torch.float64)
    ctrl_vecs = torch.cat([refusal.to(torch.float64), rnd])[:, None, :]
    ctrl_vecs = (ctrl_vecs / ctrl_vecs.norm(dim=-1, keepdim=True)).to(torch.float32)
    control = D.Directions(vectors=ctrl_vecs, categories=("refusal", *[f"random_{k}" for k in range(n_random)]),
                           layers=(layer,), site=site, method="control",
                           provenance={**prov, "refusal": "mean(harmful train) - mean(benign train)",
                                       "random_seed": seed, "n_random": n_random}, ref_norm=raw.ref_norm.clone())
    out = {"raw": raw, "orthogonalised": orth, "control": control}
    # label-permutation control: the same harmful rows, their category labels shuffled
    for p, shuffled in enumerate(permuted_labels(h_labels, n_perm, seed)):
        d = construct(shuffled, {"label_permutation": p, "permutation_seed": [seed, p]})
        out[f"permuted_{p}"] = d.with_ref_norm(X)
    out["refusal"] = refusal[0]
    return out


def _p1_acts(model: Any, train: Any, categories: Sequence[str], *, layer: int, site: str, batch_size: int,
             show_progress: bool, provenance: Mapping[str, Any]) -> tuple[torch.Tensor, list[str], torch.Tensor, dict]:
    """P1's mean difference reads harmful prompts at their category's refusal token and benign ones at
    ``[respond]``: ``(harmful acts, their categories, benign acts, provenance)``."""
    from catlens.cache import collect
    from catlens.refusal import RefusalTokens

    try:
        tokens = RefusalTokens.from_model(model)
    except ValueError as err:
        raise ValueError(f"method 'p1_mean_difference' reads activations at the refusal tokens, which {model.name!r} "
                         f"does not have ({err}); use one_vs_benign or one_vs_rest.") from None
    missing = [c for c in categories if c not in tokens.categories]
    if missing:
        raise ValueError(f"method 'p1_mean_difference': categories {missing} have no refusal token in "
                         f"{model.name!r} (it has {list(tokens.categories)}); use --categories or another method.")
    harm = train.where(label="harmful", category=list(categories))
    benign = train.where(label="benign")
    h_acts = collect(model, harm, sites=[site], layers=[layer], append=[tokens.token_of(p.category) for p in harm],
                     batch_size=batch_size, show_progress=show_progress).get(site).float()
    b_acts = collect(model, benign, sites=[site], layers=[layer], append=tokens.respond, batch_size=batch_size,
                     show_progress=show_progress).get(site).float()
    prov = {**provenance, "read_position": "category token / [respond] appended after the assistant header"}
    return h_acts, [p.category for p in harm], b_acts, prov


def cosine_table(dirs: Mapping[str, Any], method: str) -> pd.DataFrame:
    """Pairwise cosines of the raw and orthogonalised category directions (and of each with the refusal
    direction, ``category_b = "refusal"``) and of the control directions."""
    r = dirs["refusal"].to(torch.float64)
    r = r / r.norm()
    rows = []
    for variant in VARIANTS:
        d = dirs[variant]
        v = d.vectors[:, 0].to(torch.float64)
        v = v / v.norm(dim=-1, keepdim=True)
        names = list(d.categories)
        cos = v @ v.T
        extra = [] if variant == "control" else [("refusal", v @ r)]
        for a, na in enumerate(names):
            for b, nb in enumerate(names):
                rows.append({"variant": variant, "category_a": na, "category_b": nb, "cosine": float(cos[a, b])})
            for nb, col in extra:
                rows.append({"variant": variant, "category_a": na, "category_b": nb, "cosine": float(col[a])})
    out = pd.DataFrame(rows)
    out["method"], out["layer"] = method, int(dirs["raw"].layers[0])
    return out[list(COSINE_COLUMNS)]


# --------------------------------------------------------------------------------------------------- policies
def direction_variants(dirs: Mapping[str, Any]) -> list[str]:
    """The direction sets of a :func:`fit_directions` result (``refusal`` is a vector, not a set)."""
    return [k for k in dirs if k != "refusal"]


def build_policies(dirs: Mapping[str, Any], *, toward: float, away: float, positions: Any = "last_prompt",
                   variants: Sequence[str] | None = None) -> tuple[dict[str, dict[str, Any]], pd.DataFrame]:
    """Per variant (default: every direction set of ``dirs``): ``{name: Intervention | None}`` (``"unsteered"``
    included) and one meta table ``variant, policy, steer_category, sign, coeff, scale``."""
    from catlens.steer import Intervention

    out: dict[str, dict[str, Any]] = {}
    meta = []
    for variant in (direction_variants(dirs) if variants is None else variants):
        d = dirs[variant]
        layer = int(d.layers[0])
        ref = float(d.ref_norm[0])
        pols: dict[str, Any] = {BASE: None}
        for i, name in enumerate(d.categories):
            for sign, coeff, scale in (("toward", toward, toward), ("away", -away, away)):
                key = f"{name}|{sign}"
                pols[key] = Intervention(d.site, layer, d.vectors[i, 0], coeff=coeff, positions=positions,
                                         scale="norm", ref_norm=ref, label=f"{variant}:{key}")
                meta.append({"variant": variant, "policy": key, "steer_category": name, "sign": sign,
                             "coeff": float(coeff), "scale": float(scale)})
        out[variant] = pols
    return out, pd.DataFrame(meta)


def run_first_position(model: Any, evals: Any, policies: Mapping[str, Mapping[str, Any]], *, batch_size: int = 32,
                       cache_dir: Path | None = None, show_progress: bool = True) -> tuple[pd.DataFrame, dict]:
    """The first-position table of every variant's settings and the unsteered baseline, in **one**
    :func:`catlens.generation.first_position` call (one prefill per batch shared by all settings), cached per
    setting in ``cache_dir`` by :func:`catlens.generation.first_position_cached` (keyed by the model, the prompts,
    the setting and the batch size). Returns the table (column ``variant`` added; each variant's rows carry the one
    unsteered baseline) and ``{variant: "computed" | "cached"}`` ("cached" when every setting of the variant was)."""
    from catlens.generation import first_position, first_position_cached

    joint: dict[str, Any] = {BASE: None}
    for variant, pols in policies.items():
        joint.update({f"{variant}/{name}": pol for name, pol in pols.items() if pol is not None})
    if cache_dir is None:
        table = first_position(model, evals, joint, batch_size=batch_size, show_progress=show_progress)
        done = {name: "computed" for name in joint}
    else:
        table, done = first_position_cached(model, evals, joint, cache_dir, batch_size=batch_size,
                                            show_progress=show_progress)
    base = table[table.policy == BASE]
    tables, status = [], {}
    for variant in policies:
        own = table[table.policy.str.startswith(f"{variant}/")]
        tables.append(pd.concat([base, own.assign(policy=own.policy.str.slice(len(variant) + 1))],
                                ignore_index=True).assign(variant=variant))
        status[variant] = ("cached" if all(v == "cached" for k, v in done.items() if k.startswith(f"{variant}/"))
                           else "computed")
    return pd.concat(tables, ignore_index=True), status


# ------------------------------------------------------------------------------------------------ the matrix
def _ci(x: np.ndarray, method: str = "linear") -> tuple[float, float]:
    x = x[~np.isnan(x)]
    if not len(x):
        return math.nan, math.nan
    lo, hi = np.quantile(x, [0.025, 0.975], method=method)
    return float(lo), float(hi)


def mcnemar_exact(base: np.ndarray | Sequence[Any], steered: np.ndarray | Sequence[Any]) -> tuple[int, float]:
    """Exact two-sided McNemar test of paired 0/1 outcomes: ``(discordant pairs, p-value)``; p = 1 without any
    discordant pair."""
    from scipy.stats import binom

    base, steered = np.asarray(base, dtype=bool), np.asarray(steered, dtype=bool)
    b, c = int((base & ~steered).sum()), int((~base & steered).sum())
    n = b + c
    if n == 0:
        return 0, 1.0
    return n, float(min(1.0, 2.0 * binom.cdf(min(b, c), n, 0.5)))


def adjust_p_values(p: Sequence[float] | np.ndarray, method: str = "fdr_bh", alpha: float = 0.05
                    ) -> tuple[np.ndarray, np.ndarray]:
    """``(adjusted p-values, rejected)`` across one family of tests (``statsmodels.stats.multitest.multipletests``;
    ``method`` ``fdr_bh`` (Benjamini-Hochberg) or ``holm``)."""
    from statsmodels.stats.multitest import multipletests

    if method not in CORRECTIONS:
        raise _unknown("correction", method, list(CORRECTIONS))
    p = np.asarray(p, dtype=float)
    if not len(p):
        return p, np.zeros(0, dtype=bool)
    reject, adjusted, _, _ = multipletests(p, alpha=alpha, method=method)
    return adjusted, reject


def specificity_tables(fp: pd.DataFrame, meta: pd.DataFrame, index: pd.DataFrame, categories: Sequence[str], *,
                       n_boot: int = 2000, seed: int = 0, context: Mapping[str, Any] | None = None,
                       correction: str = "fdr_bh", alpha: float = 0.05) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The specificity matrix (one row per variant, set, sign, steering direction, evaluated category) and its
    summary, from a first-position table.

    ``fp`` has columns ``variant, policy, id, refused, refusal_score`` (each variant's own ``"unsteered"`` rows are its
    baseline); ``meta`` maps ``(variant, policy)`` to ``steer_category, sign, coeff, scale``; ``index`` maps ``id`` to
    ``set`` (harmful|lookalike) and ``eval_category``. Intervals: a paired percentile bootstrap over prompts with
    ``numpy.random.default_rng(seed)``; one draw resamples the prompts of every (set, category) and serves every cell
    and summary. ``context`` adds constant columns (layer, method, positions, seeds).

    Every cell also gets an exact McNemar p-value of its rate change (:func:`mcnemar_exact`) and a p-value adjusted
    across **all cells of the table** (one family; ``correction`` ``fdr_bh`` or ``holm``, :func:`adjust_p_values`);
    ``significant`` = adjusted p <= ``alpha``.
    """
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r} must be an int >= 1 (e.g. 2000).")
    context = dict(context or {})
    if fp["refused"].isna().any():
        raise ValueError("the first-position table has no refusal verdicts (refused is None): the model has no "
                         "refusal tokens. The specificity test needs a refusal-token model (catlens finetune).")
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list[str]] = {}
    draws: dict[tuple[str, str], np.ndarray] = {}
    for s in SETS:
        for c in categories:
            ids = index[(index.set == s) & (index.eval_category == c)].id.tolist()
            if not ids:
                raise ValueError(f"no {s} evaluation prompts of category {c!r}; every category needs prompts in "
                                 f"both sets.")
            groups[(s, c)] = ids
            draws[(s, c)] = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    cells, summary = [], []
    for variant in dict.fromkeys(meta.variant):
        table = fp[fp.variant == variant]
        wide_r = table.pivot(index="id", columns="policy", values="refused").astype(float)
        wide_s = table.pivot(index="id", columns="policy", values="refusal_score").astype(float)
        if BASE not in wide_r.columns:
            raise ValueError(f"variant {variant!r}: the first-position table has no {BASE!r} rows (the baseline).")
        m = meta[meta.variant == variant]
        for sign in SIGNS:
            rows = m[m.sign == sign]
            steer = rows.steer_category.tolist()
            pols = rows.policy.tolist()
            for s in SETS:
                boot = {"rate": np.empty((n_boot, len(steer), len(categories))),
                        "score": np.empty((n_boot, len(steer), len(categories)))}
                point = {"rate": np.empty((len(steer), len(categories))),
                         "score": np.empty((len(steer), len(categories)))}
                for j, c in enumerate(categories):
                    ids = groups[(s, c)]
                    idx = draws[(s, c)]
                    for metric, wide in (("rate", wide_r), ("score", wide_s)):
                        base = wide.loc[ids, BASE].to_numpy()
                        diff = wide.loc[ids, pols].to_numpy().T - base[None, :]  # [steer prompt]
                        point[metric][:, j] = diff.mean(1)
                        boot[metric][:, :, j] = diff[:, idx].mean(-1).T
                    base_r, base_s = wide_r.loc[ids, BASE].mean(), wide_s.loc[ids, BASE].mean()
                    base_flags = wide_r.loc[ids, BASE].to_numpy()
                    for i, name in enumerate(steer):
                        n_disc, p_val = mcnemar_exact(base_flags, wide_r.loc[ids, pols[i]].to_numpy())
                        lo, hi = _ci(boot["rate"][:, i, j])
                        slo, shi = _ci(boot["score"][:, i, j])
                        r = rows.iloc[i]
                        cells.append({"variant": variant, "set": s, "sign": sign, "steer_category": name,
                                      "eval_category": c, "diagonal": name == c, "n": len(ids),
                                      "base_rate": float(base_r), "steered_rate": float(base_r + point["rate"][i, j]),
                                      "delta": float(point["rate"][i, j]), "delta_ci_low": lo, "delta_ci_high": hi,
                                      "base_score": float(base_s),
                                      "steered_score": float(base_s + point["score"][i, j]),
                                      "delta_score": float(point["score"][i, j]), "delta_score_ci_low": slo,
                                      "delta_score_ci_high": shi, "n_discordant": n_disc, "p_value": p_val,
                                      "coeff": float(r.coeff), "scale": float(r.scale)})
                for metric in ("rate", "score"):
                    summary += _summaries(variant, s, sign, metric, steer, categories, point[metric], boot[metric],
                                          scale=float(rows.scale.iloc[0]) if len(rows) else math.nan)
    cell_table = pd.DataFrame(cells)
    adjusted, reject = adjust_p_values(cell_table["p_value"].to_numpy(), correction, alpha)
    cell_table["p_adjusted"], cell_table["significant"] = adjusted, reject.astype(bool)
    cell_table["correction"] = f"{CORRECTIONS[correction]} across the {len(cell_table)} cells; {P_VALUE}"
    cell_table["family_size"] = len(cell_table)
    sum_table = pd.DataFrame(summary)
    for t in (cell_table, sum_table):
        t["n_boot"] = n_boot
        for k, v in context.items():
            t[k] = v
    for t, cols in ((cell_table, SPECIFICITY_COLUMNS), (sum_table, SUMMARY_COLUMNS)):
        for col in cols:
            if col not in t.columns:
                t[col] = None
    cell_table["ci_method"] = f"{CI_METHOD}, B={n_boot}"
    return cell_table[list(SPECIFICITY_COLUMNS)], sum_table[list(SUMMARY_COLUMNS)]


def _summaries(variant: str, s: str, sign: str, metric: str, steer: Sequence[str], categories: Sequence[str],
               point: np.ndarray, boot: np.ndarray, *, scale: float) -> list[dict[str, Any]]:
    """Summary rows of one matrix ``point`` [steer category] with bootstrap draws ``boot`` [draw steer category]."""
    base = {"variant": variant, "set": s, "sign": sign, "metric": metric, "scale": scale}
    nan = math.nan
    if all(name in categories for name in steer):  # category directions: a diagonal exists
        cols = [list(categories).index(name) for name in steer]
        diag_mask = np.zeros(point.shape, dtype=bool)
        diag_mask[np.arange(len(steer)), cols] = True
        off_mask = ~diag_mask

        def stats(m: np.ndarray) -> tuple[Any, Any, Any, Any, Any]:
            d = m[..., diag_mask].mean(-1)
            o = m[..., off_mask].mean(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.divide(d, o)
            # an effect on the diagonal only (off-diagonal exactly 0) is unboundedly specific: +inf whatever the sign
            ratio = np.where((o == 0) & (d != 0), np.inf, ratio)
            return d, o, ratio, d - o, m.reshape(*m.shape[:-2], -1).mean(-1)

        d, o, ratio, diff, allm = stats(point)
        bd, bo, bratio, bdiff, ball = stats(boot)
        return [{**base, "rows": "categories", "n_rows": len(steer), "mean_diag": float(d),
                 "mean_diag_ci_low": _ci(bd)[0], "mean_diag_ci_high": _ci(bd)[1], "mean_offdiag": float(o),
                 "mean_offdiag_ci_low": _ci(bo)[0], "mean_offdiag_ci_high": _ci(bo)[1], "ratio": float(ratio),
                 "ratio_ci_low": _ci(bratio, "inverted_cdf")[0], "ratio_ci_high": _ci(bratio, "inverted_cdf")[1],
                 "diag_minus_offdiag": float(diff), "diag_minus_offdiag_ci_low": _ci(bdiff)[0],
                 "diag_minus_offdiag_ci_high": _ci(bdiff)[1],
                 "mean_all": float(allm), "mean_all_ci_low": _ci(ball)[0], "mean_all_ci_high": _ci(ball)[1]}]
    out = []
    groups = {"refusal": [i for i, n in enumerate(steer) if n == "refusal"],
              "random": [i for i, n in enumerate(steer) if n.startswith("random")]}
    groups.update({n: [i] for i, n in enumerate(steer) if n != "refusal" and not n.startswith("random")})
    for name, rows in groups.items():
        if not rows:
            continue
        allm, ball = point[rows].mean(), boot[:, rows].reshape(len(boot), -1).mean(-1)
        lo, hi = _ci(ball)
        out.append({**base, "rows": name, "n_rows": len(rows), "mean_diag": nan, "mean_diag_ci_low": nan,
                    "mean_diag_ci_high": nan, "mean_offdiag": nan, "mean_offdiag_ci_low": nan,
                    "mean_offdiag_ci_high": nan, "ratio": nan, "ratio_ci_low": nan, "ratio_ci_high": nan,
                    "diag_minus_offdiag": nan, "diag_minus_offdiag_ci_low": nan,
                    "diag_minus_offdiag_ci_high": nan, "mean_all": float(allm),
                    "mean_all_ci_low": lo, "mean_all_ci_high": hi})
    return out


# ------------------------------------------------------------------------------------------------------ run
def add_permutation_control(summary: pd.DataFrame, perm_summary: pd.DataFrame) -> pd.DataFrame:
    """For every ``categories`` row of ``summary``: the mean ``diag_minus_offdiag`` of the label-permuted directions
    (same set, sign, metric) and the permutation p-value ``(1 + #{perm: |d - o| >= |observed d - o|}) / (1 +
    n_perm)`` (NaN without permutations). With P permutations the smallest possible p is 1 / (P + 1)."""
    out = summary.copy()
    out["perm_mean_diag_minus_offdiag"], out["perm_p"], out["n_perm"] = math.nan, math.nan, 0
    if perm_summary is None or not len(perm_summary):
        return out
    cat = perm_summary[perm_summary.rows == "categories"]
    for i, r in out[out.rows == "categories"].iterrows():
        same = cat[(cat.set == r.set) & (cat.sign == r.sign) & (cat.metric == r.metric)]
        vals = same.diag_minus_offdiag.to_numpy(dtype=float)
        if not len(vals):
            continue
        obs = abs(float(r.diag_minus_offdiag))
        out.loc[i, "perm_mean_diag_minus_offdiag"] = float(vals.mean())
        out.loc[i, "perm_p"] = (1 + int((np.abs(vals) >= obs - 1e-12).sum())) / (1 + len(vals))
        out.loc[i, "n_perm"] = len(vals)
    return out


def run_specificity(model: Any, train: Any, evals: Any, index: pd.DataFrame, categories: Sequence[str], *,
                    layer: int, toward: float, away: float, method: str = "one_vs_benign", site: str = "resid_post",
                    positions: Any = "last_prompt", n_random: int = 3, n_perm: int = 3, n_boot: int = 2000,
                    seed: int = 0, correction: str = "fdr_bh", batch_size: int = 32, run: Any = None,
                    show_progress: bool = True) -> dict[str, Any]:
    """Fit the directions, measure every setting at the first response position, build the tables: the matrix of
    the raw, orthogonalised and control directions (``specificity``, one family for the multiple-testing
    correction), its ``summary`` (with the label-permutation control's p-value), the permuted directions' own cells
    and summary (``permutation``, ``permutation_summary``) and the cosines."""
    t0 = time.perf_counter()
    layer = model.layer(layer)
    toward, away = check_fraction("toward", toward), check_fraction("away", away)
    check_method(method)
    if isinstance(n_random, bool) or not isinstance(n_random, int) or n_random < 0:
        raise ValueError(f"n_random={n_random!r} must be an int >= 0.")
    if correction not in CORRECTIONS:
        raise _unknown("correction", correction, list(CORRECTIONS))
    dirs = fit_directions(model, train, categories, layer=layer, method=method, site=site, n_random=n_random,
                          n_perm=n_perm, seed=seed, batch_size=batch_size, show_progress=show_progress)
    policies, meta = build_policies(dirs, toward=toward, away=away, positions=positions)
    cache_dir = run.path / "cache" if run is not None else None
    fp, status = run_first_position(model, evals, policies, batch_size=batch_size, cache_dir=cache_dir,
                                    show_progress=show_progress)
    seeds = json.dumps({"bootstrap": seed, "random_directions": seed, "subsample": seed, "label_permutations": seed},
                       sort_keys=True)
    context = {"layer": layer, "method": method, "positions": json.dumps(positions), "seeds": seeds}
    main_meta, perm_meta = meta[meta.variant.isin(VARIANTS)], meta[~meta.variant.isin(VARIANTS)]
    cells, summary = specificity_tables(fp[fp.variant.isin(VARIANTS)], main_meta, index, categories, n_boot=n_boot,
                                        seed=seed, context=context, correction=correction)
    if len(perm_meta):
        pcells, psummary = specificity_tables(fp[~fp.variant.isin(VARIANTS)], perm_meta, index, categories,
                                              n_boot=n_boot, seed=seed, context=context, correction=correction)
    else:
        pcells = pd.DataFrame(columns=list(SPECIFICITY_COLUMNS))
        psummary = pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    summary = add_permutation_control(summary, psummary)[list(SUMMARY_COLUMNS)]
    cosines = cosine_table(dirs, method)
    result = {"specificity": cells, "summary": summary, "permutation": pcells, "permutation_summary": psummary,
              "cosines": cosines, "directions": dirs, "cache": status, "seconds": time.perf_counter() - t0}
    if run is not None:
        for name in ("specificity", "summary", "permutation", "permutation_summary", "cosines"):
            run.save_table(name, result[name])
        run.save_table("first_position", fp)
        for variant in direction_variants(dirs):
            dirs[variant].save(run.path / "directions" / variant)
    return result


def selection_rule() -> Any:
    """The specificity stage's choice of layer and scale on the selection split (:mod:`catlens.selection`): maximise
    the raw directions' category specificity of the refusal score (mean of ``-(diag - offdiag)`` of harmful/away and
    ``diag - offdiag`` of lookalike/toward); ties: the smaller scale, then the lower layer."""
    from catlens.selection import Objective, SelectionRule, TieBreak

    return SelectionRule(Objective("objective", "max"), tie_breaks=(TieBreak("scale", "min"), TieBreak("layer", "min")))


def selection_row(summary: pd.DataFrame) -> dict[str, float]:
    """The objective's parts from a raw-variant summary (score metric)."""
    def get(s: str, sign: str) -> float:
        r = summary[(summary.variant == "raw") & (summary.set == s) & (summary.sign == sign)
                    & (summary.metric == "score") & (summary.rows == "categories")]
        return float(r.diag_minus_offdiag.iloc[0]) if len(r) else math.nan

    harmful_away, lookalike_toward = -get("harmful", "away"), get("lookalike", "toward")
    return {"harmful_away": harmful_away, "lookalike_toward": lookalike_toward,
            "objective": (harmful_away + lookalike_toward) / 2}


def choose_setting(model: Any, train: Any, evals: Any, index: pd.DataFrame, categories: Sequence[str], *,
                   layers: Sequence[int], scales: Sequence[float], method: str = "one_vs_benign",
                   site: str = "resid_post", positions: Any = "last_prompt", seed: int = 0, batch_size: int = 32,
                   run: Any = None, show_progress: bool = True) -> tuple[pd.DataFrame, Any]:
    """Every (layer, scale) of the grid on the **selection** split (raw directions only), and the choice
    (:func:`selection_rule`). Returns the ``selection`` table and the :class:`catlens.selection.Selection`."""
    from catlens.selection import mark, select

    rows = []
    for layer in dict.fromkeys(model.layer(x) for x in layers):
        dirs = fit_directions(model, train, categories, layer=layer, method=method, site=site, n_random=0, n_perm=0,
                              seed=seed, batch_size=batch_size, show_progress=show_progress)
        for scale in dict.fromkeys(check_fraction("scale", x) for x in scales):
            policies, meta = build_policies(dirs, toward=scale, away=scale, positions=positions, variants=["raw"])
            cache_dir = run.path / "cache" / "selection" / f"L{layer}-s{scale:g}" if run is not None else None
            fp, _ = run_first_position(model, evals, policies, batch_size=batch_size, cache_dir=cache_dir,
                                       show_progress=show_progress)
            _, summary = specificity_tables(fp, meta, index, categories, n_boot=1, seed=seed)
            rows.append({"layer": layer, "scale": scale, "split": "selection", "n_prompts": len(evals),
                         **selection_row(summary)})
    table = pd.DataFrame(rows)
    rule = selection_rule()
    sel = select(table, rule)
    table = mark(table, rule, sel)
    return table[list(SELECTION_COLUMNS)], sel


def headline(summary: pd.DataFrame) -> dict[str, Any]:
    """The manifest's headline: per (variant, set, sign) of the headline cells (raw and orthogonalised;
    harmful/away, lookalike/toward) the rate summary's diagonal, off-diagonal, ratio, difference and permutation
    control (NaN as None)."""
    out = {}
    for variant, s, sign in (("raw", "harmful", "away"), ("raw", "lookalike", "toward"),
                             ("orthogonalised", "harmful", "away"), ("orthogonalised", "lookalike", "toward")):
        row = summary[(summary.variant == variant) & (summary.set == s) & (summary.sign == sign)
                      & (summary.metric == "rate") & (summary.rows == "categories")]
        if len(row):
            r = row.iloc[0]
            out[f"{variant}/{s}/{sign}"] = {k: (None if isinstance(r[k], float) and math.isnan(r[k]) else float(r[k]))
                                            for k in ("mean_diag", "mean_offdiag", "ratio", "ratio_ci_low",
                                                      "ratio_ci_high", "diag_minus_offdiag",
                                                      "diag_minus_offdiag_ci_low", "diag_minus_offdiag_ci_high",
                                                      "perm_mean_diag_minus_offdiag", "perm_p")}
    return out


def parse_list(text: str, what: str, cast: Any) -> list[Any] | None:
    """``'auto'`` -> None; ``'2,3'`` -> [2, 3] (unique, in order)."""
    if str(text).strip() == "auto":
        return None
    try:
        items = [cast(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{what} {text!r}: give comma-separated numbers or 'auto'.") from None
    if not items:
        raise ValueError(f"--{what} is empty: give comma-separated numbers or 'auto'.")
    return list(dict.fromkeys(items))


def resolve_grid(n_layers: int, setting: Mapping[str, Any] | None, layers: Sequence[int] | None,
                 scales: Sequence[float] | None, policy_scale: float | None) -> tuple[list[int], list[float]]:
    """The candidate layers and scales (``None`` = auto, see ``--layers``/``--scales``)."""
    last = n_layers - 1
    if layers is None:
        if setting is not None:
            first = int(setting["layer"]) % n_layers
            other = round(AUTO_LAYER_FRACTIONS[1] * last)
            other = other if other != first else round(AUTO_LAYER_FRACTIONS[0] * last)
            layers = [first, other]
        else:
            layers = [round(f * last) for f in AUTO_LAYER_FRACTIONS]
    if scales is None:
        scales = [policy_scale, 2 * policy_scale] if policy_scale else [0.1, 0.2]
    return list(dict.fromkeys(layers)), list(dict.fromkeys(float(x) for x in scales))



# -------------------------------------------------------------------------------------------- the command line
@dataclasses.dataclass(frozen=True)
class Plan:
    """The checked command line (:func:`check_options`): everything decided before a model is loaded."""

    setting: dict[str, Any] | None
    """The ``--policy`` folder's setting (:func:`read_policy_setting`), or None."""
    method: str
    layers: list[int] | None
    """``--layers`` (None: auto, :func:`resolve_grid`)."""
    scales: list[float] | None
    n_boot: int
    n_random: int
    n_perm: int
    categories: list[str] | None
    out: Path
    config: dict[str, Any]
    """What the manifest records and a rerun must match to resume."""
    resume: bool
    """``out`` holds a run of the same config: resume it (its cached first-position tables are reused)."""


def check_options(options: Any) -> Plan:
    """Every check of the options that needs no model, before anything is loaded or written (the ``--quick`` caps
    applied; an ``--out`` folder that holds another run, or no run, is refused unless ``--overwrite``)."""
    from catlens.runs import RunDir

    args = argparse.Namespace(**dataclasses.asdict(options))
    setting = read_policy_setting(args.policy) if args.policy else None
    if args.method is not None:
        method = check_method(args.method)
    else:
        method = (setting or {}).get("method") or "one_vs_benign"
    layers = parse_list(args.layers, "layers", int)
    scales = parse_list(args.scales, "scales", float)
    for x in scales or ():
        check_fraction("--scale", x)
    for flag, value, least in (("--n-boot", args.n_boot, 1), ("--n-random", args.n_random, 0),
                               ("--n-perm", args.n_perm, 0), ("--batch-size", args.batch_size, 1)):
        if value < least:
            raise ValueError(f"{flag} {value} must be >= {least}.")
    if args.correction not in CORRECTIONS:
        raise _unknown("correction", args.correction, list(CORRECTIONS))
    n_boot = min(args.n_boot, QUICK["n_boot"]) if args.quick else args.n_boot
    n_random = min(args.n_random, QUICK["n_random"]) if args.quick else args.n_random
    n_perm = min(args.n_perm, QUICK["n_perm"]) if args.quick else args.n_perm
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    out = Path(args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("threads", "overwrite", "no_progress")}
    resume = False
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        if not (out / "manifest.json").exists():
            raise FileExistsError(f"--out {str(out)!r} is not empty and is not a run folder; choose another --out.")
        previous = RunDir.open(out).manifest.get("config")
        if previous != config:
            raise FileExistsError(f"--out {str(out)!r} holds a run with other arguments ({previous}); pass --overwrite "
                                  f"to replace it or choose another --out.")
        resume = True
    return Plan(setting=setting, method=method, layers=layers, scales=scales, n_boot=n_boot, n_random=n_random,
                n_perm=n_perm, categories=categories, out=out, config=config, resume=resume)


def check_model(model: Any, plan: Plan, finetune_config: str | None = None) -> dict[str, Any]:
    """The checks that need the model (``--layers`` in range, a resid_post policy, refusal tokens) and what it
    decides: ``{"site", "positions", "tokens", "finetune_config"}`` (the fine-tune preset: the option, else the
    model's own, else ``default``)."""
    from catlens.refusal import refusal_token_ids

    setting = plan.setting
    for x in plan.layers or ():
        model.layer(x)  # range check before any work
    site = setting["site"] if setting else "resid_post"
    if site == "z":
        raise ValueError(f"policy {setting['path']!r} steers the per-head site 'z'; give --layers for resid_post "
                         f"instead.")
    positions = setting["positions"] if setting else "last_prompt"
    if isinstance(positions, list):
        positions = tuple(positions)
    tokens, _ = refusal_token_ids(model)
    if tokens is None:
        raise ValueError(f"{model.name!r} has no refusal tokens; the specificity test reads refusal at the first "
                         f"response position of a refusal-token model (catlens finetune).")
    ft_config = finetune_config or (((model.provenance or {}).get("source", {}).get("finetune") or {})
                                    .get("config", {}).get("name")) or "default"
    return {"site": site, "positions": positions, "tokens": tokens, "finetune_config": ft_config}


def policy_scale(model: Any, train: Any, setting: Mapping[str, Any] | None, site: str) -> float | None:
    """The ``--policy`` setting's toward magnitude as a fraction of the residual norm (a raw coefficient is divided
    by the training prompts' mean activation norm at the policy's layer); None without a policy."""
    if setting is None:
        return None
    scale = setting["toward"]
    if setting["raw_scale"]:  # raw coefficients -> fractions of the residual norm
        from catlens.cache import collect

        x = collect(model, train, sites=[site], layers=[model.layer(setting["layer"])],
                    show_progress=False).get(site).float()
        ref = float(x.norm(dim=-1).mean())
        scale = scale * setting["raw_vector_norm"] / ref
        log.info("policy coefficients are raw: converted to fractions of the residual norm %.3f", ref)
    return scale


def headline_lines(head: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One printed line per :func:`headline` entry."""
    return [f"{k}: diagonal {v['mean_diag']:+.3f}, off-diagonal {v['mean_offdiag']:+.3f}, ratio "
            f"{v['ratio'] if v['ratio'] is not None else float('nan'):.2f}, diagonal - off-diagonal "
            f"{v['diag_minus_offdiag']:+.3f} [{v['diag_minus_offdiag_ci_low']:+.3f}, "
            f"{v['diag_minus_offdiag_ci_high']:+.3f}]" for k, v in head.items()]
