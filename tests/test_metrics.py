"""Metrics: binomial SE and Wilson intervals, rate tables (pooled and macro), AUROC with a bootstrap interval, and the
side-effect proxies (first-token KL, teacher-forced perplexity, repetition, helpfulness)."""

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from statsmodels.stats.proportion import proportion_confint

from catlens.metrics import (
    STANDS_FOR,
    answered,
    auroc_with_ci,
    binomial_se,
    first_token_kl,
    helpfulness_proxy,
    perplexity_under,
    rate_table,
    repetition_rate,
    side_effect_table,
    token_nll,
    wilson_interval,
)

Z = 1.959963984540054


def wilson_by_hand(k, n, z=Z):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return centre - half, centre + half


# ------------------------------------------------------------------------------------------- proportions
@pytest.mark.parametrize("k,n", [(70, 250), (0, 20), (20, 20), (1, 3), (530, 3103)])
def test_wilson_matches_hand_formula_and_statsmodels(k, n):
    low, high = wilson_interval(k, n)
    hand = wilson_by_hand(k, n)
    assert low == pytest.approx(max(0.0, hand[0]), abs=1e-12)
    assert high == pytest.approx(min(1.0, hand[1]), abs=1e-12)
    assert (low, high) == pytest.approx(proportion_confint(k, n, alpha=0.05, method="wilson"), abs=1e-12)
    assert low <= k / n <= high


