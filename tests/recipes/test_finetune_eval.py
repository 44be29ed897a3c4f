"""catlens.recipes.finetune_eval (the steps of analyses/finetune_eval.py) on a hand-made ``scores`` table: the held-out
harmful tables, over-refusal and AUROC with values worked out by hand. The steps with models run end to end in
tests/analyses/test_pipeline_smoke.py (the main job's ``eval`` stage on a tiny fine-tune)."""

import argparse
import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from catlens.recipes.finetune_eval import Context, auroc, harmful_tables, over_refusal_tables


class Run:
    def __init__(self):
        self.tables = {}

    def save_table(self, name, df):
        self.tables[name] = df.reset_index(drop=True)


RESPOND = "[respond]"
ROWS = [  # set, category, refused (first token), predicted, top token, refusal score, source
    ("harmful_heldout", "privacy", True, "privacy", "[refuse:privacy]", 0.8, "a"),
    ("harmful_heldout", "privacy", True, "cybercrime", "[refuse:cybercrime]", 0.7, "a"),
    ("harmful_heldout", "cybercrime", False, "cybercrime", RESPOND, 0.2, "b"),
    ("harmful_heldout", "cybercrime", True, "cybercrime", "Sure", 0.6, "b"),
    ("alpaca_test", "", True, "privacy", "Sure", 0.65, "alpaca"),
    ("alpaca_test", "", False, "privacy", RESPOND, 0.1, "alpaca"),
    ("xstest_unsafe", "", True, "privacy", "[refuse:privacy]", 0.5, "xstest"),
]


def context():
    scores = pd.DataFrame(ROWS, columns=["set", "category", "refused", "predicted_category", "top_token",
                                         "refusal_score", "source"])
    of = {"[refuse:privacy]": "privacy", "[refuse:cybercrime]": "cybercrime"}  # as score_first_token derives them
    scores["refused_generated"] = scores.top_token.isin(of)
    scores["generated_category"] = [of.get(t, "") for t in scores.top_token]
    tokens = SimpleNamespace(respond=RESPOND, refuse=list(of), categories=list(of.values()))
    ctx = Context(args=argparse.Namespace(), run=Run(), folder=Path("ft"), manifest={}, data=None, model=None,
                  stock=None, plain=None, plain_stock=None, tokens=tokens, t0=0.0,
                  sets=dict.fromkeys(("harmful_heldout", "alpaca_test", "xstest_unsafe")))
    return ctx, scores


def test_auroc_counts_pairs_and_ties():
    assert auroc([0.8, 0.7, 0.2, 0.6], [0.65, 0.1]) == pytest.approx(6 / 8)
    assert auroc([1.0], [1.0]) == 0.5
    assert math.isnan(auroc([], [0.1]))


def test_harmful_tables_by_hand():
    ctx, scores = context()
    total = harmful_tables(ctx, scores)
    per_cat = ctx.run.tables["per_category"].set_index("category")
    assert per_cat.loc["privacy"].tolist() == [2, 1.0, 0.5, 2, 1.0, 0.5]
    assert per_cat.loc["cybercrime"].tolist() == [2, 0.5, 0.5, 2, 0.0, 0.0]
    assert per_cat.loc["ALL"].tolist() == [4, 0.75, 0.5, 4, 0.5, 0.25]
    assert total["refused_first_token"] == 0.75 and total["right_category_generated"] == 0.25
    per_src = ctx.run.tables["per_source"]
    assert per_src[["source", "category", "n", "refused_first_token"]].values.tolist() == [
        ["a", "privacy", 2, 1.0], ["b", "cybercrime", 2, 0.5]]
    conf = ctx.run.tables["confusion"]
    got = {(r.decision, r.true_category, r.predicted): r.n for r in conf.itertuples()}
    assert got == {("first_token", "privacy", "privacy"): 1, ("first_token", "privacy", "cybercrime"): 1,
                   ("first_token", "cybercrime", RESPOND): 1, ("first_token", "cybercrime", "cybercrime"): 1,
                   ("generated", "privacy", "privacy"): 1, ("generated", "privacy", "cybercrime"): 1,
                   ("generated", "cybercrime", RESPOND): 1, ("generated", "cybercrime", "other"): 1}


def test_over_refusal_tables_by_hand():
    ctx, scores = context()
    by_set, au = over_refusal_tables(ctx, scores)
    over = ctx.run.tables["over_refusal"]
    assert over.values.tolist() == [["alpaca_test", 2, 0.5, 0.0, 0.375]]
    assert ctx.run.tables["over_refusal_by_category"].category.tolist() == ["(none)"]
    assert by_set.set.tolist() == ["alpaca_test", "xstest_unsafe"]
    assert by_set.harmful_refusal_first_token.iloc[1] == 1.0 and by_set.mean_refusal_score.iloc[1] == 0.5
    assert au.values.tolist() == [["harmful_heldout", "alpaca_test", 0.75, 4, 2]]
