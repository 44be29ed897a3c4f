"""The geometry recipe, the steps behind ``analyses/geometry.py`` (its docstring lists the tables and the direction
sets): the checked options (:class:`Args`), the activations of a model or a saved store (:func:`load_activations`),
every direction set (:func:`compute_directions`) and the tables: separability, anisotropy / spectrum / massive
dimensions, raw, whitened and basis cosines, probe cosines, projections, model diffing, and the manifest's headline
numbers (:func:`summarise`). The math is :mod:`catlens.geometry`'s; this module arranges it into the run's tables.
"""

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from catlens import directions as D
from catlens import geometry as G
from catlens.runs import RunDir, sha256_file

log = logging.getLogger(__name__)

# direction set -> (registered method of catlens.directions, benign side, constructor options)
DIRECTION_RECIPES: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "one_vs_benign": ("one_vs_benign", "benign", {}),
    "one_vs_rest": ("one_vs_rest", None, {}),
    "one_vs_benign_orth": ("one_vs_benign_orth", "benign", {}),
    "p1": ("p1_mean_difference", "benign", {"tau": 1e-3, "top_k": D.P1_TOP_K_MODE}),
    "p2_generic": ("p2_unsupervised", "generic", {}),
    "p2_matched": ("p2_unsupervised", "matched", {}),
    "p2_pruned": ("p2_pruned", "generic", {"quantile": 0.5, "pairing": "truncate"}),
}
DIRECTION_SETS = tuple(DIRECTION_RECIPES)


@dataclass(frozen=True)
class Args:
    out: Path
    """Run folder to create."""
    model: str = "smollm2-135m-instruct"
    """Model spec for catlens.model.load_model (embedded name, checkpoint folder or hub id)."""
    prompts: str = "builtin"
    """Prompt set for catlens.datasets.load_prompts."""
    other_model: str | None = None
    """Second model for model diffing (same prompts, same site/positions/format)."""
    acts: Path | None = None
    """Use this saved activation store instead of running --model."""
    other_acts: Path | None = None
    """Saved activation store of the second model (instead of running --other-model)."""
    device: str = "cpu"
    """Device the model(s) run on (cpu, cuda, cuda:1)."""
    dtype: str = "float32"
    """Weight dtype of the model(s): float32, bfloat16 or float16."""
    cache_dir: str | None = None
    """Model cache (default: $CATLENS_CACHE or ~/.cache/catlens)."""
    site: str = "resid_post"
    layers: tuple[int, ...] | None = None
    """Layers to collect (None: all)."""
    positions: str = "last"
    fmt: str = "chat"
    batch_size: int = 16
    harmful_label: str = "harmful"
    direction_splits: tuple[str, ...] | None = ("train",)
    """Splits whose prompts fit the directions and the whitener (None: all prompts)."""
    directions: tuple[str, ...] = DIRECTION_SETS
    whiten_method: str = "zca"
    whiten_eps: float = 1e-4
    whiten_shrinkage: str | float | None = None
    """None, 'ledoit_wolf' or a float in [0, 1]."""
    restrict_to_span: bool = False
    cv_folds: int = 5
    pca_dims: int | None = 32
    tsne_layers: tuple[int, ...] | None = None
    """Layers for t-SNE (slow); None: four evenly spaced layers; () to skip."""
    projection_subset: str = "harmful"
    """Prompts projected: 'harmful' (P1: category activations only) or 'all'."""
    spectrum_top: int = 100
    threads: int | None = None
    """torch/BLAS threads of the process, set once in :func:`main` (:func:`catlens.runs.configure_process`); None:
    $OMP_NUM_THREADS, else the libraries' default."""
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        unknown = [d for d in self.directions if d not in DIRECTION_SETS]
        if unknown:
            raise ValueError(f"unknown direction set(s) {unknown}; choose from {', '.join(DIRECTION_SETS)}.")
        if self.projection_subset not in ("harmful", "all"):
            raise ValueError(f"projection_subset={self.projection_subset!r}: use 'harmful' or 'all'.")
        if self.other_model is not None and self.other_acts is not None:
            raise ValueError("give --other-model or --other-acts, not both.")