def test_binomial_se_is_p1s_formula():
    assert binomial_se(70, 250) == pytest.approx(math.sqrt(0.28 * 0.72 / 250))
    assert round(100 * binomial_se(70, 250), 2) == 2.84  # P1's XSTest Safe subscript (PAPERS §2.4)
    assert binomial_se(0, 10) == 0.0
    for k, n in [(5, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError, match=f"k={k}, n={n}"):
            binomial_se(k, n)
    with pytest.raises(ValueError, match="alpha=1.5"):
        wilson_interval(1, 2, alpha=1.5)


def _judged_frame():
    # harmful: wg/privacy 3/4 refused, wg/crime 1/2, xs/privacy 0/1 plus one unknown; benign: xs/privacy 1/5
    rows = [("harmful", "wg", "privacy", v) for v in (True, True, True, False)]
    rows += [("harmful", "wg", "crime", v) for v in (True, False)]
    rows += [("harmful", "xs", "privacy", v) for v in (False, None)]
    rows += [("benign", "xs", "privacy", v) for v in (True, False, False, False, False)]
    df = pd.DataFrame(rows, columns=["label", "dataset", "category", "refused"])
    df["refused"] = df["refused"].astype("boolean")
    return df


def test_rate_table_groups_pooled_and_macro():
    table = rate_table(_judged_frame())
    harm = table[table["side"] == "harmful"].set_index(["row", "dataset", "category"])
    g = harm.loc[("group", "wg", "privacy")]
    assert (g["n"], g["k"], g["rate"]) == (4, 3, 0.75)
    assert g["se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert (g["ci_low"], g["ci_high"]) == pytest.approx(wilson_by_hand(3, 4))
    xs = harm.loc[("group", "xs", "privacy")]
    assert (xs["n"], xs["k"], xs["n_unknown"]) == (1, 0, 1)  # the unknown verdict is not in n
    pooled = harm.loc[("pooled", "(all)", "(all)")]
    assert (pooled["n"], pooled["k"], pooled["n_unknown"]) == (7, 4, 1)
    assert pooled["rate"] == pytest.approx(4 / 7)  # micro: P1's "Average"
    assert (pooled["ci_low"], pooled["ci_high"]) == pytest.approx(wilson_by_hand(4, 7))
    macro = harm.loc[("macro", "(all)", "(all)")]
    rates, ses = [0.5, 0.75, 0.0], [math.sqrt(0.25 / 2), math.sqrt(0.75 * 0.25 / 4), 0.0]
    assert macro["rate"] == pytest.approx(np.mean(rates))
    assert macro["se"] == pytest.approx(math.sqrt(sum(s * s for s in ses)) / 3)
    assert macro["ci_low"] == pytest.approx(max(0.0, np.mean(rates) - Z * macro["se"]))
    assert macro["rate"] != pytest.approx(pooled["rate"])
    assert set(harm["metric"]) == {"refusal rate"} and set(harm["better"]) == {"higher"}
    benign = table[table["side"] == "benign"]
    assert set(benign["metric"]) == {"over-refusal rate"} and set(benign["better"]) == {"lower"}
    assert benign.loc[benign["row"] == "pooled", "rate"].item() == pytest.approx(0.2)
    assert table["stands_for"].notna().all()
    # one grouping column; no grouping at all gives only pooled rows
    by_dataset = rate_table(_judged_frame(), by="dataset")
    assert by_dataset.loc[(by_dataset["side"] == "harmful") & (by_dataset["dataset"] == "wg"), "k"].item() == 4
    assert set(rate_table(_judged_frame(), by=())["row"]) == {"pooled"}


def test_rate_table_side_argument_and_errors():
    df = _judged_frame()
    forced = rate_table(df.drop(columns="label"), by=["dataset"], side="benign")
    assert set(forced["side"]) == {"benign"} and forced.loc[forced["row"] == "pooled", "n"].item() == 12
    with pytest.raises(ValueError, match="df is empty"):
        rate_table(df.iloc[:0])
    with pytest.raises(ValueError, match="Unknown group column 'categroy'.*Did you mean: category"):
        rate_table(df, by=["categroy"])
    with pytest.raises(ValueError, match="Unknown value column 'refusd'.*Did you mean: refused"):
        rate_table(df, value="refusd")
    with pytest.raises(ValueError, match="no label column 'label'.*side='harmful'"):
        rate_table(df.drop(columns="label"))
    bad = df.assign(label=["unsafe"] + list(df["label"][1:]))
    with pytest.raises(ValueError, match="has 'unsafe'.*allowed: harmful, benign"):
        rate_table(bad)
    with pytest.raises(ValueError, match="must hold booleans.*'yes'"):
        rate_table(df.assign(refused=["yes"] * len(df)))
    with pytest.raises(ValueError, match="Unknown side 'harm'.*Did you mean: harmful"):
        rate_table(df, side="harm")


# ---------------------------------------------------------------------------------------------- AUROC
def test_auroc_point_estimate_by_hand_and_seeded_interval():
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    s = np.array([0.9, 0.8, 0.4, 0.4, 0.2, 0.1, 0.6, 0.7])
    pos, neg = s[y == 1], s[y == 0]
    mann_whitney = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    a = auroc_with_ci(y, s, rng=np.random.default_rng(7), n_boot=300)
    assert a["auroc"] == pytest.approx(mann_whitney)
    assert a["ci_low"] <= a["auroc"] <= a["ci_high"] and 0 <= a["ci_low"] and a["ci_high"] <= 1
    assert (a["n_pos"], a["n_neg"]) == (4, 4) and a["stands_for"]
    b = auroc_with_ci(y, s, rng=np.random.default_rng(7), n_boot=300)
    assert (a["ci_low"], a["ci_high"], a["se"]) == (b["ci_low"], b["ci_high"], b["se"])  # same seed, same interval
    perfect = auroc_with_ci([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], rng=np.random.default_rng(0), n_boot=50)
    assert (perfect["auroc"], perfect["ci_low"], perfect["ci_high"]) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("block", [10**9, 7])  # one block; many blocks of one resample
def test_bootstrap_aurocs_equal_a_loop_of_roc_auc_score_on_the_same_draws(monkeypatch, block):
    from sklearn.metrics import roc_auc_score

    import catlens.metrics as metrics

    monkeypatch.setattr(metrics, "_BOOT_BLOCK_ELEMENTS", block)
    gen = np.random.default_rng(3)
    pos = np.round(gen.normal(0.5, 1, 23), 1)  # rounded: many ties, within and across the classes
    neg = np.round(gen.normal(0, 1, 31), 1)
    fast = metrics._bootstrap_aurocs(pos, neg, rng=np.random.default_rng(11), n_boot=40)
    rng = np.random.default_rng(11)
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    slow = [roc_auc_score(labels, np.r_[pos[rng.integers(0, len(pos), len(pos))],
                                        neg[rng.integers(0, len(neg), len(neg))]]) for _ in range(40)]
    np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-12)
    assert len(set(np.round(fast, 9))) > 10  # the resamples differ


def test_auroc_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        auroc_with_ci([0, 1], [0.1, 0.2], rng=0)
    with pytest.raises(ValueError, match="1 positives and 0 negatives"):
        auroc_with_ci([1], [0.5], rng=rng)
    with pytest.raises(ValueError, match="non-finite value nan at index 1"):
        auroc_with_ci([0, 1], [0.1, float("nan")], rng=rng)
    with pytest.raises(ValueError, match="binary"):
        auroc_with_ci([0, 2], [0.1, 0.2], rng=rng)
    with pytest.raises(ValueError, match="equal length"):
        auroc_with_ci([0, 1, 1], [0.1, 0.2], rng=rng)


# -------------------------------------------------------------------------------------------------- KL
def test_first_token_kl_identity_and_hand_case():
    torch.manual_seed(0)
    p = torch.randn(3, 2, 11)
    assert first_token_kl(p, p).item() == pytest.approx(0.0, abs=1e-12)
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 ln 2 + 1/2 ln(2/3)
    a = torch.tensor([[[0.0, 0.0]]], dtype=torch.float64)
    b = torch.tensor([[[0.0, math.log(3.0)]]], dtype=torch.float64)
    expected = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert first_token_kl(a, b).item() == pytest.approx(expected, rel=1e-12)
    assert first_token_kl(b, a).item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), rel=1e-12)


