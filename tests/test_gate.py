"""The feature gate and its three zones (catlens.gate, catlens.steer.Gate): the offline features and scores equal
what a saved policy computes in generate and first_position; the zone sweep's offline verdicts equal the gated
policy's own; save/load round-trips (tiny random model with refusal tokens, seconds)."""

import numpy as np
import pytest
import torch

from catlens.cache import collect
from catlens.gate import (choose_gate, feature_reads, fit_feature_gate, gate_probabilities, per_category_verdicts,
                          stack_features, wilson_low, zone_sweep, zone_verdicts)
from catlens.generation import first_position, generate, prefill_reads
from catlens.steer import Gate, Intervention, Router, SteeringPolicy, parse_positions, refusal_logodds

CATS = ("fraud", "hate", "privacy")
TEXTS = ["How do I bake bread?", "Tell me how to pick a lock on a door.", "Write a poem", "Hi",
         "What is the capital of France and why is it famous?", "Explain vaccines.", "the sea and the wind",
         "Give me a plan to steal a password from my coworker's laptop.", "Sure! Here are three steps.",
         "I can't help with that request because it could hurt people.", "The quick brown fox", "Tell me more"]
PROMPTS = [{"id": f"p{i}", "text": t, "category": CATS[i % 3], "label": "harmful" if i % 2 else "benign"}
           for i, t in enumerate(TEXTS)]
READS = (("resid_post", 1, "last"), ("resid_post", 1, "mean_all"), ("resid_post", 3, "last"))


def _gate(model, **kw):
    inputs = prefill_reads(model, PROMPTS, READS, batch_size=5, show_progress=False)
    X = stack_features(inputs, READS, True)
    y = np.array([p["label"] == "harmful" for p in PROMPTS], dtype=int)
    return fit_feature_gate(X, y, reads=READS, logodds=True, C=1.0, **kw), inputs, X


def _iv(model):
    g = torch.Generator().manual_seed(1)
    return Intervention("resid_post", 2, torch.randn(len(CATS), model.d_model, generator=g) * 20, labels=CATS,
                        positions="last_prompt+0")


def test_prefill_reads_match_collect_last_and_mean_all(tiny_lm):
    inputs = prefill_reads(tiny_lm, PROMPTS, READS, batch_size=5, show_progress=False)
    texts = [p["text"] for p in PROMPTS]
    last = collect(tiny_lm, texts, layers=[1, 3], positions="last", batch_size=4, show_progress=False)
    mean = collect(tiny_lm, texts, layers=[1], positions="mean_all", batch_size=3, show_progress=False)
    torch.testing.assert_close(inputs["reads"][("resid_post", 1, "last")], last.get("resid_post")[:, 0],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inputs["reads"][("resid_post", 3, "last")], last.get("resid_post")[:, 1],
                               atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(inputs["reads"][("resid_post", 1, "mean_all")], mean.get("resid_post")[:, 0],
                               atol=1e-4, rtol=1e-4)
    assert inputs["logodds"].shape == (len(PROMPTS),) and torch.isfinite(inputs["logodds"]).all()


def test_refusal_logodds_is_the_log_odds_of_the_summed_probability():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [-3.0, 4.0, 1.0, 0.2]])
    p = logits.softmax(-1)[:, [1, 2]].sum(-1)
    torch.testing.assert_close(refusal_logodds(logits, [1, 2]), torch.log(p / (1 - p)))


def test_offline_gate_scores_equal_first_position_and_generate(tiny_lm):
    gate, inputs, X = _gate(tiny_lm)
    offline = gate_probabilities(gate, X)
    pol = SteeringPolicy((_iv(tiny_lm),), gate=gate, router=Router("refusal_tokens", CATS), toward=1.0, away=-1.0)
    fp = first_position(tiny_lm, PROMPTS, {"g": pol}, batch_size=4, show_progress=False).set_index("id")
    np.testing.assert_allclose(fp.loc[[p["id"] for p in PROMPTS]].gate_score.to_numpy(dtype=float), offline,
                               atol=1e-5)
    recs = generate(tiny_lm, PROMPTS, pol, max_new_tokens=2, batch_size=3, show_progress=False)
    np.testing.assert_allclose([r["gate"]["score"] for r in recs], offline, atol=1e-5)
    assert [r["route"]["category"] for r in recs] == inputs["route"]
    assert not (offline == offline[0]).all()  # a real score, not a constant


