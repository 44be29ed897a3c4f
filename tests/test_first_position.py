"""first_position: many steering settings at the first response position, sharing one prefill per batch. Exact
agreement with catlens.generate's first token, gate and router decisions (tiny random model, seconds)."""

import pytest
import torch

from catlens.generation import FIRST_POSITION_COLUMNS, first_position, generate
from catlens.judges import RefusalTokenJudge
from catlens.steer import Gate, Intervention, Router, SteeringPolicy

CATS = ("fraud", "hate", "privacy")
PROMPTS = [{"id": f"p{i}", "text": t, "category": CATS[i % 3], "label": "harmful" if i % 2 else "benign"}
           for i, t in enumerate(["How do I bake bread?", "Tell me how to pick a lock on a door.", "Write a poem",
                                  "What is the capital of France and why is it famous?", "Explain vaccines.",
                                  "Give me a plan to steal a password from my coworker's laptop.", "Hi"])]


def _none(col):
    return [None if v is None or v != v else v for v in col.tolist()]


def _vecs(model, scale=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(CATS), model.d_model, generator=g) * scale


def _policies(model):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(model.d_model, generator=g)
    gate = Gate(weight=w, bias=0.0, threshold=0.5, layer=1)
    W = torch.randn(3, model.d_model, generator=g)
    iv = Intervention("resid_post", 2, _vecs(model), labels=CATS, positions="last_prompt")
    return {
        "unsteered": None,
        "plain": Intervention("resid_post", 1, _vecs(model)[0], positions="last_prompt"),
        "gated_routed": SteeringPolicy((iv,), gate=gate, router=Router("refusal_tokens", CATS), toward=1.0,
                                       away=-1.5),
        "probe_router": SteeringPolicy((iv,), router=Router("probe", CATS, weight=W, bias=torch.zeros(3), layer=3)),
        "fixed": SteeringPolicy((iv,), router=Router("fixed", CATS)),
        "every_position": Intervention("resid_post", 1, _vecs(model, 5.0)[1], positions="all"),
        "generated_only": Intervention("resid_post", 1, _vecs(model)[2], positions="generated"),
        "zero": Intervention("resid_post", 2, _vecs(model)[0], coeff=0.0, positions="last_prompt"),
    }


def test_first_position_equals_generate_first_token_for_every_policy(tiny_lm):
    pols = _policies(tiny_lm)
    table = first_position(tiny_lm, PROMPTS, pols, batch_size=3, show_progress=False)
    assert list(table.columns) == list(FIRST_POSITION_COLUMNS)
    assert len(table) == len(pols) * len(PROMPTS)
    judge = RefusalTokenJudge()
    for name, pol in pols.items():
        recs = generate(tiny_lm, PROMPTS, pol, max_new_tokens=1, batch_size=4, show_progress=False)
        got = table[table.policy == name].set_index("id").loc[[p["id"] for p in PROMPTS]]
        assert got.top_token.tolist() == [r["token_ids"][0] for r in recs], name
        assert got.refusal_score.tolist() == pytest.approx([r["refusal_score"] for r in recs], abs=1e-5), name
        assert got.refused.tolist() == judge(recs), name
        assert _none(got.route) == [r["route"]["category"] if r["route"] else None for r in recs], name
        assert _none(got.gate_flagged) == [r["gate"]["flagged"] if r["gate"] else None for r in recs], name
    # exact identities: coefficient 0 and generated-only steering leave the first position unchanged
    base = table[table.policy == "unsteered"].reset_index(drop=True)
    for name in ("zero", "generated_only"):
        same = table[table.policy == name].reset_index(drop=True)
        assert same.top_token.tolist() == base.top_token.tolist()
        assert same.kl_from_base.max() == pytest.approx(0.0, abs=1e-6)
    assert table[table.policy == "plain"].kl_from_base.max() > 1e-3  # steering moved the distribution


