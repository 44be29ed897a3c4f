"""catlens.selection: admissibility boundaries, objective, documented tie-breaks, none admissible, groups, Wilson
constraints computed with catlens.metrics, the records a manifest stores, and rank (the order select's choice is the
first of), checked against a plain sorted() reference on many random tables."""

import json
import math
import random

import pandas as pd
import pytest

from catlens.metrics import wilson_interval
from catlens.selection import (Constraint, Objective, SelectionRule, TieBreak, add_wilson_columns, mark, ppl_guard,
                               rank, select, select_groups, total_magnitude)


def _rule(**kw):
    return SelectionRule(objective=kw.pop("objective", Objective("score", "max")), **kw)


# --------------------------------------------------------------------------------------- admissibility
def test_ppl_guard_is_inclusive_at_its_boundary_and_strict_above():
    t = pd.DataFrame({"score": [5.0, 4.0, 3.0, 2.0], "ppl_ratio": [1.1000001, 1.10, 1.0 + 0.1, 0.9]})
    # 1.0 + 0.1 == 1.1000000000000001 in floating point: inside the documented tolerance
    sel = select(t, _rule(constraints=(ppl_guard(0.10),)))
    assert sel.chosen and sel.index == 1 and sel.n_admissible == 3
    assert sel.rejected == {"ppl_ratio <= 1.1": 1, "objective missing": 0}
    marked = mark(t, sel.rule, sel)
    assert marked.admissible.tolist() == [False, True, True, True]
    assert marked.rejected_by.tolist() == ["ppl_ratio <= 1.1", "", "", ""]
    assert marked.chosen.tolist() == [False, True, False, False]


@pytest.mark.parametrize("op, value, want", [
    (">=", 0.9, [True, True, False]), (">", 0.9, [True, False, False]), ("<=", 0.9, [False, True, True]),
    ("<", 0.9, [False, False, True]), ("==", 0.9, [False, True, False]), ("!=", 0.9, [True, False, True])])
def test_constraint_operators_at_the_boundary(op, value, want):
    t = pd.DataFrame({"x": [0.95, 0.9, 0.85]})
    assert Constraint("x", op, value).holds(t).tolist() == want


def test_missing_values_fail_constraints_and_the_objective():
    t = pd.DataFrame({"score": [9.0, math.nan, 1.0], "ppl_ratio": [math.nan, 1.0, 1.0]})
    sel = select(t, _rule(constraints=(ppl_guard(0.1),)))
    assert sel.index == 2 and sel.n_admissible == 1  # row 0: no ppl; row 1: no objective
    assert sel.rejected == {"ppl_ratio <= 1.1": 1, "objective missing": 1}
    assert mark(t, sel.rule, sel).rejected_by.tolist() == ["ppl_ratio <= 1.1", "objective missing", ""]


def test_minimised_objective():
    t = pd.DataFrame({"over_refusal": [0.3, 0.1, 0.2]})
    assert select(t, _rule(objective=Objective("over_refusal", "min"))).index == 1


# ------------------------------------------------------------------------------------------- tie-breaks
def test_ties_broken_by_magnitude_then_key_then_order():
    t = pd.DataFrame({"setting": ["c2", "b1", "a3", "d0", "e"], "score": [0.5, 0.5, 0.5, 0.5, 0.4],
                      "toward": [0.2, 0.1, 0.1, None, 0.0], "away": [-0.1, -0.2, -0.2, -0.3, None]})
    t["size"] = total_magnitude(t, ["toward", "away"])
    assert t["size"].tolist() == pytest.approx([0.3, 0.3, 0.3, 0.3, 0.0])  # missing counts 0
    rule = _rule(tie_breaks=(TieBreak("size", "min"),), key="setting")
    sel = select(t, rule)
    assert sel.index == 2 and sel.n_tied == 4  # all four tied on size: the key 'a3' (ascending) wins
    assert "4 tied" in sel.reason and "setting ascending" in sel.reason
    t.loc[0, "away"] = -0.05  # now row 0 is the smallest total magnitude among the tied
    t["size"] = total_magnitude(t, ["toward", "away"])
    assert select(t, rule).index == 0
    # without key: table order
    assert select(t.assign(size=0.0), _rule(tie_breaks=(TieBreak("size", "min"),))).index == 0
    assert select(t.iloc[::-1].assign(size=0.0), _rule()).index == 3  # reversed table: first tied row in order


