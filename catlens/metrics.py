"""Evaluation metrics: refusal and over-refusal rates with intervals, side-effect proxies, AUROC with an interval.

Rates (:func:`rate_table`) are proportions in [0, 1] (multiply by 100 for P1's percentages): per group ``n``,
``k``, ``rate``, the binomial SE ``sqrt(p(1-p)/n)`` (P1's ``compute_standard_error_proportion``, PAPERS §2.4) and a
Wilson 95 % interval (statsmodels), plus a *pooled* row (micro over all prompts: P1's "Average") and a *macro* row
(mean of the group rates) per side. The *side* says how to read a rate: ``harmful`` prompts give the refusal rate
(higher is better), ``benign`` prompts the over-refusal rate (lower is better).

Side-effect proxies stand in for quantities catlens does not measure directly; every function says which in its
docstring and every table carries it in a ``stands_for`` column:

* :func:`first_token_kl`: KL(unsteered ‖ steered) of next-token distributions, for "how much steering changes the
  model's behaviour on a prompt" (P1's benign KL term, PAPERS §2.3);
* :func:`perplexity_under`: perplexity of a response under the unsteered model, for coherence / fluency;
* :func:`repetition_rate`: share of repeated n-grams, for degeneration (loops, stuck repetition);
* :func:`helpfulness_proxy`: share of benign prompts still answered, for helpfulness (P2's reward-model score);
* :func:`auroc_with_ci`: AUROC of a score against labels with a stratified bootstrap interval (probe vs
  refusal-token comparison).
"""

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from catlens.stats import check_counts, wilson_interval  # noqa: F401  (wilson_interval: part of this API)
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from catlens.errors import unknown_name_message

log = logging.getLogger(__name__)

Z95 = 1.959963984540054
"""Two-sided 95 % normal quantile."""

SIDES = {"harmful": ("refusal rate", "higher"), "benign": ("over-refusal rate", "lower")}
"""Side -> (what the rate is, which direction is better)."""

STANDS_FOR = {
    "refusal_rate": "refusal on harmful prompts (higher is better)",
    "over_refusal_rate": "over-refusal on benign prompts (lower is better)",
    "first_token_kl": "behaviour change caused by steering: KL(unsteered || steered) of next-token distributions",
    "perplexity": "coherence/fluency of the response (perplexity under the unsteered model; lower = more fluent)",
    "repetition_rate": "degeneration (share of repeated n-grams in the response; higher = more degenerate)",
    "degenerate": "degeneration (share of responses whose repetition rate reaches the threshold)",
    "helpfulness": "helpfulness on benign prompts (share answered: not refused, non-empty, not degenerate)",
}
"""Metric -> the quantity the metric stands in for (the ``stands_for`` column of every table)."""


# ------------------------------------------------------------------------------------------ proportions
def binomial_se(k: int, n: int) -> float:
    """``sqrt(p(1-p)/n)`` with ``p = k/n`` (P1's SE; multiply by 100 for percentage points)."""
    check_counts(k, n)
    p = k / n
    return math.sqrt(p * (1 - p) / n)


def _as_bool_column(df: Any, column: str) -> Any:
    """The column as pandas nullable booleans; a clear error for anything but bools / 0-1 / missing."""
    import pandas as pd

    if column not in df.columns:
        raise ValueError(unknown_name_message("value column", column, df.columns,
                                              "Pass value=<a boolean column>, e.g. 'refused_substring'."))
    s = df[column]
    values = s.dropna()
    bad = values[~values.isin([True, False, 0, 1])]
    if len(bad):
        raise ValueError(f"column {column!r} must hold booleans (True = refused) or missing values; it has "
                         f"{bad.iloc[0]!r} (row {bad.index[0]!r}).")
    return s.astype("boolean") if not isinstance(s.dtype, pd.BooleanDtype) else s


def _sides(df: Any, label_column: str, side: str | None) -> Any:
    import pandas as pd

    if side is not None:
        if side not in SIDES:
            raise ValueError(unknown_name_message("side", side, SIDES))
        return pd.Series([side] * len(df), index=df.index)
    if label_column not in df.columns:
        raise ValueError(f"df has no label column {label_column!r} to tell harmful from benign prompts (columns: "
                         f"{list(df.columns)}); pass side='harmful' or side='benign', or label_column=.")
    labels = df[label_column]
    bad = labels[~labels.isin(list(SIDES))]
    if len(bad):
        raise ValueError(f"label column {label_column!r} has {bad.iloc[0]!r} (row {bad.index[0]!r}); allowed: "
                         f"{', '.join(SIDES)}. Drop or relabel those rows, or pass side=.")
    return labels


