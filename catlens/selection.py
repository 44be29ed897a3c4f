"""Choosing one setting on validation data: an admissibility guard, an objective, deterministic tie-breaks, and a
record of the choice. Pure pandas; no model, no file.

Every analysis that picks a setting on val (the steering sweep, P1, P2, the specificity stage) states its rule as
data and calls :func:`select` (one table) or :func:`select_groups` (one choice per group)::

    rule = SelectionRule(
        objective=Objective("objective", "max"),
        constraints=(ppl_guard(0.10), Constraint("refusal_ci_low", ">=", 0.90)),
        tie_breaks=(TieBreak("steer_magnitude", "min"),),
        key="setting",
    )
    sel = select(table, rule)
    if sel.chosen:  # else sel.reason says why nothing was admissible
        row = table.loc[sel.index]

Conventions (each one tested in ``tests/test_selection.py``):

* **Admissible** = every constraint holds. Comparisons ``<=`` and ``>=`` are **inclusive**, up to a relative
  tolerance of ``1e-9`` so that a ratio computed as ``1.1000000000000003`` passes ``<= 1 + 0.10``; ``<`` and ``>``
  are strict (same tolerance, the other way). A missing value (NaN/None) in a constrained column fails the
  constraint; a missing objective makes the row inadmissible ("objective missing").
* **Objective**: one column, maximised or minimised among admissible rows.
* **Ties** (objective values within the same tolerance) are broken by ``tie_breaks`` in order (each a column to
  minimise or maximise; missing values sort last), then by ``key`` (a column sorted ascending, e.g. a setting id),
  then by the row's position in the table. Tie-break values are compared after rounding to 9 decimals. The result never depends on anything else.
* **None admissible**: :class:`Selection` with ``index=None``, ``chosen=False`` and a ``reason`` that counts the rows
  each constraint rejected. Nothing is picked silently.

:func:`rank` orders the rows by the same rule, for a caller that tries candidates in turn (e.g. the first one
that passes a check only a generation can make): the rows tied with the best objective value (the same tolerance),
ordered by the tie-breaks, key and table order, then the ties of the best value among the rest, and so on. Its
first row is always :func:`select`'s choice (``select`` is built on it). With ``include_inadmissible=True`` the
inadmissible rows follow the admissible ones, ranked the same way (rows with a missing objective last).

:func:`mark` writes the outcome back into the table (``admissible``, ``rejected_by``, ``chosen``) and
:meth:`Selection.record` gives a JSON-able record for a run's manifest.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

__all__ = ["Constraint", "Objective", "TieBreak", "SelectionRule", "Selection", "ppl_guard", "select", "rank",
           "select_groups", "mark", "add_wilson_columns", "total_magnitude", "TOLERANCE"]

TOLERANCE = 1e-9
"""Relative tolerance of every comparison (constraints and objective ties)."""

TIE_DECIMALS = 9
"""Tie-break values are compared after rounding to this many decimals (0.1 + 0.2 ties with 0.3)."""

OPS = ("<=", ">=", "<", ">", "==", "!=")


def _tol(value: float) -> float:
    return TOLERANCE * max(1.0, abs(value))


@dataclass(frozen=True)
class Constraint:
    """``column op value`` must hold for a row to be admissible (``op`` one of ``<=, >=, <, >, ==, !=``)."""

    column: str
    """Column of the candidate table."""
    op: str
    """Comparison, one of ``<=, >=, <, >, ==, !=``; ``<=``/``>=`` are inclusive."""
    value: float
    """Threshold."""
    label: str | None = None
    """How the constraint is named in reasons and records (default ``"column op value"``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not self.column:
            raise ValueError(f"Constraint column={self.column!r} must be a non-empty column name.")
        if self.op not in OPS:
            raise ValueError(f"Constraint op={self.op!r} is not allowed; use one of {', '.join(OPS)}.")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or math.isnan(self.value):
            raise ValueError(f"Constraint value={self.value!r} must be a number (e.g. 0.9).")

    def describe(self) -> str:
        return self.label or f"{self.column} {self.op} {self.value:g}"

    def holds(self, table: pd.DataFrame) -> pd.Series:
        """Boolean per row; a missing value fails."""
        if self.column not in table.columns:
            raise KeyError(f"constraint {self.describe()!r}: column {self.column!r} is not in the table (columns: "
                           f"{', '.join(map(str, table.columns))}).")
        x = pd.to_numeric(table[self.column], errors="coerce").astype(float)
        v, t = float(self.value), _tol(float(self.value))
        ok = {"<=": x <= v + t, ">=": x >= v - t, "<": x < v - t, ">": x > v + t,
              "==": (x - v).abs() <= t, "!=": (x - v).abs() > t}[self.op]
        return ok & x.notna()


def ppl_guard(guard: float, column: str = "ppl_ratio") -> Constraint:
    """The coherence guard: ``column <= 1 + guard`` (inclusive), e.g. ``ppl_guard(0.10)`` admits ratios up to 1.10."""
    if isinstance(guard, bool) or not isinstance(guard, (int, float)) or not math.isfinite(guard) or guard < 0:
        raise ValueError(f"ppl guard={guard!r} must be a finite number >= 0 (0.10 admits perplexity ratios up to "
                         f"1.10).")
    return Constraint(column, "<=", 1.0 + float(guard), label=f"{column} <= {1.0 + float(guard):g}")


@dataclass(frozen=True)
class Objective:
    """The column to optimise among admissible rows."""

    column: str
    goal: str = "max"

    def __post_init__(self) -> None:
        if self.goal not in ("max", "min"):
            raise ValueError(f"Objective goal={self.goal!r} must be 'max' or 'min'.")

    def describe(self) -> str:
        return f"{self.goal}imise {self.column}"


@dataclass(frozen=True)
class TieBreak:
    """Among rows tied on the objective, prefer the smaller (``"min"``) or larger (``"max"``) value of ``column``."""

    column: str
    goal: str = "min"

    def __post_init__(self) -> None:
        if self.goal not in ("max", "min"):
            raise ValueError(f"TieBreak goal={self.goal!r} must be 'min' or 'max'.")

    def describe(self) -> str:
        return f"{'smaller' if self.goal == 'min' else 'larger'} {self.column}"


@dataclass(frozen=True)
class SelectionRule:
    """Objective, constraints and tie-breaks (see the module docstring)."""

    objective: Objective
    constraints: tuple[Constraint, ...] = ()
    tie_breaks: tuple[TieBreak, ...] = ()
    key: str | None = None
    """Final tie-break: this column ascending (a stable id); then the row position."""

    def __post_init__(self) -> None:
        if not isinstance(self.objective, Objective):
            raise TypeError(f"objective={self.objective!r} must be an Objective(column, 'max'|'min').")
        for c in self.constraints:
            if not isinstance(c, Constraint):
                raise TypeError(f"constraints must be Constraint objects; got {c!r}.")
        for t in self.tie_breaks:
            if not isinstance(t, TieBreak):
                raise TypeError(f"tie_breaks must be TieBreak objects; got {t!r}.")

    def describe(self) -> str:
        parts = [self.objective.describe()]
        if self.constraints:
            parts.append("subject to " + ", ".join(c.describe() for c in self.constraints))
        ties = [t.describe() for t in self.tie_breaks] + ([f"{self.key} ascending"] if self.key else [])
        parts.append("ties: " + ", ".join([*ties, "table order"]))
        return "; ".join(parts)

    def record(self) -> dict[str, Any]:
        return {"objective": {"column": self.objective.column, "goal": self.objective.goal},
                "constraints": [{"column": c.column, "op": c.op, "value": float(c.value), "label": c.describe()}
                                for c in self.constraints],
                "tie_breaks": [{"column": t.column, "goal": t.goal} for t in self.tie_breaks], "key": self.key,
                "tolerance": TOLERANCE, "text": self.describe()}


@dataclass(frozen=True)
class Selection:
    """The outcome of one selection."""

    index: Hashable | None
    """Index label of the chosen row in the input table, or None when no row was admissible."""
    rule: SelectionRule
    n_candidates: int
    n_admissible: int
    rejected: Mapping[str, int]
    """Per constraint (and ``"objective missing"``): how many candidate rows it rejected."""
    n_tied: int
    """Admissible rows tied with the best objective value (1 = no tie)."""
    reason: str
    row: Mapping[str, Any] | None = field(default=None, repr=False)
    """The chosen row as a dict."""
    group: Any = None

    @property
    def chosen(self) -> bool:
        return self.index is not None

    def record(self) -> dict[str, Any]:
        """JSON-able summary (for a manifest)."""
        row = None if self.row is None else {k: _plain(v) for k, v in self.row.items()}
        return {"group": _plain(self.group), "chosen": self.chosen, "index": _plain(self.index),
                "n_candidates": self.n_candidates, "n_admissible": self.n_admissible,
                "rejected": dict(self.rejected), "n_tied": self.n_tied, "reason": self.reason, "row": row,
                "rule": self.rule.record()}


def _plain(v: Any) -> Any:
    """A JSON-able copy of a table cell (numpy scalars to Python, NaN to None)."""
    import numpy as np

    if v is None or isinstance(v, str):
        return v
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, (int, np.integer)):
        return int(v)
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return None if math.isnan(f) else f


