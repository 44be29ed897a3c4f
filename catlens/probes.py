"""Fitting the steering gate and the category router from activations (scikit-learn logistic regression).

    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> harmful, benign = torch.randn(40, 16, generator=g) + 1.0, torch.randn(40, 16, generator=g) - 1.0
    >>> gate = fit_gate(harmful[:30], benign[:30], layer=22, val=(harmful[30:], benign[30:]))
    >>> gate.layer, 0.0 < gate.threshold < 1.0
    (22, True)

The probe follows P1 (PAPERS §2.3 F): ``p = σ(w·(h − μ) + b)`` on the last prompt token's activation, with μ the
training mean; the threshold is chosen on *separate* selection activations (``val``): Youden's J
(``argmax TPR − FPR``, P1's rule) or the lowest threshold whose false-positive rate (over-refusal by the gate) is
at most ``target_fpr``. Without ``val`` the threshold is chosen on the training activations, which flatters it;
a warning says so.

**Centring** (``fit_gate(centring=...)``, :data:`GATE_CENTRINGS`). P1 trains its probe on centred features and
chooses its threshold on centred validation features, but at inference the line that subtracts the training mean is
commented out (PAPERS §2.3 F), so its gate runs as ``σ(w·h + b)``: a bias shift of ``+w·μ`` relative to how it was
fitted. ``"consistent"`` (default) subtracts μ wherever the probe is used; ``"p1_as_run"`` fits and thresholds
exactly as ``"consistent"`` does but returns a gate without the mean (``Gate.mean = None``), i.e. P1's gate as it
ran. PAPERS §2.7 measured that running P1's probe uncentred flips a large share of gate decisions and multiplies
the share of benign prompts it flags.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from catlens.steer import Gate, Router

log = logging.getLogger(__name__)

GATE_CENTRINGS = ("consistent", "p1_as_run")
"""How :func:`fit_gate`'s gate centres its features: ``"consistent"`` (trained, thresholded and run on ``h − μ``;
catlens) or ``"p1_as_run"`` (trained and thresholded on ``h − μ``, run on ``h``; P1's code, PAPERS §2.3 F)."""


def _as_np(name: str, x: Any, d: int | None = None) -> np.ndarray:
    arr = x.detach().float().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [n d_model] matrix, got shape {arr.shape}.")
    if d is not None and arr.shape[1] != d:
        raise ValueError(f"{name} has width {arr.shape[1]}, the others {d}: activations of different models/sites.")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has NaN or inf entries.")
    return arr


def choose_threshold(y: np.ndarray, p: np.ndarray, *, rule: str = "youden", target_fpr: float | None = None
                     ) -> float:
    """A probability threshold from labels ``y`` (1 = harmful) and scores ``p``: ``"youden"`` or
    ``"target_fpr"`` (the lowest threshold with false-positive rate <= ``target_fpr``)."""
    from sklearn.metrics import roc_curve

    if len(set(y.tolist())) != 2:
        raise ValueError("choosing a threshold needs both harmful and benign examples.")
    fpr, tpr, thr = roc_curve(y, p)
    thr = np.clip(thr, 0.0, 1.0)
    if rule == "youden":
        return float(thr[int(np.argmax(tpr - fpr))])
    if rule == "target_fpr":
        if target_fpr is None or not 0.0 <= target_fpr <= 1.0:
            raise ValueError(f"target_fpr={target_fpr!r} must be a rate in [0, 1].")
        ok = np.where(fpr <= target_fpr)[0]
        return float(thr[ok[-1]])
    from catlens.errors import unknown_name_message

    raise ValueError(unknown_name_message("threshold rule", rule, ["target_fpr", "youden"]))


def _by_label(store: Any, what: str, site: str, layer: int) -> tuple[Tensor, Tensor]:
    """``(harmful, benign)`` activations ``[n d_model]`` of an :class:`catlens.cache.ActivationStore` at
    ``(site, layer)``, split by the prompts' ``label``."""
    if site not in store.sites:
        raise ValueError(f"{what} holds sites {list(store.sites)}, not {site!r}; collect {site!r} or pass site=.")
    if layer not in store.layers:
        raise ValueError(f"{what} holds layers {list(store.layers)}, not layer={layer}; collect it (layers=[{layer}])"
                         f" or pass one of those.")
    return store.where(label="harmful").at(site, layer), store.where(label="benign").at(site, layer)


def _is_store(x: Any) -> bool:
    return all(hasattr(x, a) for a in ("where", "at", "sites", "layers"))


def fit_gate(harmful: Any, benign: Tensor | None = None, *, layer: int, site: str = "resid_post",
             val: Any = None, rule: str = "youden", target_fpr: float | None = None,
             C: float = 1.0, name: str = "probe", centring: str = "consistent") -> Gate:
    """Fit the harmful-vs-benign probe on ``harmful``/``benign`` activations ``[n d_model]`` (class-balanced
    logistic regression on centred features) and choose its threshold on ``val = (harmful, benign)``.

    Or give activation stores (:func:`catlens.collect`): ``fit_gate(train_acts, layer=L, val=val_acts)`` reads each
    store at ``(site, layer)`` and splits its prompts by ``label`` (harmful vs benign).

    ``centring`` (:data:`GATE_CENTRINGS`): ``"consistent"`` returns a gate that scores ``σ(w·(h − μ) + b)``, as it
    was fitted; ``"p1_as_run"`` returns the same ``w``, ``b`` and threshold in a gate without ``μ``, which scores
    ``σ(w·h + b)`` (P1's probe as its inference code runs it; see the module docstring).
    """
    from sklearn.linear_model import LogisticRegression

    if centring not in GATE_CENTRINGS:
        from catlens.errors import unknown_name_message

        raise ValueError(unknown_name_message("gate centring", centring, GATE_CENTRINGS,
                                              "'consistent' centres when run (catlens), 'p1_as_run' does not (P1)."))

    if _is_store(harmful):
        if benign is not None:
            raise ValueError("fit_gate(store, ...): the benign side comes from the store's labels; do not pass benign "
                             "as well (or pass two activation tensors instead of a store).")
        harmful, benign = _by_label(harmful, "the training store", site, layer)
    elif benign is None:
        raise ValueError("fit_gate needs benign activations: fit_gate(harmful, benign, layer=...) with two [n d_model] "
                         "tensors, or fit_gate(store, layer=...) with an activation store labelled harmful/benign.")
    if _is_store(val):
        val = _by_label(val, "the val store", site, layer)
    h = _as_np("harmful", harmful)
    b = _as_np("benign", benign, h.shape[1])
    X = np.concatenate([h, b])
    y = np.concatenate([np.ones(len(h)), np.zeros(len(b))])
    mu = X.mean(0)
    clf = LogisticRegression(C=C, max_iter=5000, class_weight="balanced").fit(X - mu, y)
    w, bias = clf.coef_[0].astype(np.float32), float(clf.intercept_[0])
    if val is None:
        log.warning("fit_gate: no selection set given; the threshold is chosen on the training activations and "
                    "will look better than it is.")
        Xs, ys = X, y
    else:
        vh = _as_np("val harmful", val[0], h.shape[1])
        vb = _as_np("val benign", val[1], h.shape[1])
        Xs, ys = np.concatenate([vh, vb]), np.concatenate([np.ones(len(vh)), np.zeros(len(vb))])
    p = 1.0 / (1.0 + np.exp(-((Xs - mu) @ w + bias)))
    threshold = choose_threshold(ys, p, rule=rule, target_fpr=target_fpr)
    mean = torch.from_numpy(mu.astype(np.float32)) if centring == "consistent" else None
    return Gate(weight=torch.from_numpy(w), bias=bias, threshold=threshold, layer=layer, site=site, mean=mean,
                name=name)


def fit_router_probe(acts: Tensor, categories: Sequence[str], *, layer: int, site: str = "resid_post",
                     C: float = 1.0) -> Router:
    """A multi-class category probe (``argmax W h + b``) from activations ``[n d_model]`` and one category per
    row; the router's category order is sorted."""
    from sklearn.linear_model import LogisticRegression

    X = _as_np("acts", acts)
    cats = list(categories)
    if len(cats) != len(X):
        raise ValueError(f"{len(cats)} categories for {len(X)} activation rows; give one per row.")
    classes = sorted(set(cats))
    if len(classes) < 2:
        raise ValueError(f"a category router needs at least two categories, got {classes}.")
    clf = LogisticRegression(C=C, max_iter=5000).fit(X, cats)
    coef, intercept = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # two classes: one decision function f for classes_[1]; scores (-f/2, f/2) argmax alike
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    order = [list(clf.classes_).index(c) for c in classes]
    return Router("probe", tuple(classes), weight=torch.from_numpy(coef[order].astype(np.float32)),
                  bias=torch.from_numpy(intercept[order].astype(np.float32)), layer=layer, site=site)


def gate_scores(gate: Gate, acts: Tensor) -> np.ndarray:
    """The gate's probability for each row of ``acts`` ``[n d_model]``."""
    return gate.score(torch.as_tensor(_as_np("acts", acts, gate.d_model))).numpy()