def rate_table(
    df: Any,
    value: str = "refused",
    by: Sequence[str] = ("dataset", "category"),
    *,
    label_column: str = "label",
    side: str | None = None,
    alpha: float = 0.05,
) -> Any:
    """Refusal / over-refusal rates per group with binomial SE and Wilson interval, plus pooled and macro rows.

    ``df`` has one row per response, a boolean ``value`` column (missing values = unknown verdicts: they are left
    out of ``n`` and counted in ``n_unknown``), the ``by`` columns and a ``label_column`` with ``harmful`` /
    ``benign`` (or give ``side`` for the whole table). Rows are computed separately per side, never pooled across
    harmful and benign prompts.

    Columns: ``side``, ``metric`` (``refusal rate`` / ``over-refusal rate``), ``better`` (``higher`` / ``lower``),
    ``stands_for``, ``row`` (``group``, ``pooled`` or ``macro``), the ``by`` columns (``"(all)"`` on pooled and
    macro rows), ``n``, ``k``, ``n_unknown``, ``rate``, ``se``, ``ci_low``, ``ci_high``, ``interval``.

    * ``group`` rows: ``rate = k/n``, ``se = sqrt(rate(1-rate)/n)``, Wilson interval at level ``1 - alpha``.
    * ``pooled`` (micro; P1's "Average" rows): the same over all rows of the side.
    * ``macro``: the unweighted mean of the group rates; ``se = sqrt(sum se_g^2) / G`` (groups independent), and a
      normal interval ``rate ± z se`` clipped to [0, 1] (a Wilson interval has no meaning for a mean of rates).
      With a single group it equals that group's rate.
    """
    import pandas as pd
    from scipy.stats import norm

    if df is None or len(df) == 0:
        raise ValueError("df is empty: rate_table needs one row per judged response (see catlens.judges."
                         "judge_records).")
    if not (isinstance(alpha, float) and 0 < alpha < 1):
        raise ValueError(f"alpha={alpha!r} must be a float in (0, 1) (0.05 for 95 % intervals).")
    by = [by] if isinstance(by, str) else list(by)
    for col in by:
        if col not in df.columns:
            raise ValueError(unknown_name_message("group column", col, df.columns, "Pass by=<existing columns>."))
    values = _as_bool_column(df, value)
    sides = _sides(df, label_column, side)
    z = float(norm.ppf(1 - alpha / 2))
    work = pd.DataFrame({"_side": sides.to_numpy(), "_v": values.to_numpy()}, index=df.index)
    for col in by:
        work[col] = df[col].astype(object).where(df[col].notna(), "(none)")

    def stats(v: Any) -> dict[str, Any]:
        known = v.dropna().astype(bool)
        n, k = int(len(known)), int(known.sum())
        row: dict[str, Any] = {"n": n, "k": k, "n_unknown": int(v.isna().sum())}
        if n == 0:
            row.update(rate=float("nan"), se=float("nan"), ci_low=float("nan"), ci_high=float("nan"))
        else:
            low, high = wilson_interval(k, n, alpha)
            row.update(rate=k / n, se=binomial_se(k, n), ci_low=low, ci_high=high)
        return row

    rows: list[dict[str, Any]] = []
    for s in (s for s in SIDES if (work["_side"] == s).any()):
        part = work[work["_side"] == s]
        metric, better = SIDES[s]
        head = {"side": s, "metric": metric, "better": better,
                "stands_for": STANDS_FOR["refusal_rate" if s == "harmful" else "over_refusal_rate"]}
        groups: list[dict[str, Any]] = []
        if by:
            for key, g in part.groupby(by, sort=True, dropna=False):
                key = key if isinstance(key, tuple) else (key,)
                groups.append({**head, "row": "group", **dict(zip(by, key)), **stats(g["_v"]),
                               "interval": "wilson"})
        rows.extend(groups)
        rows.append({**head, "row": "pooled", **{c: "(all)" for c in by}, **stats(part["_v"]),
                     "interval": "wilson"})
        if by:
            valid = [g for g in groups if g["n"] > 0]
            if valid:
                rate = float(np.mean([g["rate"] for g in valid]))
                se = math.sqrt(sum(g["se"] ** 2 for g in valid)) / len(valid)
                macro = {"n": sum(g["n"] for g in valid), "k": sum(g["k"] for g in valid),
                         "n_unknown": sum(g["n_unknown"] for g in groups), "rate": rate, "se": se,
                         "ci_low": max(0.0, rate - z * se), "ci_high": min(1.0, rate + z * se)}
            else:
                macro = {"n": 0, "k": 0, "n_unknown": sum(g["n_unknown"] for g in groups), "rate": float("nan"),
                         "se": float("nan"), "ci_low": float("nan"), "ci_high": float("nan")}
            rows.append({**head, "row": "macro", **{c: "(all)" for c in by}, **macro, "interval": "normal"})
    columns = ["side", "metric", "better", "stands_for", "row", *by, "n", "k", "n_unknown", "rate", "se",
               "ci_low", "ci_high", "interval"]
    return pd.DataFrame(rows, columns=columns)