def admissibility(table: pd.DataFrame, rule: SelectionRule) -> tuple[pd.Series, pd.Series]:
    """``(admissible, rejected_by)`` per row: a bool, and the '; '-joined constraints the row fails ('' if none)."""
    ok = pd.Series(True, index=table.index)
    why = pd.Series("", index=table.index, dtype=object)
    checks = [(c.describe(), c.holds(table)) for c in rule.constraints]
    if rule.objective.column not in table.columns:
        raise KeyError(f"objective column {rule.objective.column!r} is not in the table (columns: "
                       f"{', '.join(map(str, table.columns))}).")
    checks.append(("objective missing", pd.to_numeric(table[rule.objective.column], errors="coerce").notna()))
    for name, holds in checks:
        ok &= holds
        why = why.where(holds, why + "; " + name)
    why = why.str.lstrip("; ")
    return ok.astype(bool), why


def _check(table: pd.DataFrame, rule: SelectionRule, caller: str) -> None:
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"{caller} needs a pandas DataFrame; got {type(table).__name__}.")
    if not table.index.is_unique:
        raise ValueError(f"{caller} needs a table with a unique index (call reset_index(drop=True) first).")
    for col in [t.column for t in rule.tie_breaks] + ([rule.key] if rule.key else []):
        if col not in table.columns:
            raise KeyError(f"tie-break column {col!r} is not in the table (columns: "
                           f"{', '.join(map(str, table.columns))}).")


