"""P2's recipe (catlens/recipes/p2.py) without a model: its vectors on planted data, the choice on val, the ratios to
the unsteered model, the once-only claim on a test split and the automatic layer sets. The script and the steps end to
end on the tiny model: tests/analyses/test_p2_steering.py."""

import pandas as pd
import pytest
import torch

from catlens.recipes import p2

CATS = ("fraud_financial_crime", "hate_harassment", "privacy")


# --------------------------------------------------------------------------------------------- planted data
def _planted(n: int = 40, d: int = 32, n_layers: int = 2, informative: float = 1.0, seed: int = 0):
    """Safe rows: noise. Unsafe rows of category c: noise - 3 u_c on a share ``informative`` of the rows; the other
    rows carry a smaller shared nuisance shift - 1.5 w instead (w orthogonal to every u_c), which drags the plain
    mean off u_c. Returns (unsafe_by_cat, safe, u, informative masks)."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(d, len(CATS) + 1, generator=g))[0].T  # orthonormal
    u, w = basis[:len(CATS)], basis[len(CATS)]
    safe = 0.3 * torch.randn(n, n_layers, d, generator=g)
    unsafe, masks = {}, {}
    for i, c in enumerate(CATS):
        x = 0.3 * torch.randn(n, n_layers, d, generator=g)
        mask = torch.arange(n) < int(informative * n)
        x[mask] -= 3.0 * u[i]
        x[~mask] -= 1.5 * w
        unsafe[c], masks[c] = x, mask
    return unsafe, safe, u, masks


def _cos(dirs, u):
    v = dirs.vectors / dirs.vectors.norm(dim=-1, keepdim=True)  # [cat layer d]
    return torch.einsum("cld,kd->lck", v, u)  # [layer cat planted]


def test_unsupervised_and_pruned_recover_planted_category_directions():
    unsafe, safe, u, _ = _planted()
    for method in ("unsupervised", "pruned"):
        dirs = p2.category_vectors(method, unsafe, safe, quantile=0.5, layers=[4, 9])
        cos = _cos(dirs, u)
        assert dirs.layers == (4, 9) and dirs.categories == CATS
        assert (torch.diagonal(cos, dim1=1, dim2=2) > 0.95).all(), method  # safe - unsafe points along +u_c
        off = cos - torch.diag_embed(torch.diagonal(cos, dim1=1, dim2=2))
        assert off.abs().max() < 0.2, method


def test_pruning_and_guidance_sharpen_a_diluted_direction():
    """Only a third of the unsafe rows carry the direction (the others a weaker nuisance shift): the norm-pruned mean
    and the guided mean (the judge marks exactly those rows) recover it better than the plain mean."""
    unsafe, safe, u, masks = _planted(informative=1 / 3, seed=1)
    plain = torch.diagonal(_cos(p2.category_vectors("unsupervised", unsafe, safe), u), dim1=1, dim2=2)
    pruned = torch.diagonal(_cos(p2.category_vectors("pruned", unsafe, safe, quantile=0.6), u), dim1=1, dim2=2)
    guided_dirs = p2.category_vectors("guided", unsafe, safe, answered={c: masks[c].tolist() for c in CATS})
    guided = torch.diagonal(_cos(guided_dirs, u), dim1=1, dim2=2)
    assert (plain < 0.8).all()  # the nuisance really dilutes the plain mean
    assert (pruned > plain + 0.1).all() and (guided > 0.95).all()
    assert guided_dirs.provenance["fallback_unsupervised"] == []
    # a category whose answers were all refused falls back to its unsupervised vector, and says so
    answered = {c: masks[c].tolist() for c in CATS}
    answered["privacy"] = [False] * len(masks["privacy"])
    mixed = p2.category_vectors("guided", unsafe, safe, answered=answered, guided_min=1)
    assert mixed.provenance["fallback_unsupervised"] == ["privacy"]
    unsup = p2.category_vectors("unsupervised", unsafe, safe)
    assert torch.equal(mixed.vectors[2], unsup.vectors[2]) and torch.equal(mixed.vectors[0], guided_dirs.vectors[0])


def test_category_vectors_are_the_registry_constructors():
    """The recipe's vectors are catlens.directions' P2 constructors (through its method registry), bit for bit."""
    from catlens import directions as D

    unsafe, safe, _, masks = _planted(seed=2)
    matched = {c: safe for c in CATS}
    for sides in (safe, matched):
        got = p2.category_vectors("unsupervised", unsafe, sides, layers=[4, 9])
        assert torch.equal(got.vectors, D.p2_unsupervised(unsafe, sides, layers=[4, 9]).vectors)
        got = p2.category_vectors("pruned", unsafe, sides, quantile=0.6, pairing="random", seed=3)
        want = D.p2_pruned(unsafe, sides, quantile=0.6, pairing="random", seed=3)
        assert torch.equal(got.vectors, want.vectors) and got.method == "p2_pruned"
    got = p2.category_vectors("guided", unsafe, safe, answered={c: masks[c].tolist() for c in CATS})
    want = D.p2_guided(unsafe, safe, judge_labels=masks)
    assert torch.equal(got.vectors, want.vectors) and got.method == "p2_guided"
    assert set(p2.DIRECTION_METHODS) == set(p2.METHODS) and set(p2.DIRECTION_METHODS.values()) <= set(D.METHODS)


def test_category_vectors_bad_inputs():
    unsafe, safe, _, _ = _planted(n=6)
    with pytest.raises(ValueError, match="Did you mean: pruned"):
        p2.category_vectors("prunned", unsafe, safe)
    for q in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            p2.category_vectors("pruned", unsafe, safe, quantile=q)
    with pytest.raises(ValueError, match="'privacy' has no harmful activations"):
        p2.category_vectors("unsupervised", {**unsafe, "privacy": unsafe["privacy"][:0]}, safe)
    with pytest.raises(ValueError, match="needs answered"):
        p2.category_vectors("guided", unsafe, safe)
    with pytest.raises(ValueError, match="6 activations"):
        p2.category_vectors("guided", unsafe, safe, answered={c: [True] * 5 for c in CATS})


# ------------------------------------------------------------------------------------- selection and protocol
def _summary(rows):
    """A val summary as run_val builds it: (setting, method, site, coeff, n_layers, harmful answered, benign answered,
    pooled perplexity)."""
    return pd.DataFrame([{"setting": s, "method": m, "site": site, "coeff": c, "n_layers": n, "harmful_answered": h,
                          "benign_answered": b, "ppl_pooled": p} for s, m, site, c, n, h, b, p in rows])


def test_choose_admits_only_within_the_perplexity_guard():
    """The stop-15 failure: settings with perplexity ratios 4.1 and 21.1 were admitted. Now they are not; the
    best setting within the guard is chosen, and a group with none admissible has no chosen setting."""
    summary = _summary([
        ("unsteered", "unsteered", None, 0.0, 0, 0.60, 0.90, 10.0),
        ("u-a-m4", "unsupervised", "attn_out", 4.0, 5, 0.10, 0.95, 41.0),    # ppl ratio 4.1
        ("u-a-m16", "unsupervised", "attn_out", 16.0, 5, 0.05, 0.93, 211.0),  # ppl ratio 21.1
        ("u-a-m1", "unsupervised", "attn_out", 1.0, 5, 0.50, 0.90, 11.0),     # ratio 1.10: admissible (inclusive)
        ("u-a-m0.5", "unsupervised", "attn_out", 0.5, 5, 0.55, 0.90, 10.2),
        ("u-r-m1", "unsupervised", "resid_post", 1.0, 5, 0.20, 0.80, 10.0),   # benign answered ratio 0.889 < 0.9
        ("u-r-m4", "unsupervised", "resid_post", 4.0, 5, 0.10, 0.90, 50.0)])
    table, sels = p2.choose(summary, ("method", "site"), 0.10, 0.10)
    t = table.set_index("setting")
    assert not t.loc["u-a-m4"].admissible and not t.loc["u-a-m16"].admissible
    assert t.loc["u-a-m4"].rejected_by == "ppl_ratio <= 1.1" and t.loc["u-a-m1"].admissible
    assert t.loc["u-a-m1"].chosen and not t.loc["u-a-m4"].chosen
    assert t.loc["u-a-m1"].harmful_answered_drop == pytest.approx(0.10)
    assert not t.loc[["u-r-m1", "u-r-m4"]].chosen.any()
    assert not sels["unsupervised/resid_post"].chosen
    assert "none of 2 candidates is admissible" in sels["unsupervised/resid_post"].reason
    # ties on the objective go to the smaller |m|, then fewer layers
    tie = _summary([("unsteered", "unsteered", None, 0.0, 0, 0.6, 0.9, 10.0),
                    ("a", "pruned", "attn_out", 2.0, 1, 0.5, 0.9, 10.0), ("b", "pruned", "attn_out", 1.0, 5, 0.5, 0.9,
                                                                          10.0),
                    ("c", "pruned", "attn_out", 1.0, 1, 0.5, 0.9, 10.0)])
    table, _ = p2.choose(tie, ("method", "site"), 0.10, 0.10)
    assert table[table.chosen].setting.tolist() == ["c"]


def test_halved_is_undefined_for_a_zero_baseline():
    assert p2.halved(pd.Series([0.0, 0.3]), 0.0).isna().all()  # nothing to halve: neither True nor False
    got = p2.halved(pd.Series([0.2, 0.21, 0.0]), 0.4)
    assert got.tolist() == [True, False, True]
    assert p2.ratio_to_base(pd.Series([0.5]), 0.0).isna().all()


def test_a_test_split_is_evaluated_once_per_run_folder(tmp_path):
    from catlens.runs import RunDir

    run = RunDir.create(tmp_path / "run", {"x": 1})
    p2.claim_test_split(run, 1, "abc", ["unsteered", "pruned-a"])
    p2.claim_test_split(run, 1, "abc", ["pruned-a", "unsteered"])  # the same choice again (a resumed run): fine
    assert run.manifest["test_evaluation"] == {"split_seed": 1, "prompts_sha256": "abc",
                                               "settings": ["pruned-a", "unsteered"]}
    with pytest.raises(RuntimeError, match="already evaluated with the settings"):
        p2.claim_test_split(run, 1, "abc", ["unsteered", "pruned-b"])
    assert run.manifest["test_evaluation"]["settings"] == ["pruned-a", "unsteered"]  # unchanged


def test_auto_layer_sets_scale_p2s_set():
    assert p2.auto_layer_sets(32) == [(16,), (14, 16, 20, 25, 31)]  # P2's {14,16,20,25,31} on 32 layers
    assert p2.auto_layer_sets(30) == [(14,), (13, 15, 19, 23, 29)]