# ------------------------------------------------------------------------------------------------- AUROC
def auroc_with_ci(
    y: Any,
    score: Any,
    *,
    rng: Any,
    n_boot: int = 2000,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """AUROC of ``score`` for binary labels ``y`` (:func:`sklearn.metrics.roc_auc_score`) with a stratified
    percentile bootstrap interval.

    Each of ``n_boot`` resamples draws the positives and the negatives separately with replacement (so every
    resample has both classes and the class sizes stay fixed), using only ``rng`` (a ``numpy.random.Generator``;
    no global seed is touched). The interval is the ``alpha/2`` and ``1-alpha/2`` quantiles of the resampled
    AUROCs. Stands for: how well the score separates the two classes (e.g. a linear probe vs the refusal-token
    score at predicting refusal). Returns ``auroc``, ``ci_low``, ``ci_high``, ``se`` (bootstrap SD), ``n_pos``,
    ``n_neg``, ``n_boot``, ``method``, ``stands_for``.
    """
    from sklearn.metrics import roc_auc_score

    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(0)), got "
                        f"{type(rng).__name__}; catlens never uses global seeds.")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot={n_boot!r} must be an int >= 1.")
    if not (isinstance(alpha, float) and 0 < alpha < 1):
        raise ValueError(f"alpha={alpha!r} must be a float in (0, 1).")
    y_arr = np.asarray(y)
    s = np.asarray(score, dtype=float)
    if y_arr.ndim != 1 or s.ndim != 1 or len(y_arr) != len(s):
        raise ValueError(f"y and score must be 1-d and of equal length; got shapes {y_arr.shape} and {s.shape}.")
    if not np.isfinite(s).all():
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise ValueError(f"score has a non-finite value {float(s[bad])!r} at index {bad}; scores must be finite.")
    labels = set(np.unique(y_arr).tolist())
    if not labels <= {0, 1, True, False}:
        raise ValueError(f"y must be binary (0/1 or bools), got values {sorted(map(str, labels))}.")
    y_bool = y_arr.astype(bool)
    pos, neg = s[y_bool], s[~y_bool]
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"y has {len(pos)} positives and {len(neg)} negatives; AUROC needs both classes.")
    auc = float(roc_auc_score(y_bool, s))
    boots = _bootstrap_aurocs(pos, neg, rng=rng, n_boot=n_boot)
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"auroc": auc, "ci_low": float(low), "ci_high": float(high), "se": float(boots.std(ddof=1)) if n_boot > 1
            else float("nan"), "n_pos": int(len(pos)), "n_neg": int(len(neg)), "n_boot": n_boot,
            "method": "stratified percentile bootstrap",
            "stands_for": "separation of the two classes by the score (probe vs refusal-token comparison)"}


_BOOT_BLOCK_ELEMENTS = 4_000_000  # counts held at once by _bootstrap_aurocs (int64: 32 MB)


