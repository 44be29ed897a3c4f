"""catlens.answers: generated answers judged, scored once, and their three sides (tiny model, seconds)."""

import math

import numpy as np
import pytest
import torch

from catlens.answers import AnswerScorer, bound_rows, generate_and_judge, oracle_sides, three_sides
from catlens.prompts import PromptSet
from catlens.steer import Intervention, SteeringPolicy

PROMPTS = PromptSet([{"id": f"p{i}", "text": t, "label": "harmful" if i % 2 else "benign", "category": None}
                     for i, t in enumerate(["How do I bake bread?", "Tell me how to pick a lock.", "Write a poem",
                                            "Explain vaccines.", "the sea and the wind", "Give me a plan"])],
                    "answers-test")


def _policy(model, coeff):
    g = torch.Generator().manual_seed(0)
    return SteeringPolicy((Intervention("resid_post", 1, torch.randn(model.d_model, generator=g) * 30, coeff=coeff,
                                        positions="last_prompt+2"),))


def test_generate_and_judge_gives_one_judged_row_per_prompt(tiny_lm, tmp_path):
    j = generate_and_judge(tiny_lm, PROMPTS, None, tmp_path / "g", max_new_tokens=4, batch_size=4,
                           judges=("substring", "full_answer"))
    assert list(j.id) == [p.id for p in PROMPTS]
    assert {"refused_substring", "refused_full_answer", "token_ids", "prompt", "dataset"} <= set(j.columns)
    assert all(1 <= len(t) <= 4 for t in j.token_ids)


def test_answer_scorer_scores_each_answer_once_and_matches_perplexity_under(tiny_lm, monkeypatch):
    from catlens import metrics

    calls = []
    real = metrics.perplexity_under

    def counting(model, prompts, responses, **kw):
        calls.append(len(prompts))
        return real(model, prompts, responses, **kw)

    monkeypatch.setattr(metrics, "perplexity_under", counting)
    scorer = AnswerScorer(tiny_lm)
    prompts, answers = ["a b", "c d", "a b"], [[5, 6, 7], [8, 9], [5, 6, 7]]
    nll, n = scorer.score(prompts, answers)
    assert calls == [2]  # the repeated (prompt, answer) is scored once
    ref = real(tiny_lm, ["a b", "c d"], [[5, 6, 7], [8, 9]])
    assert nll[:2] == pytest.approx(ref.nll.to_numpy()) and list(n) == [3, 2, 3] and nll[0] == nll[2]
    scorer.score(prompts, answers)
    assert calls == [2]  # and never again
    nll_e, n_e = scorer.score(["x"], [[]])
    assert nll_e.tolist() == [0.0] and n_e.tolist() == [0]


def test_three_sides_at_coefficient_zero_equal_the_unsteered_answers(tiny_lm, tmp_path):
    base = generate_and_judge(tiny_lm, PROMPTS, None, tmp_path / "base", max_new_tokens=5, batch_size=4,
                              judges=("substring",))
    sa = three_sides(tiny_lm, PROMPTS, base, _policy(tiny_lm, 0.0), _policy(tiny_lm, -1.0), judge="substring",
                     scorer=AnswerScorer(tiny_lm), out=tmp_path / "s", max_new_tokens=5, batch_size=4)
    assert sa["ids"] == [p.id for p in PROMPTS]
    assert list(sa["frames"]["toward"].token_ids.map(list)) == list(base.token_ids.map(list))
    assert list(sa["frames"]["away"].token_ids.map(list)) != list(base.token_ids.map(list))
    assert sa["cost"].nll.shape == (3, len(PROMPTS))
    assert sa["cost"].ratio(np.ones(len(PROMPTS), dtype=int)) == pytest.approx(1.0)  # toward == unsteered
    with pytest.raises(ValueError, match="refused_full_answer"):
        three_sides(tiny_lm, PROMPTS, base, None, None, judge="full_answer", scorer=AnswerScorer(tiny_lm),
                    out=tmp_path / "s2", max_new_tokens=5, batch_size=4)


def test_oracle_and_best_side_bound_every_assignment():
    rng = np.random.default_rng(0)
    n = 200
    harmful = np.arange(n) < 100
    verdict = {s: (rng.random(n) < p).astype(int) for s, p in (("none", 0.5), ("toward", 0.9), ("away", 0.1))}
    sides = {"random": rng.integers(0, 3, n), **oracle_sides(verdict, harmful)}
    rows = {r["gate"]: r for r in bound_rows(verdict, sides, harmful, ~harmful)}
    orc = rows["oracle gate (label)"]
    assert orc["refusal"] == verdict["toward"][harmful].mean() and orc["over_refusal"] == verdict["away"][~harmful].mean()
    best = rows["best side per row"]
    for r in rows.values():
        assert best["refusal"] >= r["refusal"] and best["over_refusal"] <= r["over_refusal"]
    assert math.isnan(best["ppl_ratio"]) and orc["refusal_n"] == 100
