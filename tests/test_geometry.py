"""Geometry: whitening identities, the QR basis, anisotropy null values, separability ranking, cosine structure."""

import logging
import math

import numpy as np
import pytest
import torch

from catlens import directions as D
from catlens import geometry as G


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def _gaussian(n: int, d: int, gen: torch.Generator, cov: torch.Tensor | None = None,
              mean: torch.Tensor | None = None) -> torch.Tensor:
    z = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if cov is not None:
        z = z @ torch.linalg.cholesky(cov).T
    return (z + (0 if mean is None else mean)).float()


def _known_cov(d: int, gen: torch.Generator) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]
    return q @ torch.diag(torch.logspace(-2, 2, d, dtype=torch.float64)) @ q.T


def _cov(z: torch.Tensor) -> torch.Tensor:
    z = z.double() - z.double().mean(0)
    return z.T @ z / len(z)


# -------------------------------------------------------------------------------------------- whitening
@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitening_known_covariance_gives_identity(gen, method):
    d = 8
    cov = _known_cov(d, gen)
    x = _gaussian(20_000, d, gen, cov, mean=torch.arange(d, dtype=torch.float64))
    w = G.fit_whitener(x, method=method, eps=0.0)
    assert w.rank == d and not w.rank_deficient
    # exact on the fitting data (biased covariance, as P1)
    torch.testing.assert_close(_cov(w.whiten(x)), torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
    # and close to identity on fresh data from the same distribution (sampling error only)
    fresh = _gaussian(20_000, d, gen, cov, mean=torch.arange(d, dtype=torch.float64))
    assert float((_cov(w.whiten(fresh)) - torch.eye(d, dtype=torch.float64)).abs().max()) < 0.1
    if method == "zca":
        torch.testing.assert_close(w.W, w.W.T)
        # W^T W is the inverse of the sample covariance
        torch.testing.assert_close(w.W.T @ w.W @ _cov(x), torch.eye(d, dtype=torch.float64), atol=1e-6, rtol=0)


def test_whitening_eps_shrinks_the_whitened_variances_by_lambda_over_lambda_plus_eps(gen):
    d = 5
    cov = torch.diag(torch.tensor([4.0, 1.0, 0.25, 1e-2, 1e-4], dtype=torch.float64))
    x = _gaussian(5_000, d, gen, cov)
    eps = 1e-2
    w = G.fit_whitener(x, method="pca", eps=eps)
    lam = w.eigenvalues
    torch.testing.assert_close(torch.diagonal(_cov(w.whiten(x))), lam / (lam + eps), atol=1e-6, rtol=0)


def _zca_reference(x: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """ZCA whitening written out from PAPERS §2.3 I, every step in ``dtype``: W = U diag(max(S, eps)^-1/2) U^T with
    U, S from an SVD of the biased covariance plus eps I."""
    x = x.to(dtype)
    xc = x - x.mean(0)
    sigma = xc.T @ xc / len(x)
    u, s, _ = torch.linalg.svd(sigma + eps * torch.eye(len(sigma), dtype=dtype))
    return u @ torch.diag(s.clamp_min(eps) ** -0.5) @ u.T


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_whitening_float32_is_p1s_arithmetic_and_differs_from_float64_when_ill_conditioned(gen):
    """dtype="float32" reproduces a float32 computation of P1's map; with fewer samples than dimensions and a few
    large-variance directions its rounding near eps moves W well away from the float64 map (PAPERS §2.7)."""
    n, d = 40, 256
    scale = torch.ones(d, dtype=torch.float64)
    scale[:4] = torch.tensor([300.0, 100.0, 50.0, 20.0])  # a few massive directions, as in real residual streams
    x = _gaussian(n, d, gen, torch.diag(scale ** 2), mean=torch.full((d,), 2.0, dtype=torch.float64))
    w32 = G.fit_whitener(x, dtype="float32", warn=False)
    w64 = G.fit_whitener(x, warn=False)
    assert (w32.dtype, w64.dtype) == ("float32", "float64") and w32.rank == w64.rank == n - 1
    assert _rel(w32.W, _zca_reference(x, 1e-4, torch.float32)) < 1e-5
    assert _rel(w64.W, _zca_reference(x, 1e-4, torch.float64)) < 1e-8
    assert _rel(w32.W, w64.W) > 1e-2
    assert G.fit_whitener(x, dtype=torch.float32, warn=False).dtype == "float32"  # a torch dtype works too


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_whitening_both_dtypes_whiten_well_conditioned_data_to_identity(gen, dtype):
    d = 8
    cov = torch.diag(torch.linspace(0.5, 5.0, d, dtype=torch.float64) ** 2)
    x = _gaussian(20_000, d, gen, cov, mean=torch.arange(d, dtype=torch.float64))
    w = G.fit_whitener(x, eps=1e-8, dtype=dtype)
    torch.testing.assert_close(_cov(w.whiten(x)), torch.eye(d, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(w.W_inv @ w.W, torch.eye(d, dtype=torch.float64), atol=1e-5, rtol=0)
    assert _rel(w.W, G.fit_whitener(x, eps=1e-8).W) < 1e-4  # the same map up to float32 rounding


def test_whitening_float32_only_for_p1s_map(gen):
    x = _gaussian(50, 6, gen)
    for kw in ({"method": "pca"}, {"restrict_to_span": True}):
        with pytest.raises(ValueError, match="unrestricted ZCA"):
            G.fit_whitener(x, dtype="float32", **kw)
    with pytest.raises(ValueError, match="Did you mean: float32"):
        G.fit_whitener(x, dtype="float23")


@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitening_fewer_samples_than_dims(gen, method, caplog):
    n, d = 12, 40
    x = _gaussian(n, d, gen) + 5.0
    with caplog.at_level(logging.WARNING, logger="catlens.geometry"):
        full = G.fit_whitener(x, method=method, eps=1e-4)
    assert full.rank == n - 1 and full.rank_deficient
    assert any("rank 11 < 40" in r.getMessage() for r in caplog.records)
    # unrestricted: whiten and unwhiten are exact inverses everywhere
    y = _gaussian(7, d, gen)
    torch.testing.assert_close(full.unwhiten(full.whiten(y)), y, atol=1e-4, rtol=1e-5)
    # the off-span part of a random direction dominates W v (gain eps^-1/2 = 100)
    v = torch.randn(3, d, generator=gen)
    assert float(full.off_span_share(v).min()) > 0.5
    # restricted to the span: no garbage, identity covariance on the span, exact round trip on mean + span
    r = G.fit_whitener(x, method=method, eps=0.0, restrict_to_span=True)
    assert r.n_components == (d if method == "zca" else n - 1)
    ev = torch.linalg.eigvalsh(_cov(r.whiten(x)))
    torch.testing.assert_close(ev[-(n - 1):], torch.ones(n - 1, dtype=torch.float64), atol=1e-6, rtol=0)
    if len(ev) > n - 1:  # ZCA keeps d coordinates, the off-span ones are exactly projected away
        assert float(ev[: -(n - 1)].abs().max()) < 1e-8
    torch.testing.assert_close(r.unwhiten(r.whiten(x)), x, atol=1e-4, rtol=1e-5)
    assert float(r.off_span_share(v).max()) < 1e-6
    with pytest.raises(ValueError, match="eps=0 with a rank-deficient"):
        G.fit_whitener(x, method=method, eps=0.0)


def test_whitening_map_unmap_and_shrinkage(gen):
    n, d = 30, 20
    x = _gaussian(n, d, gen, _known_cov(d, gen))
    w = G.fit_whitener(x, shrinkage="ledoit_wolf")
    assert 0 < w.shrinkage < 1 and float(w.eigenvalues.min()) > 0
    v = torch.randn(4, d, generator=gen)
    torch.testing.assert_close(w.unmap_directions(w.map_directions(v)), v, atol=1e-5, rtol=1e-5)
    w_half = G.fit_whitener(x, shrinkage=0.5, eps=0.0)
    assert w_half.shrinkage == 0.5
    with pytest.raises(ValueError, match="shrinkage"):
        G.fit_whitener(x, shrinkage=2.0)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        G.fit_whitener(bad)


# --------------------------------------------------------------------------------------- QR basis
@pytest.mark.parametrize("restrict", [False, True])
def test_orthonormal_basis_identities(gen, restrict):
    n, d, c = 200, 16, 4
    x = _gaussian(n, d, gen, _known_cov(d, gen))
    w = G.fit_whitener(x, eps=1e-4, restrict_to_span=restrict)
    v = torch.randn(c, d, generator=gen)
    b = G.orthonormal_basis(v, w, categories=("a", "b", "c", "d"))
    q = b.whitened.double()
    torch.testing.assert_close(q @ q.T, torch.eye(c, dtype=torch.float64), atol=1e-5, rtol=0)
    wv = w.map_directions(v.double())
    torch.testing.assert_close(q.T @ b.R.double(), wv.T, atol=1e-4, rtol=1e-5)  # W V = Q R
    assert torch.equal(torch.triu(b.R), b.R) and bool((b.R.diagonal() > 0).all())
    torch.testing.assert_close((wv @ q.T) @ q, wv, atol=1e-4, rtol=1e-5)  # Q spans W V
    # mapped back: W^-1 Q = V R^-1, Mahalanobis-orthonormal, and its Euclidean QR spans span(V)
    res = b.residual.double()
    torch.testing.assert_close(res.T @ b.R.double(), v.double().T, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(res @ w.W.T @ w.W @ res.T, torch.eye(c, dtype=torch.float64), atol=1e-4, rtol=0)
    ro = b.residual_orthonormal.double()
    torch.testing.assert_close(ro @ ro.T, torch.eye(c, dtype=torch.float64), atol=1e-5, rtol=0)
    plain = torch.linalg.qr(v.double().T)[0].T
    torch.testing.assert_close((ro @ plain.T).abs(), torch.eye(c, dtype=torch.float64), atol=1e-5, rtol=0)
    assert torch.equal(b.residual_directions("whitened"), b.whitened)


def test_orthonormal_basis_signs_and_errors(gen):
    x = _gaussian(100, 6, gen)
    w = G.fit_whitener(x)
    v = torch.randn(3, 6, generator=gen)
    lapack = G.orthonormal_basis(v, w, positive_diagonal=False)
    pos = G.orthonormal_basis(v, w)
    torch.testing.assert_close(lapack.whitened.abs(), pos.whitened.abs())
    assert bool(((pos.whitened.double() * w.map_directions(v.double())).sum(-1) > 0).all())
    dependent = torch.stack([v[0], v[1], v[0] + 2 * v[1]])
    with pytest.raises(ValueError, match=r"\['c'\] are linearly dependent"):
        G.orthonormal_basis(dependent, w, categories=("a", "b", "c"))
    with pytest.raises(ValueError, match="d_model=7"):
        G.orthonormal_basis(torch.randn(2, 7), w)
    pca_basis = G.orthonormal_basis(v, G.fit_whitener(x, method="pca"))
    with pytest.raises(ValueError, match="only usable .* for ZCA"):
        pca_basis.residual_directions("whitened")


# ------------------------------------------------------------------------------------------- anisotropy
def test_isotropic_gaussian_has_null_anisotropy(gen):
    n, d = 8_000, 20
    m = G.anisotropy_measures(_gaussian(n, d, gen))
    assert abs(m["mean_pairwise_cosine"]) < 0.01
    assert m["effective_rank"] > 0.98 * d
    assert m["numerical_rank"] == d
    mp = ((1 + math.sqrt(d / n)) / (1 - math.sqrt(d / n))) ** 2  # Marchenko-Pastur edge ratio, ~1.22 here
    assert 1.0 < m["condition_number"] < 1.3 * mp
    assert m["mean_norm_ratio"] < 0.05
    assert m["top1_variance_share"] < 2.0 / d and m["top10_variance_share"] < 0.6
    assert m["max_dim_share"] < 2.0 / d


def test_anisotropic_data_moves_every_measure(gen):
    n, d = 2_000, 20
    x = _gaussian(n, d, gen, torch.diag(torch.logspace(0, 3, d, dtype=torch.float64)))
    m = G.anisotropy_measures(x + 30.0)
    assert m["mean_pairwise_cosine"] > 0.3 and m["mean_norm_ratio"] > 0.3
    assert m["effective_rank"] < 0.5 * d and m["condition_number"] > 500
    assert m["top1_variance_share"] > 0.2


def test_effective_rank_and_numerical_rank_exact(gen):
    assert G.effective_rank(torch.ones(4, dtype=torch.float64)) == pytest.approx(4.0)
    assert G.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert G.effective_rank(torch.tensor([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2.0)
    assert G.numerical_rank(_gaussian(10, 50, gen)) == 9  # centring removes one dimension
    lam = G.covariance_spectrum(_gaussian(10, 50, gen))
    assert lam.shape == (10,) and bool((lam[:-1] >= lam[1:]).all())


def test_massive_dimension_is_flagged(gen):
    x = _gaussian(500, 64, gen)
    assert not G.massive_dimensions(x)["massive"].any()
    x[:, 17] += 40.0
    table = G.massive_dimensions(x, share=0.1)
    assert table.loc[table["massive"], "dim"].tolist() == [17]
    assert table.iloc[0]["dim"] == 17 and table.iloc[0]["mean_share"] > 0.9 and table.iloc[0]["median_ratio"] > 20


def test_anisotropy_table_over_layers(gen):
    acts = torch.stack([_gaussian(300, 16, gen), _gaussian(300, 16, gen) + 10], dim=1)
    t = G.anisotropy(acts, layers=(3, 8), show_progress=False)
    assert set(t["layer"]) == {3, 8} and set(t.columns) >= {"layer", "measure", "value"}
    cos = t[t["measure"] == "mean_pairwise_cosine"].set_index("layer")["value"]
    assert cos[8] > 0.5 > abs(cos[3])


# ------------------------------------------------------------------------------------------ separability
def _planted_classes(gen, n_per=60, k=3, d=32, layers=2, sep=3.0):
    centers = torch.randn(k, d, generator=gen) * sep / math.sqrt(d) * 3
    x = torch.randn(n_per * k, layers, d, generator=gen)
    labels = np.repeat([f"c{i}" for i in range(k)], n_per)
    x += centers.repeat_interleave(n_per, 0)[:, None, :]
    return x, labels


def test_separability_ranks_a_separable_plant_above_random(gen):
    x, labels = _planted_classes(gen)
    random_labels = np.random.default_rng(0).permutation(labels)
    sep = G.separability(x, labels, layers=(5, 6), show_progress=False).groupby("metric")["value"].mean()
    rnd = G.separability(x, random_labels, layers=(5, 6), show_progress=False).groupby("metric")["value"].mean()
    assert sep["probe_accuracy"] > 0.95 and rnd["probe_accuracy"] < 0.55
    assert sep["probe_auroc"] > 0.99 and rnd["probe_auroc"] < 0.65
    for metric in ("silhouette", "fisher_ratio", "calinski_harabasz"):
        assert sep[metric] > rnd[metric]
    assert sep["davies_bouldin"] < rnd["davies_bouldin"]


def test_separability_binary_table_shape_and_errors(gen):
    x, labels = _planted_classes(gen, k=2)
    t = G.separability(x, labels, task="harmful_vs_benign", pca_dims=None, cv_folds=3, show_progress=False)
    assert set(t.columns) == {"task", "layer", "metric", "value", "n_prompts", "n_classes"}
    assert len(t) == 2 * 6 and set(t["task"]) == {"harmful_vs_benign"} and (t["n_classes"] == 2).all()
    lonely = labels.astype(object)
    lonely[0] = "alone"
    with pytest.raises(ValueError, match="alone"):
        G.separability(x, lonely, show_progress=False)
    with pytest.raises(ValueError, match="one label per prompt"):
        G.separability(x, labels[:-1], show_progress=False)
    nan = x.clone()
    nan[4, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        G.separability(nan, labels, show_progress=False)


def test_fisher_ratio_matches_scatter_matrices(gen):
    x, labels = _planted_classes(gen, n_per=20, k=3, d=5, layers=1)
    x = x[:, 0].double()
    mu = x.mean(0)
    sb = torch.zeros(5, 5, dtype=torch.float64)
    sw = torch.zeros(5, 5, dtype=torch.float64)
    for c in np.unique(labels):
        xc = x[torch.from_numpy(labels == c)]
        dc = (xc.mean(0) - mu)[:, None]
        sb += len(xc) * dc @ dc.T
        sw += (xc - xc.mean(0)).T @ (xc - xc.mean(0))
    assert G.fisher_ratio(x, labels) == pytest.approx(float(torch.trace(sb) / torch.trace(sw)), rel=1e-10)


def test_projections_tables(gen):
    x, labels = _planted_classes(gen, n_per=5, k=2, d=8)
    import pandas as pd

    keys = pd.DataFrame({"category": labels, "id": range(len(labels))})
    pca = G.projections(x, keys, layers=(0, 1), method="pca", show_progress=False)
    assert len(pca) == 20 and {"x", "y", "var_x", "var_y", "category", "id", "layer"} <= set(pca.columns)
    assert (pca["var_x"] >= pca["var_y"]).all()
    tsne = G.projections(x, keys, layers=(0, 1), which=[1], method="tsne", show_progress=False)
    assert len(tsne) == 10 and tsne["perplexity"].iloc[0] == pytest.approx(3.0)  # clipped from 10 to (n-1)/3
    again = G.projections(x, keys, layers=(0, 1), which=[1], method="tsne", show_progress=False)
    assert np.array_equal(tsne[["x", "y"]].to_numpy(), again[["x", "y"]].to_numpy())
    with pytest.raises(ValueError, match=r"layers \[7\]"):
        G.projections(x, which=[7], show_progress=False)


# ----------------------------------------------------------------------------------------------- cosines
def test_cosine_matrix_symmetric_unit_diagonal(gen):
    v = torch.randn(5, 30, generator=gen) * torch.tensor([1.0, 10.0, 0.1, 3.0, 7.0])[:, None]
    m = G.cosine_matrix(v)
    assert torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(5))
    manual = torch.nn.functional.cosine_similarity(v[:, None, :], v[None, :, :], dim=-1)
    torch.testing.assert_close(m, manual, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="zero"):
        G.cosine_matrix(torch.zeros(2, 3))
    t = G.cosine_table(m, list("abcde"), layer=3)
    assert len(t) == 25 and (t["layer"] == 3).all() and set(t.columns) >= {"category_a", "category_b", "cosine"}


def test_whitened_cosines_remove_a_shared_high_variance_axis(gen):
    # two directions that agree only along a high-variance axis look similar raw, and nearly orthogonal whitened
    d = 10
    x = _gaussian(5_000, d, gen, torch.diag(torch.tensor([100.0] + [1.0] * (d - 1), dtype=torch.float64)))
    e0, e1, e2 = torch.eye(d)[:3]
    v = torch.stack([10 * e0 + e1, 10 * e0 + e2])
    raw = G.cosine_matrix(v)[0, 1]
    white = G.whitened_cosine_matrix(v, G.fit_whitener(x))[0, 1]
    assert raw > 0.95 and abs(float(white)) < 0.6


def test_model_diff_and_probe_cosines(gen):
    acts = {c: torch.randn(20, 2, 8, generator=gen) + 3 * torch.eye(8)[i] for i, c in enumerate("abc")}
    benign = torch.randn(30, 2, 8, generator=gen)
    a = D.one_vs_benign(acts, benign)
    t = G.model_diff_cosines(a, a)
    assert np.allclose(t["cosine"], 1.0) and len(t) == 6
    neg = D.Directions(vectors=-a.vectors[[2, 0, 1]], categories=("c", "a", "b"), layers=a.layers)
    assert np.allclose(G.model_diff_cosines(a, neg)["cosine"], -1.0, atol=1e-6)
    with pytest.raises(ValueError, match="different categories"):
        G.model_diff_cosines(a, a.select(categories=["a", "b"]))
    with pytest.raises(ValueError, match="d_model differs"):
        G.model_diff_cosines(a, D.Directions(vectors=torch.ones(3, 2, 9), categories=a.categories, layers=a.layers))
    # a probe for harmful-vs-benign along a planted axis points along that axis
    harmful = torch.randn(200, 2, 8, generator=gen) + 2 * torch.eye(8)[5]
    x = torch.cat([harmful, benign.repeat(7, 1, 1)[:200] + 0.1 * torch.randn(200, 2, 8, generator=gen)])
    labels = ["harmful"] * 200 + ["benign"] * 200
    w = G.probe_weights(x, labels, positive="harmful", show_progress=False)
    assert w.shape == (2, 8) and float(w[0, 5] / w[0].norm()) > 0.8
    pc = G.probe_direction_cosines(w, a)
    assert len(pc) == 6 and set(pc.columns) >= {"category", "layer", "cosine"}
    with pytest.raises(ValueError, match="d_model=9 but directions have d_model=8"):
        G.probe_direction_cosines(torch.ones(2, 9), a)
    with pytest.raises(ValueError, match="positive='bad'"):
        G.probe_weights(x, labels, positive="bad", show_progress=False)