def args_of(a: Any) -> Args:
    """The checked :class:`Args` of typed options (:class:`catlens.stages.GeometryOptions`: the command line's, or
    the main job's)."""
    from catlens.options import parse_layers

    layers = parse_layers(a.layers)
    tsne: tuple[int, ...] | None
    if a.tsne_layers is None or a.tsne_layers == "auto":
        tsne = None
    elif a.tsne_layers.lower() == "none":
        tsne = ()
    else:
        tsne = tuple(parse_layers(a.tsne_layers) or ())
    shrink: str | float | None = a.whiten_shrinkage
    if shrink not in (None, "ledoit_wolf"):
        shrink = float(shrink)
    return Args(out=a.out, model=a.model, prompts=a.prompts, other_model=a.other_model, acts=a.acts,
                other_acts=a.other_acts, device=a.device, dtype=a.dtype, cache_dir=a.cache_dir, site=a.site,
                layers=None if layers is None else tuple(layers),
                positions=a.positions, fmt=a.fmt, batch_size=a.batch_size, harmful_label=a.harmful_label,
                direction_splits=None if a.direction_splits == "all" else tuple(a.direction_splits.split(",")),
                directions=tuple(a.directions.split(",")), whiten_method=a.whiten_method, whiten_eps=a.whiten_eps,
                whiten_shrinkage=shrink, restrict_to_span=a.restrict_to_span, cv_folds=a.cv_folds,
                pca_dims=None if a.pca_dims.lower() == "none" else int(a.pca_dims), tsne_layers=tsne,
                projection_subset=a.projection_subset, spectrum_top=a.spectrum_top, threads=a.threads,
                seed=a.seed, overwrite=a.overwrite)


# ------------------------------------------------------------------------------------------- data access
@dataclass(frozen=True)
class Activations:
    """What this analysis needs from an activation store."""

    acts: torch.Tensor  # [prompt layer d_model]
    index: pd.DataFrame  # one row per prompt: id, text, label, category, source, split
    layers: tuple[int, ...]
    model: dict[str, Any]  # model provenance
    data: dict[str, Any]  # prompt / store provenance


def load_activations(args: Args, *, model_spec: str, acts_path: Path | None,
                     models: Any = None) -> Activations:
    """The only place that touches the model and activation-store API; adapt here if that API changes. The model
    comes from ``models`` (a :class:`catlens.model.ModelPool`; a new pool when None)."""
    from catlens.cache import ActivationStore, collect

    if acts_path is not None:
        store = ActivationStore.load(acts_path)
        model_prov = dict(store.meta.get("model", {}))
    else:
        from catlens.datasets import load_prompts
        from catlens.model import ModelPool

        models = ModelPool() if models is None else models
        model = models.get(model_spec, device=args.device, dtype=args.dtype, cache=args.cache_dir)
        store = collect(model, load_prompts(args.prompts), sites=[args.site],
                        layers=None if args.layers is None else list(args.layers), positions=args.positions,
                        fmt=args.fmt, batch_size=args.batch_size, out=None)
        model_prov = dict(model.provenance)
        del model
    meta = dict(store.meta)
    data = {"prompts": args.prompts if acts_path is None else None, "store": str(acts_path) if acts_path else None,
            "prompts_sha256": meta.get("prompts_sha256"), "prompt_provenance": meta.get("prompt_provenance"),
            "site": args.site, "positions": meta.get("positions"), "fmt": meta.get("fmt"),
            "n_prompts": len(store.index)}
    return Activations(acts=store.get(args.site).float(), index=store.index.reset_index(drop=True),
                       layers=tuple(store.layers), model=model_prov, data=data)


# ------------------------------------------------------------------------------------------- directions
def by_category(acts: torch.Tensor, index: pd.DataFrame, mask: np.ndarray) -> dict[str, torch.Tensor]:
    out = {}
    cats = index["category"]
    for c in sorted(cats[mask].dropna().unique()):
        rows = np.flatnonzero(mask & (cats == c).to_numpy())
        out[str(c)] = acts[torch.from_numpy(rows)]
    return out