def test_objective_ties_use_the_tolerance_not_exact_equality():
    t = pd.DataFrame({"score": [0.3 - 1e-15, 0.1 + 0.2], "n": [2, 1]})  # equal up to rounding
    assert select(t, _rule(tie_breaks=(TieBreak("n", "min"),))).index == 1
    t = pd.DataFrame({"score": [0.3, 0.3001], "n": [1, 2]})  # a real difference is not a tie
    assert select(t, _rule(tie_breaks=(TieBreak("n", "min"),))).index == 1


def test_larger_tie_break_and_missing_tie_break_values_sort_last():
    t = pd.DataFrame({"score": [1.0, 1.0, 1.0], "help": [0.8, math.nan, 0.9]})
    assert select(t, _rule(tie_breaks=(TieBreak("help", "max"),))).index == 2
    assert select(t, _rule(tie_breaks=(TieBreak("help", "min"),))).index == 0


# ---------------------------------------------------------------------------------------- none admissible
def test_none_admissible_returns_no_row_with_a_reason():
    t = pd.DataFrame({"score": [3.0, 2.0], "ppl_ratio": [4.1, 21.1], "help_ratio": [1.05, 0.5]})
    rule = _rule(constraints=(ppl_guard(0.10), Constraint("help_ratio", ">=", 0.9)))
    sel = select(t, rule)
    assert not sel.chosen and sel.index is None and sel.row is None and sel.n_admissible == 0
    assert sel.reason == "none of 2 candidates is admissible (ppl_ratio <= 1.1 rejected 2, help_ratio >= 0.9 " \
                         "rejected 1)"
    assert not mark(t, rule, sel).chosen.any()
    empty = select(t.iloc[:0], rule)
    assert not empty.chosen and empty.reason == "no candidate rows"


# ---------------------------------------------------------------------------------------- wilson constraints
def test_constraint_on_wilson_lower_bounds_from_catlens_metrics():
    t = pd.DataFrame({"setting": ["a", "b", "c", "d"], "refusal_k": [95, 190, 100, 0], "refusal_n": [100, 200, 100, 0],
                      "over_refusal": [0.05, 0.10, 0.30, 0.0]})
    t = add_wilson_columns(t, "refusal_k", "refusal_n", "refusal")
    for i in range(3):
        lo, hi = wilson_interval(int(t.refusal_k[i]), int(t.refusal_n[i]))
        assert (t.refusal_ci_low[i], t.refusal_ci_high[i]) == (lo, hi)
    assert math.isnan(t.refusal_ci_low[3])  # no prompts: no interval, and so not admissible
    rule = SelectionRule(Objective("over_refusal", "min"), constraints=(Constraint("refusal_ci_low", ">=", 0.90),))
    # 95/100 has a Wilson lower bound 0.888 < 0.90 although the rate is 95 %; 190/200 has 0.910
    assert t.refusal_ci_low[0] < 0.90 < t.refusal_ci_low[1]
    sel = select(t, rule)
    assert sel.row["setting"] == "b" and sel.n_admissible == 2
    assert sel.rejected["refusal_ci_low >= 0.9"] == 2


# ------------------------------------------------------------------------------------------------- groups
def test_select_groups_chooses_per_group_and_reports_empty_groups():
    t = pd.DataFrame({"method": ["u", "u", "p", "p"], "site": ["a", "a", "a", "a"], "score": [1.0, 2.0, 5.0, 6.0],
                      "ppl_ratio": [1.0, 1.0, 3.0, 2.0]})
    rule = _rule(constraints=(ppl_guard(0.1),))
    sels = select_groups(t, rule, ["method", "site"])
    assert list(sels) == [("u", "a"), ("p", "a")]
    assert sels[("u", "a")].index == 1 and not sels[("p", "a")].chosen
    marked = mark(t, rule, sels)
    assert marked.chosen.tolist() == [False, True, False, False]
    assert select_groups(t, rule, "method")["u"].group == "u"