def _bootstrap_aurocs(pos: np.ndarray, neg: np.ndarray, *, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """The AUROCs of ``n_boot`` stratified resamples, all at once.

    Resample ``b`` draws ``rng.integers(0, len(pos), len(pos))`` and then ``rng.integers(0, len(neg), len(neg))``,
    in that order, as a loop of ``roc_auc_score`` calls on the resampled scores would. A resample is a count per
    original score, and its AUROC is the Mann-Whitney statistic
    ``Σ_i c_i Σ_j d_j ([pos_i > neg_j] + ½[pos_i = neg_j]) / (n_pos n_neg)`` with ``c``, ``d`` the counts of the
    positives and the negatives. The inner sum is read from the running sum of ``d`` over the sorted negatives at
    each positive's ``searchsorted`` bounds, so a resample costs O(n) instead of a sort and sklearn's checks, and
    the numerator is an exact integer (times ½). Memory is bounded by doing the resamples in blocks.
    """
    n_pos, n_neg = len(pos), len(neg)
    order = np.argsort(neg, kind="stable")
    below = np.searchsorted(neg[order], pos, side="left")  # negatives strictly below each positive
    upto = np.searchsorted(neg[order], pos, side="right")  # ... below or tied
    rank_of = np.empty(n_neg, dtype=np.intp)
    rank_of[order] = np.arange(n_neg)
    boots = np.empty(n_boot)
    block = max(1, min(n_boot, _BOOT_BLOCK_ELEMENTS // (n_pos + n_neg + 1)))
    for start in range(0, n_boot, block):
        size = min(block, n_boot - start)
        c = np.zeros((size, n_pos), dtype=np.int64)
        d = np.zeros((size, n_neg + 1), dtype=np.int64)  # column 0 stays 0: the running sum starts there
        for b in range(size):
            c[b] = np.bincount(rng.integers(0, n_pos, n_pos), minlength=n_pos)
            d[b, 1:] = np.bincount(rank_of[rng.integers(0, n_neg, n_neg)], minlength=n_neg)
        running = np.cumsum(d, axis=1)
        twice = running[:, below] + running[:, upto]  # 2·(strictly below) + (tied)
        boots[start:start + size] = (c * twice).sum(axis=1) / (2.0 * n_pos * n_neg)
    return boots


# ------------------------------------------------------------------------------------------ side effects
def first_token_kl(
    p_logits: Float[Tensor, "batch pos vocab"],
    q_logits: Float[Tensor, "batch pos vocab"],
    mask: Bool[Tensor, "batch pos"] | None = None,
    *,
    reduce: str = "mean",
) -> Tensor:
    """KL(p ‖ q) = Σ_v p(v) (log p(v) − log q(v)) of the softmax distributions of two logit tensors, per position,
    averaged over the positions where ``mask`` is true (all positions when ``mask`` is None). Computed in float64.

    Stands for: how much an intervention changes the model's next-token behaviour. With ``p`` the unsteered and
    ``q`` the steered logits at the first response position this is P1's benign KL term (PAPERS §2.3), a
    side-effect proxy: 0 means steering left the distribution unchanged.

    ``reduce``: ``"mean"`` (a 0-d tensor: mean over all masked positions), ``"row"`` (``[batch]``: mean over each
    row's masked positions; NaN for a row with none) or ``"none"`` (``[batch pos]``, unmasked). Logits may be
    ``-inf`` (forbidden tokens); a token with ``p > 0`` and ``q = 0`` gives ``inf``; NaN or ``+inf`` logits are a
    ``ValueError``.
    """
    if reduce not in ("mean", "row", "none"):
        raise ValueError(unknown_name_message("reduce", reduce, ["mean", "row", "none"]))
    if p_logits.ndim != 3 or p_logits.shape != q_logits.shape:
        raise ValueError(f"p_logits and q_logits must both be [batch pos vocab] of the same shape; got "
                         f"{tuple(p_logits.shape)} and {tuple(q_logits.shape)}.")
    for name, t in (("p_logits", p_logits), ("q_logits", q_logits)):
        if torch.isnan(t).any() or torch.isposinf(t).any():
            raise ValueError(f"{name} has NaN or +inf entries; logits must be finite (or -inf for forbidden "
                             f"tokens).")
    if mask is None:
        mask = torch.ones(p_logits.shape[:2], dtype=torch.bool, device=p_logits.device)
    if mask.shape != p_logits.shape[:2]:
        raise ValueError(f"mask has shape {tuple(mask.shape)}; it must be [batch pos] = {tuple(p_logits.shape[:2])}.")
    mask = mask.bool()
    logp = torch.log_softmax(p_logits.double(), dim=-1)
    logq = torch.log_softmax(q_logits.double(), dim=-1)
    p = logp.exp()
    terms = torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))
    kl = terms.sum(dim=-1)  # [batch pos]
    if reduce == "none":
        return kl
    if reduce == "row":
        counts = mask.sum(dim=1)
        sums = torch.where(mask, kl, torch.zeros_like(kl)).sum(dim=1)
        return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float("nan")))
    if not mask.any():
        raise ValueError("mask selects no position; select at least one (e.g. the first response position).")
    return kl[mask].mean()