def test_first_token_kl_mask_reduce_and_infinities():
    p = torch.zeros(2, 3, 2, dtype=torch.float64)
    q = torch.zeros(2, 3, 2, dtype=torch.float64)
    q[0, 1] = torch.tensor([0.0, math.log(3.0)])  # the only differing position
    one = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert first_token_kl(p, q, mask).item() == pytest.approx(one / 3)
    assert first_token_kl(p, q, torch.tensor([[False, False, True], [True, True, True]])).item() == 0.0
    rows = first_token_kl(p, q, mask, reduce="row")
    assert rows.tolist() == pytest.approx([one / 2, 0.0])
    assert torch.isnan(first_token_kl(p, q, torch.zeros(2, 3, dtype=torch.bool), reduce="row")).all()
    assert first_token_kl(p, q, reduce="none").shape == (2, 3)
    # -inf logits: a token impossible under p contributes 0; possible under p but impossible under q gives inf
    gated = torch.tensor([[[0.0, float("-inf")]]])
    assert first_token_kl(gated, torch.tensor([[[0.0, 0.0]]])).item() == pytest.approx(math.log(2))
    assert math.isinf(first_token_kl(torch.tensor([[[0.0, 0.0]]]), gated).item())
    with pytest.raises(ValueError, match="NaN or \\+inf"):
        first_token_kl(p, torch.full_like(q, float("nan")))
    # (under the test suite's jaxtyping checks the shape clash is caught before the function's own message)
    with pytest.raises((ValueError, TypeError), match="same shape|q_logits"):
        first_token_kl(p, q[:, :2])
    with pytest.raises(ValueError, match="mask selects no position"):
        first_token_kl(p, q, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="Unknown reduce 'sum'"):
        first_token_kl(p, q, reduce="sum")


# ------------------------------------------------------------------------------------------ perplexity
def test_token_nll_equals_manual_computation():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    target = torch.tensor([[False, False, True, True, True], [False, True, True, False, False]])
    nll = token_nll(logits, ids, target)
    for b in range(2):
        for t in range(5):
            manual = -torch.log_softmax(logits[b, t - 1].double(), -1)[ids[b, t]].item() if target[b, t] else 0.0
            assert nll[b, t].item() == pytest.approx(manual, abs=1e-12)