def _ordered(table: pd.DataFrame, rule: SelectionRule, rows: pd.Index) -> tuple[pd.Index, int, float]:
    """The labels ``rows`` of ``table`` in the rule's order, how many are tied with the best objective value (the
    first group) and that value. Rows are sorted by the objective (best first); a group is the run of rows within the
    tolerance of its first (best) value, so the first group is exactly the rows tied with the best; groups keep this
    order and inside a group rows go by the tie-breaks (rounded), the key, then table position. Missing objective
    values form one last group."""
    import numpy as np

    if len(rows) == 0:
        return rows, 0, math.nan
    part = table.loc[rows].copy()
    pos = table.index.get_indexer(rows)
    obj = pd.to_numeric(part[rule.objective.column], errors="coerce").astype(float).to_numpy()
    sign = -1.0 if rule.objective.goal == "max" else 1.0
    group = np.full(len(part), len(part), dtype=int)  # missing objective: after every real group
    first = math.nan
    g, start = -1, math.nan
    for k in np.lexsort((pos, sign * obj)):  # best first (NaN last), ties in table order
        v = obj[k]
        if math.isnan(v):
            continue
        if g < 0 or abs(v - start) > _tol(start):
            g, start = g + 1, v
            if g == 0:
                first = v
        group[k] = g
    part["_group"], part["_pos"] = group, pos
    keys, asc = ["_group"], [True]
    for t in rule.tie_breaks:
        name = f"_tb{len(keys)}"
        part[name] = pd.to_numeric(part[t.column], errors="coerce").astype(float).round(TIE_DECIMALS)
        keys.append(name)
        asc.append(t.goal == "min")
    if rule.key:
        part["_key"] = part[rule.key].astype(str)
        keys.append("_key")
        asc.append(True)
    keys.append("_pos")
    asc.append(True)
    ordered = part.sort_values(keys, ascending=asc, na_position="last", kind="mergesort")
    return ordered.index, int((group == 0).sum()), first


def rank(table: pd.DataFrame, rule: SelectionRule, *, include_inadmissible: bool = False) -> pd.DataFrame:
    """The admissible rows of ``table`` ranked by ``rule`` (see the module docstring); its first row is
    :func:`select`'s choice. With ``include_inadmissible`` the inadmissible rows follow, ranked the same way. The
    rows keep their index labels (``rank(t, rule).index`` is the order of ``t``'s labels)."""
    _check(table, rule, "rank")
    ok, _ = admissibility(table, rule)
    order, _, _ = _ordered(table, rule, table.index[ok.to_numpy()])
    if include_inadmissible:
        rest, _, _ = _ordered(table, rule, table.index[~ok.to_numpy()])
        order = order.append(rest)
    return table.loc[order]


