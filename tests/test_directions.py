"""Category directions: planted directions are recovered, options do exactly what they say, bad input fails clearly."""

import pytest
import torch

from catlens import directions as D
from catlens.directions import Directions

D_MODEL = 64
N_LAYERS = 3


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() @ b.double()) / (a.double().norm() * b.double().norm()))


def _noise(n: int, gen: torch.Generator, scale: float = 0.3) -> torch.Tensor:
    return scale * torch.randn(n, N_LAYERS, D_MODEL, generator=gen)


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.fixture
def planted(gen):
    """Benign = noise (sd 0.3); category c = noise + shared offset s + 4 * u_c at every layer (u_c orthonormal, s unit)."""
    basis = torch.linalg.qr(torch.randn(D_MODEL, 4, generator=gen))[0].T  # 4 orthonormal rows
    shared, u = basis[0], {"a": basis[1], "b": basis[2], "c": basis[3]}
    benign = _noise(400, gen)
    cats = {c: _noise(n, gen) + 3 * shared + 4 * u[c] for c, n in (("a", 300), ("b", 200), ("c", 350))}
    return {"shared": shared, "u": u, "benign": benign, "cats": cats}


# --------------------------------------------------------------------------------------------- recovery
def test_one_vs_benign_recovers_planted_difference(planted):
    d = D.one_vs_benign(planted["cats"], planted["benign"])
    assert d.vectors.shape == (3, N_LAYERS, D_MODEL) and d.vectors.dtype == torch.float32
    for c, u in planted["u"].items():
        for layer in d.layers:
            assert _cos(d.vector(c, layer), 3 * planted["shared"] + 4 * u) > 0.99


def test_p1_mean_difference_recovers_planted_direction_with_tau_and_topk(gen):
    # a sparse plant (16 dims) survives top-K with K >= 16; tau below the signal keeps it
    support = torch.randperm(D_MODEL, generator=gen)[:16]
    plant = torch.zeros(D_MODEL)
    plant[support] = torch.randn(16, generator=gen).sign() * 2.0
    cat = {"x": _noise(500, gen, 0.3) + plant}
    respond = _noise(500, gen, 0.3)
    d = D.p1_mean_difference(cat, respond, tau=1e-3, top_k=16)
    for layer in d.layers:
        v = d.vector("x", layer)
        assert _cos(v, plant) > 0.99
        assert set(v.nonzero().flatten().tolist()) == set(support.tolist())


def test_p1_topk_exactly_k_nonzeros_and_unit_norm(planted):
    d = D.p1_mean_difference(planted["cats"], planted["benign"], tau=None, top_k=10)
    nonzeros = (d.vectors != 0).sum(-1)
    assert bool((nonzeros == 10).all())
    torch.testing.assert_close(d.vectors.norm(dim=-1), torch.ones(3, N_LAYERS))


def test_tau_mask_applies_to_each_mean_separately():
    # mu_c = [0.5e-3, 1, 0], mu_b = [0, 0.5e-3, 2e-3]: masked separately the first dim of mu_c and second of mu_b
    # vanish, so d = [0, 1, -2e-3]; masking the difference instead would have kept dim 0 (0.5e-3 < tau though)
    # and given dim 1 = 1 - 0.5e-3.
    cat = {"x": torch.tensor([[0.5e-3, 1.0, 0.0]]).reshape(1, 1, 3)}
    respond = torch.tensor([[0.0, 0.5e-3, 2e-3]]).reshape(1, 1, 3)
    d = D.p1_mean_difference(cat, respond, tau=1e-3, top_k=None, normalize=False)
    torch.testing.assert_close(d.vectors[0, 0], torch.tensor([0.0, 1.0, -2e-3]))
    nomask = D.p1_mean_difference(cat, respond, tau=None, top_k=None, normalize=False)
    torch.testing.assert_close(nomask.vectors[0, 0], torch.tensor([0.5e-3, 1.0 - 0.5e-3, -2e-3]))