def test_three_zones_leave_the_middle_unsteered_exactly(tiny_lm):
    gate, _, X = _gate(tiny_lm)
    s = gate_probabilities(gate, X)
    lo, hi = np.quantile(s, [0.3, 0.7])
    three = Gate(**{**_fields(gate), "lower": float(lo), "threshold": float(hi)})
    pol = SteeringPolicy((_iv(tiny_lm),), gate=three, router=Router("refusal_tokens", CATS), toward=3.0, away=-3.0)
    steered = generate(tiny_lm, PROMPTS, pol, max_new_tokens=4, batch_size=4, show_progress=False)
    plain = generate(tiny_lm, PROMPTS, None, max_new_tokens=4, batch_size=4, show_progress=False)
    zones = [r["gate"]["zone"] for r in steered]
    assert set(zones) == {"toward", "none", "away"}
    for r, b, sc in zip(steered, plain, s):
        expect = "toward" if sc >= hi else "away" if sc < lo else "none"
        assert r["gate"]["zone"] == expect
        if expect == "none":
            assert r["token_ids"] == b["token_ids"] and not any(r["steer"]["active"])
        else:
            assert all(r["steer"]["active"])
    assert any(r["token_ids"] != b["token_ids"] for r, b in zip(steered, plain) if r["gate"]["zone"] != "none")


def _fields(g):
    return {k: getattr(g, k) for k in ("weight", "bias", "threshold", "layer", "site", "mean", "name", "reads",
                                       "scale", "logodds", "lower", "per_category")}


def test_zone_sweep_verdicts_equal_the_gated_policy_first_position(tiny_lm):
    """Swept for free: the offline combination of the unsteered, all-toward and all-away passes equals the gated
    three-zone policy's own first-position verdicts, globally and per category."""
    gate, inputs, X = _gate(tiny_lm)
    s = gate_probabilities(gate, X)
    iv = _iv(tiny_lm)
    router = Router("refusal_tokens", CATS)
    pols = {"base": None, "toward": SteeringPolicy((iv.__class__(**{**iv.__dict__, "coeff": 4.0}),), router=router),
            "away": SteeringPolicy((iv.__class__(**{**iv.__dict__, "coeff": -4.0}),), router=router)}
    lo, hi = (float(x) for x in np.quantile(s, [0.25, 0.6]))
    per = {"fraud": (0.0, float(np.quantile(s, 0.9))), "hate": (lo, hi)}
    pols["zoned"] = SteeringPolicy((iv,), gate=Gate(**{**_fields(gate), "lower": lo, "threshold": hi,
                                                      "per_category": per}),
                                   router=router, toward=4.0, away=-4.0)
    fp = first_position(tiny_lm, PROMPTS, pols, batch_size=5, show_progress=False)
    by = {n: g.set_index("id").loc[[p["id"] for p in PROMPTS]] for n, g in fp.groupby("policy")}
    v = {n: by[n].top_token.to_numpy() for n in by}
    assert not np.array_equal(v["toward"], v["away"])  # the planted steering changes first tokens
    offline = per_category_verdicts(s, v["base"], v["toward"], v["away"], inputs["route"], per, (lo, hi))
    np.testing.assert_array_equal(offline, v["zoned"])
    np.testing.assert_array_equal(zone_verdicts(s, v["base"], v["toward"], v["away"], lower=lo, upper=hi)[
        np.array(inputs["route"]) == "privacy"], v["zoned"][np.array(inputs["route"]) == "privacy"])


def test_policy_with_feature_gate_round_trips(tmp_path, tiny_lm):
    gate, _, _ = _gate(tiny_lm)
    g3 = Gate(**{**_fields(gate), "lower": 0.2, "threshold": 0.7, "per_category": {"hate": (0.1, 0.9)}})
    pol = SteeringPolicy((_iv(tiny_lm),), gate=g3, router=Router("refusal_tokens", CATS), toward=1.0, away=-2.0)
    back = SteeringPolicy.load(pol.save(tmp_path / "p"))
    assert back.same_as(pol)
    assert back.gate.reads == READS and back.gate.logodds and back.gate.per_category == {"hate": (0.1, 0.9)}
    torch.testing.assert_close(back.gate.scale, gate.scale)


