"""P1's choices through catlens.selection, without a model: :func:`catlens.recipes.p1.zone_pick` (one zone mode's
candidate rows in, the chosen position and its reason out) and :func:`catlens.recipes.p1.lowrank_order` (the order
the low-rank candidates are tried in), each checked against the ``min``/``max``/``sort`` expressions they replaced
(written out below as the reference) on hand-made cases and on many seeded random candidate lists, and the
manifest's ``selection`` record (:func:`catlens.recipes.p1.selection_record`) keeping every field it had."""

import argparse
import json
import math
import random

import pandas as pd
import pytest

from catlens.recipes import p1
from catlens.results import selection_lines

SCOPES = ["last_prompt", "last_prompt+4", "all"]
TARGET, GUARD = 0.9, 0.1
HIT = f"lowest val over-refusal on generated answers with refusal >= {TARGET} and perplexity ratio <= 1.10"
FALLBACK = ("no setting reached the target refusal within the perplexity guard: the highest refusal among "
            "admissible ones")


# ------------------------------------------------------------------------------- the replaced expressions
def old_pick(rows, scopes, target_refusal, ppl_guard):
    """choose()'s per-mode pick before catlens.selection (verbatim but for the reason's return)."""
    mine = [(r, None) for r in rows]
    ok = [c for c in mine if c[0]["admissible"]]
    hit = [c for c in ok if c[0]["feasible"]]
    order = {s: i for i, s in enumerate(scopes)}
    pick = (min(hit, key=lambda c: (c[0]["over_refusal"], -c[0]["refusal"], abs(c[0]["toward"]) + abs(
        c[0]["away"]), order[c[0]["positions"]])) if hit else
            max(ok, key=lambda c: (c[0]["refusal"], -c[0]["over_refusal"])) if ok else None)
    if pick is None:
        return None, ""
    index = next(i for i, r in enumerate(rows) if r is pick[0])
    reason = (f"lowest val over-refusal on generated answers with refusal >= {target_refusal} and perplexity ratio "
              f"<= {1 + ppl_guard:.2f}" if hit else "no setting reached the target refusal within the perplexity "
              "guard: the highest refusal among admissible ones")
    return index, reason


def old_lowrank_order(cands):
    """_lowrank()'s candidate order before catlens.selection (the in-place sort, on a copy)."""
    ordered = list(cands)
    ordered.sort(key=lambda r: (not r["feasible"], r["over_refusal"], -r["refusal"], abs(r["toward"]) +
                                abs(r["away"])))
    return [next(i for i, c in enumerate(cands) if c is r) for r in ordered]


def _row(over_refusal, refusal, *, toward=0.5, away=-0.5, positions="last_prompt", admissible=True, feasible=True):
    return {"mode": "global", "method": "one_vs_benign", "layer": 2, "positions": positions, "toward": toward,
            "away": away, "refusal": refusal, "over_refusal": over_refusal, "ppl_ratio": 1.0,
            "admissible": admissible, "feasible": feasible}


def _pick(rows):
    return p1.zone_pick(rows, SCOPES, target_refusal=TARGET, ppl_guard=GUARD, mode="global")


