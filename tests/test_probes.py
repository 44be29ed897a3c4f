"""Gate and router fitting recover planted structure; thresholds follow their rules."""

import numpy as np
import pytest
import torch

from catlens.probes import choose_threshold, fit_gate, fit_router_probe, gate_scores


def _planted(n=200, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    direction = torch.zeros(d)
    direction[3] = 1.0
    harmful = torch.randn(n, d, generator=g) + 2.5 * direction
    benign = torch.randn(n, d, generator=g) - 2.5 * direction
    return harmful, benign, direction


def test_fit_gate_recovers_a_planted_direction_and_separates_held_out_rows():
    h, b, direction = _planted()
    vh, vb, _ = _planted(seed=1)
    gate = fit_gate(h, b, layer=2, val=(vh, vb))
    cos = float(gate.weight @ direction / gate.weight.norm())
    assert cos > 0.9
    th, tb, _ = _planted(seed=2)
    acc = ((gate_scores(gate, th) >= gate.threshold).mean() + (gate_scores(gate, tb) < gate.threshold).mean()) / 2
    assert acc > 0.95
    strict = fit_gate(h, b, layer=2, val=(vh, vb), rule="target_fpr", target_fpr=0.0)
    assert (gate_scores(strict, vb) >= strict.threshold).mean() == 0.0


def test_choose_threshold_rules():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.4, 0.7, 0.9])
    assert choose_threshold(y, p) == pytest.approx(0.4)  # J = 1 - 1/3 at 0.4 (tpr 1, fpr 1/3) vs 0.7 (2/3, 0)
    assert choose_threshold(y, p, rule="target_fpr", target_fpr=0.0) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="Did you mean: youden"):
        choose_threshold(y, p, rule="yuden")
    with pytest.raises(ValueError, match="both"):
        choose_threshold(np.ones(3), np.ones(3))


def test_fit_router_probe_recovers_planted_categories():
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:3] * 4
    cats = ["a", "b", "c"] * 50
    X = torch.stack([centers["abc".index(c)] + torch.randn(8, generator=g) for c in cats])
    router = fit_router_probe(X, cats, layer=1)
    pred = [router.categories[int(i)] for i in (X @ router.weight.T + router.bias).argmax(1)]
    assert np.mean([p == c for p, c in zip(pred, cats)]) > 0.95
    with pytest.raises(ValueError, match="one per row"):
        fit_router_probe(X, cats[:-1], layer=1)
    with pytest.raises(ValueError, match="width"):
        fit_gate(X, torch.randn(5, 9), layer=1)


def test_router_probe_with_two_categories_routes_like_the_classifier():
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from catlens.probes import fit_router_probe

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 6, generator=g)
    X[:20, 0] += 3.0
    cats = ["b"] * 20 + ["a"] * 20
    router = fit_router_probe(X, cats, layer=0)
    assert router.weight.shape == (2, 6) and router.categories == ("a", "b")
    picked = [router.categories[i] for i in (X @ router.weight.T + router.bias).argmax(1).tolist()]
    expected = LogisticRegression(C=1.0, max_iter=5000).fit(X.numpy(), cats).predict(X.numpy())
    assert picked == list(np.asarray(expected))


def test_fit_gate_centring_p1_as_run_flips_exactly_the_rows_the_bias_shift_predicts():
    """P1 trains centred but runs uncentred (PAPERS §2.3 F): the run logit is the fitted one plus w·μ."""
    shift = torch.zeros(16)
    shift[3], shift[5] = 1.5, 4.0  # a training mean far from 0, partly along the probe's direction
    (h, b, _), (vh, vb, _), (th, tb, _) = (_planted(seed=s) for s in (0, 1, 2))
    h, b, vh, vb, th, tb = (x + shift for x in (h, b, vh, vb, th, tb))
    ours = fit_gate(h, b, layer=2, val=(vh, vb))
    p1 = fit_gate(h, b, layer=2, val=(vh, vb), centring="p1_as_run")
    # trained and thresholded identically; only the mean is dropped
    assert p1.mean is None and torch.equal(p1.weight, ours.weight)
    assert (p1.bias, p1.threshold) == (ours.bias, ours.threshold)
    mu = torch.cat([h, b]).double().mean(0)
    torch.testing.assert_close(ours.mean.double(), mu, rtol=0, atol=1e-5)
    X = torch.cat([th, tb]).double()
    w, bias = ours.weight.double(), float(ours.bias)
    centred_logit, raw_logit = (X - mu) @ w + bias, X @ w + bias
    # default = centred scoring; p1_as_run = w·x + b without the mean
    np.testing.assert_allclose(gate_scores(ours, X), torch.sigmoid(centred_logit).numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(gate_scores(p1, X), torch.sigmoid(raw_logit).numpy(), rtol=0, atol=1e-5)
    # the decisions differ exactly where the logit crosses logit(threshold) after the shift by w·μ
    cut = float(np.log(ours.threshold / (1 - ours.threshold)))
    wmu = float(w @ mu)
    assert wmu > 1.0  # the planted mean shifts the logit noticeably
    predicted = ((centred_logit < cut) & (centred_logit + wmu >= cut)).numpy()
    flipped = (gate_scores(ours, X) >= ours.threshold) != (gate_scores(p1, X) >= p1.threshold)
    assert predicted.sum() > 0 and np.array_equal(flipped, predicted)
    # w·μ > 0 here, so every flip is toward "harmful": more benign rows are flagged
    assert (gate_scores(p1, tb) >= p1.threshold).mean() > (gate_scores(ours, tb) >= ours.threshold).mean()
    with pytest.raises(ValueError, match="Did you mean: p1_as_run"):
        fit_gate(h, b, layer=2, centring="p1_as_ran")