def compute_directions(args: Args, a: Activations) -> dict[str, D.Directions]:
    """Every requested direction set, fitted on the prompts of ``args.direction_splits``."""
    idx = a.index
    fit = np.ones(len(idx), dtype=bool) if args.direction_splits is None else idx["split"].isin(
        args.direction_splits).to_numpy()
    harmful = (idx["label"] == args.harmful_label).to_numpy()
    benign = ~harmful
    harmful_by_cat = by_category(a.acts, idx, fit & harmful)
    benign_acts = a.acts[torch.from_numpy(np.flatnonzero(fit & benign))]
    if not harmful_by_cat or len(benign_acts) == 0:
        raise ValueError(f"no harmful prompts with a category or no benign prompts in splits {args.direction_splits}; "
                         f"labels present: {sorted(idx['label'].unique())}. Check --harmful-label/--direction-splits.")
    prov = {"model": a.model.get("name"), "data": a.data, "direction_splits": args.direction_splits,
            "read_position": a.data.get("positions"), "fmt": a.data.get("fmt")}
    common = {"layers": a.layers, "site": args.site, "provenance": prov}
    generic_mask = fit & benign & idx["category"].isna().to_numpy()
    generic = a.acts[torch.from_numpy(np.flatnonzero(generic_mask))] if generic_mask.any() else benign_acts
    matched = by_category(a.acts, idx, fit & benign)
    sides = {"benign": benign_acts, "generic": generic, "matched": matched, None: None}
    out: dict[str, D.Directions] = {}
    for name in args.directions:
        method, side, options = DIRECTION_RECIPES[name]
        if name == "one_vs_rest" and len(harmful_by_cat) < 2:
            continue
        if name == "p2_matched" and not all(c in matched for c in harmful_by_cat):
            log.warning("p2_matched skipped: no benign look-alikes for %s",
                        [c for c in harmful_by_cat if c not in matched])
            continue
        if name == "p2_pruned":
            if min(len(x) for x in harmful_by_cat.values()) < 2 or len(generic) < 2:
                continue
            options = {**options, "seed": args.seed}
        out[name] = D.fit_directions(harmful_by_cat, method, benign=sides[side], **options, **common)
    return out


# ---------------------------------------------------------------------------------------------- tables
def separability_tables(args: Args, a: Activations) -> pd.DataFrame:
    idx, frames = a.index, []
    harmful = (idx["label"] == args.harmful_label).to_numpy()
    opts = {"layers": a.layers, "cv_folds": args.cv_folds, "pca_dims": args.pca_dims, "random_state": args.seed}
    labels = np.where(harmful, "harmful", "benign")
    if harmful.any() and (~harmful).any():
        frames.append(G.separability(a.acts, labels, task="harmful_vs_benign", **opts))
    cat_rows = np.flatnonzero(harmful & idx["category"].notna().to_numpy())
    if idx.loc[cat_rows, "category"].nunique() >= 2:
        frames.append(G.separability(a.acts[torch.from_numpy(cat_rows)], idx.loc[cat_rows, "category"].to_numpy(),
                                     task="harmful_category", **opts))
    look_rows = np.flatnonzero(idx["category"].notna().to_numpy())
    look_labels = labels[look_rows]
    if len(set(look_labels)) == 2 and (~harmful[look_rows]).sum() >= 2:
        frames.append(G.separability(a.acts[torch.from_numpy(look_rows)], look_labels,
                                     task="harmful_vs_lookalike", **opts))
    return pd.concat(frames, ignore_index=True)


def subsets(args: Args, a: Activations) -> dict[str, np.ndarray]:
    harmful = (a.index["label"] == args.harmful_label).to_numpy()
    return {"all": np.ones(len(harmful), dtype=bool), "harmful": harmful, "benign": ~harmful}


def anisotropy_tables(args: Args, a: Activations) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    aniso, spectrum, massive = [], [], []
    for name, mask in subsets(args, a).items():
        if mask.sum() < 2:
            continue
        x = a.acts[torch.from_numpy(np.flatnonzero(mask))]
        aniso.append(G.anisotropy(x, layers=a.layers).assign(subset=name))
        for j, layer in enumerate(a.layers):
            lam = G.covariance_spectrum(x[:, j])
            top = lam[: args.spectrum_top]
            spectrum.append(pd.DataFrame({"subset": name, "layer": layer, "index": np.arange(len(top)),
                                          "eigenvalue": top.numpy(), "share": (top / lam.sum()).numpy()}))
            if name == "all":
                massive.append(G.massive_dimensions(x[:, j]).assign(layer=layer))
    aniso_df = pd.concat(aniso, ignore_index=True)
    return (aniso_df[["subset", *[c for c in aniso_df.columns if c != "subset"]]],
            pd.concat(spectrum, ignore_index=True),
            pd.concat(massive, ignore_index=True)[["layer", "dim", "mean_share", "max_share", "mean_abs",
                                                   "median_ratio", "massive"]])