def token_nll(
    logits: Float[Tensor, "batch pos vocab"],
    input_ids: Int[Tensor, "batch pos"],
    target_mask: Bool[Tensor, "batch pos"],
) -> Float[Tensor, "batch pos"]:
    """Teacher-forced negative log-likelihood of each token: ``nll[b, t] = -log softmax(logits[b, t-1])[ids[b, t]]``
    where ``target_mask[b, t]`` (0 elsewhere, and always 0 at ``t = 0``, which has no prediction). Pure."""
    if logits.shape[:2] != input_ids.shape or input_ids.shape != target_mask.shape:
        raise ValueError(f"shapes disagree: logits {tuple(logits.shape)}, input_ids {tuple(input_ids.shape)}, "
                         f"target_mask {tuple(target_mask.shape)}.")
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    picked = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    nll = torch.zeros(input_ids.shape, dtype=torch.float64, device=logits.device)
    nll[:, 1:] = torch.where(target_mask[:, 1:].bool(), -picked, torch.zeros_like(picked))
    return nll


@torch.inference_mode()
def perplexity_under(
    model: Any,
    prompts: Sequence[str],
    responses: Sequence[str | Sequence[int]],
    fmt: str = "chat",
    batch_size: int = 16,
    *,
    system: str | None = None,
) -> Any:
    """Perplexity of each response under ``model`` (normally the *unsteered* model), by teacher forcing, counting
    the response tokens only: ``exp(mean_t nll_t)`` over the response tokens (:func:`token_nll`).

    Stands for: coherence / fluency of the response; a steered model that produces text its unsteered self finds
    improbable has likely lost coherence. It is a proxy: a fluent but unusual answer also scores high.

    ``model`` needs ``format`` (prompt rendering), ``tokenizer`` and ``hf`` (a :class:`catlens.model.LensModel`).
    The rendered prompt and the response are tokenised separately (no special tokens added) and concatenated, so
    the boundary is exact; a response may also be given as token ids (a record's ``token_ids``). Batches are right
    padded (positions start at 0 in every row; causal attention keeps padding out of real positions). Returns a
    DataFrame with ``n_tokens``, ``nll`` (mean per token), ``perplexity`` and ``stands_for``; an empty response
    gives NaN.
    """
    import pandas as pd

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt.")
    if len(prompts) == 0:
        raise ValueError("prompts is empty: give at least one (prompt, response) pair.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1.")
    tok = model.tokenizer
    rendered = model.format(list(prompts), fmt, system=system)
    seqs: list[tuple[list[int], list[int]]] = []
    for text, resp in zip(rendered, responses):
        p_ids = tok(text, add_special_tokens=False)["input_ids"]
        r_ids = tok(resp, add_special_tokens=False)["input_ids"] if isinstance(resp, str) else [int(i) for i in resp]
        if not p_ids:
            raise ValueError(f"prompt {text!r} renders to no tokens; perplexity needs a context.")
        seqs.append((list(p_ids), r_ids))
    hf = model.hf
    device = next(hf.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    nll_mean, n_tok = [float("nan")] * len(seqs), [0] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: -(len(seqs[i][0]) + len(seqs[i][1])))
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        length = max(len(seqs[i][0]) + len(seqs[i][1]) for i in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        attn = torch.zeros((len(batch), length), dtype=torch.long)
        target = torch.zeros((len(batch), length), dtype=torch.bool)
        for row, i in enumerate(batch):
            p_ids, r_ids = seqs[i]
            full = p_ids + r_ids
            ids[row, :len(full)] = torch.tensor(full)
            attn[row, :len(full)] = 1
            target[row, len(p_ids):len(full)] = True
        logits = hf(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
        nll = token_nll(logits.float().cpu(), ids, target)
        for row, i in enumerate(batch):
            k = int(target[row].sum())
            n_tok[i] = k
            if k:
                nll_mean[i] = float(nll[row].sum() / k)
    return pd.DataFrame({"n_tokens": n_tok, "nll": nll_mean, "perplexity": [math.exp(v) for v in nll_mean],
                         "stands_for": STANDS_FOR["perplexity"]})


def repetition_rate(token_ids: Any, n: int = 3) -> float:
    """Share of repeated n-grams: ``1 - (#distinct n-grams) / (#n-grams)`` of a sequence (token ids, or words).

    Stands for: degeneration (a model stuck in a loop repeats itself; 0 = no n-gram occurs twice, values near 1 =
    one n-gram over and over). A sequence shorter than ``n`` has no n-gram and gives 0.0.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be an int >= 1 (the n-gram length).")
    if isinstance(token_ids, (str, bytes)):
        raise TypeError("token_ids must be a sequence of tokens (ids or words), not a string; split it first.")
    seq = list(token_ids)
    total = len(seq) - n + 1
    if total <= 0:
        return 0.0
    grams = {tuple(seq[i:i + n]) for i in range(total)}
    return 1.0 - len(grams) / total


DEGENERATE_THRESHOLD = 0.5
"""Repetition rate (3-grams) from which a response counts as degenerate."""


def _response_tokens(record: Mapping[str, Any]) -> list[Any]:
    ids = record.get("token_ids")
    return list(ids) if ids is not None else record.get("response", "").split()


def answered(records: Sequence[Mapping[str, Any]], refused: Any, *, n: int = 3,
             degenerate_threshold: float | int = DEGENERATE_THRESHOLD) -> list[bool]:
    """Per record: the response still answers: not refused, non-empty text (special tokens removed), and
    :func:`repetition_rate` (on ``token_ids``, else words) below ``degenerate_threshold``."""
    from catlens.judges import check_records, strip_special_tokens

    records = check_records(records)
    if len(refused) != len(records):
        raise ValueError(f"{len(refused)} refusal verdicts for {len(records)} records; give one per record.")
    if not (isinstance(degenerate_threshold, (int, float)) and math.isfinite(degenerate_threshold)
            and 0 <= degenerate_threshold <= 1):
        raise ValueError(f"degenerate_threshold={degenerate_threshold!r} must be a finite number in [0, 1].")
    out = []
    for r, ref in zip(records, refused):
        if ref is None or (isinstance(ref, float) and math.isnan(ref)):
            raise ValueError(f"record id={r['id']!r} has an unknown refusal verdict ({ref!r}); drop or resolve "
                             f"unknown verdicts before computing helpfulness.")
        out.append(not bool(ref) and bool(strip_special_tokens(r["response"]))
                   and repetition_rate(_response_tokens(r), n) < degenerate_threshold)
    return out


def helpfulness_proxy(records: Sequence[Mapping[str, Any]], refused: Any, *, n: int = 3,
                      degenerate_threshold: float | int = DEGENERATE_THRESHOLD) -> float:
    """Share of *benign* records whose response still answers (:func:`answered`: not refused, non-empty, not
    degenerate). Records with a ``label`` other than ``benign`` are ignored; with no label at all every record is
    taken as benign.

    Stands for: helpfulness on benign prompts (P2 scores it with a reward model; this proxy only says whether an
    answer was attempted, not whether it is good).
    """
    from catlens.judges import check_records

    records = check_records(records)
    keep = [i for i, r in enumerate(records) if r.get("label", "benign") == "benign"]
    if not keep:
        raise ValueError("no benign record (label == 'benign'): helpfulness is measured on benign prompts.")
    if len(refused) != len(records):
        raise ValueError(f"{len(refused)} refusal verdicts for {len(records)} records; give one per record.")
    flags = answered([records[i] for i in keep], [refused[i] for i in keep], n=n,
                     degenerate_threshold=degenerate_threshold)
    return float(np.mean(flags))


def _mean_row(values: Sequence[Any], alpha: float) -> dict[str, Any]:
    from scipy.stats import norm

    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=float)
    n = len(v)
    if n == 0:
        return {"n": 0, "k": None, "value": float("nan"), "se": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "interval": "none"}
    mean = float(v.mean())
    se = float(v.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    z = float(norm.ppf(1 - alpha / 2))
    return {"n": n, "k": None, "value": mean, "se": se, "ci_low": mean - z * se, "ci_high": mean + z * se,
            "interval": "normal (mean ± z·SE)" if n > 1 else "none"}


def _share_row(flags: Sequence[bool], alpha: float) -> dict[str, Any]:
    n, k = len(flags), int(sum(bool(f) for f in flags))
    if n == 0:
        return {"n": 0, "k": 0, "value": float("nan"), "se": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan"), "interval": "none"}
    low, high = wilson_interval(k, n, alpha)
    return {"n": n, "k": k, "value": k / n, "se": binomial_se(k, n), "ci_low": low, "ci_high": high,
            "interval": "wilson"}


def side_effect_table(
    records: Sequence[Mapping[str, Any]],
    refused: Any,
    *,
    by: Sequence[str] = ("dataset",),
    kl: Any = None,
    perplexity: Any = None,
    n: int = 3,
    degenerate_threshold: float | int = DEGENERATE_THRESHOLD,
    alpha: float = 0.05,
) -> Any:
    """Side-effect proxies per group (and an ``(all)`` row): one row per (group, metric).

    Metrics: ``repetition_rate`` (mean over responses), ``degenerate`` (share with repetition rate >=
    ``degenerate_threshold``; Wilson interval), ``helpfulness`` (share of benign responses answered, see
    :func:`answered`; Wilson interval; benign records only), and when given one value per record, ``first_token_kl``
    (e.g. :func:`first_token_kl` with ``reduce="row"``) and ``perplexity`` (e.g. :func:`perplexity_under`), as means
    with SE ``sd/sqrt(n)`` and a normal interval. Every row says in ``stands_for`` what the proxy stands in for
    (:data:`STANDS_FOR`). ``by`` names record fields (``dataset`` falls back to ``source``).
    """
    import pandas as pd

    from catlens.judges import check_records

    records = check_records(records)
    if len(refused) != len(records):
        raise ValueError(f"{len(refused)} refusal verdicts for {len(records)} records; give one per record.")
    extra: dict[str, Sequence[float]] = {}
    for name, vals in (("first_token_kl", kl), ("perplexity", perplexity)):
        if vals is not None:
            vals = [float(v) for v in vals]
            if len(vals) != len(records):
                raise ValueError(f"{name} has {len(vals)} values for {len(records)} records; give one per record.")
            extra[name] = vals
    by = [by] if isinstance(by, str) else list(by)

    def field(r: Mapping[str, Any], key: str) -> Any:
        v = r.get(key)
        if v is None and key == "dataset":
            v = r.get("source")
        return "(none)" if v is None else v

    missing = [k for k in by if not any(k in r or (k == "dataset" and "source" in r) for r in records)]
    if missing:
        raise ValueError(f"no record has the group field(s) {missing}; records have {sorted(records[0])}.")
    rep = [repetition_rate(_response_tokens(r), n) for r in records]
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(tuple(field(r, k) for k in by), []).append(i)
    keys = sorted(groups, key=lambda t: tuple(map(str, t)))
    units = [(dict(zip(by, key)), groups[key]) for key in keys] if by else []
    units.append(({k: "(all)" for k in by}, list(range(len(records)))))
    rows: list[dict[str, Any]] = []
    for labels, idx in units:
        rows.append({**labels, "metric": "repetition_rate", **_mean_row([rep[i] for i in idx], alpha)})
        rows.append({**labels, "metric": "degenerate", **_share_row([rep[i] >= degenerate_threshold for i in idx],
                                                                    alpha)})
        benign = [i for i in idx if records[i].get("label", "benign") == "benign"]
        flags = answered([records[i] for i in benign], [refused[i] for i in benign], n=n,
                         degenerate_threshold=degenerate_threshold) if benign else []
        rows.append({**labels, "metric": "helpfulness", **_share_row(flags, alpha)})
        for name, vals in extra.items():
            rows.append({**labels, "metric": name, **_mean_row([vals[i] for i in idx], alpha)})
    table = pd.DataFrame(rows)
    table["stands_for"] = table["metric"].map(STANDS_FOR)
    table["row"] = ["pooled" if all(r[k] == "(all)" for k in by) else "group" for r in rows]
    return table[[*by, "row", "metric", "stands_for", "n", "k", "value", "se", "ci_low", "ci_high", "interval"]]
