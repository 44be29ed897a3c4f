"""Planted structure for P1's pipeline pieces (no model): per-category directions planted in synthetic activations
are recovered by the direction constructors, the gate separates harmful from benign (Youden and target-FPR
thresholds behave), and the probe router routes each harmful prompt to its planted category."""

import numpy as np
import torch

from catlens import directions as D
from catlens.probes import choose_threshold, fit_gate, fit_router_probe, gate_scores

CATS = ("fraud", "hate", "privacy", "self_harm")
D_MODEL, N = 64, 60


BASIS = torch.linalg.qr(torch.randn(D_MODEL, len(CATS) + 1, generator=torch.Generator().manual_seed(99)))[0].T


def _planted(seed: int):
    """The same planted directions every time (orthonormal rows of BASIS); fresh noise per seed."""
    g = torch.Generator().manual_seed(seed)
    shared, cat_dirs = BASIS[0], BASIS[1:]
    benign = torch.randn(N * 2, D_MODEL, generator=g)
    harm = {c: torch.randn(N, D_MODEL, generator=g) + 5.0 * shared + 4.0 * cat_dirs[i] for i, c in enumerate(CATS)}
    return shared, cat_dirs, benign, harm


def test_directions_gate_and_router_recover_planted_structure():
    shared, cat_dirs, benign, harm = _planted(0)
    d = D.one_vs_benign({c: x[:, None] for c, x in harm.items()}, benign[:, None], normalize=True)
    for i, c in enumerate(CATS):
        v = d.vector(c, 0)
        planted = (5.0 * shared + 4.0 * cat_dirs[i]) / (5.0 * shared + 4.0 * cat_dirs[i]).norm()
        assert float(v @ planted) > 0.95
    # one-vs-rest removes the shared part: v_c = 4 c_i - (4/3) sum_{j != i} c_j, so cos(v_c, c_i) = 4 / sqrt(16 +
    # 3 * 16/9) = 0.866 and cos(v_c, c_j) = -0.289; the shared direction cancels
    r = D.one_vs_rest({c: x[:, None] for c, x in harm.items()}, normalize=True)
    for i, c in enumerate(CATS):
        cos = cat_dirs @ r.vector(c, 0)
        assert abs(float(cos[i]) - 0.866) < 0.06
        assert all(abs(float(cos[j]) + 0.289) < 0.06 for j in range(len(CATS)) if j != i)
        assert abs(float(r.vector(c, 0) @ shared)) < 0.1
    # the gate: fitted on one half, threshold on the other, tested on fresh draws
    _, _, benign2, harm2 = _planted(1)
    h_all = torch.cat(list(harm.values()))
    h_val = torch.cat(list(harm2.values()))
    gate = fit_gate(h_all, benign, layer=0, val=(h_val, benign2))
    _, _, benign3, harm3 = _planted(2)
    s_h, s_b = gate_scores(gate, torch.cat(list(harm3.values()))), gate_scores(gate, benign3)
    assert (s_h >= gate.threshold).mean() > 0.95 and (s_b >= gate.threshold).mean() < 0.05
    y = np.r_[np.ones(len(s_h)), np.zeros(len(s_b))]
    strict = choose_threshold(y, np.r_[s_h, s_b], rule="target_fpr", target_fpr=0.0)
    assert (s_b >= strict).mean() == 0.0  # a zero-FPR threshold flags no benign row
    # the router: a probe on harmful activations routes fresh prompts to their planted category
    router = fit_router_probe(h_all, [c for c in CATS for _ in range(N)], layer=0)
    for i, c in enumerate(CATS):
        picked = (harm3[c] @ router.weight.T + router.bias).argmax(1)
        assert (picked == router.categories.index(c)).float().mean() >= 0.9  # chance: 0.25
