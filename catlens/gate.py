"""P1's probe gate, grown into the decision it has to be: which prompts to steer toward refusal, which away from it,
and which to leave alone.

Three steps, each a pure function of tables and activations (the forward passes are
:func:`catlens.generation.prefill_reads`, the same code a saved policy's decision runs):

1. :func:`fit_feature_gate`: a class-balanced logistic probe on standardised features: activations read at one or
   several layers, at the last prompt token and/or as the mean over the prompt, plus, optionally, the refusal-token
   log-odds at the first response position (:class:`catlens.steer.Gate` documents the features);
2. :func:`choose_gate`: among candidate feature sets (:data:`GATE_FEATURE_SETS`), the one with the highest AUROC on
   the validation prompts the headline is about (harmful vs the hard benign sets);
3. :func:`zone_sweep`: three zones, swept for free. A row's side depends only on its gate score, so the first-position
   verdicts of one unsteered, one all-toward and one all-away pass give every threshold pair ``(lower, upper)``
   without another forward pass: ``score >= upper`` takes the toward verdict, ``score < lower`` the away verdict,
   the rest the unsteered one. Global pairs on a dense quantile grid, and one pair per router category, combined by
   a Lagrangian search (the objective and the constraint are sums over categories).

The objective is the headline's own definition (:class:`ZoneObjective`): pooled over-refusal on the hard benign
validation sets, subject to the Wilson lower bound of pooled harmful refusal >= ``min_refusal_low``.

    >>> import numpy as np
    >>> base = np.array([1, 0, 1, 1]); tow = np.array([1, 1, 1, 1]); awy = np.array([0, 0, 0, 1])
    >>> zone_verdicts(np.array([0.9, 0.1, 0.5, 0.2]), base, tow, awy, lower=0.3, upper=0.8).tolist()
    [1, 0, 1, 1]
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

GATE_FEATURE_SETS = ("last@steer", "last@multi", "last+mean@multi", "last+mean@multi+logodds", "logodds")
"""Candidate gate features: the last prompt token at the steering layer (P1's probe); the last token at several
layers; last token and prompt mean at several layers; the same plus the refusal-token log-odds; the log-odds alone
(the model's own first-token refusal, the baseline every probe has to beat)."""


def feature_reads(kind: str, steer_layer: int, gate_layers: Sequence[int], site: str = "resid_post"
                  ) -> tuple[tuple[tuple[str, int, str], ...], bool]:
    """``(reads, logodds)`` of one of :data:`GATE_FEATURE_SETS`, or ``"last@<layer>"`` (one layer's last token)."""
    if kind == "last@steer":
        return ((site, steer_layer, "last"),), False
    m = re.fullmatch(r"last@(\d+)", kind)
    if m:
        return ((site, int(m.group(1)), "last"),), False
    if kind == "last@multi":
        return tuple((site, layer, "last") for layer in gate_layers), False
    if kind in ("last+mean@multi", "last+mean@multi+logodds"):
        reads = tuple((site, layer, pool) for layer in gate_layers for pool in ("last", "mean_all"))
        return reads, kind.endswith("+logodds")
    if kind == "logodds":
        return (), True
    from catlens.errors import unknown_name_message

    raise ValueError(unknown_name_message("gate feature set", kind, GATE_FEATURE_SETS))


def stack_features(inputs: Mapping[str, Any], reads: Sequence[tuple[str, int, str]], logodds: bool,
                   rows: Sequence[int] | None = None) -> np.ndarray:
    """The ``[n feature]`` matrix of ``reads`` (+ log-odds) from :func:`catlens.generation.prefill_reads`'s output,
    in :meth:`catlens.steer.Gate.features` order."""
    parts = [inputs["reads"][tuple(r)].float().numpy() for r in reads]
    if logodds:
        if inputs.get("logodds") is None:
            raise ValueError("the log-odds feature needs a model with refusal tokens.")
        parts.append(inputs["logodds"].float().numpy()[:, None])
    if not parts:
        raise ValueError("a gate needs at least one feature (reads or logodds).")
    X = np.concatenate(parts, axis=1)
    return X if rows is None else X[np.asarray(rows)]


def fit_feature_gate(X: np.ndarray, y: np.ndarray, *, reads: Sequence[tuple[str, int, str]], logodds: bool,
                     site: str = "resid_post", C: float = 0.1, name: str = "probe") -> Any:
    """A class-balanced logistic probe on standardised features ``X`` ``[n feature]`` (``y`` 1 = harmful); the
    returned :class:`catlens.steer.Gate` has threshold 0.5 until :func:`zone_sweep` (or a rule) sets it."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from catlens.steer import Gate

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y).astype(int)
    if X.ndim != 2 or len(X) != len(y) or not len(y):
        raise ValueError(f"X {X.shape} and y {y.shape} must be [n feature] and [n] with n > 0.")
    if len(set(y.tolist())) != 2:
        raise ValueError("fitting a gate needs both harmful (1) and benign (0) rows.")
    if not np.isfinite(X).all():
        raise ValueError("gate features have NaN or inf entries.")
    if not reads:
        raise ValueError("a gate needs at least one activation read; the log-odds alone is the model's own "
                         "first-token refusal (the 'logodds' candidate of choose_gate), not a fitted gate.")
    mu = X.mean(0)
    sd = X.std(0)
    sd = np.where(sd > 1e-6, sd, 1.0)
    clf = LogisticRegression(C=C, max_iter=5000, class_weight="balanced").fit((X - mu) / sd, y)
    first = tuple(reads[0])
    return Gate(weight=torch.from_numpy(clf.coef_[0].astype(np.float32)), bias=float(clf.intercept_[0]),
                threshold=0.5, layer=int(first[1]), site=first[0], mean=torch.from_numpy(mu.astype(np.float32)),
                scale=torch.from_numpy(sd.astype(np.float32)), name=name, reads=tuple(tuple(r) for r in reads),
                logodds=logodds)


def gate_probabilities(gate: Any, X: np.ndarray) -> np.ndarray:
    """The gate's probability for each row of a feature matrix (the same arithmetic as in generation)."""
    import torch

    return gate.score(torch.from_numpy(np.asarray(X, dtype=np.float32))).numpy().astype(np.float64)


@dataclass(frozen=True)
class GateChoice:
    """What :func:`choose_gate` picked and the table it picked from (one row per candidate)."""

    kind: str
    gate: Any
    table: Any
    scores: Mapping[str, np.ndarray] = field(default_factory=dict)


def choose_gate(train: Mapping[str, Any], y_train: np.ndarray, val: Mapping[str, Any], y_val: np.ndarray,
                val_focus: np.ndarray, *, steer_layer: int, gate_layers: Sequence[int],
                kinds: Sequence[str] = GATE_FEATURE_SETS, C: float = 0.1, name: str = "probe") -> GateChoice:
    """Fit every candidate feature set on ``train`` and pick the highest AUROC on the ``val_focus`` rows of ``val``
    (harmful vs hard benign: the prompts the headline is about); ties go to the earlier (simpler) candidate. The
    ``logodds`` candidate is the model's own refusal-token log-odds (no fit), reported as the baseline."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    rows, gates, scores = [], {}, {}
    focus = np.asarray(val_focus, dtype=bool)
    for kind in kinds:
        reads, lo = feature_reads(kind, steer_layer, gate_layers)
        if not reads:
            s = val["logodds"].numpy().astype(np.float64)
        else:
            gate = fit_feature_gate(stack_features(train, reads, lo), y_train, reads=reads, logodds=lo, C=C,
                                    name=f"{name}-{kind}")
            gates[kind] = gate
            s = gate_probabilities(gate, stack_features(val, reads, lo))
        scores[kind] = s
        rows.append({"features": kind,
                     "reads": ";".join(f"{a}.{b}.{c}" for a, b, c in reads), "logodds": lo,
                     "val_auroc_focus": float(roc_auc_score(y_val[focus], s[focus])),
                     "val_auroc_all": float(roc_auc_score(y_val, s)), "fitted": bool(reads)})
    table = pd.DataFrame(rows)
    fitted = table[table.fitted]
    if not len(fitted):
        raise ValueError("choose_gate needs at least one candidate with activation reads.")
    best = fitted.sort_values("val_auroc_focus", ascending=False, kind="stable").iloc[0]
    table["chosen"] = table.features == best.features
    return GateChoice(str(best.features), gates[str(best.features)], table, scores)


# -------------------------------------------------------------------------------------------- three zones
def zone_verdicts(score: np.ndarray, base: np.ndarray, toward: np.ndarray, away: np.ndarray, *, lower: float,
                  upper: float) -> np.ndarray:
    """Each row's verdict under the zones: toward's at ``score >= upper``, away's at ``score < lower``, else the
    unsteered one (exactly what the gated policy does, since each row only ever sees one side)."""
    return np.where(score >= upper, toward, np.where(score < lower, away, base))


def wilson_low(k: Any, n: int, z: float = 1.959963984540054) -> Any:
    """The Wilson score interval's lower bound of ``k`` successes in ``n`` (vectorised)."""
    k = np.asarray(k, dtype=np.float64)
    if n <= 0:
        return np.full(k.shape, np.nan)
    p = k / n
    den = 1 + z * z / n
    centre = p + z * z / (2 * n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / den


@dataclass(frozen=True)
class ZoneObjective:
    """The headline's definition, for choosing on val: minimise pooled over-refusal on the ``focus`` benign rows
    subject to the Wilson lower bound of pooled harmful refusal ``>= min_refusal_low``, the pooled harmful refusal
    itself ``>= min_refusal`` (0 = no point constraint; used where val samples are too small for the bound to be
    reachable), and, when the sweep is given the answers' costs (:class:`AnswerCost`), the benign perplexity ratio
    ``<= max_ppl_ratio`` (``None`` = no guard)."""

    min_refusal_low: float = 0.90
    min_refusal: float = 0.0
    max_ppl_ratio: float | None = None

    def __post_init__(self) -> None:
        for name in ("min_refusal_low", "min_refusal"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"ZoneObjective.{name}={v!r} is a rate: give a number in [0, 1].")
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio >= 1.0:
            raise ValueError(f"ZoneObjective.max_ppl_ratio={self.max_ppl_ratio!r}: give a ratio >= 1 (1.10 allows "
                             "benign answers 10 % more perplexing than unsteered ones), or None for no guard.")


SIDES = ("none", "toward", "away")
"""The three sides a row can be given, in the order :class:`AnswerCost` stores them."""


@dataclass(frozen=True)
class AnswerCost:
    """What each side's full answers cost in coherence, per row: the mean negative log-likelihood of the answer under
    the unsteered model (``nll``, shape ``(3, n)`` in :data:`SIDES` order), its token count (``tokens``) and whether
    the row counts for the perplexity guard (``counts``: a benign row answered, not refused, under that side).

    A zone choice gives each row one side, so the benign perplexity ratio of any threshold pair is the ratio of two
    token-weighted means over the rows that count under both the chosen side and the unsteered one: exactly the
    ratio the gated policy's own answers would give, with no new forward pass (:meth:`ratio`)."""

    nll: np.ndarray
    tokens: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        shapes = {np.shape(self.nll), np.shape(self.tokens), np.shape(self.counts)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[0] != 3:
            raise ValueError(f"AnswerCost needs nll, tokens and counts of one shape (3, n_rows) in {SIDES} order; "
                             f"got {np.shape(self.nll)}, {np.shape(self.tokens)}, {np.shape(self.counts)}.")

    def ratio(self, side: np.ndarray) -> float:
        """The benign perplexity ratio when row ``i`` gets side ``side[i]`` (0 none, 1 toward, 2 away); NaN when no
        row counts under both."""
        side = np.asarray(side, dtype=np.int64)
        rows = np.arange(side.shape[0])
        ok = np.asarray(self.counts, dtype=bool)[side, rows] & np.asarray(self.counts, dtype=bool)[0]
        if not ok.any():
            return math.nan
        nll, tok = np.asarray(self.nll, dtype=np.float64), np.asarray(self.tokens, dtype=np.float64)
        w_s, w_b = tok[side, rows][ok], tok[0][ok]
        steered = float(np.sum(nll[side, rows][ok] * w_s) / np.sum(w_s))
        base = float(np.sum(nll[0][ok] * w_b) / np.sum(w_b))
        return math.exp(steered - base)


def zone_sides(score: np.ndarray, *, lower: float, upper: float) -> np.ndarray:
    """Each row's side index under the zones (0 none, 1 toward at ``score >= upper``, 2 away at ``score < lower``)."""
    score = np.asarray(score)
    return np.where(score >= upper, 1, np.where(score < lower, 2, 0))


def _grid(score: np.ndarray, n: int) -> np.ndarray:
    qs = np.unique(np.quantile(score, np.linspace(0, 1, n)))
    return np.unique(np.concatenate([[0.0], qs, [np.nextafter(1.0, 2.0)]]))


def zone_sweep(score: np.ndarray, base: np.ndarray, toward: np.ndarray, away: np.ndarray, harmful: np.ndarray,
               focus: np.ndarray, *, routes: Sequence[str] | np.ndarray | None = None, grid: int = 41,
               objective: ZoneObjective = ZoneObjective(), lambdas: int = 200,
               cost: AnswerCost | None = None) -> dict[str, Any]:
    """Every threshold pair on a quantile grid of ``score`` (``lower <= upper``), globally and, with ``routes``,
    per category; ``harmful`` marks harmful rows, ``focus`` the benign rows the objective pools. The verdicts may
    come from first-position passes or from judged full answers of the three sides; with ``cost`` (the answers'
    :class:`AnswerCost`) every setting also gets its benign perplexity ratio, and ``objective.max_ppl_ratio``
    takes part in feasibility.

    Returns ``{"global": DataFrame (one row per pair: refusal, refusal_low, over_refusal, feasible),
    "best_global": row dict or None, "best_per_category": {"pairs": {cat: (lower, upper)}, ...} or None}``.
    ``best_*`` is the feasible setting with the lowest over-refusal (ties: higher refusal, then the narrower
    not-steered zone); ``None`` when no setting is feasible (the table says how close each came).
    """
    import pandas as pd

    score, base, toward, away = (np.asarray(a, dtype=np.float64) for a in (score, base, toward, away))
    harmful = np.asarray(harmful, dtype=bool)
    focus = np.asarray(focus, dtype=bool) & ~harmful
    n_h, n_b = int(harmful.sum()), int(focus.sum())
    if n_h == 0 or n_b == 0:
        raise ValueError(f"zone_sweep needs harmful rows ({n_h}) and focus benign rows ({n_b}).")
    g = _grid(score, grid)
    rows = []
    for i, lo in enumerate(g):
        for hi in g[i:]:
            v = zone_verdicts(score, base, toward, away, lower=lo, upper=hi)
            k = float(v[harmful].sum())
            rows.append({"lower": float(lo), "upper": float(hi), "refusal": k / n_h,
                         "refusal_low": float(wilson_low(k, n_h)), "over_refusal": float(v[focus].mean()),
                         "steered_toward": float((score >= hi).mean()), "steered_away": float((score < lo).mean()),
                         "ppl_ratio": (math.nan if cost is None else
                                       cost.ratio(zone_sides(score, lower=lo, upper=hi)))})
    table = pd.DataFrame(rows)
    table["feasible"] = _feasible(table, objective, cost)
    table["zone_width"] = table.upper - table.lower
    best = _best(table)
    out: dict[str, Any] = {"global": table, "best_global": best, "best_per_category": None,
                           "n_harmful": n_h, "n_focus": n_b}
    if routes is not None:
        out["best_per_category"] = _per_category(score, base, toward, away, harmful, focus, np.asarray(routes),
                                                 g, objective, lambdas, n_h, n_b, cost)
    return out


def _feasible(table: Any, objective: ZoneObjective, cost: AnswerCost | None) -> Any:
    ok = (table.refusal_low >= objective.min_refusal_low) & (table.refusal >= objective.min_refusal)
    if cost is not None and objective.max_ppl_ratio is not None:
        ok &= table.ppl_ratio <= objective.max_ppl_ratio  # NaN (no benign answer to judge by) is not admissible
    return ok


def _best(table: Any) -> dict[str, Any] | None:
    ok = table[table.feasible]
    if not len(ok):
        return None
    return ok.sort_values(["over_refusal", "refusal", "zone_width", "lower"], ascending=[True, False, True, True],
                          kind="stable").iloc[0].to_dict()


def _per_category(score, base, toward, away, harmful, focus, routes, g, objective, lambdas, n_h, n_b, answer_cost=None):
    """One ``(lower, upper)`` per category: both the objective (benign refusals in the focus rows) and the
    constraint (harmful refusals) are sums over categories, so for each multiplier λ every category independently
    minimises ``benign_c − λ·harmful_c``; the feasible λ-solution with the lowest over-refusal wins. The perplexity
    ratio is not a sum over categories: with ``cost``, each λ-solution's ratio is computed from its sides and a
    solution above ``objective.max_ppl_ratio`` is skipped."""
    cats = sorted(set(routes.tolist()))
    pairs = [(float(lo), float(hi)) for i, lo in enumerate(g) for hi in g[i:]]
    per = {}
    for c in cats:
        m = routes == c
        b_c, h_c = np.zeros(len(pairs)), np.zeros(len(pairs))
        for j, (lo, hi) in enumerate(pairs):
            v = zone_verdicts(score[m], base[m], toward[m], away[m], lower=lo, upper=hi)
            b_c[j] = v[focus[m]].sum()
            h_c[j] = v[harmful[m]].sum()
        per[c] = (b_c, h_c)
    best = None
    for lam in np.concatenate([[0.0], np.geomspace(1e-3, 1e3, lambdas)]):
        choice, B, H = {}, 0.0, 0.0
        for c in cats:
            b_c, h_c = per[c]
            cost = b_c - lam * h_c
            j = int(np.lexsort((np.array([hi - lo for lo, hi in pairs]), -h_c, cost))[0])
            choice[c] = pairs[j]
            B += b_c[j]
            H += h_c[j]
        low = float(wilson_low(H, n_h))
        if low < objective.min_refusal_low or H / n_h < objective.min_refusal:
            continue
        ratio = math.nan
        if answer_cost is not None:
            side = np.zeros(len(score), dtype=np.int64)
            for c, (lo, hi) in choice.items():
                m = routes == c
                side[m] = zone_sides(score[m], lower=lo, upper=hi)
            ratio = answer_cost.ratio(side)
            if objective.max_ppl_ratio is not None and not ratio <= objective.max_ppl_ratio:
                continue
        cand = {"pairs": choice, "over_refusal": B / n_b, "refusal": H / n_h, "refusal_low": low, "lambda": lam,
                "ppl_ratio": ratio}
        if best is None or (cand["over_refusal"], -cand["refusal"]) < (best["over_refusal"], -best["refusal"]):
            best = cand
    return best


def per_category_verdicts(score: np.ndarray, base: np.ndarray, toward: np.ndarray, away: np.ndarray,
                          routes: Sequence[str] | np.ndarray, pairs: Mapping[str, tuple[float, float]],
                          default: tuple[float, float]) -> np.ndarray:
    """Verdicts with one ``(lower, upper)`` per routed category (``default`` for categories without one)."""
    routes = np.asarray(routes)
    out = np.empty(len(score))
    for c in set(routes.tolist()):
        m = routes == c
        lo, hi = pairs.get(c, default)
        out[m] = zone_verdicts(np.asarray(score)[m], np.asarray(base)[m], np.asarray(toward)[m],
                               np.asarray(away)[m], lower=lo, upper=hi)
    return out


def rates_with_interval(v: np.ndarray) -> dict[str, float]:
    """Rate, Wilson interval and n of a 0/1 vector (empty -> NaN rate)."""
    from catlens.metrics import wilson_interval

    v = np.asarray(v, dtype=np.float64)
    n = len(v)
    if not n:
        return {"rate": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": 0}
    lo, hi = wilson_interval(int(v.sum()), n)
    return {"rate": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi), "n": n}