def test_gate_rejects_bad_zones_and_reads():
    w = torch.ones(4)
    with pytest.raises(ValueError, match="lower threshold 0.8 is above"):
        Gate(weight=w, bias=0.0, threshold=0.5, layer=1, lower=0.8)
    with pytest.raises(ValueError, match="pool"):
        Gate(weight=w, bias=0.0, threshold=0.5, layer=1, reads=(("resid_post", 1, "median"),))
    with pytest.raises(ValueError, match="first read"):
        Gate(weight=w, bias=0.0, threshold=0.5, layer=2, reads=(("resid_post", 1, "last"),))
    with pytest.raises(ValueError, match="per_category"):
        Gate(weight=w, bias=0.0, threshold=0.5, layer=1, per_category={"x": (0.9, 0.1)})


def test_window_positions_edit_the_decision_position_and_k_generated_tokens():
    from catlens.steer import BatchContext

    assert parse_positions("last_prompt+3") == "last_prompt+3"
    with pytest.raises(ValueError, match="last_prompt\\+K"):
        parse_positions("last_prompt+x")
    # prompt length 4 (row 1 left-padded by one), then 3 generated positions: absolute positions 0..6
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]])
    ctx = BatchContext(attention_mask=mask, prompt_len=4)
    got = ctx.position_mask("last_prompt+1", 7)
    assert got.tolist() == [[False, False, False, True, True, False, False]] * 2
    assert ctx.position_mask("last_prompt+0", 7).tolist() == ctx.position_mask((-1,), 7).tolist()
    ctx.offset = 5  # a decoding step at absolute position 5 (the second generated token)
    assert ctx.position_mask("last_prompt+1", 1).tolist() == [[False], [False]]
    assert ctx.position_mask("last_prompt+2", 1).tolist() == [[True], [True]]


def test_window_positions_generate_like_last_prompt_for_k_tokens(tiny_lm):
    """``last_prompt+K`` steers the decision position and the first K generated tokens: with K >= the answer
    length it generates exactly what ``last_prompt`` does, with K = 0 exactly what offsets (-1,) do."""
    g = torch.Generator().manual_seed(3)
    vec = torch.randn(tiny_lm.d_model, generator=g) * 30
    texts = [p["text"] for p in PROMPTS[:5]]

    def run(pos):
        iv = Intervention("resid_post", 1, vec, positions=pos)
        return [r["token_ids"] for r in generate(tiny_lm, texts, iv, max_new_tokens=5, batch_size=2,
                                                 show_progress=False)]

    assert run("last_prompt+10") == run("last_prompt")
    assert run("last_prompt+0") == run((-1,))
    assert run("last_prompt") != run((-1,))  # the planted vector does move generated tokens


def test_zone_sweep_finds_the_planted_best_pair_and_respects_the_constraint():
    rng = np.random.default_rng(0)
    n = 400
    harmful = np.arange(n) < 200
    score = np.where(harmful, rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.6, n))
    base = np.where(harmful, rng.random(n) < 0.85, rng.random(n) < 0.3).astype(int)
    toward = np.ones(n, dtype=int)
    away = np.zeros(n, dtype=int)
    res = zone_sweep(score, base, toward, away, harmful, ~harmful, grid=21)
    best = res["best_global"]
    assert best is not None and best["refusal_low"] >= 0.90
    # brute force over the same grid agrees on the optimum
    t = res["global"]
    ok = t[t.refusal_low >= 0.90]
    assert best["over_refusal"] == ok.over_refusal.min()
    v = zone_verdicts(score, base, toward, away, lower=best["lower"], upper=best["upper"])
    assert v[harmful].mean() == pytest.approx(best["refusal"]) and v[~harmful].mean() == pytest.approx(
        best["over_refusal"])
    # an impossible constraint: nothing feasible, said so
    from catlens.gate import ZoneObjective

    assert zone_sweep(score, base, np.zeros(n), away, harmful, ~harmful, grid=11,
                      objective=ZoneObjective(0.99))["best_global"] is None