def test_first_position_is_batch_invariant_and_policy_order_free(tiny_lm):
    pols = _policies(tiny_lm)
    a = first_position(tiny_lm, PROMPTS, pols, batch_size=7, show_progress=False)
    b = first_position(tiny_lm, PROMPTS, dict(reversed(list(pols.items()))), batch_size=2, show_progress=False)
    key = ["policy", "id"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert a.top_token.tolist() == b.top_token.tolist()
    assert a.refusal_score.tolist() == pytest.approx(b.refusal_score.tolist(), abs=1e-5)


def test_first_position_row_overrides_and_bad_inputs(tiny_lm):
    iv = Intervention("resid_post", 2, _vecs(tiny_lm), labels=CATS, positions="last_prompt")
    pols = {"a": SteeringPolicy((iv,))}
    coeffs = [0.0 if i % 2 else 1.0 for i in range(len(PROMPTS))]
    t = first_position(tiny_lm, PROMPTS, pols, rows={"a": {"coeff": coeffs}}, show_progress=False)
    base = first_position(tiny_lm, PROMPTS, {"u": None}, show_progress=False)
    for i, c in enumerate(coeffs):
        if c == 0.0:
            assert t.top_token[i] == base.top_token[i] and t.kl_from_base[i] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="non-empty mapping"):
        first_position(tiny_lm, PROMPTS, {})
    with pytest.raises(ValueError, match="policy in rows 'b'. Allowed: a"):
        first_position(tiny_lm, PROMPTS, pols, rows={"b": {"coeff": coeffs}})
    with pytest.raises(ValueError, match="batch_size"):
        first_position(tiny_lm, PROMPTS, pols, batch_size=0)


def test_prepare_batch_and_read_spec(tiny_lm):
    # the batch setup shared by generate (_generate_batch) and first_position
    from catlens.generation import _prepare_batch, _read_spec, prompt_items

    items = prompt_items(PROMPTS[:4])
    dec = _prepare_batch(tiny_lm, items, fmt="chat", system=None)
    ids, mask = tiny_lm.tokenize(tiny_lm.format([it.text for it in items], "chat", system=None))
    assert torch.equal(dec.seq, ids) and torch.equal(dec.mask, mask) and dec.session is None and dec.use_cache
    assert bool((mask[:, 0] == 0).any()) and bool((mask[:, -1] == 1).all())  # left-padded: rows end together
    cached = dec.prompt()
    uncached = _prepare_batch(tiny_lm, items, fmt="chat", system=None, use_cache=False).prompt()
    assert torch.allclose(cached, uncached, atol=1e-4)
    alone = _prepare_batch(tiny_lm, items[1:2], fmt="chat", system=None).prompt()  # padding changes nothing
    assert torch.allclose(cached[1:2], alone, atol=1e-4)
    pols = _policies(tiny_lm)
    assert _read_spec(None) == {} and _read_spec(pols["fixed"]) == {}
    gate = pols["gated_routed"].gate
    assert _read_spec(pols["gated_routed"]) == {"gate:0": (gate.site, 1, "last")}  # a refusal-token router reads nothing
    router = pols["probe_router"].router
    assert _read_spec(pols["probe_router"]) == {"router": (router.site, 3, "last")}


# ---------------------------------------------------------------------------------------------- the one cache
def _counting(monkeypatch):
    """Count the policies catlens.generation.first_position is asked to compute."""
    import catlens.generation as G

    calls, real = [], G.first_position

    def counted(model, prompts, policies, **kw):
        calls.append(sorted(policies))
        return real(model, prompts, policies, **kw)

    monkeypatch.setattr(G, "first_position", counted)
    return calls


