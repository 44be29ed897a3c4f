"""Geometry of activations and category directions, per layer: separability, projections, cosines, anisotropy,
whitening and P1's orthonormal steering basis.

Pure functions: tensors / labels in, tensors or tidy ``pandas.DataFrame`` out (one row per observation, keys as
columns). No model, no file. scikit-learn and pandas are imported inside the functions that need them.

Shapes: ``prompt layer d_model`` for activations over layers, ``prompt d_model`` at one layer, ``category d_model``
for the directions at one layer. ``rank`` names the whitened-coordinate axis (``d_model`` long for ZCA whitening
and for unrestricted PCA whitening, the kept rank for PCA whitening restricted to the data span).

Definitions used here (P1 uses "anisotropy" without defining it; PAPERS.md §5 item 9):

* **mean pairwise cosine** ``mean_{i != j} cos(x_i, x_j)`` of the raw (uncentred) activations, computed exactly
  as ``(||sum_i u_i||^2 - n) / (n (n - 1))`` with ``u_i = x_i / ||x_i||``. Null value (isotropic, zero mean): 0.
* **top-k variance share** ``sum_{i<=k} lambda_i / sum_i lambda_i`` with ``lambda`` the eigenvalues of the biased
  (1/N) covariance. Null: about k / d (larger when n is not much bigger than d).
* **effective rank** ``exp(H(p))``, ``p = lambda / sum(lambda)``, H the Shannon entropy (Roy & Vetterli 2007).
  Null: about d when n >> d (at most min(n - 1, d)).
* **numerical rank** of the centred data, as ``numpy.linalg.matrix_rank`` decides it: singular values above
  ``sigma_max * max(n, d) * eps(float64)``.
* **condition number** ``(lambda_max + ridge) / (lambda_r + ridge)`` with ``lambda_r`` the smallest eigenvalue
  inside the numerical rank, i.e. the condition number of the covariance restricted to the data span (the exact
  zeros of a rank-deficient estimate would make it infinite), plus an optional ridge (pass the whitening eps to
  see the conditioning the whitener works with). Null: near 1; for an isotropic Gaussian it follows the
  Marchenko-Pastur edges, ``((1 + sqrt(d/n)) / (1 - sqrt(d/n)))^2``.
* **mean-norm ratio** ``||mean_i x_i|| / mean_i ||x_i||``: 0 for zero-mean data, 1 when all activations are equal.
  A large common offset is the simplest form of anisotropy.
* **massive dimensions** (:func:`massive_dimensions`): a dimension j is *massive* when its mean share of the
  squared norm, ``mean_i x_ij^2 / ||x_i||^2``, is at least ``share`` (default 0.1; a perfectly spread vector
  gives each dimension 1/d, e.g. 0.0017 at d = 576).
* **Fisher ratio** (:func:`fisher_ratio`) ``tr(S_B) / tr(S_W)`` with ``S_B = sum_k n_k (mu_k - mu)(mu_k - mu)^T``
  and ``S_W = sum_k sum_{i in k} (x_i - mu_k)(x_i - mu_k)^T``: between-class over within-class sum of squares
  (Calinski-Harabasz is this times ``(n - K) / (K - 1)``).
"""

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from catlens.directions import Directions

log = logging.getLogger(__name__)

__all__ = [
    "separability",
    "fisher_ratio",
    "project_2d",
    "projections",
    "cosine_matrix",
    "cosine_table",
    "whitened_cosine_matrix",
    "model_diff_cosines",
    "probe_weights",
    "probe_direction_cosines",
    "covariance_spectrum",
    "numerical_rank",
    "effective_rank",
    "anisotropy_measures",
    "anisotropy",
    "massive_dimensions",
    "Whitener",
    "fit_whitener",
    "SteeringBasis",
    "orthonormal_basis",
]

_EPS64 = float(np.finfo(np.float64).eps)


# ------------------------------------------------------------------------------------------------ helpers
def _labels(labels: Any, n: int, what: str = "labels") -> np.ndarray:
    arr = np.asarray(list(labels) if not isinstance(labels, np.ndarray) else labels).astype(str)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{what}: expected one label per prompt ({n}), got {len(arr)}.")
    return arr


def _check_x(x: Tensor, what: str, *, min_n: int = 1) -> None:
    if x.shape[0] < min_n:
        raise ValueError(f"{what}: {x.shape[0]} prompt(s) given, at least {min_n} needed.")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{what}: contains NaN or inf (first at index {tuple(bad)}). Recompute or drop those prompts.")


def _layers(layers: Sequence[int] | None, n: int) -> list[int]:
    if layers is None:
        return list(range(n))
    out = [int(layer) for layer in layers]
    if not out:
        raise ValueError(f"layers=[] is empty: give one label per layer on axis 1 of the activations ({n} layers), "
                         f"or layers=None for 0..{n - 1}.")
    if len(out) != n:
        raise ValueError(f"layers has {len(out)} labels but the activations have {n} layers on axis 1.")
    return out


def _class_counts(y: np.ndarray, min_count: int, what: str) -> dict[str, int]:
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"{what}: needs at least 2 classes, got {classes.tolist()}.")
    small = {str(c): int(k) for c, k in zip(classes, counts) if k < min_count}
    if small:
        raise ValueError(f"{what}: every class needs at least {min_count} prompts; too few in {small}. Add prompts "
                         f"or drop those classes.")
    return {str(c): int(k) for c, k in zip(classes, counts)}