# ------------------------------------------------------------------------------------------- hand-made cases
CASES = {
    # the feasible row with the lowest over-refusal wins over a lower over-refusal that is not feasible or not
    # admissible, and over a higher refusal
    "feasible winner": ([_row(0.05, 0.8, feasible=False), _row(0.02, 1.0, admissible=False), _row(0.20, 1.0),
                         _row(0.10, 0.9)], 3, HIT),
    "over-refusal tie broken by refusal": ([_row(0.10, 0.9), _row(0.10, 0.95), _row(0.10, 0.92)], 1, HIT),
    "then by magnitude": ([_row(0.10, 0.9, toward=1.0), _row(0.10, 0.9, toward=0.25, away=-0.25),
                           _row(0.10, 0.9, away=-1.0)], 1, HIT),
    "then by scope order": ([_row(0.10, 0.9, positions="all"), _row(0.10, 0.9, positions="last_prompt+4"),
                             _row(0.10, 0.9, positions="all")], 1, HIT),
    "then by candidate order": ([_row(0.2, 0.9), _row(0.10, 0.9), _row(0.10, 0.9)], 1, HIT),
    # no hit: the highest refusal among the admissible; a refusal tie goes to the lower over-refusal
    "no-hit fallback": ([_row(0.0, 0.5, feasible=False), _row(0.3, 0.8, feasible=False),
                         _row(0.1, 0.8, feasible=False), _row(0.0, 1.0, admissible=False, feasible=False)], 2,
                        FALLBACK),
    "none admissible": ([_row(0.0, 1.0, admissible=False), _row(0.1, 0.9, admissible=False, feasible=False)], None,
                        ""),
    "no candidates": ([], None, ""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_zone_pick_on_hand_made_cases_equals_the_old_expression(name):
    rows, want, reason = CASES[name]
    pick = _pick(rows)
    assert (pick.index, pick.reason) == (want, reason)
    assert old_pick(rows, SCOPES, TARGET, GUARD) == (want, reason)  # the reference agrees on every case
    assert pick.selection.chosen == (want is not None) and pick.selection.group == "global"
    if want is not None:
        assert pick.selection.index == want
        assert pick.selection.rule.objective.column == ("over_refusal" if reason == HIT else "refusal")


def test_none_admissible_says_why():
    rows, _, _ = CASES["none admissible"]
    pick = _pick(rows)
    assert pick.selection.reason == "none of 2 candidates is admissible (perplexity ratio <= 1.10 rejected 2)"
    assert _pick([]).selection.reason == "no candidate rows"


def _random_rows(rng: random.Random, n: int) -> list[dict]:
    """Rates on coarse grids (k/20, k/10) and dyadic coefficients, so that values either tie exactly or differ by far
    more than the selection tolerance: where the old exact comparisons and the new ones must agree."""
    return [_row(rng.randrange(0, 5) / 20, rng.randrange(5, 11) / 10, toward=rng.choice([0.25, 0.5, 1.0]),
                 away=rng.choice([0.0, -0.25, -0.5, -0.75]), positions=rng.choice(SCOPES),
                 admissible=rng.random() < 0.7, feasible=rng.random() < 0.5) for _ in range(n)]


def test_zone_pick_equals_the_old_expression_on_random_candidate_lists():
    rng = random.Random(19)
    seen = {"hit": 0, "fallback": 0, "none": 0, "tied": 0}
    for trial in range(300):
        rows = _random_rows(rng, rng.randrange(0, 10))
        scopes = rng.sample(SCOPES, len(SCOPES))  # the scope order is the option's, not a fixed one
        target, guard = rng.choice([0.8, 0.9]), rng.choice([0.1, 0.25])
        pick = p1.zone_pick(rows, scopes, target_refusal=target, ppl_guard=guard)
        assert (pick.index, pick.reason) == old_pick(rows, scopes, target, guard), (trial, rows, scopes)
        seen["none" if pick.index is None else "hit" if pick.selection.rule.objective.column == "over_refusal"
             else "fallback"] += 1
        seen["tied"] += pick.selection.n_tied > 1
    assert min(seen.values()) > 15, seen  # every branch, and ties, exercised many times


def test_ties_within_the_tolerance_are_the_documented_difference():
    """|0.1| + |0.2| is 0.30000000000000004 in floating point: the old key found it larger than 0.3; the selection
    module's tie-breaks compare at 9 decimals, so the two tie and the next tie-break (scope order) decides."""
    rows = [_row(0.1, 0.9, toward=0.3, away=0.0, positions="all"),
            _row(0.1, 0.9, toward=0.1, away=-0.2, positions="last_prompt")]
    assert old_pick(rows, SCOPES, TARGET, GUARD)[0] == 0
    assert _pick(rows).index == 1


def test_zone_pick_says_which_scope_it_does_not_know():
    with pytest.raises(ValueError, match="candidate positions nowhere not in the scopes last_prompt, "
                                         "last_prompt\\+4, all; give every candidate's scope"):
        _pick([_row(0.1, 0.9, positions="nowhere")])


# ------------------------------------------------------------------------------------------- low-rank order
def _random_cands(rng: random.Random) -> list[dict]:
    """One basis's candidates as _lowrank builds them: every toward x away multiplier pair."""
    return [{"basis": "residual", "toward": tc, "away": -ac, "refusal": rng.randrange(5, 11) / 10,
             "refusal_low": 0.5, "over_refusal": rng.randrange(0, 4) / 20, "feasible": rng.random() < 0.5}
            for tc in (1.0, 2.0, 4.0) for ac in (1.0, 2.0, 4.0, 6.0)]


def test_lowrank_order_equals_the_old_sort_on_random_candidates():
    rng = random.Random(25)
    for trial in range(200):
        cands = _random_cands(rng)
        if trial % 3 == 0:
            cands = rng.sample(cands, rng.randrange(0, len(cands)))
        assert p1.lowrank_order(cands) == old_lowrank_order(cands), trial


def test_lowrank_order_hand_made():
    c = [{"toward": 1.0, "away": -1.0, "refusal": 0.9, "over_refusal": 0.1, "feasible": False},   # 0 infeasible
         {"toward": 4.0, "away": -6.0, "refusal": 0.9, "over_refusal": 0.1, "feasible": True},    # 1
         {"toward": 1.0, "away": -2.0, "refusal": 0.9, "over_refusal": 0.1, "feasible": True},    # 2 smaller
         {"toward": 2.0, "away": -2.0, "refusal": 1.0, "over_refusal": 0.1, "feasible": True},    # 3 more refusal
         {"toward": 1.0, "away": -1.0, "refusal": 0.8, "over_refusal": 0.05, "feasible": True},   # 4 lowest o-r
         {"toward": 1.0, "away": -1.0, "refusal": 0.9, "over_refusal": 0.0, "feasible": False}]   # 5 infeasible
    assert p1.lowrank_order(c) == [4, 3, 2, 1, 5, 0] == old_lowrank_order(c)
    assert p1.lowrank_order([]) == []


# ------------------------------------------------------------------------------------------ manifest record
def old_selection_record(sweep, chosen_rows, args):
    """selection_record before the selections were recorded (verbatim)."""
    return {
        "split": "val", "test_read": False,
        "rule": {"text": "zones: " + sweep.objective_text.iloc[0] + "; candidates: perplexity ratio <= "
                         f"{1 + args.ppl_guard:.2f}, then the lowest over-refusal on generated val answers "
                         f"({args.judge}) with harmful refusal >= {args.target_refusal}",
                 "zones": sweep.objective_text.iloc[0],
                 "candidates": f"perplexity ratio <= {1 + args.ppl_guard:.2f}; harmful refusal >= "
                               f"{args.target_refusal} on generated val answers ({args.judge}); lowest over-refusal"},
        "choices": [{"group": r.get("mode"),
                     **{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()}}  # noqa: PLR0124
                    for r in chosen_rows]}


def test_selection_record_keeps_its_fields_and_adds_each_modes_selection():
    args = argparse.Namespace(ppl_guard=GUARD, target_refusal=TARGET, judge="substring")
    sweep = pd.DataFrame({"objective_text": ["lowest over-refusal with refusal_low >= 0.8"]})
    rows, want, _ = CASES["over-refusal tie broken by refusal"]
    pick = _pick(rows)
    chosen = {**rows[want], "chosen": True, "reason": pick.reason, "online_refusal": 1.0, "pairs": math.nan}
    empty = p1.zone_pick([], SCOPES, target_refusal=TARGET, ppl_guard=GUARD, mode="per_category")
    selections = {"global": pick.selection, "per_category": empty.selection}
    old = old_selection_record(sweep, [chosen], args)
    new = json.loads(json.dumps(p1.selection_record(sweep, [chosen], args, selections)))
    assert {k: new[k] for k in ("split", "test_read")} == {k: old[k] for k in ("split", "test_read")}
    assert {k: new["rule"][k] for k in old["rule"]} == old["rule"]
    assert new["rule"]["hit"]["objective"] == {"column": "over_refusal", "goal": "min"}
    assert new["rule"]["fallback"]["objective"] == {"column": "refusal", "goal": "max"}
    first = new["choices"][0]
    assert {k: first[k] for k in old["choices"][0]} == json.loads(json.dumps(old["choices"][0]))
    assert first["selection"]["chosen"] and first["selection"]["index"] == want
    assert first["selection"]["n_tied"] == 3 and first["selection"]["row"]["refusal"] == 0.95
    assert new["choices"][1] == {"group": "per_category", "chosen": False,
                                 "reason": "no setting passed the perplexity guard (no candidate rows)",
                                 "selection": json.loads(json.dumps(selections["per_category"].record()))}
    lines = selection_lines({"selection": new})
    assert lines[0].startswith("Settings were chosen on the val split: 1 of 2 choices made")
    assert lines[1] == f"- chosen (global): {HIT}."
    assert lines[2] == "- nothing chosen (per_category): no setting passed the perplexity guard (no candidate " \
                       "rows); not evaluated further."
    # without the selections: the old record plus the rules
    plain = p1.selection_record(sweep, [chosen], args)
    assert plain["choices"] == old["choices"] and {k: plain["rule"][k] for k in old["rule"]} == old["rule"]