def test_record_is_json_and_names_the_rule():
    t = pd.DataFrame({"score": [1, 2], "flag": [True, False], "ppl_ratio": [1.0, 1.0]})
    sel = select(t, _rule(constraints=(ppl_guard(0.1),)))
    rec = json.loads(json.dumps(sel.record()))
    assert rec["chosen"] and rec["index"] == 1 and rec["row"] == {"score": 2, "flag": False, "ppl_ratio": 1.0}
    assert rec["rule"]["constraints"][0] == {"column": "ppl_ratio", "op": "<=", "value": 1.1, "label":
                                             "ppl_ratio <= 1.1"}
    assert rec["rule"]["text"] == "maximise score; subject to ppl_ratio <= 1.1; ties: table order"


# ------------------------------------------------------------------------------------------------------ rank
def test_rank_orders_admissible_rows_by_objective_then_tie_breaks_then_order():
    t = pd.DataFrame({"score": [0.2, 0.5, 0.5, 0.9, 0.5, math.nan], "n": [0, 3, 1, 5, 1, 0],
                      "ppl_ratio": [1.0, 1.0, 1.0, 2.0, 1.0, 1.0]}, index=list("abcdef"))
    rule = _rule(constraints=(ppl_guard(0.1),), tie_breaks=(TieBreak("n", "min"),))
    ranked = rank(t, rule)
    assert list(ranked.index) == ["c", "e", "b", "a"]  # d fails the guard, f has no objective
    assert ranked.equals(t.loc[["c", "e", "b", "a"]])  # the rows themselves, labels kept
    assert ranked.index[0] == select(t, rule).index
    # inadmissible rows follow, ranked the same way; a missing objective last
    assert list(rank(t, rule, include_inadmissible=True).index) == ["c", "e", "b", "a", "d", "f"]
    assert rank(t.iloc[:0], rule).empty and rank(t[t.ppl_ratio > 1.5], rule).empty


def test_rank_groups_ties_from_the_best_value_of_each_group():
    # 1.0 and 1.0 - 0.6e-9 tie (within 1e-9 of the best); 1.0 - 1.2e-9 does not tie with 1.0, so it starts the next
    # group although it is within 1e-9 of the second row: groups are counted from their best value, as in select
    t = pd.DataFrame({"score": [1.0 - 1.2e-9, 1.0 - 0.6e-9, 1.0], "n": [0, 1, 2]})
    rule = _rule(tie_breaks=(TieBreak("n", "min"),))
    assert list(rank(t, rule).index) == [1, 2, 0]
    sel = select(t, rule)
    assert sel.index == 1 and sel.n_tied == 2


def _random_table(rng: random.Random, n: int, near_ties: bool) -> pd.DataFrame:
    """Scores on a coarse grid (exact ties, no near ties) or with values that tie only within the tolerance."""
    grid = [0.0, 0.25, 0.5, 0.75, 1.0]
    rows = []
    for i in range(n):
        score = rng.choice(grid)
        if near_ties and rng.random() < 0.5:
            score += rng.choice([-4e-10, 3e-10, 1e-12])
        rows.append({"score": score if rng.random() > 0.1 else math.nan, "a": rng.choice(grid),
                     "b": rng.choice([1, 2, 3]), "ok": rng.random() < 0.7, "id": f"s{rng.randrange(5)}"})
    return pd.DataFrame(rows, columns=["score", "a", "b", "ok", "id"], index=[f"r{i}" for i in range(n)])