# --------------------------------------------------------------------------------------------- separability
def fisher_ratio(x: Float[Tensor, "prompt d_model"], labels: Sequence[str] | np.ndarray) -> float:
    """``tr(S_B) / tr(S_W)`` (between- over within-class sum of squares; module docstring). Float64 inside."""
    y = _labels(labels, x.shape[0])
    _class_counts(y, 2, "fisher_ratio")
    x64 = x.to(torch.float64)
    mu = x64.mean(0)
    between = within = 0.0
    for c in np.unique(y):
        xc = x64[torch.from_numpy(y == c)]
        mu_c = xc.mean(0)
        between += len(xc) * float(((mu_c - mu) ** 2).sum())
        within += float(((xc - mu_c) ** 2).sum())
    return between / within if within > 0 else math.inf


def separability(
    acts: Float[Tensor, "prompt layer d_model"],
    labels: Sequence[str] | np.ndarray,
    *,
    layers: Sequence[int] | None = None,
    task: str = "category",
    cv_folds: int = 5,
    pca_dims: int | None = 32,
    C: float = 1.0,
    max_iter: int = 200,
    random_state: int = 0,
    show_progress: bool = True,
) -> Any:
    """Linear and cluster separability of ``labels`` at every layer, as a tidy DataFrame.

    Columns: ``task, layer, metric, value, n_prompts, n_classes``. Metrics:

    * ``probe_accuracy``, ``probe_auroc``: a logistic probe (``LogisticRegression(C, max_iter)``, lbfgs,
      multinomial for more than two classes) cross-validated with ``StratifiedKFold(cv_folds, shuffle=True,
      random_state)``; accuracy and AUROC on the pooled out-of-fold predicted probabilities. Two classes: binary
      AUROC of the second class name (sorted) against the first; more: macro one-vs-rest AUROC.
      Features: standardised activations (per-dimension z-scores), then -- for speed, ``pca_dims`` not None --
      their top ``pca_dims`` principal components (sklearn PCA, randomized solver seeded with ``random_state``
      when ``pca_dims`` is small). Scaler and PCA are fitted once per layer on all prompts: they
      never see the labels, so the cross-validation stays honest about the labels (the only sharing across folds
      is the unsupervised feature map). ``pca_dims=None`` gives the full-dimension probe (slower, and with
      n < d it separates almost anything in the training folds; the out-of-fold numbers remain valid).
    * ``silhouette``, ``davies_bouldin``, ``calinski_harabasz``: sklearn defaults (Euclidean) on the raw,
      full-dimension activations, as P1 computes them (PAPERS.md §2.3 D).
    * ``fisher_ratio``: see :func:`fisher_ratio`.

    Every class needs at least 2 prompts; ``cv_folds`` is lowered to the smallest class size when needed.
    Threads are the process's (set once by the entry point, :func:`catlens.runs.configure_process`; one thread is
    fastest for these small problems on a busy machine).
    """
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, roc_auc_score, silhouette_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.preprocessing import StandardScaler

    import pandas as pd

    n, n_layers, d = acts.shape
    _check_x(acts, "acts")
    y = _labels(labels, n)
    counts = _class_counts(y, 2, f"separability(task={task!r})")
    classes = sorted(counts)
    if cv_folds < 2:
        raise ValueError(f"cv_folds={cv_folds} must be >= 2.")
    folds = min(cv_folds, min(counts.values()))
    if folds < cv_folds:
        log.info("separability(%s): cv_folds lowered from %d to %d (smallest class has %d prompts)", task,
                 cv_folds, folds, min(counts.values()))
    k = None if pca_dims is None else min(pca_dims, d, n - 1)
    y_idx = np.searchsorted(classes, y)
    rows = []
    for j, layer in enumerate(tqdm(_layers(layers, n_layers), desc=f"separability[{task}]",
                                   disable=not show_progress)):
        x = acts[:, j].to(torch.float64)
        xn = x.numpy()
        feats = StandardScaler().fit_transform(xn)
        if k is not None:
            feats = PCA(n_components=k, svd_solver="randomized" if k < min(n, d) // 2 else "full",
                        random_state=random_state).fit_transform(feats)
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=random_state)
        proba = cross_val_predict(LogisticRegression(C=C, max_iter=max_iter), feats, y_idx, cv=cv,
                                  method="predict_proba")
        acc = float((proba.argmax(1) == y_idx).mean())
        if len(classes) == 2:
            auroc = float(roc_auc_score(y_idx, proba[:, 1]))
        else:
            auroc = float(roc_auc_score(y_idx, proba, multi_class="ovr", average="macro"))
        values = {
            "probe_accuracy": acc,
            "probe_auroc": auroc,
            "silhouette": float(silhouette_score(xn, y)),
            "davies_bouldin": float(davies_bouldin_score(xn, y)),
            "calinski_harabasz": float(calinski_harabasz_score(xn, y)),
            "fisher_ratio": fisher_ratio(x, y),
        }
        rows += [{"task": task, "layer": layer, "metric": m, "value": v, "n_prompts": n,
                  "n_classes": len(classes)} for m, v in values.items()]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- projections