def select(table: pd.DataFrame, rule: SelectionRule, *, group: Any = None) -> Selection:
    """Choose one row of ``table`` by ``rule`` (see the module docstring): the first row of :func:`rank`."""
    _check(table, rule, "select")
    ok, _ = admissibility(table, rule)
    rejected = {c.describe(): int((~c.holds(table)).sum()) for c in rule.constraints}
    rejected["objective missing"] = int(pd.to_numeric(table[rule.objective.column], errors="coerce").isna().sum())
    n, k = len(table), int(ok.sum())
    if k == 0:
        if n == 0:
            reason = "no candidate rows"
        else:
            worst = ", ".join(f"{name} rejected {m}" for name, m in rejected.items() if m)
            reason = f"none of {n} candidates is admissible ({worst})"
        return Selection(None, rule, n, 0, rejected, 0, reason, None, group)
    order, n_tied, best = _ordered(table, rule, table.index[ok.to_numpy()])
    idx = order[0]
    reason = (f"{rule.objective.describe()} = {best:.6g} among {k} admissible of {n}"
              + (f"; {n_tied} tied, broken by " + ", ".join([t.describe() for t in rule.tie_breaks]
                                                             + ([f"{rule.key} ascending"] if rule.key else [])
                                                             + ["table order"]) if n_tied > 1 else ""))
    row = table.loc[idx].to_dict()
    return Selection(idx, rule, n, k, rejected, n_tied, reason, row, group)


def select_groups(table: pd.DataFrame, rule: SelectionRule, by: str | Sequence[str]) -> dict[Any, Selection]:
    """One :func:`select` per group of ``by`` (groups in order of first appearance); group keys are scalars for one
    column and tuples for several."""
    cols = [by] if isinstance(by, str) else list(by)
    for c in cols:
        if c not in table.columns:
            raise KeyError(f"group column {c!r} is not in the table.")
    out: dict[Any, Selection] = {}
    for key, part in table.groupby(cols if len(cols) > 1 else cols[0], sort=False, dropna=False):
        out[key] = select(part, rule, group=key)
    return out


def mark(table: pd.DataFrame, rule: SelectionRule, selections: Selection | Mapping[Any, Selection]
         ) -> pd.DataFrame:
    """A copy of ``table`` with ``admissible`` (bool), ``rejected_by`` (str) and ``chosen`` (bool) columns."""
    out = table.copy()
    ok, why = admissibility(out, rule)
    out["admissible"] = ok
    out["rejected_by"] = why
    sels = [selections] if isinstance(selections, Selection) else list(selections.values())
    chosen = {s.index for s in sels if s.chosen}
    out["chosen"] = [i in chosen for i in out.index]
    return out


def add_wilson_columns(table: pd.DataFrame, k: str, n: str, prefix: str, alpha: float = 0.05) -> pd.DataFrame:
    """A copy with ``{prefix}_ci_low`` and ``{prefix}_ci_high``: the Wilson interval
    (:func:`catlens.metrics.wilson_interval`) of counts ``k`` out of ``n`` per row (NaN where ``n`` is 0 or missing),
    so that a constraint such as ``Constraint("refusal_ci_low", ">=", 0.90)`` can be stated on them."""
    from catlens.metrics import wilson_interval

    out = table.copy()
    lo, hi = [], []
    for kk, nn in zip(out[k], out[n]):
        if pd.isna(kk) or pd.isna(nn) or int(nn) < 1:
            lo.append(math.nan)
            hi.append(math.nan)
            continue
        a, b = wilson_interval(int(kk), int(nn), alpha=alpha)
        lo.append(a)
        hi.append(b)
    out[f"{prefix}_ci_low"], out[f"{prefix}_ci_high"] = lo, hi
    return out


def total_magnitude(table: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """Sum of ``|value|`` over ``columns`` per row, a missing value counting 0 (no steering on that side)."""
    total = pd.Series(0.0, index=table.index)
    for c in columns:
        total += pd.to_numeric(table[c], errors="coerce").astype(float).abs().fillna(0.0)
    return total