def _reference_order(t: pd.DataFrame, rule: SelectionRule, admissible: bool) -> list:
    """The rule's order written as one sorted() key (exact comparisons: right where no values tie within the
    tolerance), over the admissible rows (``ok`` and a score) or the others (missing scores last)."""
    sign = 1 if rule.objective.goal == "min" else -1
    rows = [(pos, label, r) for pos, (label, r) in enumerate(t.iterrows())
            if (bool(r.ok) and not math.isnan(r.score)) == admissible]

    def key(item):
        pos, _, r = item
        obj = r[rule.objective.column]
        ties = tuple((1 if tb.goal == "min" else -1) * r[tb.column] for tb in rule.tie_breaks)
        return (math.isnan(obj), 0.0 if math.isnan(obj) else sign * obj, *ties,
                str(r[rule.key]) if rule.key else "", pos)

    return [label for _, label, _ in sorted(rows, key=key)]


@pytest.mark.parametrize("goal", ["max", "min"])
def test_rank_equals_a_plain_sort_without_near_ties_and_its_first_row_is_select(goal):
    rng = random.Random(19)
    for trial in range(100):
        t = _random_table(rng, rng.randrange(0, 12), near_ties=False)
        rule = SelectionRule(Objective("score", goal), constraints=(Constraint("ok", "==", 1.0),),
                             tie_breaks=(TieBreak("a", rng.choice(["min", "max"])), TieBreak("b", "min")),
                             key="id" if trial % 2 else None)
        ok_rows = _reference_order(t, rule, True)
        assert list(rank(t, rule).index) == ok_rows, trial
        assert list(rank(t, rule, include_inadmissible=True).index) == ok_rows + _reference_order(t, rule, False), \
            trial
        sel = select(t, rule)
        assert sel.index == (ok_rows[0] if ok_rows else None), trial


def test_select_is_the_first_row_of_rank_with_near_ties():
    rng = random.Random(25)
    for trial in range(100):
        t = _random_table(rng, rng.randrange(1, 12), near_ties=True)
        rule = SelectionRule(Objective("score", rng.choice(["max", "min"])), constraints=(Constraint("ok", "==", 1.0),),
                             tie_breaks=(TieBreak("a", "max"),), key="id")
        ranked, sel = rank(t, rule), select(t, rule)
        assert sel.index == (ranked.index[0] if len(ranked) else None), trial
        if sel.chosen:  # the chosen row ties with the best admissible value and wins every tie-break among the tied
            ok = pd.to_numeric(t.score[t.ok], errors="coerce").dropna()
            best = ok.max() if rule.objective.goal == "max" else ok.min()
            tied = t.loc[ok.index[(ok - best).abs() <= 1e-9 * max(1.0, abs(best))]]
            assert sel.n_tied == len(tied) and sel.index in tied.index, trial
            assert t.a[sel.index] == tied.a.max(), trial


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_say_what_is_allowed():
    with pytest.raises(ValueError, match="use one of <=, >="):
        Constraint("x", "=>", 1.0)
    with pytest.raises(ValueError, match="must be a number"):
        Constraint("x", ">=", float("nan"))
    with pytest.raises(ValueError, match="must be 'max' or 'min'"):
        Objective("x", "maximum")
    with pytest.raises(ValueError, match="finite number >= 0"):
        ppl_guard(-0.1)
    t = pd.DataFrame({"score": [1.0]})
    with pytest.raises(KeyError, match="column 'ppl_ratio' is not in the table"):
        select(t, _rule(constraints=(ppl_guard(0.1),)))
    with pytest.raises(KeyError, match="objective column 'nope'"):
        select(t, _rule(objective=Objective("nope")))
    with pytest.raises(KeyError, match="tie-break column 'size'"):
        select(t, _rule(tie_breaks=(TieBreak("size"),)))
    with pytest.raises(ValueError, match="unique index"):
        select(pd.DataFrame({"score": [1.0, 2.0]}, index=[0, 0]), _rule())
    with pytest.raises(ValueError, match="rank needs a table with a unique index"):
        rank(pd.DataFrame({"score": [1.0, 2.0]}, index=[0, 0]), _rule())
    with pytest.raises(KeyError, match="tie-break column 'size'"):
        rank(t, _rule(tie_breaks=(TieBreak("size"),)))