def project_2d(
    x: Float[Tensor, "prompt d_model"],
    *,
    method: Literal["pca", "tsne"] = "pca",
    perplexity: float = 10.0,
    random_state: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Two-dimensional PCA or t-SNE coordinates ``[prompt, 2]`` and facts about the fit.

    P1 settings (PAPERS.md §2.3 D): ``PCA(n_components=2, random_state=0)``; ``TSNE(n_components=2,
    perplexity=10, random_state=0)`` (perplexity 4 for the handful of direction vectors). t-SNE needs
    ``perplexity < n``; it is clipped to ``max(1, (n - 1) / 3)`` when larger (the usual "below n/3" rule), and the
    value used is returned in the info dict. PCA's info holds the explained variance ratio of both axes.
    """
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    _check_x(x, "x", min_n=2)
    xn = x.to(torch.float64).numpy()
    if method == "pca":
        pca = PCA(n_components=2, random_state=random_state)
        return pca.fit_transform(xn), {"explained_variance_ratio": pca.explained_variance_ratio_.tolist()}
    if method == "tsne":
        n = len(xn)
        p = float(min(perplexity, max(1.0, (n - 1) / 3)))
        if p != perplexity:
            log.info("t-SNE perplexity clipped from %s to %s for n=%d points", perplexity, p, n)
        tsne = TSNE(n_components=2, perplexity=p, random_state=random_state, init="pca", learning_rate="auto")
        return tsne.fit_transform(xn), {"perplexity": p}
    raise ValueError(f"method={method!r} is not allowed; use 'pca' or 'tsne'.")


def projections(
    acts: Float[Tensor, "prompt layer d_model"],
    keys: Any = None,
    *,
    layers: Sequence[int] | None = None,
    which: Sequence[int] | None = None,
    method: Literal["pca", "tsne"] = "pca",
    perplexity: float = 10.0,
    random_state: int = 0,
    show_progress: bool = True,
) -> Any:
    """2-D projections at the layers ``which`` (labels; default all) as one tidy table.

    Columns: ``method, layer, x, y`` plus ``var_x, var_y`` (PCA explained variance ratio) or ``perplexity``
    (t-SNE), plus every column of ``keys`` (a DataFrame with one row per prompt, e.g. id, category, label).
    """
    import pandas as pd

    n, n_layers, _ = acts.shape
    labels = _layers(layers, n_layers)
    if keys is not None and len(keys) != n:
        raise ValueError(f"keys has {len(keys)} rows but there are {n} prompts.")
    wanted = labels if which is None else list(which)
    if not wanted:
        raise ValueError(f"which={wanted} selects no layer; pass which=None for all, or some of the activation "
                         f"layers {labels}.")
    missing = [w for w in wanted if w not in labels]
    if missing:
        raise ValueError(f"layers {missing} are not among the activation layers {labels}.")
    frames = []
    for layer in tqdm(wanted, desc=f"projection[{method}]", disable=not show_progress):
        xy, info = project_2d(acts[:, labels.index(layer)], method=method, perplexity=perplexity,
                              random_state=random_state)
        df = pd.DataFrame({"method": method, "layer": layer, "x": xy[:, 0], "y": xy[:, 1]})
        if method == "pca":
            df["var_x"], df["var_y"] = info["explained_variance_ratio"]
        else:
            df["perplexity"] = info["perplexity"]
        if keys is not None:
            df = pd.concat([df, keys.reset_index(drop=True)], axis=1)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------------------------------- cosines
def cosine_matrix(v: Float[Tensor, "category d_model"]) -> Float[Tensor, "category category"]:
    """``M[i, j] = cos(v_i, v_j)``: exactly symmetric, unit diagonal, float32 (float64 inside).

    A zero row has no direction and is an error.
    """
    _check_x(v, "directions")
    v64 = v.to(torch.float64)
    norms = v64.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError(f"direction rows {(norms.squeeze(-1) == 0).nonzero().flatten().tolist()} are zero; a cosine "
                         f"with a zero vector is undefined.")
    u = v64 / norms
    m = u @ u.T
    m = ((m + m.T) / 2).clamp(-1.0, 1.0)
    m.fill_diagonal_(1.0)
    return m.to(torch.float32)


def cosine_table(m: Float[Tensor, "category category"], categories: Sequence[str], **keys: Any) -> Any:
    """Long table of a cosine matrix: ``category_a, category_b, cosine`` plus constant ``keys`` columns."""
    import pandas as pd

    if len(categories) != m.shape[0] or m.shape[0] != m.shape[1]:
        raise ValueError(f"matrix of shape {tuple(m.shape)} does not match {len(categories)} categories.")
    rows = [{**keys, "category_a": a, "category_b": b, "cosine": float(m[i, j])}
            for i, a in enumerate(categories) for j, b in enumerate(categories)]
    return pd.DataFrame(rows)


def whitened_cosine_matrix(v: Float[Tensor, "category d_model"],
                           whitener: "Whitener") -> Float[Tensor, "category category"]:
    """``cos(W v_i, W v_j)``: the cosine geometry after whitening (PAPERS.md §5 item 9)."""
    return cosine_matrix(whitener.map_directions(v))


def model_diff_cosines(dirs_a: Directions, dirs_b: Directions) -> Any:
    """P1's model diffing (PAPERS.md §2.3 E): ``cos(v_c^A, v_c^B)`` per category and layer.

    Both must have the same categories (any order) and d_model; only layers present in both are compared.
    Columns: ``category, layer, cosine, method_a, method_b, site``.
    """
    import pandas as pd

    if set(dirs_a.categories) != set(dirs_b.categories):
        raise ValueError(f"the two Directions have different categories: {sorted(dirs_a.categories)} vs "
                         f"{sorted(dirs_b.categories)}; compute both with the same prompts.")
    if dirs_a.d_model != dirs_b.d_model:
        raise ValueError(f"d_model differs ({dirs_a.d_model} vs {dirs_b.d_model}): directions of models with different "
                         f"widths cannot be compared by cosine.")
    if dirs_a.site != dirs_b.site:
        log.warning("model_diff_cosines: comparing site %r with site %r", dirs_a.site, dirs_b.site)
    layers = [layer for layer in dirs_a.layers if layer in dirs_b.layers]
    if not layers:
        raise ValueError(f"no layer in common: {dirs_a.layers} vs {dirs_b.layers}.")
    rows = []
    for layer in layers:
        a = dirs_a.at(layer).to(torch.float64)
        b = dirs_b.select(categories=dirs_a.categories).at(layer).to(torch.float64)
        cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))
        rows += [{"category": c, "layer": layer, "cosine": float(cos[i]), "method_a": dirs_a.method,
                  "method_b": dirs_b.method, "site": dirs_a.site} for i, c in enumerate(dirs_a.categories)]
    return pd.DataFrame(rows)


def probe_weights(
    acts: Float[Tensor, "prompt layer d_model"],
    labels: Sequence[str] | np.ndarray,
    *,
    positive: str,
    C: float = 1.0,
    max_iter: int = 500,
    show_progress: bool = True,
) -> Float[Tensor, "layer d_model"]:
    """Weight vector of a logistic probe ``positive`` vs the rest at every layer, in raw residual coordinates.

    The probe is fitted on standardised features (``z = (x - mu) / sigma``) for conditioning; its weight is
    mapped back to raw coordinates, ``w_raw = w_std / sigma``, since ``w_std . z = w_raw . (x - mu)``. Use with
    :func:`probe_direction_cosines` (P1's ``cos(v_c, w / ||w||)``, PAPERS.md §2.3 E).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    n, n_layers, d = acts.shape
    _check_x(acts, "acts")
    y = _labels(labels, n)
    if positive not in set(y):
        raise ValueError(f"positive={positive!r} is not among the labels {sorted(set(y))}.")
    yb = (y == positive).astype(int)
    _class_counts(yb.astype(str), 2, "probe_weights")
    out = torch.empty(n_layers, d, dtype=torch.float64)
    for j in tqdm(range(n_layers), desc="probe weights", disable=not show_progress):
        scaler = StandardScaler().fit(acts[:, j].to(torch.float64).numpy())
        z = scaler.transform(acts[:, j].to(torch.float64).numpy())
        w = LogisticRegression(C=C, max_iter=max_iter).fit(z, yb).coef_[0]
        out[j] = torch.from_numpy(w / scaler.scale_)
    return out.to(torch.float32)


def probe_direction_cosines(
    weights: Float[Tensor, "layer d_model"],
    directions: Directions,
    *,
    weight_layers: Sequence[int] | None = None,
) -> Any:
    """``cos(v_c, w)`` for every category and every layer present in both (rows of ``weights`` are labelled by
    ``weight_layers``, default ``directions.layers``). Columns: ``category, layer, cosine, method``."""
    import pandas as pd

    wl = list(directions.layers) if weight_layers is None else [int(x) for x in weight_layers]
    if len(wl) != weights.shape[0]:
        raise ValueError(f"weights has {weights.shape[0]} rows but {len(wl)} weight_layers labels.")
    if weights.shape[1] != directions.d_model:
        raise ValueError(f"weights have d_model={weights.shape[1]} but directions have d_model={directions.d_model}.")
    rows = []
    for layer in directions.layers:
        if layer not in wl:
            continue
        w = weights[wl.index(layer)].to(torch.float64)
        v = directions.at(layer).to(torch.float64)
        cos = (v @ w) / (v.norm(dim=-1) * w.norm())
        rows += [{"category": c, "layer": layer, "cosine": float(cos[i]), "method": directions.method}
                 for i, c in enumerate(directions.categories)]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ anisotropy
def _centred_svdvals(x: Tensor) -> Tensor:
    x64 = x.to(torch.float64)
    return torch.linalg.svdvals(x64 - x64.mean(0))


def covariance_spectrum(x: Float[Tensor, "prompt d_model"]) -> Float[Tensor, "rank"]:
    """Eigenvalues of the biased (1/N) covariance, descending, float64; ``min(n, d)`` of them (the rest are 0)."""
    _check_x(x, "x", min_n=2)
    return _centred_svdvals(x) ** 2 / x.shape[0]


def numerical_rank(x: Float[Tensor, "prompt d_model"]) -> int:
    """Rank of the centred data as ``numpy.linalg.matrix_rank`` decides it (sigma > sigma_max max(n, d) eps)."""
    _check_x(x, "x", min_n=2)
    s = _centred_svdvals(x)
    return int((s > s.max() * max(x.shape) * _EPS64).sum()) if float(s.max()) > 0 else 0


def effective_rank(eigenvalues: Float[Tensor, "rank"]) -> float:
    """``exp(H(p))`` with ``p = lambda / sum(lambda)`` (zero eigenvalues contribute nothing)."""
    lam = eigenvalues.to(torch.float64).clamp_min(0)
    total = float(lam.sum())
    if total <= 0:
        return 0.0
    p = lam[lam > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def anisotropy_measures(
    x: Float[Tensor, "prompt d_model"],
    *,
    top_k: Sequence[int] = (1, 10),
    ridge: float = 0.0,
) -> dict[str, float]:
    """All anisotropy measures of the module docstring for one layer's activations, as a dict."""
    _check_x(x, "x", min_n=2)
    n, d = x.shape
    x64 = x.to(torch.float64)
    norms = x64.norm(dim=-1)
    if bool((norms == 0).any()):
        raise ValueError("some activation vectors are exactly zero; cosines with them are undefined.")
    u = x64 / norms[:, None]
    mean_cos = (float((u.sum(0) ** 2).sum()) - n) / (n * (n - 1))
    s = _centred_svdvals(x64)
    lam = s ** 2 / n
    total = float(lam.sum())
    rank = int((s > s.max() * max(n, d) * _EPS64).sum()) if float(s.max()) > 0 else 0
    out = {"mean_pairwise_cosine": mean_cos}
    for k in top_k:
        out[f"top{k}_variance_share"] = float(lam[:k].sum()) / total if total > 0 else math.nan
    out["effective_rank"] = effective_rank(lam)
    out["numerical_rank"] = float(rank)
    out["condition_number"] = (float(lam[0]) + ridge) / (float(lam[rank - 1]) + ridge) if rank > 0 else math.nan
    out["mean_norm_ratio"] = float(x64.mean(0).norm()) / float(norms.mean())
    share = (x64 ** 2 / (norms ** 2)[:, None]).mean(0)
    out["max_dim_share"] = float(share.max())
    return out


def anisotropy(
    acts: Float[Tensor, "prompt layer d_model"],
    *,
    layers: Sequence[int] | None = None,
    top_k: Sequence[int] = (1, 10),
    ridge: float = 0.0,
    show_progress: bool = True,
) -> Any:
    """:func:`anisotropy_measures` at every layer. Tidy columns: ``layer, measure, value, n_prompts, d_model``."""
    import pandas as pd

    n, n_layers, d = acts.shape
    rows = []
    for j, layer in enumerate(tqdm(_layers(layers, n_layers), desc="anisotropy", disable=not show_progress)):
        for m, v in anisotropy_measures(acts[:, j], top_k=top_k, ridge=ridge).items():
            rows.append({"layer": layer, "measure": m, "value": v, "n_prompts": n, "d_model": d})
    return pd.DataFrame(rows)


def massive_dimensions(
    x: Float[Tensor, "prompt d_model"],
    *,
    share: float = 0.1,
    top: int = 5,
) -> Any:
    """Dimensions that carry a large share of the activation norm (module docstring).

    For each dimension j: ``mean_share = mean_i x_ij^2 / ||x_i||^2``, ``max_share`` (over prompts),
    ``mean_abs = mean_i |x_ij|`` and ``median_ratio = median_i |x_ij| / median_i median_k |x_ik|`` (how many times
    larger than a typical entry; Sun et al. 2024 call dimensions ~1000x the median "massive activations").
    ``massive = mean_share >= share``. Returns the ``top`` dimensions by ``mean_share`` plus any further flagged
    ones, sorted by ``mean_share`` descending.
    """
    import pandas as pd

    if not 0 < share <= 1:
        raise ValueError(f"share={share} must be in (0, 1] (the share of the squared norm one dimension carries).")
    _check_x(x, "x")
    x64 = x.to(torch.float64)
    sq = x64 ** 2
    tot = sq.sum(-1, keepdim=True)
    if bool((tot == 0).any()):
        raise ValueError("some activation vectors are exactly zero; their norm shares are undefined.")
    shares = sq / tot
    mean_share = shares.mean(0)
    absx = x64.abs()
    typical = float(absx.median(dim=-1).values.median())
    order = torch.argsort(mean_share, descending=True)
    n_flagged = int((mean_share >= share).sum())
    keep = order[: max(top, n_flagged)]
    return pd.DataFrame({
        "dim": keep.numpy(),
        "mean_share": mean_share[keep].numpy(),
        "max_share": shares.max(0).values[keep].numpy(),
        "mean_abs": absx.mean(0)[keep].numpy(),
        "median_ratio": (absx.median(0).values[keep] / typical).numpy() if typical > 0 else np.inf,
        "massive": (mean_share[keep] >= share).numpy(),
    })


# ------------------------------------------------------------------------------------------------- whitening
@dataclass(frozen=True, eq=False)
class Whitener:
    """An affine whitening map fitted on (benign) activations: ``z = W (x - mean)``.

    Stored in float64 (the inverse of an ill-conditioned map loses digits in float32); outputs of the methods
    come back in the input's dtype. Build with :func:`fit_whitener`; ``dtype="float32"`` there computes ``W`` and
    ``W_inv`` in float32 (P1's arithmetic) and stores the float32 result.
    """

    mean: Float[Tensor, "d_model"]
    """Mean of the fitting data."""
    W: Float[Tensor, "rank d_model"]
    """Whitening matrix (rows = whitened coordinates). ZCA: symmetric ``d_model x d_model``."""
    W_inv: Float[Tensor, "d_model rank"]
    """Inverse on the kept subspace: the exact inverse when unrestricted, the pseudo-inverse when restricted."""
    span: Float[Tensor, "_rank d_model"]
    """Orthonormal basis (rows) of the data span: eigenvectors of the covariance inside its numerical rank."""
    eigenvalues: Float[Tensor, "d_model"]
    """Eigenvalues of the (shrunk, not ridged) covariance, descending."""
    method: str
    """``"zca"`` or ``"pca"``."""
    eps: float
    """Ridge added to every eigenvalue before the inverse square root."""
    shrinkage: float
    """Ledoit-Wolf style shrinkage intensity used (0 = none)."""
    rank: int
    """Numerical rank of the sample covariance of the fitting data (see :func:`numerical_rank`)."""
    n_samples: int
    restrict_to_span: bool
    dtype: str = "float64"
    """Precision ``W`` and ``W_inv`` were computed in (:data:`WHITEN_DTYPES`); the span, eigenvalues and rank are
    float64 facts about the data either way."""

    @property
    def d_model(self) -> int:
        return int(self.W.shape[1])

    @property
    def n_components(self) -> int:
        """Number of whitened coordinates (``W.shape[0]``)."""
        return int(self.W.shape[0])

    @property
    def rank_deficient(self) -> bool:
        """True when the sample covariance is singular (``rank < d_model``, always so when n <= d)."""
        return self.rank < self.d_model

    def whiten(self, x: Float[Tensor, "prompt d_model"]) -> Float[Tensor, "prompt rank"]:
        """``z = W (x - mean)`` row-wise."""
        return ((x.to(torch.float64) - self.mean) @ self.W.T).to(x.dtype)

    def unwhiten(self, z: Float[Tensor, "prompt rank"]) -> Float[Tensor, "prompt d_model"]:
        """``x = W_inv z + mean``; inverts :meth:`whiten` exactly on ``mean + span`` (everywhere if unrestricted)."""
        return (z.to(torch.float64) @ self.W_inv.T + self.mean).to(z.dtype)

    def map_directions(self, v: Float[Tensor, "category d_model"]) -> Float[Tensor, "category rank"]:
        """Directions into whitened coordinates, ``W v`` (no mean: a direction is a difference of points)."""
        return (v.to(torch.float64) @ self.W.T).to(v.dtype)

    def unmap_directions(self, u: Float[Tensor, "category rank"]) -> Float[Tensor, "category d_model"]:
        """Whitened directions back into the residual stream, ``W_inv u``."""
        return (u.to(torch.float64) @ self.W_inv.T).to(u.dtype)

    def off_span_share(self, v: Float[Tensor, "category d_model"]) -> Float[Tensor, "category"]:
        """Share of ``||W v||^2`` that comes from the part of ``v`` outside the data span.

        Near 1 means the whitened direction is set by the ridge ``eps`` rather than by the data (P1's situation
        with N=379 < d=4096, PAPERS.md §2.3 I). Always 0 when restricted to the span.
        """
        v64 = v.to(torch.float64)
        v_in = (v64 @ self.span.T) @ self.span
        total = (v64 @ self.W.T).norm(dim=-1) ** 2
        off = ((v64 - v_in) @ self.W.T).norm(dim=-1) ** 2
        return (off / total).to(v.dtype)


WHITEN_DTYPES = ("float64", "float32")
"""Arithmetic precision of :func:`fit_whitener`: ``"float64"`` (catlens) or ``"float32"`` (P1's code)."""


def fit_whitener(
    benign_acts: Float[Tensor, "prompt d_model"],
    *,
    method: Literal["zca", "pca"] = "zca",
    eps: float = 1e-4,
    shrinkage: None | Literal["ledoit_wolf"] | float = None,
    restrict_to_span: bool = False,
    warn: bool = True,
    dtype: str | torch.dtype = "float64",
) -> Whitener:
    """Fit a whitening map on activations (P1: benign prompts, PAPERS.md §2.3 I and §5 item 10).

    ``Sigma = (1/N) sum_i (x_i - mean)(x_i - mean)^T`` (biased, as P1), optionally shrunk,
    ``Sigma_s = (1 - delta) Sigma + delta (tr(Sigma) / d) I`` with ``delta`` from Ledoit-Wolf
    (``shrinkage="ledoit_wolf"``, sklearn's estimate) or given as a float in [0, 1]. With ``Sigma_s = U diag(lam) U^T``:

    * ``"zca"``: ``W = U diag((lam + eps)^(-1/2)) U^T`` (symmetric; P1's ``W``, since P1 takes the SVD of
      ``Sigma + eps I`` and clamps at eps, which is the same map); whitened coordinates live in the residual basis;
    * ``"pca"``: ``W = diag((lam + eps)^(-1/2)) U^T``; whitened coordinate k is the k-th principal axis.

    **Fewer samples than dimensions** (P1: N=379 < d=4096). The sample covariance then has rank <= N - 1; on the
    ``d - rank`` directions outside the data span its eigenvalue is 0 and the gain is ``eps^(-1/2)`` (100 for
    eps=1e-4) -- larger than on most in-span directions -- so ``W v`` is dominated by whatever part of ``v`` lies
    outside the span, a part the data say nothing about. The fit logs a WARNING when rank < d. Remedies:
    ``restrict_to_span=True`` keeps only the ``rank`` in-span eigen-directions (``W`` then projects the rest away,
    ``W_inv`` is the pseudo-inverse and ``whiten``/``unwhiten`` invert each other on ``mean + span``), or
    shrinkage, which gives the off-span directions the variance ``delta tr(Sigma)/d`` instead of 0.
    ``eps=0`` with a rank-deficient, unshrunk covariance and no restriction is refused (the map is infinite).
    ``warn=False`` silences the rank warning (e.g. after the first of many layers).

    **Precision** (``dtype``, :data:`WHITEN_DTYPES`). ``"float64"`` (default) computes the map from an SVD of the
    centred data in float64. ``"float32"`` reproduces P1's arithmetic (PAPERS §2.3 I): the covariance
    ``Sigma = Xc^T Xc / N`` formed in float32, ``U, S, _ = svd(Sigma_s + eps I)`` in float32,
    ``W = U diag(max(S, eps)^(-1/2)) U^T`` and ``W_inv = U diag(max(S, eps)^(1/2)) U^T``; only for unrestricted
    ``"zca"`` (the map P1 uses). In exact arithmetic the two are the same map. With well-conditioned data they agree
    to float32 precision; with fewer samples than dimensions the float32 eigenvalues near ``eps`` carry rounding
    errors of order ``S.max() * 1e-7``, and PAPERS §2.7 measured P1's float32 whitening matrix a few percent away from
    the float64 one on the tuned default model's activations (its basis columns still nearly parallel).
    """
    return _fit_whitener(benign_acts, method=method, eps=eps, shrinkage=shrinkage,
                         restrict_to_span=restrict_to_span, warn=warn, dtype=dtype)


def _whiten_dtype(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
    if name not in WHITEN_DTYPES:
        from catlens.errors import unknown_name_message

        raise ValueError(unknown_name_message("whitening dtype", dtype, WHITEN_DTYPES,
                                              "'float64' is catlens's precision, 'float32' P1's."))
    return str(name)


def _p1_zca_float32(x: Tensor, eps: float, delta: float) -> tuple[Tensor, Tensor]:
    """``W, W_inv`` of ZCA whitening computed as P1's code computes them: every step in float32."""
    x32 = x.to(torch.float32)
    xc = x32 - x32.mean(0, keepdim=True)
    sigma = xc.T @ xc / x32.shape[0]
    eye = torch.eye(sigma.shape[0], dtype=torch.float32)
    if delta:
        sigma = (1 - delta) * sigma + delta * (torch.trace(sigma) / sigma.shape[0]) * eye
    u, s, _ = torch.linalg.svd(sigma + eps * eye)
    s = s.clamp_min(eps)
    return (u * s.rsqrt()) @ u.T, (u * s.sqrt()) @ u.T


def _fit_whitener(benign_acts: Tensor, *, method: str, eps: float, shrinkage: Any, restrict_to_span: bool,
                  warn: bool, dtype: Any = "float64") -> Whitener:
    if method not in ("zca", "pca"):
        raise ValueError(f"method={method!r} is not allowed; use 'zca' (P1) or 'pca'.")
    dtype = _whiten_dtype(dtype)
    if dtype == "float32" and (method != "zca" or restrict_to_span):
        raise ValueError(f"dtype='float32' reproduces P1's arithmetic, which is unrestricted ZCA whitening; got "
                         f"method={method!r}, restrict_to_span={restrict_to_span}. Use dtype='float64' for these.")
    if eps < 0 or not math.isfinite(eps):
        raise ValueError(f"eps={eps} must be a finite number >= 0 (P1 uses 1e-4).")
    _check_x(benign_acts, "benign_acts", min_n=2)
    n, d = benign_acts.shape
    x = benign_acts.to(torch.float64)
    mean = x.mean(0)
    xc = x - mean
    _, s, vh = torch.linalg.svd(xc, full_matrices=False)
    if float(s.max()) == 0:
        raise ValueError("benign_acts are all identical: their covariance is zero and cannot be whitened.")
    rank = int((s > s.max() * max(n, d) * _EPS64).sum())
    lam = torch.zeros(d, dtype=torch.float64)
    lam[:rank] = s[:rank] ** 2 / n
    if shrinkage is None:
        delta = 0.0
    elif shrinkage == "ledoit_wolf":
        from sklearn.covariance import ledoit_wolf_shrinkage

        delta = float(ledoit_wolf_shrinkage(x.numpy()))
    elif isinstance(shrinkage, (int, float)) and 0.0 <= float(shrinkage) <= 1.0:
        delta = float(shrinkage)
    else:
        raise ValueError(f"shrinkage={shrinkage!r} is not allowed; use None, 'ledoit_wolf' or a float in [0, 1].")
    mu = float(lam.sum()) / d
    lam_s = (1 - delta) * lam + delta * mu
    if warn and rank < d:
        log.warning(
            "fit_whitener: %d samples in %d dimensions, covariance rank %d < %d. %s", n, d, rank, d,
            "Restricted to the data span (restrict_to_span=True)." if restrict_to_span else
            f"The {d - rank} directions outside the data span get whitening gain (shrunk variance + eps)^-1/2 = "
            f"{(delta * mu + eps) ** -0.5 if delta * mu + eps > 0 else math.inf:.3g}, so W v is dominated by the "
            f"part of v outside the span. Consider restrict_to_span=True or shrinkage='ledoit_wolf'.")
    if not restrict_to_span and rank < d and delta * mu + eps == 0:
        raise ValueError(f"eps=0 with a rank-deficient covariance (rank {rank} < d={d}) and no shrinkage gives an "
                         f"infinite whitening gain outside the data span. Pass eps > 0, shrinkage, or "
                         f"restrict_to_span=True.")
    span = vh[:rank]
    g = (lam_s + eps).rsqrt()  # gains, length d; entries >= rank are the off-span gain
    if dtype == "float32":
        w, w_inv = (t.to(torch.float64) for t in _p1_zca_float32(benign_acts, eps, delta))
    elif method == "zca":
        if restrict_to_span or rank == d:  # W = V^T diag(g) V on the span (and 0 off it when restricted)
            w = span.T @ (g[:rank, None] * span)
            w_inv = span.T @ ((1 / g[:rank])[:, None] * span)
        else:  # W = g_off (I - V^T V) + V^T diag(g) V = g_off I + V^T diag(g - g_off) V
            eye = torch.eye(d, dtype=torch.float64)
            w = g[rank] * eye + span.T @ ((g[:rank] - g[rank])[:, None] * span)
            w_inv = eye / g[rank] + span.T @ ((1 / g[:rank] - 1 / g[rank])[:, None] * span)
    elif restrict_to_span:
        w = g[:rank, None] * span
        w_inv = span.T * (1 / g[:rank])[None, :]
    else:  # full PCA: the span's basis completed by an orthonormal basis of its complement
        basis = span
        if rank < d:
            evals, evecs = torch.linalg.eigh(torch.eye(d, dtype=torch.float64) - span.T @ span)
            basis = torch.cat([span, evecs[:, evals > 0.5].T.flip(0)])
        w = g[:, None] * basis
        w_inv = basis.T * (1 / g)[None, :]
    if dtype == "float32":
        mean = benign_acts.to(torch.float32).mean(0).to(torch.float64)
    return Whitener(mean=mean, W=w, W_inv=w_inv, span=span, eigenvalues=lam_s, method=method, eps=float(eps),
                    shrinkage=delta, rank=rank, n_samples=n, restrict_to_span=restrict_to_span, dtype=dtype)


# ------------------------------------------------------------------------------------------ orthonormal basis
@dataclass(frozen=True, eq=False)
class SteeringBasis:
    """P1's orthonormal steering basis ``Q, R = qr(W V)`` (PAPERS.md §2.3 I), rows in the fixed category order.

    With ``V = [v_1 ... v_C]`` (columns = the directions in ``categories`` order) and ``W`` the whitener:

    * ``whitened`` = rows of ``Q``: orthonormal (Euclidean) *in whitened coordinates*; row i spans the part of
      ``W v_i`` not explained by ``W v_1..W v_{i-1}``. P1 adds Q's columns to the residual stream unchanged. For
      ZCA whitening the whitened coordinates share the residual basis, so that is possible, but the vectors are
      directions of the *whitened* space, i.e. ``W`` applied to (combinations of) the category directions;
      whitening amplifies low-variance (and, with N < d, off-span) components.
    * ``residual`` = rows of ``W^-1 Q = V R^-1`` (exact when W is invertible): mapped back, these lie in
      ``span(V)`` -- the span of the original category directions -- and are orthonormal in the *whitened*
      (Mahalanobis) inner product ``<a, b> = a^T W^T W b = a^T (Sigma + eps I)^-1 b``, not in the Euclidean one.
      This is the geometry-aware, un-whitened reading of P1's basis. With a whitener restricted to the data span,
      ``W^-1`` is the pseudo-inverse and the rows are ``P V R^-1`` (P = projector onto the span): only the in-span
      part of the directions survives.
    * ``residual_orthonormal`` = the Euclidean re-orthonormalisation of ``residual`` (QR again). Because
      ``R^-1`` is upper triangular, this equals the plain Gram-Schmidt of ``V`` itself (of ``P V`` when
      restricted), up to signs: whitening no longer plays any role.
    * ``R`` (upper triangular) with ``W V = Q R`` (columns convention: ``whitened.T @ R == W @ V.T``).

    Signs: LAPACK's QR (``torch.linalg.qr``, which P1 calls) returns ``R`` with arbitrary diagonal signs, so some
    of P1's basis vectors may point *against* their whitened category direction. ``positive_diagonal=True``
    (default) flips rows so that ``R_ii > 0``, i.e. ``<Q_i, W v_i> > 0``; pass False for LAPACK's signs.
    """

    whitened: Float[Tensor, "category rank"]
    residual: Float[Tensor, "category d_model"]
    residual_orthonormal: Float[Tensor, "category d_model"]
    R: Float[Tensor, "category category"]
    categories: tuple[str, ...]
    whitening_method: str

    def residual_directions(
        self, space: Literal["whitened", "residual", "residual_orthonormal"] = "whitened",
    ) -> Float[Tensor, "category d_model"]:
        """Vectors to add to the residual stream: ``"whitened"`` = Q used verbatim (P1; ZCA only),
        ``"residual"`` = ``W^-1 Q``, ``"residual_orthonormal"`` = its Euclidean re-orthonormalisation."""
        if space == "whitened":
            if self.whitening_method != "zca" or self.whitened.shape[1] != self.residual.shape[1]:
                raise ValueError("the whitened basis is only usable as residual directions for ZCA whitening (the "
                                 "whitened coordinates of PCA whitening are principal axes, not residual dims). Use "
                                 "space='residual'.")
            return self.whitened
        if space == "residual":
            return self.residual
        if space == "residual_orthonormal":
            return self.residual_orthonormal
        raise ValueError(f"space={space!r} is not allowed; use 'whitened', 'residual' or 'residual_orthonormal'.")


def _qr_rows(a: Tensor, positive_diagonal: bool, categories: Sequence[str], what: str) -> tuple[Tensor, Tensor]:
    """QR of the columns ``a.T`` (a: rows = vectors). Returns (Q rows, R)."""
    q, r = torch.linalg.qr(a.T, mode="reduced")
    diag = r.diagonal().abs()
    tol = float(diag.max()) * 1e-5 if len(diag) else 0.0  # float32 inputs: dependent up to rounding
    bad = (diag <= tol).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{what}: the direction(s) of {[categories[i] for i in bad]} are linearly dependent on "
                         f"the earlier ones (R diagonal ~ 0); an orthonormal basis of {len(categories)} vectors does "
                         f"not exist. Drop or merge categories.")
    if positive_diagonal:
        sign = torch.sign(r.diagonal())
        q, r = q * sign[None, :], r * sign[:, None]
    return q.T, r


def orthonormal_basis(
    directions_at_layer: Float[Tensor, "category d_model"],
    whitener: Whitener,
    *,
    categories: Sequence[str] | None = None,
    positive_diagonal: bool = True,
) -> SteeringBasis:
    """P1's basis ``Q, R = qr(W V, mode="reduced")`` and its mapped-back versions; see :class:`SteeringBasis`.

    ``directions_at_layer`` rows are in the category order that fixes the basis (e.g. ``Directions.at(layer)``).
    Computed in float64, returned as float32.
    """
    c, d = directions_at_layer.shape
    if d != whitener.d_model:
        raise ValueError(f"directions have d_model={d} but the whitener was fitted on d_model={whitener.d_model}.")
    _check_x(directions_at_layer, "directions_at_layer")
    cats = tuple(categories) if categories is not None else tuple(str(i) for i in range(c))
    if len(cats) != c:
        raise ValueError(f"{len(cats)} category names for {c} direction rows.")
    if c > whitener.n_components:
        raise ValueError(f"{c} directions cannot be orthonormal in {whitener.n_components} whitened coordinates.")
    wv = whitener.map_directions(directions_at_layer.to(torch.float64))
    q, r = _qr_rows(wv, positive_diagonal, cats, "W V")
    residual = whitener.unmap_directions(q)
    q2, _ = _qr_rows(residual, True, cats, "W^-1 Q")
    f32 = torch.float32
    return SteeringBasis(whitened=q.to(f32), residual=residual.to(f32), residual_orthonormal=q2.to(f32),
                         R=r.to(f32), categories=cats, whitening_method=whitener.method)