def test_top_k_sparsify_and_tau_mask_helpers():
    x = torch.tensor([[3.0, -5.0, 1.0, 0.5]])
    torch.testing.assert_close(D.top_k_sparsify(x, 2), torch.tensor([[3.0, -5.0, 0.0, 0.0]]))
    assert torch.equal(D.top_k_sparsify(x, None), x) and torch.equal(D.top_k_sparsify(x, 99), x)
    torch.testing.assert_close(D.tau_mask(x, 1.0), torch.tensor([[3.0, -5.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="top_k=0"):
        D.top_k_sparsify(x, 0)
    with pytest.raises(ValueError, match="tau=-1.0"):
        D.tau_mask(x, -1.0)


def test_p1_contrastive_recovers_paired_difference(gen):
    plant = _unit(torch.randn(D_MODEL, generator=gen))
    base = _noise(300, gen, 3.0)  # large per-prompt variation, cancelled by pairing
    paired_cat = {"x": base + 0.5 * plant + _noise(300, gen, 0.05)}
    paired_resp = {"x": base + _noise(300, gen, 0.05)}
    d = D.p1_contrastive(paired_cat, paired_resp)
    assert all(_cos(d.vector("x", layer), plant) > 0.99 for layer in d.layers)
    torch.testing.assert_close(d.vectors.norm(dim=-1), torch.ones(1, N_LAYERS))


def test_one_vs_rest_weighting(planted):
    cats, u, s = planted["cats"], planted["u"], planted["shared"]
    for weighting in ("prompt", "category"):
        d = D.one_vs_rest(cats, weighting=weighting)
        for c in cats:
            others = [o for o in cats if o != c]
            if weighting == "category":
                rest = sum(u[o] for o in others) / len(others)
            else:
                rest = sum(len(cats[o]) * u[o] for o in others) / sum(len(cats[o]) for o in others)
            expected = 4 * (u[c] - rest)  # the shared offset cancels
            assert _cos(d.vector(c, 1), expected) > 0.99
            assert abs(_cos(d.vector(c, 1), s)) < 0.1
    # the two weightings differ exactly by the pooled-mean definition
    x = {"a": torch.ones(1, 1, 2), "b": torch.zeros(3, 1, 2), "c": 4 * torch.ones(1, 1, 2)}
    prompt = D.one_vs_rest(x, weighting="prompt").vector("a", 0)
    category = D.one_vs_rest(x, weighting="category").vector("a", 0)
    torch.testing.assert_close(prompt, torch.tensor([0.0, 0.0]))  # 1 - (0+0+0+4)/4
    torch.testing.assert_close(category, torch.tensor([-1.0, -1.0]))  # 1 - (0+4)/2


def test_orthogonalize_against_refusal_direction(planted):
    harmful = torch.cat(list(planted["cats"].values()))
    r = D.refusal_direction(harmful, planted["benign"])
    assert r.shape == (N_LAYERS, D_MODEL)
    base = D.one_vs_benign(planted["cats"], planted["benign"])
    orth = D.orthogonalize_against(base, r, normalize=True)
    for j, layer in enumerate(orth.layers):
        v = orth.at(layer)
        assert float((v.double() @ r[j].double()).abs().max()) < 1e-5 * float(r[j].norm())
    # with the shared offset removed, what is left is each category's own part (relative to the harmful mean)
    mean_u = sum(len(planted["cats"][c]) * planted["u"][c] for c in planted["cats"]) / len(harmful)
    for c in planted["cats"]:
        assert _cos(orth.vector(c, 0), planted["u"][c] - mean_u) > 0.95
    assert orth.method == "one_vs_benign_orth"


def test_p2_unsupervised_generic_and_matched(planted, gen):
    unsafe = planted["cats"]
    generic = D.p2_unsupervised(unsafe, planted["benign"])
    for c, u in planted["u"].items():  # safe - unsafe: the sign points away from the category
        assert _cos(generic.vector(c, 2), -(3 * planted["shared"] + 4 * u)) > 0.99
    assert generic.provenance["safe_data"] == "generic"
    matched_safe = {c: _noise(150, gen) + 3 * planted["shared"] for c in unsafe}  # same topic, safe
    matched = D.p2_unsupervised(unsafe, matched_safe)
    for c, u in planted["u"].items():
        assert _cos(matched.vector(c, 0), -u) > 0.99
    assert matched.provenance["safe_data"] == "matched"


def test_p2_pruned_keeps_the_right_count_and_recovers(planted):
    unsafe = {"a": planted["cats"]["a"][:101], "b": planted["cats"]["b"][:100]}
    d = D.p2_pruned(unsafe, planted["benign"], quantile=0.5)
    assert d.provenance["n_kept"] == {"a": [50] * N_LAYERS, "b": [50] * N_LAYERS}
    d75 = D.p2_pruned(unsafe, planted["benign"], quantile=0.75, pairing="truncate")
    assert d75.provenance["n_kept"]["b"] == [25] * N_LAYERS
    for c in unsafe:
        assert _cos(d.vector(c, 0), -(3 * planted["shared"] + 4 * planted["u"][c])) > 0.99
    # the exact rule at one layer: mean of the truncated pairs' differences whose norm is above the median
    delta = (planted["benign"][:100, 1] - unsafe["b"][:, 1]).double()
    norms = delta.norm(dim=-1)
    expected = delta[norms > torch.quantile(norms, 0.5)].mean(0)
    torch.testing.assert_close(d.vector("b", 1), expected.float())


def test_p2_pruned_random_pairing_is_seeded(planted):
    unsafe = {"a": planted["cats"]["a"][:50]}
    one = D.p2_pruned(unsafe, planted["benign"], pairing="random", seed=1)
    same = D.p2_pruned(unsafe, planted["benign"], pairing="random", seed=1)
    other = D.p2_pruned(unsafe, planted["benign"], pairing="random", seed=2)
    assert torch.equal(one.vectors, same.vectors)
    assert not torch.equal(one.vectors, other.vectors)
    assert not torch.equal(one.vectors, D.p2_pruned(unsafe, planted["benign"]).vectors)


def test_p2_guided_keeps_only_judged_unsafe(gen):
    u, w = torch.linalg.qr(torch.randn(D_MODEL, 2, generator=gen))[0].T
    safe = _noise(300, gen)
    judged_unsafe = _noise(100, gen) + 4 * u
    judged_safe = _noise(100, gen) + 4 * w
    unsafe = {"x": torch.cat([judged_unsafe, judged_safe])}
    mask = {"x": [True] * 100 + [False] * 100}
    guided = D.p2_guided(unsafe, safe, judge_labels=mask)
    assert _cos(guided.vector("x", 0), -u) > 0.99
    assert guided.provenance["n_judged_unsafe"] == {"x": 100}
    unsup = D.p2_unsupervised(unsafe, safe)
    assert _cos(unsup.vector("x", 0), -u) < 0.8  # the mixture is pulled toward w
    records = {"x": [{"response": "harmful stuff" if i < 100 else "I cannot help"} for i in range(200)]}
    via_callable = D.p2_guided(unsafe, safe, judge_labels=lambda r: r["response"].startswith("harmful"),
                               records=records)
    assert torch.equal(via_callable.vectors, guided.vectors)
    pruned = D.p2_guided(unsafe, safe, judge_labels=mask, quantile=0.5)
    assert pruned.provenance["n_kept"]["x"] == [50] * N_LAYERS and pruned.method == "p2_guided"


# ----------------------------------------------------------------------------------------- the object
def test_directions_save_load_exact(tmp_path, planted):
    d = D.p1_mean_difference(planted["cats"], planted["benign"], layers=(4, 7, 9), site="resid_post",
                             provenance={"model": "tiny", "positions": ("last",), "data_sha256": {"x": "ab"}})
    path = d.save(tmp_path / "dirs")
    assert path.name == "dirs.safetensors" and (tmp_path / "dirs.dims.json").exists()
    back = Directions.load(tmp_path / "dirs.safetensors")
    assert back == d
    assert torch.equal(back.vectors, d.vectors) and back.layers == (4, 7, 9) and back.provenance == d.provenance
    assert back.provenance["positions"] == ["last"]  # tuples are stored JSON-normalised, so equal after load


def test_directions_access_and_normalized(planted):
    d = D.one_vs_benign(planted["cats"], planted["benign"], layers=(10, 11, 12))
    assert torch.equal(d.at(11), d.vectors[:, 1]) and torch.equal(d.vector("b", 12), d.vectors[1, 2])
    n = d.normalized()
    torch.testing.assert_close(n.vectors.norm(dim=-1), torch.ones(3, 3))
    assert not torch.equal(n.vectors, d.vectors) and d.vectors.norm(dim=-1).max() > 1.5  # input not mutated
    s = d.select(categories=["c", "a"], layers=[12])
    assert s.categories == ("c", "a") and torch.equal(s.vectors[0, 0], d.vector("c", 12))
    with pytest.raises(KeyError, match="Did you mean: b"):
        d.vector("bb", 10)
    with pytest.raises(KeyError, match="layer 3"):
        d.at(3)
    assert set(d.norms().columns) >= {"category", "layer", "norm"} and len(d.norms()) == 9


def test_directions_validates_its_fields():
    v = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="categories has 1 names"):
        Directions(vectors=v, categories=("a",), layers=(0, 1, 2))
    with pytest.raises(ValueError, match="layers has 2 labels"):
        Directions(vectors=v, categories=("a", "b"), layers=(0, 1))
    with pytest.raises(ValueError, match="unique"):
        Directions(vectors=v, categories=("a", "a"), layers=(0, 1, 2))
    with pytest.raises(ValueError, match="exactly zero"):
        Directions(vectors=v, categories=("a", "b"), layers=(0, 1, 2)).normalized()


# ------------------------------------------------------------------------------------------ bad input
def test_mismatched_d_model_names_the_category(gen):
    cats = {"ok": _noise(5, gen), "wide": torch.randn(5, N_LAYERS, D_MODEL + 1, generator=gen)}
    with pytest.raises(ValueError, match=r"cat_acts\['wide'\].*d_model=65.*d_model=64"):
        D.p1_mean_difference(cats, _noise(5, gen))


def test_nan_names_category_and_layer(gen):
    bad = _noise(5, gen)
    bad[3, 2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"harmful_by_cat\['b'\].*NaN.*prompt 3, layer axis index 2"):
        D.one_vs_benign({"a": _noise(5, gen), "b": bad}, _noise(5, gen))
    with pytest.raises(ValueError, match="safe_acts.*NaN"):
        D.p2_unsupervised({"a": _noise(5, gen)}, bad)


def test_too_few_samples(gen):
    with pytest.raises(ValueError, match=r"\['a'\]: has 0 prompt"):
        D.one_vs_benign({"a": torch.zeros(0, N_LAYERS, D_MODEL)}, _noise(5, gen))
    with pytest.raises(ValueError, match=r"\['one'\]: has 1 prompt.*at least 2"):
        D.p2_pruned({"one": _noise(1, gen)}, _noise(5, gen))
    with pytest.raises(ValueError, match="at least 2 categories"):
        D.one_vs_rest({"a": _noise(3, gen)})


def test_other_bad_input(gen):
    # the run-time type checker (tests) or the function itself (no checker) refuses it, naming the value
    with pytest.raises((ValueError, TypeError), match="pooled"):
        D.one_vs_rest({"a": _noise(3, gen), "b": _noise(3, gen)}, weighting="pooled")
    with pytest.raises(ValueError, match="one pair per prompt"):
        D.p1_contrastive({"a": _noise(3, gen)}, {"a": _noise(4, gen)})
    with pytest.raises(ValueError, match="no entry for"):
        D.p2_unsupervised({"a": _noise(3, gen), "b": _noise(3, gen)}, {"a": _noise(3, gen)})
    with pytest.raises(ValueError, match="quantile=1"):
        D.p2_pruned({"a": _noise(3, gen)}, _noise(3, gen), quantile=1.0)
    with pytest.raises(ValueError, match="labelled none of its 3"):
        D.p2_guided({"a": _noise(3, gen)}, _noise(3, gen), judge_labels={"a": [False] * 3})
    with pytest.raises(ValueError, match="records"):
        D.p2_guided({"a": _noise(3, gen)}, _noise(3, gen), judge_labels=lambda r: True)
    with pytest.raises(ValueError, match="layers=.*2 labels"):
        D.one_vs_benign({"a": _noise(3, gen)}, _noise(3, gen), layers=(0, 1))


def test_refusal_direction_must_match_the_directions(planted):
    base = D.one_vs_benign(planted["cats"], planted["benign"])
    with pytest.raises(ValueError, match=r"refusal has shape \(3, 65\).*d_model=64"):
        D.orthogonalize_against(base, torch.ones(N_LAYERS, D_MODEL + 1))
    with pytest.raises(ValueError, match="exactly zero"):
        D.orthogonalize_against(base, torch.zeros(N_LAYERS, D_MODEL))


# ------------------------------------------------------------------------------- files: integrity and ref_norm
def _flip_last_byte(path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # inside the tensor data, not the header
    path.write_bytes(bytes(data))


def test_directions_load_detects_a_flipped_byte(tmp_path, planted):
    d = D.one_vs_benign(planted["cats"], planted["benign"])
    path = d.save(tmp_path / "dirs")
    _flip_last_byte(path)
    with pytest.raises(ValueError, match=r"dirs.safetensors.*fails its checksum.*again"):
        Directions.load(path)


def test_directions_load_detects_a_tensor_file_from_another_save(tmp_path, planted):
    a = D.one_vs_benign(planted["cats"], planted["benign"])
    b = D.one_vs_rest(planted["cats"])  # same shape, other vectors
    a.save(tmp_path / "a")
    b.save(tmp_path / "b")
    (tmp_path / "a.safetensors").write_bytes((tmp_path / "b.safetensors").read_bytes())
    with pytest.raises(ValueError, match="come from different saves"):
        Directions.load(tmp_path / "a")


def test_directions_load_detects_reordered_categories_in_the_sidecar(tmp_path, planted):
    import json

    d = D.one_vs_benign(planted["cats"], planted["benign"])
    d.save(tmp_path / "dirs")
    side = tmp_path / "dirs.dims.json"
    meta = json.loads(side.read_text())
    meta["categories"] = meta["categories"][::-1]
    side.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"categories differ.*relabel"):
        Directions.load(tmp_path / "dirs")


def test_directions_interrupted_save_is_refused(tmp_path, planted, monkeypatch):
    import catlens.runs as runs

    D.one_vs_benign(planted["cats"], planted["benign"]).save(tmp_path / "dirs")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "write_json_atomic", killed)  # the tensor file lands, the sidecar does not
    with pytest.raises(KeyboardInterrupt):
        D.one_vs_rest(planted["cats"]).save(tmp_path / "dirs")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different saves.*interrupted save"):
        Directions.load(tmp_path / "dirs")


def test_directions_damaged_files_name_the_file(tmp_path, planted):
    d = D.one_vs_benign(planted["cats"], planted["benign"])
    path = d.save(tmp_path / "dirs")
    side = tmp_path / "dirs.dims.json"
    good_side = side.read_text()
    side.write_text(good_side[: len(good_side) // 2])
    with pytest.raises(ValueError, match=r"dirs.dims.json' is damaged or truncated.*again"):
        Directions.load(path)
    side.write_text(good_side)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=r"dirs.safetensors' is damaged or truncated.*again"):
        Directions.load(path)


def test_ref_norm_measured_saved_compared_and_selected(tmp_path, planted, gen):
    d = D.one_vs_benign(planted["cats"], planted["benign"], layers=(4, 7, 9))
    assert d.ref_norm is None
    r = d.with_ref_norm(planted["benign"])
    expected = planted["benign"].double().norm(dim=-1).mean(0).float()
    assert r.ref_norm.shape == (3,) and torch.equal(r.ref_norm, expected)
    assert r.provenance["ref_norm"]["n_prompts"] == len(planted["benign"]) and d.ref_norm is None
    assert r != d and torch.equal(r.vectors, d.vectors)
    back = Directions.load(r.save(tmp_path / "with_ref"))
    assert back == r and torch.equal(back.ref_norm, r.ref_norm)
    assert torch.equal(r.select(layers=[9, 4]).ref_norm, expected[[2, 0]])
    assert torch.equal(r.normalized().ref_norm, r.ref_norm)
    orth = D.orthogonalize_against(r, D.refusal_direction(torch.cat(list(planted["cats"].values())),
                                                          planted["benign"]))
    assert torch.equal(orth.ref_norm, r.ref_norm)
    # the run-time type checker (tests) or the class itself (no checker) refuses it, naming ref_norm
    with pytest.raises((ValueError, TypeError), match="ref_norm"):
        Directions(vectors=d.vectors, categories=d.categories, layers=d.layers, ref_norm=torch.ones(2))
    with pytest.raises(ValueError, match="finite and > 0"):
        Directions(vectors=d.vectors, categories=d.categories, layers=d.layers,
                   ref_norm=torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="has 2 layers"):
        d.with_ref_norm(planted["benign"][:, :2])


def test_with_ref_norm_from_an_activation_store(planted):
    import pandas as pd

    from catlens.cache import ActivationStore

    acts = planted["benign"][:10]  # [prompt layer d]
    store = ActivationStore({"resid_post": acts[:, None]}, pd.DataFrame({"id": [f"p{i}" for i in range(10)]}),
                            (4, 7, 9), ("last",))
    d = D.one_vs_benign(planted["cats"], planted["benign"], layers=(4, 7, 9)).select(layers=[9, 4])  # a subset
    r = d.with_ref_norm(store)
    torch.testing.assert_close(r.ref_norm, acts[:, [2, 0]].double().norm(dim=-1).mean(0).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="same site"):
        D.p2_unsupervised(planted["cats"], planted["benign"], layers=(4, 7, 9)).with_ref_norm(store)
    with pytest.raises(ValueError, match=r"lacks layers \[1\]"):
        D.one_vs_benign(planted["cats"], planted["benign"], layers=(1, 7, 9)).with_ref_norm(store)


def test_a_format_1_directions_file_still_loads(tmp_path, caplog):
    import json

    from safetensors.torch import save_file

    v = torch.randn(2, 3, 4)
    save_file({"vectors": v}, str(tmp_path / "old.safetensors"), metadata={"format": "catlens.Directions"})
    (tmp_path / "old.dims.json").write_text(json.dumps({
        "format": "catlens.Directions", "format_version": 1, "dims": ["category", "layer", "d_model"],
        "shape": [2, 3, 4], "dtype": "float32", "categories": ["a", "b"], "layers": [0, 1, 2], "site": "resid_post",
        "method": "x", "provenance": {}}))
    with caplog.at_level("WARNING"):
        d = Directions.load(tmp_path / "old")
    assert torch.equal(d.vectors, v) and d.ref_norm is None and "older catlens" in caplog.text


# ------------------------------------------------------------------------------------------------ registry
def _registry_cases(planted, gen):
    """Per registered method: (fit_directions call, the direct constructor call it must equal)."""
    h, b = planted["cats"], planted["benign"]
    matched = {c: x[:50] for c, x in h.items()}
    paired = {c: x[50:100] for c, x in h.items()}
    labels = {c: torch.arange(len(x)) % 3 != 0 for c, x in h.items()}
    refusal = D.refusal_direction(torch.cat(list(h.values())), b)
    kw = {"layers": (3, 5, 7), "provenance": {"data": "planted"}}
    return {
        "one_vs_benign": (lambda: D.fit_directions(h, "one_vs_benign", benign=b, normalize=True, **kw),
                          lambda: D.one_vs_benign(h, b, normalize=True, **kw)),
        "one_vs_rest": (lambda: D.fit_directions(h, "one_vs_rest", weighting="category", **kw),
                        lambda: D.one_vs_rest(h, weighting="category", **kw)),
        "one_vs_benign_orth": (lambda: D.fit_directions(h, "one_vs_benign_orth", benign=b, **kw),
                               lambda: D.orthogonalize_against(D.one_vs_benign(h, b, **kw), refusal)),
        "p1_mean_difference": (lambda: D.fit_directions(h, "p1_mean_difference", benign=b, tau=1e-3, **kw),
                               lambda: D.p1_mean_difference(h, b, tau=1e-3, top_k="proportional", **kw)),
        "p1_contrastive": (lambda: D.fit_directions(paired, "p1_contrastive", benign=matched, top_k=4),
                           lambda: D.p1_contrastive(paired, matched, top_k=4)),
        "p2_unsupervised": (lambda: D.fit_directions(h, "p2_unsupervised", benign=matched, site="attn_out", **kw),
                            lambda: D.p2_unsupervised(h, matched, site="attn_out", **kw)),
        "p2_pruned": (lambda: D.fit_directions(h, "p2_pruned", benign=b, quantile=0.25, pairing="random", seed=3),
                      lambda: D.p2_pruned(h, b, quantile=0.25, pairing="random", seed=3)),
        "p2_guided": (lambda: D.fit_directions(h, "p2_guided", benign=b, judge_labels=labels),
                      lambda: D.p2_guided(h, b, judge_labels=labels)),
    }


def test_every_registered_method_equals_its_constructor(planted, gen):
    cases = _registry_cases(planted, gen)
    assert set(cases) == set(D.METHODS), "a registered method has no equality case here"
    for name, (via_registry, direct) in cases.items():
        got, want = via_registry(), direct()
        assert got == want, name
        assert got.method == want.method


def test_p1_top_k_is_one_definition_proportional_by_default_and_capped_when_absolute(planted):
    """P1 keeps 200 of 4096 dims; the registry carries that to other widths with p1_top_k (PAPERS §2.7)."""
    h, b = planted["cats"], planted["benign"]
    k = D.p1_top_k(D_MODEL)
    assert k == round(200 * D_MODEL / 4096) == 3 and D.P1_TOP_K_MODE == "proportional"
    assert D.p1_top_k(D_MODEL, "absolute") == D_MODEL and D.p1_top_k(4096) == D.p1_top_k(4096, "absolute") == 200
    assert D.p1_top_k(576) == 28 and D.p1_top_k(1) == 1  # SmolLM2-135M's width; never zero dimensions
    reg = D.fit_directions(h, "p1_mean_difference", benign=b)
    assert torch.equal(reg.vectors, D.p1_mean_difference(h, b, top_k=k).vectors)
    assert (reg.provenance["top_k"], reg.provenance["top_k_mode"]) == (k, "proportional")
    assert bool(((reg.vectors != 0).sum(-1) == k).all())
    absolute = D.fit_directions(h, "p1_mean_difference", benign=b, top_k="absolute")
    assert torch.equal(absolute.vectors, D.p1_mean_difference(h, b, top_k=D_MODEL).vectors)
    # an integer K above the width is capped by the registry (keeps every dimension)
    assert D.fit_directions(h, "p1_mean_difference", benign=b, top_k=200) == D.p1_mean_difference(h, b,
                                                                                                 top_k=D_MODEL)
    assert D.fit_directions(h, "p1_mean_difference", benign=b, top_k=3) == D.p1_mean_difference(h, b, top_k=3)
    with pytest.raises(ValueError, match="Did you mean: proportional"):
        D.p1_top_k(576, "proportionl")
    with pytest.raises(ValueError, match="positive integer"):
        D.p1_top_k(0)


def test_unknown_method_gets_a_did_you_mean():
    with pytest.raises(ValueError, match=r"Unknown direction method 'one_vs_bengin'\. Did you mean: one_vs_benign"):
        D.fit_directions({"a": torch.zeros(2, 1, 4)}, "one_vs_bengin", benign=torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match="needs the benign side: pass benign="):
        D.fit_directions({"a": torch.ones(2, 1, 4)}, "one_vs_benign")
    with pytest.raises(ValueError, match="non-empty"):
        D.fit_directions({}, "one_vs_rest")


def test_fit_from_a_store_equals_fit_from_its_activations(planted):
    """A store (index + get(site)) gives the same directions as the grouped tensors of its chosen split."""
    import pandas as pd

    h, b = planted["cats"], planted["benign"]
    rows = [(c, "harmful", "train" if i % 4 else "test") for c, x in h.items() for i in range(len(x))]
    rows += [(None, "benign", "train" if i % 4 else "test") for i in range(len(b))]
    acts = torch.cat([*h.values(), b])

    class Store:
        index = pd.DataFrame(rows, columns=["category", "label", "split"])
        layers = tuple(range(N_LAYERS))

        def get(self, site):
            assert site == "attn_out"
            return acts

    train = {c: x[torch.arange(len(x)) % 4 != 0] for c, x in h.items()}
    want = D.one_vs_benign(train, b[torch.arange(len(b)) % 4 != 0], site="attn_out", layers=Store.layers)
    assert D.fit_directions(Store(), "one_vs_benign", site="attn_out", split="train") == want
    with pytest.raises(ValueError, match="do not pass benign="):
        D.fit_directions(Store(), "one_vs_benign", benign=b)
    with pytest.raises(ValueError, match="no harmful prompts"):
        D.fit_directions(Store(), "one_vs_benign", site="attn_out", split="val")