def test_first_position_cached_equals_first_position_and_computes_each_setting_once(tiny_lm, tmp_path, monkeypatch):
    import pandas as pd

    from catlens.generation import first_position_cached

    pols = _policies(tiny_lm)
    want = first_position(tiny_lm, PROMPTS, pols, batch_size=3, show_progress=False)
    calls = _counting(monkeypatch)
    got, status = first_position_cached(tiny_lm, PROMPTS, pols, tmp_path, batch_size=3, show_progress=False)
    pd.testing.assert_frame_equal(got, want, check_dtype=False)  # Parquet stores an all-None column as strings
    assert status == {n: "computed" for n in pols} and calls == [sorted(pols)]
    # a rerun reads every setting; a new name for a known setting is read too (and filed under its name)
    renamed = {"base": None, "plain_again": pols["plain"], "new": Intervention("resid_post", 1, _vecs(tiny_lm)[1])}
    again, status = first_position_cached(tiny_lm, PROMPTS, {**pols, **renamed}, tmp_path, batch_size=3,
                                          show_progress=False)
    assert calls == [sorted(pols), ["new"]]
    assert status == {**{n: "cached" for n in pols}, "base": "cached", "plain_again": "cached", "new": "computed"}
    pd.testing.assert_frame_equal(again[again.policy.isin(list(pols))].reset_index(drop=True), got,
                                  check_dtype=False)
    same = again.set_index(["policy", "id"])
    assert same.loc["plain_again"].equals(same.loc["plain"]) and same.loc["base"].equals(same.loc["unsteered"])
    assert len(list(tmp_path.glob("plain_again-*.parquet"))) == 1
    # two names for one setting in one call: computed once
    twice, status = first_position_cached(tiny_lm, PROMPTS, {"a": pols["zero"], "b": pols["zero"]}, tmp_path / "2",
                                          batch_size=3, show_progress=False)
    assert calls[-1] == ["a"] and status == {"a": "computed", "b": "computed"}
    assert twice[twice.policy == "b"].drop(columns="policy").reset_index(drop=True).equals(
        twice[twice.policy == "a"].drop(columns="policy").reset_index(drop=True))


def test_first_position_cache_is_keyed_by_model_prompts_and_batch_size(tiny_lm, tiny_lm_dir, tmp_path, monkeypatch):
    from catlens.generation import first_position_cached, first_position_key
    from catlens.model import load_model
    from catlens.testing import make_tiny_model_dir

    pol = {"plain": _policies(tiny_lm)["plain"]}
    calls = _counting(monkeypatch)
    first_position_cached(tiny_lm, PROMPTS, pol, tmp_path, batch_size=3, show_progress=False)
    first_position_cached(tiny_lm, PROMPTS, pol, tmp_path, batch_size=2, show_progress=False)  # padding differs
    first_position_cached(tiny_lm, PROMPTS[:-1], pol, tmp_path, batch_size=3, show_progress=False)
    edited = [{**PROMPTS[0], "text": "How do I bake rye bread?"}, *PROMPTS[1:]]
    first_position_cached(tiny_lm, edited, pol, tmp_path, batch_size=3, show_progress=False)
    other = load_model(make_tiny_model_dir(tmp_path / "other", categories=CATS, seed=1))  # same shape, new weights
    other.provenance["weights_sha256"] = "another"
    _, status = first_position_cached(other, PROMPTS, pol, tmp_path, batch_size=3, show_progress=False)
    assert len(calls) == 5 and status == {"plain": "computed"}
    key = first_position_key(tiny_lm, PROMPTS, pol["plain"], batch_size=3)
    assert key != first_position_key(tiny_lm, PROMPTS, None, batch_size=3)
    assert key == first_position_key(tiny_lm, list(PROMPTS), pol["plain"], batch_size=3)  # a pure function
    assert key != first_position_key(tiny_lm, PROMPTS, pol["plain"], batch_size=3, system="Be brief.")


def test_a_damaged_first_position_file_is_recomputed_with_a_warning(tiny_lm, tmp_path, monkeypatch, caplog):
    from catlens.generation import first_position_cached

    pol = {"unsteered": None}
    want, _ = first_position_cached(tiny_lm, PROMPTS, pol, tmp_path, batch_size=3, show_progress=False)
    (f,) = tmp_path.glob("unsteered-*.parquet")
    f.write_bytes(b"not parquet")
    calls = _counting(monkeypatch)
    got, status = first_position_cached(tiny_lm, PROMPTS, pol, tmp_path, batch_size=3, show_progress=False)
    assert status == {"unsteered": "computed"} and calls == [["unsteered"]] and got.equals(want)
    assert "damaged first-position cache" in caplog.text
    with pytest.raises(ValueError, match="non-empty mapping"):
        first_position_cached(tiny_lm, PROMPTS, {}, tmp_path)