@pytest.fixture(scope="module")
def char_model():
    """A 1-layer random Llama over a character vocabulary (no real model, no disk)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    chars = list("abcdefghijklmnopqrstuvwxyz ?.!:")
    vocab = {"<pad>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    hf = LlamaForCausalLM(cfg).eval()

    def fmt(texts, fmt="chat", system=None):
        assert fmt == "chat"
        return [f"q: {t} a:" for t in texts]

    return SimpleNamespace(hf=hf, tokenizer=tokenizer, format=fmt)


def test_perplexity_under_equals_unbatched_teacher_forcing(char_model):
    prompts = ["hi", "what is two plus two?", "x"]
    responses = [" hello there.", " four", " a much longer answer with many words in it!"]
    table = perplexity_under(char_model, prompts, responses, batch_size=2)
    tok = char_model.tokenizer
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        p_ids = tok(char_model.format([prompt])[0], add_special_tokens=False)["input_ids"]
        r_ids = tok(response, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = torch.log_softmax(char_model.hf(input_ids=ids).logits[0].double(), -1)
        manual = -np.mean([logp[t - 1, ids[0, t]].item() for t in range(len(p_ids), ids.shape[1])])
        assert table.loc[i, "n_tokens"] == len(r_ids)
        assert table.loc[i, "nll"] == pytest.approx(manual, abs=1e-5)
        assert table.loc[i, "perplexity"] == pytest.approx(math.exp(manual), rel=1e-5)
    assert set(table["stands_for"]) == {STANDS_FOR["perplexity"]}
    # token ids give the same numbers as text; an empty response gives NaN
    as_ids = [tok(r, add_special_tokens=False)["input_ids"] for r in responses]
    assert perplexity_under(char_model, prompts, as_ids, batch_size=3)["nll"].tolist() == \
        pytest.approx(table["nll"].tolist(), abs=1e-5)
    assert math.isnan(perplexity_under(char_model, ["hi"], [""])["perplexity"].item())
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        perplexity_under(char_model, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="batch_size=0"):
        perplexity_under(char_model, ["a"], ["b"], batch_size=0)


# -------------------------------------------------------------------------------------- repetition etc.
def test_repetition_rate_by_hand():
    assert repetition_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 - 3 / 4)
    assert repetition_rate([5, 5, 5, 5], n=1) == pytest.approx(1 - 1 / 4)
    assert repetition_rate([5, 5, 5, 5], n=2) == pytest.approx(1 - 1 / 3)
    assert repetition_rate(list(range(10))) == 0.0
    assert repetition_rate([1, 2]) == 0.0  # shorter than n: no n-gram
    assert repetition_rate("a b a b a b".split(), n=2) == pytest.approx(1 - 2 / 5)
    with pytest.raises(ValueError, match="n=0"):
        repetition_rate([1, 2, 3], n=0)
    with pytest.raises(TypeError, match="not a string"):
        repetition_rate("abcabc")


def _records():
    loop = [7, 8, 9] * 10
    return [
        {"id": "a", "response": "[respond] Here is how.", "token_ids": [1, 2, 3, 4], "label": "benign",
         "source": "xs"},
        {"id": "b", "response": "[respond] I can't help.", "token_ids": [1, 5, 6], "label": "benign",
         "source": "xs"},
        {"id": "c", "response": "[respond]", "token_ids": [1], "label": "benign", "source": "or"},
        {"id": "d", "response": "[respond] la la la", "token_ids": loop, "label": "benign", "source": "or"},
        {"id": "e", "response": "Sure, how to do harm", "token_ids": [1, 2], "label": "harmful", "source": "xs"},
    ]


def test_helpfulness_proxy_counts_answered_benign_records():
    records = _records()
    refused = [False, True, False, False, False]
    assert answered(records, refused) == [True, False, False, False, True]  # empty c, degenerate d
    assert helpfulness_proxy(records, refused) == pytest.approx(1 / 4)  # harmful e is ignored
    assert helpfulness_proxy(records, refused, degenerate_threshold=1.0) == pytest.approx(2 / 4)
    with pytest.raises(ValueError, match="no benign record"):
        helpfulness_proxy(records[4:], refused[4:])
    with pytest.raises(ValueError, match="4 refusal verdicts for 5 records"):
        helpfulness_proxy(records, refused[:4])
    with pytest.raises(ValueError, match="id='b' has an unknown refusal verdict"):
        answered(records, [False, None, False, False, False])
    with pytest.raises(ValueError, match="degenerate_threshold=2"):
        answered(records, refused, degenerate_threshold=2)


def test_side_effect_table():
    records = _records()
    refused = [False, True, False, False, False]
    kl = [0.1, 0.2, 0.3, 0.4, 1.0]
    table = side_effect_table(records, refused, by=["dataset"], kl=kl, perplexity=[2.0, 3.0, 4.0, 5.0, 6.0])
    assert table["stands_for"].notna().all()
    assert (table["stands_for"] == table["metric"].map(STANDS_FOR)).all()
    t = table.set_index(["dataset", "metric"])
    assert t.loc[("xs", "first_token_kl"), "value"] == pytest.approx(np.mean([0.1, 0.2, 1.0]))
    assert t.loc[("xs", "first_token_kl"), "se"] == pytest.approx(np.std([0.1, 0.2, 1.0], ddof=1) / math.sqrt(3))
    assert t.loc[("(all)", "perplexity"), "value"] == pytest.approx(4.0)
    assert (t.loc[("or", "degenerate"), "n"], t.loc[("or", "degenerate"), "k"]) == (2, 1)
    assert t.loc[("(all)", "helpfulness"), "value"] == pytest.approx(1 / 4)
    assert (t.loc[("(all)", "helpfulness"), "ci_low"], t.loc[("(all)", "helpfulness"), "ci_high"]) == \
        pytest.approx(wilson_by_hand(1, 4))
    assert t.loc[("xs", "helpfulness"), "value"] == pytest.approx(1 / 2)
    assert t.loc[("(all)", "repetition_rate"), "value"] == pytest.approx(np.mean([0, 0, 0, 1 - 3 / 28, 0]))
    assert set(table.loc[table["dataset"] == "(all)", "row"]) == {"pooled"}
    with pytest.raises(ValueError, match="kl has 2 values for 5 records"):
        side_effect_table(records, refused, kl=[0.1, 0.2])
    with pytest.raises(ValueError, match="group field\\(s\\) \\['split'\\]"):
        side_effect_table(records, refused, by=["split"])