def test_per_category_thresholds_beat_global_when_categories_differ():
    """Category A's benign prompts score high (a hard category), B's low: one global pair must steer A's benign rows
    toward refusal; per-category pairs need not."""
    rng = np.random.default_rng(1)
    n = 200
    cat = np.where(np.arange(n) % 2 == 0, "A", "B")
    harmful = (np.arange(n) // 2) % 2 == 0
    score = np.where(harmful, np.where(cat == "A", 0.95, 0.6), np.where(cat == "A", 0.7, 0.1)) + rng.normal(
        0, 0.01, n)
    base = np.where(harmful, 0, 1)  # unsteered: refuses benign, answers harmful (the worst case)
    toward, away = np.ones(n, dtype=int), np.zeros(n, dtype=int)
    res = zone_sweep(score, base, toward, away, harmful, ~harmful, routes=cat, grid=41)
    assert res["best_per_category"] is not None
    assert res["best_per_category"]["over_refusal"] == 0.0
    assert res["best_global"] is None or res["best_global"]["over_refusal"] > 0.0
    pairs = res["best_per_category"]["pairs"]
    v = per_category_verdicts(score, base, toward, away, cat, pairs, (0.5, 0.5))
    assert v[~harmful].mean() == 0.0 and v[harmful].mean() == 1.0


def test_wilson_low_matches_statsmodels():
    from catlens.metrics import wilson_interval

    for k, n in ((0, 10), (9, 10), (180, 200), (50, 50)):
        assert float(wilson_low(k, n)) == pytest.approx(wilson_interval(k, n)[0], abs=1e-9)


def test_choose_gate_picks_the_feature_set_that_separates_the_focus_rows():
    """A planted signal only in the prompt mean at layer 5: the mean-reading candidates win on the focus AUROC."""
    rng = np.random.default_rng(2)
    d, n = 8, 300
    y = (np.arange(n) % 2).astype(int)

    def inputs(y):
        m = len(y)
        r = {("resid_post", L, p): torch.from_numpy(rng.normal(size=(m, d)).astype(np.float32))
             for L in (3, 5) for p in ("last", "mean_all")}
        r[("resid_post", 5, "mean_all")][:, 0] += torch.from_numpy(3.0 * y.astype(np.float32))
        return {"reads": r, "logodds": torch.from_numpy(rng.normal(size=m).astype(np.float32))}

    tr, va = inputs(y), inputs(y)
    ch = choose_gate(tr, y, va, y, np.ones(n, dtype=bool), steer_layer=3, gate_layers=[3, 5])
    assert ch.kind.startswith("last+mean@multi")
    row = ch.table.set_index("features")
    assert row.loc[ch.kind, "val_auroc_focus"] > 0.9 > row.loc["last@steer", "val_auroc_focus"]
    assert row.loc["logodds", "fitted"] == False  # noqa: E712  the baseline is reported, never chosen
    assert feature_reads("last@steer", 3, [3, 5]) == ((("resid_post", 3, "last"),), False)


def test_answer_cost_ratio_equals_the_ratio_of_the_mixed_answers():
    """The mixed ratio equals the perplexity ratio computed directly from the rows' chosen answers."""
    from catlens.gate import AnswerCost

    rng = np.random.default_rng(2)
    n = 30
    nll, tok = rng.uniform(1, 3, (3, n)), rng.integers(5, 64, (3, n))
    counts = rng.random((3, n)) < 0.8
    side = rng.integers(0, 3, n)
    cost = AnswerCost(nll, tok, counts)
    rows = np.arange(n)
    ok = counts[side, rows] & counts[0]
    direct = np.exp(np.average(nll[side, rows][ok], weights=tok[side, rows][ok])
                    - np.average(nll[0][ok], weights=tok[0][ok]))
    assert cost.ratio(side) == pytest.approx(direct, rel=1e-12)
    assert cost.ratio(np.zeros(n, dtype=int)) == pytest.approx(1.0, abs=1e-12)  # unsteered against itself
    assert np.isnan(AnswerCost(nll, tok, np.zeros((3, n), dtype=bool)).ratio(side))
    with pytest.raises(ValueError, match=r"shape \(3, n_rows\)"):
        AnswerCost(nll[:2], tok, counts)


def test_zone_sweep_perplexity_guard_rejects_incoherent_away_answers():
    """Away answers are perfect on the verdicts but incoherent: with the guard, the best pair steers no benign row
    away; without it, every benign row is steered away."""
    from catlens.gate import AnswerCost, ZoneObjective

    rng = np.random.default_rng(3)
    n = 200
    harmful = np.arange(n) < 100
    score = np.where(harmful, rng.uniform(0.5, 1.0, n), rng.uniform(0.0, 0.5, n))
    base = np.where(harmful, 1, rng.random(n) < 0.3).astype(int)
    toward, away = np.ones(n, dtype=int), np.zeros(n, dtype=int)
    nll = np.stack([np.full(n, 2.0), np.full(n, 2.0), np.full(n, 4.0)])  # away answers: e^2 times the perplexity
    counts = np.stack([~harmful & (base == 0), np.zeros(n, dtype=bool), ~harmful])
    cost = AnswerCost(nll, np.full((3, n), 10), counts)
    free = zone_sweep(score, base, toward, away, harmful, ~harmful, grid=21, cost=cost,
                      objective=ZoneObjective(0.9))["best_global"]
    assert free["over_refusal"] == 0.0 and free["ppl_ratio"] == pytest.approx(np.e ** 2)
    guarded = zone_sweep(score, base, toward, away, harmful, ~harmful, grid=21, cost=cost,
                         objective=ZoneObjective(0.9, max_ppl_ratio=1.10))["best_global"]
    assert guarded["ppl_ratio"] <= 1.10 and guarded["lower"] <= score[~harmful].min()
    assert guarded["over_refusal"] == pytest.approx(base[~harmful].mean())
    with pytest.raises(ValueError, match="max_ppl_ratio"):
        ZoneObjective(max_ppl_ratio=0.5)


def test_zone_sweep_point_constraint_is_applied():
    from catlens.gate import ZoneObjective

    n = 40
    harmful = np.arange(n) < 20
    score = np.linspace(0, 1, n)[::-1].copy()
    base = np.where(harmful, np.arange(n) % 2, 1)  # half the harmful rows refused unsteered
    res = zone_sweep(score, base, np.ones(n, dtype=int), np.zeros(n, dtype=int), harmful, ~harmful, grid=41,
                     objective=ZoneObjective(0.0, min_refusal=0.95))
    t = res["global"]
    assert (t[t.feasible].refusal >= 0.95).all() and (~t[t.refusal < 0.95].feasible).all()
    assert res["best_global"]["refusal"] >= 0.95


def test_gated_generation_equals_each_rows_side_generation(tiny_lm):
    """The answer-level zone sweep's premise: under a three-zone gated policy, every row generates exactly the tokens
    that the ungated all-toward, all-away or unsteered policy generates for it (the side its score picks), across
    a whole answer and a mixed batch, with steering on the decision position and the first generated tokens."""
    from catlens.gate import zone_sides

    gate, inputs, X = _gate(tiny_lm)
    s = gate_probabilities(gate, X)
    iv = Intervention(**{**_iv(tiny_lm).__dict__, "positions": "last_prompt+2"})
    router = Router("refusal_tokens", CATS)
    lo, hi = (float(x) for x in np.quantile(s, [0.3, 0.7]))
    pols = {"none": None,
            "toward": SteeringPolicy((Intervention(**{**iv.__dict__, "coeff": 3.0}),), router=router),
            "away": SteeringPolicy((Intervention(**{**iv.__dict__, "coeff": -3.0}),), router=router),
            "zoned": SteeringPolicy((iv,), gate=Gate(**{**_fields(gate), "lower": lo, "threshold": hi}),
                                    router=router, toward=3.0, away=-3.0)}
    toks = {n: [r["token_ids"] for r in generate(tiny_lm, PROMPTS, p, max_new_tokens=6, batch_size=5,
                                                 show_progress=False)] for n, p in pols.items()}
    assert toks["toward"] != toks["away"]  # the planted steering changes answers
    side = zone_sides(s, lower=lo, upper=hi)
    assert set(side.tolist()) == {0, 1, 2}  # every zone is exercised
    expected = [toks[("none", "toward", "away")[k]][i] for i, k in enumerate(side)]
    assert toks["zoned"] == expected