def cosine_tables(args: Args, a: Activations, dirs: dict[str, D.Directions]
                  ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Raw / whitened / basis cosines, the basis alignment table and the whitening facts, per layer."""
    idx = a.index
    fit = np.ones(len(idx), dtype=bool) if args.direction_splits is None else idx["split"].isin(
        args.direction_splits).to_numpy()
    benign_rows = np.flatnonzero(fit & (idx["label"] != args.harmful_label).to_numpy())
    cos, align, whitening = [], [], []
    no_basis: dict[str, tuple[str, list[int]]] = {}
    for j, layer in enumerate(a.layers):
        w = G.fit_whitener(a.acts[torch.from_numpy(benign_rows), j], method=args.whiten_method,
                           eps=args.whiten_eps, shrinkage=args.whiten_shrinkage,
                           restrict_to_span=args.restrict_to_span, warn=(j == 0))
        whitening.append({"layer": layer, "method": w.method, "eps": w.eps, "shrinkage": w.shrinkage,
                          "restrict_to_span": w.restrict_to_span, "n_samples": w.n_samples, "rank": w.rank,
                          "rank_deficient": w.rank_deficient, "d_model": w.d_model})
        for name, d in dirs.items():
            v = d.at(layer)
            if bool((v.norm(dim=-1) == 0).any()):
                log.warning("%s layer %d: a zero direction; cosines skipped", name, layer)
                continue
            keys = {"direction": name, "layer": layer}
            cos.append(G.cosine_table(G.cosine_matrix(v), d.categories, **keys, space="raw"))
            cos.append(G.cosine_table(G.whitened_cosine_matrix(v, w), d.categories, **keys, space="whitened"))
            try:
                basis = G.orthonormal_basis(v, w, categories=d.categories)
                lapack = G.orthonormal_basis(v, w, categories=d.categories, positive_diagonal=False)
            except ValueError as e:
                no_basis.setdefault(name, (str(e), []))[1].append(layer)
                continue
            if w.method == "zca":
                cos.append(G.cosine_table(G.cosine_matrix(basis.whitened), d.categories, **keys,
                                          space="basis_whitened"))
            cos.append(G.cosine_table(G.cosine_matrix(basis.residual), d.categories, **keys,
                                      space="basis_residual"))
            v64 = v.double()
            unit_v = v64 / v64.norm(dim=-1, keepdim=True)
            res = basis.residual.double()
            cos_res = (res * unit_v).sum(-1) / res.norm(dim=-1)
            cos_q = ((basis.whitened.double() * unit_v).sum(-1) if w.method == "zca"
                     else torch.full((len(v),), float("nan"), dtype=torch.float64))
            off = w.off_span_share(v)
            flipped = (lapack.R.diagonal() < 0).tolist()
            for i, c in enumerate(d.categories):
                align.append({**keys, "category": c, "cos_basis_whitened": float(cos_q[i]),
                              "cos_basis_residual": float(cos_res[i]), "off_span_share": float(off[i]),
                              "r_diag": float(basis.R[i, i]), "lapack_sign_flipped": bool(flipped[i])})
    for name, (reason, layers) in no_basis.items():
        # one_vs_rest directions sum to zero (equal weights) and one_vs_benign_orth directions have a weighted sum
        # equal to zero (the refusal direction is their weighted mean before projection): dependent by construction
        log.warning("%s: no orthonormal basis at %d layer(s) %s: %s", name, len(layers), layers, reason)
    return pd.concat(cos, ignore_index=True), pd.DataFrame(align), pd.DataFrame(whitening)


def probe_table(args: Args, a: Activations, dirs: dict[str, D.Directions]) -> pd.DataFrame:
    labels = np.where((a.index["label"] == args.harmful_label).to_numpy(), "harmful", "benign")
    if len(set(labels)) < 2:
        return pd.DataFrame(columns=["direction", "layer", "category", "cosine"])
    w = G.probe_weights(a.acts, labels, positive="harmful")
    frames = [G.probe_direction_cosines(w, d, weight_layers=a.layers).assign(direction=name)
              for name, d in dirs.items()]
    df = pd.concat(frames, ignore_index=True)
    return df[["direction", "layer", "category", "cosine", "method"]]


def projection_table(args: Args, a: Activations) -> pd.DataFrame:
    idx = a.index
    harmful = (idx["label"] == args.harmful_label).to_numpy()
    mask = harmful if args.projection_subset == "harmful" else np.ones(len(idx), dtype=bool)
    rows = np.flatnonzero(mask)
    keys = idx.loc[rows, ["id", "label", "category"]].reset_index(drop=True)
    keys["group"] = np.where(keys["label"] == args.harmful_label, keys["category"].fillna("uncategorised"),
                             "benign")
    x = a.acts[torch.from_numpy(rows)]
    frames = [G.projections(x, keys, layers=a.layers, method="pca", random_state=0)]
    tsne = args.tsne_layers
    if tsne is None:
        n = len(a.layers)
        tsne = tuple(sorted({a.layers[min(n - 1, round(q * (n - 1)))] for q in (0.25, 0.5, 0.75, 1.0)}))
    if tsne:
        frames.append(G.projections(x, keys, layers=a.layers, which=list(tsne), method="tsne", perplexity=10.0,
                                    random_state=0))
    return pd.concat(frames, ignore_index=True).assign(subset=args.projection_subset)


def save_directions(run: RunDir, dirs: dict[str, D.Directions]) -> None:
    """Every direction set under ``directions/`` (sha256 and method in the manifest) and the ``direction_norms``
    table."""
    for name, d in dirs.items():
        path = d.save(run.path / "directions" / name)
        run.update_manifest(outputs={f"directions/{path.name}": {"sha256": sha256_file(path), "method": d.method}})
    run.save_table("direction_norms", pd.concat([d.norms().assign(direction=n) for n, d in dirs.items()],
                                                ignore_index=True))


def model_diff_table(args: Args, a: Activations, b: Activations, dirs: dict[str, D.Directions]) -> pd.DataFrame:
    """Cosines between this model's direction sets ``dirs`` and the same sets fitted on the other model's
    activations ``b`` (P1's model diffing)."""
    if b.acts.shape[-1] != a.acts.shape[-1]:
        raise ValueError(f"the other model has d_model={b.acts.shape[-1]}, this one {a.acts.shape[-1]}: "
                         f"directions of different widths cannot be compared.")
    other = compute_directions(args, b)
    frames = [G.model_diff_cosines(dirs[n], other[n]).assign(direction=n) for n in dirs if n in other]
    return pd.concat(frames, ignore_index=True).assign(model_a=a.model.get("name"), model_b=b.model.get("name"))


def setup_logging(run: RunDir) -> list[logging.Handler]:
    """Log INFO to stderr and to the run's ``log.txt``: the handlers added (remove them when the run ends)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr), logging.FileHandler(run.path / "log.txt")]
    for handler in handlers:
        handler.setFormatter(fmt)
        root.addHandler(handler)
    return handlers


def summarise(run: RunDir) -> dict[str, Any]:
    """A few headline numbers for the manifest (best layers, mean off-diagonal cosines)."""
    sep = run.load_table("separability")
    out: dict[str, Any] = {}
    for task, g in sep[sep["metric"] == "probe_auroc"].groupby("task"):
        best = g.loc[g["value"].idxmax()]
        out[f"best_layer_auroc_{task}"] = {"layer": int(best["layer"]), "auroc": round(float(best["value"]), 4)}
    for task, g in sep[sep["metric"] == "silhouette"].groupby("task"):
        best = g.loc[g["value"].idxmax()]
        out[f"best_layer_silhouette_{task}"] = {"layer": int(best["layer"]),
                                                "silhouette": round(float(best["value"]), 4)}
    cos = run.load_table("cosine")
    off = cos[cos["category_a"] != cos["category_b"]]
    out["mean_offdiag_cosine"] = {f"{d}/{s}": round(float(v), 4)
                                  for (d, s), v in off.groupby(["direction", "space"])["cosine"].mean().items()}
    return out
