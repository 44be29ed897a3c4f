"""Category directions: one object holding a direction per (category, layer), and the constructors of both papers.

Everything here is pure: tensors in, a new :class:`Directions` out. No model, no file (except
:meth:`Directions.save` / :meth:`Directions.load`). Means are accumulated in float64 and returned as float32.

Shapes. Activations are ``Float[Tensor, "prompt layer d_model"]``: one row per prompt, the layer axis in the
order of the ``layers`` labels (e.g. ``ActivationStore.layers``). Per-category inputs are mappings
``{category: Float[Tensor, "_prompt layer d_model"]}``; ``_prompt`` (leading underscore) marks a prompt count
that differs between categories, so it is not tied to other arguments by the run-time shape checker.

Constructors (all return unit-norm directions only when ``normalize=True``):

* P1 (PAPERS.md §2.3 C) :func:`p1_mean_difference`
  ``v_c = normalise(topK(mask_tau(mu_c) - mask_tau(mu_b)))`` with ``mu_c`` the mean activation of category c's
  prompts at its category token and ``mu_b`` the mean over benign prompts at the ``[respond]`` token;
  :func:`p1_contrastive`, the paired variant ``normalise(topK(mask_tau(mean_i[h(x_i+[c]) - h(x_i+[respond])])))``.
* :func:`one_vs_benign` ``mu_c - mu_benign``; :func:`one_vs_rest` ``mu_c - mu_rest``;
  :func:`refusal_direction` ``mu_harmful - mu_benign`` and :func:`orthogonalize_against`.
* P2 (PAPERS.md §3.3, §3.7) :func:`p2_unsupervised` ``omega_c = mu_safe - mu_unsafe_c``; :func:`p2_pruned`
  (mean of the paired differences whose norm is above a quantile); :func:`p2_guided` (only the unsafe prompts whose
  responses a judge labels unsafe).

Callers choose a constructor by name through :func:`fit_directions` (the registry :data:`METHODS`; unknown names
get a did-you-mean).
"""

import hashlib
import json
import logging
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from catlens.errors import unknown_name_message

log = logging.getLogger(__name__)

__all__ = [
    "Directions",
    "METHODS",
    "fit_directions",
    "p1_mean_difference",
    "p1_contrastive",
    "one_vs_benign",
    "one_vs_rest",
    "refusal_direction",
    "orthogonalize_against",
    "p2_unsupervised",
    "p2_pruned",
    "p2_guided",
    "tau_mask",
    "top_k_sparsify",
    "p1_top_k",
    "P1_TOP_K",
    "P1_D_MODEL",
    "P1_TOP_K_MODE",
    "TOP_K_MODES",
]

_DIMS = ("category", "layer", "d_model")
_FORMAT_VERSION = 2


# ------------------------------------------------------------------------------------------------ helpers
def _jsonable(obj: Any) -> Any:
    """A JSON round-tripped copy (tuples become lists, Paths strings), so save -> load is exact."""

    def default(o: Any) -> Any:
        if isinstance(o, Path):
            return str(o)
        if hasattr(o, "tolist"):
            return o.tolist()
        if hasattr(o, "value") and hasattr(o, "name"):  # Enum
            return o.value
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        raise TypeError(f"provenance value {o!r} of type {type(o).__name__} is not JSON-serialisable")

    return json.loads(json.dumps(obj, default=default))


def _check_acts(name: str, x: Tensor, *, min_n: int = 1, n_layers: int | None = None,
                d_model: int | None = None) -> None:
    """Validate one activation tensor ``[prompt, layer, d_model]``; raise ValueError naming ``name``."""
    if x.ndim != 3:
        raise ValueError(f"{name}: expected activations of shape [prompt, layer, d_model], got shape "
                         f"{tuple(x.shape)}. For a single layer use x[:, None, :].")
    if not torch.is_floating_point(x):
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}.")
    if x.shape[0] < min_n:
        raise ValueError(f"{name}: has {x.shape[0]} prompt(s) but at least {min_n} are needed here. Add prompts "
                         f"or drop this category.")
    if n_layers is not None and x.shape[1] != n_layers:
        raise ValueError(f"{name}: has {x.shape[1]} layers but the other inputs have {n_layers}. Take all "
                         f"activations from the same layers.")
    if d_model is not None and x.shape[2] != d_model:
        raise ValueError(f"{name}: has d_model={x.shape[2]} but the other inputs have d_model={d_model}. "
                         f"Were they collected from different models or sites?")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = (~finite).nonzero()[0].tolist()
        raise ValueError(f"{name}: activations contain NaN or inf (first at prompt {bad[0]}, layer axis "
                         f"index {bad[1]}, dim {bad[2]}). Recompute or drop these prompts.")


def _check_group(groups: Mapping[str, Tensor], what: str, *, min_n: int = 1,
                 n_layers: int | None = None, d_model: int | None = None) -> tuple[int, int]:
    """Validate a ``{category: acts}`` mapping; return the common (n_layers, d_model)."""
    if len(groups) == 0:
        raise ValueError(f"{what}: no categories given (an empty mapping).")
    for cat, x in groups.items():
        if not isinstance(x, Tensor):
            raise ValueError(f"{what}[{cat!r}]: expected a torch.Tensor, got {type(x).__name__}.")
        _check_acts(f"{what}[{cat!r}]", x, min_n=min_n, n_layers=n_layers, d_model=d_model)
        n_layers, d_model = x.shape[1], x.shape[2]
    assert n_layers is not None and d_model is not None
    return n_layers, d_model


def _mean64(x: Tensor) -> Tensor:
    """Mean over the prompt axis, accumulated in float64."""
    return x.to(torch.float64).mean(dim=0)


def _layer_labels(layers: Sequence[int] | None, n_layers: int) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(n_layers))
    out = tuple(int(layer) for layer in layers)
    if len(out) != n_layers:
        raise ValueError(f"layers={out} has {len(out)} labels but the activations have {n_layers} layers on "
                         f"axis 1. Pass one label per layer (e.g. ActivationStore.layers).")
    return out


def _unit(v: Tensor, categories: Sequence[str], layers: Sequence[int]) -> Tensor:
    """Normalise each (category, layer) row to unit L2 norm; a zero row is an error naming where it is."""
    norms = v.norm(dim=-1, keepdim=True)
    zero = (norms.squeeze(-1) == 0).nonzero()
    if len(zero):
        c, li = zero[0].tolist()
        raise ValueError(f"the direction for category {categories[c]!r} at layer {layers[li]} is exactly zero, so "
                         f"it cannot be normalised (identical means?). Check the inputs or pass normalize=False.")
    return v / norms


def tau_mask(u: Float[Tensor, "*batch d_model"], tau: float | None) -> Float[Tensor, "*batch d_model"]:
    """P1's ``mask_tau(u)_i = u_i * 1[|u_i| >= tau]``: zero the entries smaller than ``tau`` in absolute value."""
    if tau is None:
        return u
    if tau < 0 or not math.isfinite(tau):
        raise ValueError(f"tau={tau} must be a finite number >= 0 (P1 uses 1e-3), or None to disable the mask.")
    return u * (u.abs() >= tau)


P1_TOP_K = 200
"""P1's top-K: dimensions its categorical steering vectors keep (PAPERS §2.3 C) ..."""
P1_D_MODEL = 4096
"""... out of Llama-3-8B's residual width."""
TOP_K_MODES = ("proportional", "absolute")
"""How :func:`p1_top_k` carries P1's K to another width."""
P1_TOP_K_MODE = "proportional"
"""catlens's choice (used by the ``p1_mean_difference`` registry entry, so by every stage that fits P1's
directions without an explicit ``top_k``): keep P1's *share* of dimensions, not its count."""


def p1_top_k(d_model: int, mode: str = P1_TOP_K_MODE) -> int:
    """P1's top-K at residual width ``d_model``: the one definition every catlens stage uses.

    * ``"proportional"`` (default, :data:`P1_TOP_K_MODE`): P1's share of dimensions,
      ``round(P1_TOP_K * d_model / P1_D_MODEL)`` (at least 1), so a smaller model's vectors are as sparse as P1's;
    * ``"absolute"``: P1's count, ``min(P1_TOP_K, d_model)``, as P1's code would run unchanged on this model
      (on a narrow model it keeps a much larger share of the dimensions than P1 does).

    Both are ``P1_TOP_K`` at P1's own width.

    >>> p1_top_k(576), p1_top_k(576, "absolute"), p1_top_k(4096), p1_top_k(4096, "absolute")
    (28, 200, 200, 200)
    """
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model={d_model!r} must be a positive integer (the residual width, e.g. 576).")
    if mode == "proportional":
        return max(1, round(P1_TOP_K * d_model / P1_D_MODEL))
    if mode == "absolute":
        return min(P1_TOP_K, d_model)
    raise ValueError(unknown_name_message("top-K mode", mode, TOP_K_MODES,
                                          "'proportional' keeps P1's share of dimensions, 'absolute' its count."))


def _resolve_top_k(top_k: int | str | None, d_model: int) -> int | None:
    """``top_k`` as given, or :func:`p1_top_k` of ``d_model`` when it names a mode."""
    return p1_top_k(d_model, top_k) if isinstance(top_k, str) else top_k


def top_k_sparsify(d: Float[Tensor, "*batch d_model"], k: int | None) -> Float[Tensor, "*batch d_model"]:
    """P1's ``topK(d)_i = d_i * 1[i in argtop_K |d|]`` along the last axis; ``k >= d_model`` or None keeps all."""
    if k is None or k >= d.shape[-1]:
        return d
    if k < 1:
        raise ValueError(f"top_k={k} must be >= 1 (P1 uses 200), or None to keep every dimension.")
    idx = d.abs().topk(k, dim=-1).indices
    keep = torch.zeros_like(d, dtype=torch.bool).scatter_(-1, idx, True)
    return d * keep


# ----------------------------------------------------------------------------------------------- Directions
@dataclass(frozen=True, eq=False)
class Directions:
    """One direction per (category, layer) at one site, with how it was made.

    ``vectors[i, j]`` is the direction of ``categories[i]`` at layer ``layers[j]`` (a layer label, e.g. 14, not
    an axis index). ``provenance`` is a JSON-serialisable dict (model, data hashes, read positions, options,
    counts...); it is stored as a JSON round-tripped copy so that :meth:`save` -> :meth:`load` is exact.
    Equality (``==``) compares vectors exactly and all metadata.
    """

    vectors: Float[Tensor, "category layer d_model"]
    """The directions, float32 from every constructor here."""
    categories: tuple[str, ...]
    """Category names in the order of axis 0 (this order fixes e.g. the columns of P1's QR basis)."""
    layers: tuple[int, ...]
    """Layer labels of axis 1."""
    site: str = "resid_post"
    """Where the activations were read (a ``catlens.model.Site`` value, e.g. ``"resid_post"``)."""
    method: str = "unknown"
    """The constructor that made these directions (e.g. ``"p1_mean_difference"``)."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Model, data hashes, positions, options and counts; JSON-serialisable."""
    ref_norm: Float[Tensor, "layer"] | None = None
    """Optional: the typical L2 norm of the site's activation at each of ``layers`` (the mean over a reference
    prompt set, see :meth:`with_ref_norm`), so that a steering coefficient can be given as a fraction of the
    residual norm. None when not measured."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "categories", tuple(str(c) for c in self.categories))
        object.__setattr__(self, "layers", tuple(int(layer) for layer in self.layers))
        site = getattr(self.site, "value", self.site)  # accept a Site enum
        object.__setattr__(self, "site", str(site))
        object.__setattr__(self, "provenance", _jsonable(dict(self.provenance)))
        n_cat, n_layer, _ = self.vectors.shape
        if len(self.categories) != n_cat:
            raise ValueError(f"categories has {len(self.categories)} names but vectors has {n_cat} rows "
                             f"(shape {tuple(self.vectors.shape)}); give one name per row.")
        if len(set(self.categories)) != n_cat:
            raise ValueError(f"categories must be unique, got {self.categories}.")
        if len(self.layers) != n_layer:
            raise ValueError(f"layers has {len(self.layers)} labels but vectors has {n_layer} layers on axis 1 "
                             f"(shape {tuple(self.vectors.shape)}); give one label per layer.")
        if len(set(self.layers)) != n_layer:
            raise ValueError(f"layers must be unique, got {self.layers}.")
        if not bool(torch.isfinite(self.vectors).all()):
            raise ValueError("vectors contain NaN or inf; check the activations they were computed from.")
        if self.ref_norm is not None:
            r = self.ref_norm
            if not isinstance(r, Tensor) or r.shape != (n_layer,) or not torch.is_floating_point(r):
                raise ValueError(f"ref_norm must be a float tensor of shape [layer] = ({n_layer},) (one norm per "
                                 f"layer label {self.layers}), got "
                                 f"{tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__}. Use "
                                 f"with_ref_norm(acts) to measure it.")
            if not bool(torch.isfinite(r).all()) or bool((r <= 0).any()):
                raise ValueError(f"ref_norm={r.tolist()} must be finite and > 0 at every layer (it is a typical "
                                 f"activation norm); measure it with with_ref_norm(acts).")

    # access ------------------------------------------------------------------------------------------------
    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[-1])

    def category_index(self, category: str) -> int:
        if category not in self.categories:
            raise KeyError(unknown_name_message("category", category, self.categories))
        return self.categories.index(category)

    def layer_index(self, layer: int) -> int:
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not among these directions' layers {self.layers}.")
        return self.layers.index(layer)

    def vector(self, category: str, layer: int) -> Float[Tensor, "d_model"]:
        """The direction of ``category`` at layer label ``layer``."""
        return self.vectors[self.category_index(category), self.layer_index(layer)]

    def at(self, layer: int) -> Float[Tensor, "category d_model"]:
        """All categories' directions at layer label ``layer`` (rows in ``categories`` order)."""
        return self.vectors[:, self.layer_index(layer)]

    def select(self, *, categories: Sequence[str] | None = None,
               layers: Sequence[int] | None = None) -> "Directions":
        """A new Directions restricted to (and ordered as) ``categories`` and ``layers``."""
        cats = tuple(self.categories if categories is None else categories)
        lays = tuple(self.layers if layers is None else layers)
        ci = [self.category_index(c) for c in cats]
        li = [self.layer_index(layer) for layer in lays]
        ref = None if self.ref_norm is None else self.ref_norm[li].clone()
        return replace(self, vectors=self.vectors[ci][:, li].clone(), categories=cats, layers=lays, ref_norm=ref)

    def with_ref_norm(self, acts: Any) -> "Directions":
        """A copy with :attr:`ref_norm` set to the mean L2 norm, over the prompts of ``acts``, of the activation at
        each of these directions' layers.

        ``acts`` is an ``ActivationStore`` holding this site (and every layer of these directions; read at its last
        read position, one layer at a time, so a lazy store is not loaded whole) or a tensor
        ``[prompt layer d_model]`` whose layer axis follows :attr:`layers`. Measure it on a reference set (e.g. the
        benign prompts): then ``coeff = 0.1 * ref_norm[j]`` adds a vector one tenth of the typical norm.
        """
        if isinstance(acts, Tensor):
            _check_acts("acts", acts, n_layers=len(self.layers), d_model=self.d_model)
            norms = acts.to(torch.float64).norm(dim=-1).mean(0)
            source: dict[str, Any] = {"from": "tensor"}
            n = len(acts)
        elif hasattr(acts, "at") and hasattr(acts, "layers") and hasattr(acts, "sites"):
            if self.site not in acts.sites:
                raise ValueError(f"the store holds sites {list(acts.sites)} but these directions are at site "
                                 f"{self.site!r}; measure ref_norm on activations of the same site.")
            missing = [layer for layer in self.layers if layer not in acts.layers]
            if missing:
                raise ValueError(f"the store lacks layers {missing} of these directions (it has {list(acts.layers)});"
                                 f" collect them, or select() the directions' layers first.")
            if len(acts) == 0:
                raise ValueError("the store holds 0 prompts; measure ref_norm on at least one prompt.")
            rows = []
            for layer in self.layers:
                x = acts.at(self.site, layer)
                if x.shape[-1] != self.d_model:
                    raise ValueError(f"the store's {self.site!r} has d_model={x.shape[-1]} but these directions "
                                     f"have d_model={self.d_model}; were they made from another model?")
                _check_acts(f"acts at layer {layer}", x[:, None, :])
                rows.append(x.to(torch.float64).norm(dim=-1).mean())
            norms = torch.stack(rows)
            n = len(acts)
            source = {"from": "ActivationStore", "position": str(acts.positions[-1]),
                      "prompts_sha256": getattr(acts, "meta", {}).get("prompts_sha256")}
        else:
            raise TypeError(f"acts must be an ActivationStore or a tensor [prompt layer d_model], got "
                            f"{type(acts).__name__}.")
        ref = norms.to(torch.float32)
        return replace(self, ref_norm=ref, provenance={**self.provenance,
                                                       "ref_norm": {**source, "n_prompts": n,
                                                                    "statistic": "mean L2 norm per layer"}})

    def normalized(self) -> "Directions":
        """A new Directions with every (category, layer) vector scaled to unit L2 norm (zero vector: error)."""
        v = _unit(self.vectors.to(torch.float64), self.categories, self.layers).to(self.vectors.dtype)
        return replace(self, vectors=v, provenance={**self.provenance, "normalized": True})

    def norms(self) -> Any:
        """Tidy ``pandas.DataFrame``: category, layer, norm (L2) of each vector."""
        import pandas as pd

        n = self.vectors.to(torch.float64).norm(dim=-1)
        return pd.DataFrame([{"method": self.method, "site": self.site, "category": c, "layer": layer,
                              "norm": float(n[i, j])}
                             for i, c in enumerate(self.categories) for j, layer in enumerate(self.layers)])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Directions):
            return NotImplemented
        return (self.categories == other.categories and self.layers == other.layers and self.site == other.site
                and self.method == other.method and self.provenance == other.provenance
                and self.vectors.dtype == other.vectors.dtype and self.vectors.shape == other.vectors.shape
                and bool(torch.equal(self.vectors, other.vectors))
                and (self.ref_norm is None) == (other.ref_norm is None)
                and (self.ref_norm is None or (self.ref_norm.dtype == other.ref_norm.dtype
                                               and bool(torch.equal(self.ref_norm, other.ref_norm)))))

    __hash__ = None  # type: ignore[assignment]  # mutable tensor inside

    def __repr__(self) -> str:
        return (f"Directions(method={self.method!r}, site={self.site!r}, categories={self.categories}, "
                f"layers={self.layers[0]}..{self.layers[-1]} ({len(self.layers)}), d_model={self.d_model})")

    # persistence --------------------------------------------------------------------------------------------
    @staticmethod
    def _paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
        p = Path(path)
        if p.suffix == ".safetensors":
            p = p.with_suffix("")
        return p.with_name(p.name + ".safetensors"), p.with_name(p.name + ".dims.json")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``<path>.safetensors`` (the vectors, ``ref_norm`` if set, and all metadata) and ``<path>.dims.json``
        (a readable sidecar: dims, dtype, metadata, the tensor file's sha256 and a save id).

        ``path`` may carry the ``.safetensors`` suffix or not. The tensor file is self-describing and written
        atomically, then the sidecar; both carry the same save id, and the sidecar the tensor file's sha256, so
        :meth:`load` refuses a pair that does not belong together (an interrupted save, a file from another save,
        an edited sidecar) instead of loading it. Returns the safetensors path.
        """
        from safetensors.torch import save as to_bytes

        from catlens.runs import atomic_path, write_json_atomic

        tensors_path, meta_path = self._paths(path)
        header = {"format": "catlens.Directions", "format_version": _FORMAT_VERSION, "save_id": uuid.uuid4().hex,
                  "dims": list(_DIMS), "shape": list(self.vectors.shape),
                  "dtype": str(self.vectors.dtype).removeprefix("torch."), "categories": list(self.categories),
                  "layers": list(self.layers), "site": self.site, "method": self.method,
                  "ref_norm": None if self.ref_norm is None else str(self.ref_norm.dtype).removeprefix("torch."),
                  "provenance": self.provenance}
        tensors = {"vectors": self.vectors.detach().cpu().contiguous()}
        if self.ref_norm is not None:
            tensors["ref_norm"] = self.ref_norm.detach().cpu().contiguous()
        blob = to_bytes(tensors, metadata={"format": "catlens.Directions", "catlens": json.dumps(header)})
        meta = {**header, "tensors_file": tensors_path.name, "tensors_sha256": hashlib.sha256(blob).hexdigest(),
                "tensors_bytes": len(blob)}
        with atomic_path(tensors_path) as tmp:
            tmp.write_bytes(blob)
        write_json_atomic(meta_path, meta)
        return tensors_path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Directions":
        """Read what :meth:`save` wrote (``path`` with or without the ``.safetensors`` suffix), checking that the
        tensor file matches its sidecar (sha256, save id, categories, layers, site, method, shape, dtype)."""
        from safetensors import safe_open

        tensors_path, meta_path = cls._paths(path)
        for p in (tensors_path, meta_path):
            if not p.exists():
                raise FileNotFoundError(f"no {p.name} at {str(p.parent)!r}; Directions.save writes both "
                                        f"{tensors_path.name} and {meta_path.name} (if only one is there, the save "
                                        f"was interrupted: save the directions again).")
        again = "Save (or recompute) the directions again."
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{str(meta_path)!r} is damaged or truncated (not valid JSON: {err}). {again}") from err
        if not isinstance(meta, dict) or meta.get("format") != "catlens.Directions":
            raise ValueError(f"{str(meta_path)!r} is not a catlens.Directions sidecar (format="
                             f"{meta.get('format') if isinstance(meta, dict) else None!r}).")
        version = meta.get("format_version")
        if version not in (1, _FORMAT_VERSION):
            raise ValueError(f"{str(meta_path)!r} has format_version {version!r}; this catlens reads 1 and "
                             f"{_FORMAT_VERSION}. {again}")
        header: dict[str, Any] = {}
        try:
            with safe_open(str(tensors_path), framework="pt") as f:
                file_meta = f.metadata() or {}
                keys = set(f.keys())
                if version >= 2:
                    header = json.loads(file_meta.get("catlens", "{}"))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own type for damaged files
            if version >= 2:
                digest = _sha256_file(tensors_path)
                if digest != meta.get("tensors_sha256"):
                    raise ValueError(f"{str(tensors_path)!r} is damaged or truncated (its sha256 does not match "
                                     f"{meta_path.name}, and it cannot be parsed: {err}). {again}") from err
            raise ValueError(f"{str(tensors_path)!r} is damaged or truncated ({err}). {again}") from err
        if version >= 2:
            if header.get("save_id") != meta.get("save_id"):
                raise ValueError(f"{tensors_path.name} and {meta_path.name} in {str(tensors_path.parent)!r} come "
                                 f"from different saves (save ids {header.get('save_id')!r} and "
                                 f"{meta.get('save_id')!r}): an interrupted save, or a file copied from another "
                                 f"save. {again}")
            digest = _sha256_file(tensors_path)
            if digest != meta.get("tensors_sha256"):
                raise ValueError(f"{str(tensors_path)!r} fails its checksum (sidecar sha256 "
                                 f"{str(meta.get('tensors_sha256'))[:12]}..., file {digest[:12]}...): it was changed "
                                 f"or damaged after it was saved. {again}")
            fields = ("shape", "dtype", "categories", "layers", "site", "method", "ref_norm", "provenance")
            differ = [k for k in fields if header.get(k) != meta.get(k)]
            if differ:
                detail = "; ".join(f"{k}: sidecar {meta.get(k)!r}, tensor file {header.get(k)!r}"
                                   for k in differ if k != "provenance")
                raise ValueError(f"{meta_path.name} does not match the metadata saved inside {tensors_path.name} "
                                 f"({', '.join(differ)} differ{': ' + detail if detail else ''}); the sidecar was "
                                 f"edited, and loading it would relabel the vectors. {again}")
        else:
            log.warning("%s was saved by an older catlens (format 1) without a checksum; it cannot be verified. "
                        "Save it again to add one.", tensors_path)
        from safetensors.torch import load_file

        tensors = load_file(str(tensors_path))
        vectors = tensors.get("vectors")
        if vectors is None or list(vectors.shape) != meta["shape"] or \
                str(vectors.dtype).removeprefix("torch.") != meta["dtype"]:
            raise ValueError(f"{tensors_path.name} holds {sorted(keys)} with vectors of shape "
                             f"{None if vectors is None else tuple(vectors.shape)} but the sidecar says shape "
                             f"{meta['shape']} dtype {meta['dtype']}; the files do not match. {again}")
        ref = tensors.get("ref_norm") if meta.get("ref_norm") else None
        if bool(meta.get("ref_norm")) != (ref is not None):
            raise ValueError(f"{tensors_path.name} and {meta_path.name} disagree on ref_norm; {again}")
        return cls(vectors=vectors, categories=tuple(meta["categories"]), layers=tuple(meta["layers"]),
                   site=meta["site"], method=meta["method"], provenance=meta["provenance"], ref_norm=ref)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _make(vectors64: Tensor, categories: Sequence[str], layers: tuple[int, ...], *, normalize: bool, site: str,
          method: str, provenance: Mapping[str, Any] | None, options: Mapping[str, Any]) -> Directions:
    cats = tuple(categories)
    v = _unit(vectors64, cats, layers) if normalize else vectors64
    return Directions(vectors=v.to(torch.float32), categories=cats, layers=layers, site=site, method=method,
                      provenance={**(provenance or {}), "method": method, "normalize": normalize, **options})


# -------------------------------------------------------------------------------------------------------- P1
def p1_mean_difference(
    cat_acts: Mapping[str, Float[Tensor, "_prompt layer d_model"]],
    respond_acts: Float[Tensor, "prompt layer d_model"],
    *,
    tau: float | None = 1e-3,
    top_k: int | str | None = P1_TOP_K,
    normalize: bool = True,
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
    provenance: Mapping[str, Any] | None = None,
) -> Directions:
    """P1's categorical steering vectors (PAPERS.md §2.3 C, the variant P1's notebook uses)::

        mu_c = mean_x h(x + " [c]")             over category c's prompts        (cat_acts[c])
        mu_b = mean_x h(x + " [respond]")       over the benign prompts           (respond_acts)
        d_c  = mask_tau(mu_c) - mask_tau(mu_b)  mask_tau(u)_i = u_i * 1[|u_i| >= tau], on each mean separately
        v_c  = topK(d_c) / ||topK(d_c)||         keep the K largest |d_c,i|, then unit L2 norm

    computed independently at every layer. Args:
        cat_acts: ``{category: [prompt, layer, d_model]}``, read at the category token (P1) or wherever the
            caller chose; the read position belongs in ``provenance``.
        respond_acts: ``[prompt, layer, d_model]``, the benign prompts at the ``[respond]`` token (P1).
        tau: mask threshold (P1: 1e-3); None disables the mask.
        top_k: dimensions kept (P1: :data:`P1_TOP_K` = 200 of 4096); None (or >= d_model) keeps all;
            ``"proportional"`` or ``"absolute"`` mean :func:`p1_top_k` of the activations' width (the registry
            entry ``fit_directions(..., "p1_mean_difference")`` defaults to :data:`P1_TOP_K_MODE`).
        normalize: unit L2 norm (P1: True).
        layers: layer labels of axis 1 (default 0..n-1).
    """
    n_layers, d_model = _check_group(cat_acts, "cat_acts")
    _check_acts("respond_acts", respond_acts, n_layers=n_layers, d_model=d_model)
    lay = _layer_labels(layers, n_layers)
    mode = top_k if isinstance(top_k, str) else None
    top_k = _resolve_top_k(top_k, d_model)
    mu_b = tau_mask(_mean64(respond_acts), tau)
    d = torch.stack([tau_mask(_mean64(x), tau) - mu_b for x in cat_acts.values()])
    return _make(top_k_sparsify(d, top_k), list(cat_acts), lay, normalize=normalize, site=site,
                 method="p1_mean_difference", provenance=provenance,
                 options={"tau": tau, "top_k": top_k, "top_k_mode": mode,
                          "n_prompts": {c: len(x) for c, x in cat_acts.items()}, "n_respond": len(respond_acts)})


def p1_contrastive(
    paired_cat_acts: Mapping[str, Float[Tensor, "_prompt layer d_model"]],
    paired_respond_acts: Mapping[str, Float[Tensor, "_prompt layer d_model"]],
    *,
    tau: float | None = None,
    top_k: int | None = None,
    normalize: bool = True,
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
    provenance: Mapping[str, Any] | None = None,
) -> Directions:
    """P1's paired "contrastive" variant (PAPERS.md §2.3 C)::

        v_c = normalise(topK(mask_tau(mean_i [h(x_i + " [c]") - h(x_i + " [respond]")])))

    over the *same* category-c prompts x_i: row i of ``paired_cat_acts[c]`` and row i of
    ``paired_respond_acts[c]`` come from the same prompt. The defaults (``tau=None, top_k=None``) are the values
    P1's layer-sweep driver passes; the mask acts on the mean paired difference.
    """
    n_layers, d_model = _check_group(paired_cat_acts, "paired_cat_acts")
    _check_group(paired_respond_acts, "paired_respond_acts", n_layers=n_layers, d_model=d_model)
    if set(paired_cat_acts) != set(paired_respond_acts):
        raise ValueError(f"paired_cat_acts and paired_respond_acts must have the same categories; got "
                         f"{sorted(paired_cat_acts)} and {sorted(paired_respond_acts)}.")
    rows = []
    for c, x in paired_cat_acts.items():
        y = paired_respond_acts[c]
        if len(x) != len(y):
            raise ValueError(f"category {c!r}: {len(x)} category-token rows but {len(y)} [respond] rows; the "
                             f"contrastive variant needs one pair per prompt (same prompts, same order).")
        rows.append(tau_mask(_mean64(x) - _mean64(y), tau))
    lay = _layer_labels(layers, n_layers)
    return _make(top_k_sparsify(torch.stack(rows), top_k), list(paired_cat_acts), lay, normalize=normalize,
                 site=site, method="p1_contrastive", provenance=provenance,
                 options={"tau": tau, "top_k": top_k, "n_pairs": {c: len(x) for c, x in paired_cat_acts.items()}})


# ------------------------------------------------------------------------------------ mean-difference family
def one_vs_benign(
    harmful_by_cat: Mapping[str, Float[Tensor, "_prompt layer d_model"]],
    benign_acts: Float[Tensor, "prompt layer d_model"],
    *,
    normalize: bool = False,
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
    provenance: Mapping[str, Any] | None = None,
) -> Directions:
    """``v_c = mean(harmful prompts of category c) - mean(benign prompts)`` per layer (no mask, no top-K).

    ``normalize=False`` keeps the raw difference, whose norm is meaningful for additive steering.
    """
    n_layers, d_model = _check_group(harmful_by_cat, "harmful_by_cat")
    _check_acts("benign_acts", benign_acts, n_layers=n_layers, d_model=d_model)
    mu_b = _mean64(benign_acts)
    d = torch.stack([_mean64(x) - mu_b for x in harmful_by_cat.values()])
    return _make(d, list(harmful_by_cat), _layer_labels(layers, n_layers), normalize=normalize, site=site,
                 method="one_vs_benign", provenance=provenance,
                 options={"n_prompts": {c: len(x) for c, x in harmful_by_cat.items()}, "n_benign": len(benign_acts)})


def one_vs_rest(
    harmful_by_cat: Mapping[str, Float[Tensor, "_prompt layer d_model"]],
    *,
    weighting: Literal["prompt", "category"] = "prompt",
    normalize: bool = False,
    layers: Sequence[int] | None = None,
    site: str = "resid_post",
    provenance: Mapping[str, Any] | None = None,
) -> Directions:
    """``v_c = mean(category c) - mean(the other harmful categories)`` per layer.

    ``weighting`` says how the other categories are pooled:

    * ``"prompt"`` (default, a plain pooled mean): every prompt of the other categories counts once, so large
      categories dominate ``mu_rest``;
    * ``"category"``: ``mu_rest`` is the unweighted mean of the other categories' means, so each category counts
      once whatever its size.

    Needs at least two categories.
    """
    if weighting not in ("prompt", "category"):
        raise ValueError(f"weighting={weighting!r} is not allowed; use 'prompt' (pooled over prompts) or "
                         f"'category' (mean of the per-category means).")
    n_layers, _ = _check_group(harmful_by_cat, "harmful_by_cat")
    if len(harmful_by_cat) < 2:
        raise ValueError(f"one_vs_rest needs at least 2 categories, got {list(harmful_by_cat)}; use "
                         f"one_vs_benign for a single category.")
    cats = list(harmful_by_cat)
    sums = {c: x.to(torch.float64).sum(0) for c, x in harmful_by_cat.items()}
    counts = {c: len(x) for c, x in harmful_by_cat.items()}
    rows = []
    for c in cats:
        others = [o for o in cats if o != c]
        if weighting == "prompt":
            mu_rest = sum(sums[o] for o in others) / sum(counts[o] for o in others)
        else:
            mu_rest = sum(sums[o] / counts[o] for o in others) / len(others)
        rows.append(sums[c] / counts[c] - mu_rest)
    return _make(torch.stack(rows), cats, _layer_labels(layers, n_layers), normalize=normalize, site=site,
                 method="one_vs_rest", provenance=provenance,
                 options={"weighting": weighting, "n_prompts": counts})


def refusal_direction(
    harmful_acts: Float[Tensor, "prompt layer d_model"],
    benign_acts: Float[Tensor, "_prompt layer d_model"],
) -> Float[Tensor, "layer d_model"]:
    """The global harmful-vs-benign direction ``mean(harmful) - mean(benign)`` per layer (raw norm, float32)."""
    _check_acts("harmful_acts", harmful_acts)
    _check_acts("benign_acts", benign_acts, n_layers=harmful_acts.shape[1], d_model=harmful_acts.shape[2])
    return (_mean64(harmful_acts) - _mean64(benign_acts)).to(torch.float32)


def orthogonalize_against(
    directions: Directions,
    refusal: Float[Tensor, "layer d_model"],
    *,
    normalize: bool = False,
) -> Directions:
    """Remove from each direction its component along the layer's refusal direction ``r``::

        v_c' = v_c - (v_c . r_hat) r_hat,   r_hat = r / ||r||     (per layer; row j of ``refusal`` is layer j)

    The result is not renormalised unless ``normalize=True`` (a category direction almost parallel to the
    refusal direction keeps only a small residual, and its norm says so).
    """
    if refusal.shape != (len(directions.layers), directions.d_model):
        raise ValueError(f"refusal has shape {tuple(refusal.shape)} but the directions need "
                         f"[layer={len(directions.layers)}, d_model={directions.d_model}] (one row per layer "
                         f"label {directions.layers}).")
    if not bool(torch.isfinite(refusal).all()):
        raise ValueError("refusal direction contains NaN or inf.")
    r = refusal.to(torch.float64)
    rn = r.norm(dim=-1, keepdim=True)
    if bool((rn == 0).any()):
        bad = directions.layers[int((rn.squeeze(-1) == 0).nonzero()[0])]
        raise ValueError(f"the refusal direction at layer {bad} is exactly zero; nothing to orthogonalise against.")
    r_hat = r / rn
    v = directions.vectors.to(torch.float64)
    v = v - (v * r_hat).sum(-1, keepdim=True) * r_hat
    out = _make(v, directions.categories, directions.layers, normalize=normalize, site=directions.site,
                method=f"{directions.method}_orth", provenance=directions.provenance,
                options={"orthogonalized_against": "refusal_direction", "base_method": directions.method})
    return out if directions.ref_norm is None else replace(out, ref_norm=directions.ref_norm.clone())


# -------------------------------------------------------------------------------------------------------- P2
SafeActs = Float[Tensor, "prompt layer d_model"] | Mapping[str, Float[Tensor, "_prompt layer d_model"]]


def _safe_for(safe: Any, categories: Sequence[str], n_layers: int, d_model: int) -> tuple[dict[str, Tensor], str]:
    """Resolve the safe side: one generic tensor shared by all categories, or a category-matched mapping."""
    if isinstance(safe, Tensor):
        _check_acts("safe_acts", safe, n_layers=n_layers, d_model=d_model)
        return {c: safe for c in categories}, "generic"
    missing = [c for c in categories if c not in safe]
    if missing:
        raise ValueError(f"safe_acts_by_cat has no entry for {missing} (it has {sorted(safe)}). Give matched safe "
                         f"data for every unsafe category, or pass one generic tensor (e.g. Alpaca) instead.")
    _check_group({c: safe[c] for c in categories}, "safe_acts_by_cat", n_layers=n_layers, d_model=d_model)
    return {c: safe[c] for c in categories}, "matched"


def p2_unsupervised(
    unsafe_acts_by_cat: Mapping[str, Float[Tensor, "_prompt layer d_model"]],
    safe_acts: SafeActs,
    *,
    normalize: bool = False,
    layers: Sequence[int] | None = None,
    site: str = "attn_out",
    provenance: Mapping[str, Any] | None = None,
) -> Directions:
    """P2's unsupervised category vector (PAPERS.md §3.2, §3.7 item 3)::

        omega_c = mean_{x in D_safe} act(x) - mean_{x in D_unsafe_c} act(x)      (per layer)

    The sign is safe minus unsafe: adding omega pushes toward safe. ``safe_acts`` is either one tensor of
    generic harmless data (e.g. Alpaca; the same for every category) or a ``{category: tensor}`` mapping of
    category-matched safe data (the switch of §3.7 item 1); ``provenance["safe_data"]`` records which.
    P2's site is the attention output (``site="attn_out"``), P2's token reduction is an open question: the
    caller chooses and records it.
    """
    n_layers, d_model = _check_group(unsafe_acts_by_cat, "unsafe_acts_by_cat")
    cats = list(unsafe_acts_by_cat)
    safe, kind = _safe_for(safe_acts, cats, n_layers, d_model)
    d = torch.stack([_mean64(safe[c]) - _mean64(unsafe_acts_by_cat[c]) for c in cats])
    return _make(d, cats, _layer_labels(layers, n_layers), normalize=normalize, site=site,
                 method="p2_unsupervised", provenance=provenance,
                 options={"safe_data": kind, "n_unsafe": {c: len(x) for c, x in unsafe_acts_by_cat.items()},
                          "n_safe": {c: len(safe[c]) for c in cats}})


def _pairs(n_safe: int, n_unsafe: int, pairing: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    n = min(n_safe, n_unsafe)
    if pairing == "truncate":
        return torch.arange(n), torch.arange(n)
    return torch.randperm(n_safe, generator=generator)[:n], torch.randperm(n_unsafe, generator=generator)[:n]


def p2_pruned(
    unsafe_acts_by_cat: Mapping[str, Float[Tensor, "_prompt layer d_model"]],
    safe_acts: SafeActs,
    *,
    quantile: float = 0.5,
    pairing: Literal["truncate", "random"] = "truncate",
    seed: int = 0,
    normalize: bool = False,
    layers: Sequence[int] | None = None,
    site: str = "attn_out",
    provenance: Mapping[str, Any] | None = None,
) -> Directions:
    """P2's pruned vector ("median-norm pruning", PAPERS.md §3.3; an unverified reading, so a switch here).

    Per category c and per layer, independently:

    1. pair safe and unsafe rows: ``pairing="truncate"`` pairs row i with row i for i < min(N_safe, N_unsafe);
       ``"random"`` draws a random subset of that size from each side (``torch.Generator`` seeded with ``seed``;
       categories in order) and pairs them in the drawn order;
    2. ``delta_i = act(safe_i) - act(unsafe_i)`` and its L2 norm;
    3. keep the pairs with ``||delta_i|| > q``, where ``q`` is the ``quantile`` of the norms (linear
       interpolation, as ``torch.quantile``); with distinct norms and ``quantile=0.5`` that is
       ``floor(n/2)`` pairs. If ties leave nothing strictly above ``q``, the pairs with norm ``>= q`` are kept;
    4. ``omega_c = mean of the kept delta_i``.

    ``provenance["n_kept"][c]`` lists the number kept at each layer.
    """
    if not 0.0 <= quantile < 1.0:
        raise ValueError(f"quantile={quantile} must be in [0, 1) (0.5 = keep the differences above the median norm).")
    if pairing not in ("truncate", "random"):
        raise ValueError(f"pairing={pairing!r} is not allowed; use 'truncate' or 'random'.")
    n_layers, d_model = _check_group(unsafe_acts_by_cat, "unsafe_acts_by_cat", min_n=2)
    cats = list(unsafe_acts_by_cat)
    safe, kind = _safe_for(safe_acts, cats, n_layers, d_model)
    gen = torch.Generator().manual_seed(seed)
    rows, kept = [], {}
    for c in cats:
        s, u = safe[c], unsafe_acts_by_cat[c]
        if len(s) < 2:
            raise ValueError(f"category {c!r}: only {len(s)} safe row(s); pruning by norm quantile needs >= 2 pairs.")
        si, ui = _pairs(len(s), len(u), pairing, gen)
        delta = s[si].to(torch.float64) - u[ui].to(torch.float64)  # [pair, layer, d_model]
        norms = delta.norm(dim=-1)  # [pair, layer]
        q = torch.quantile(norms, quantile, dim=0, keepdim=True)
        keep = norms > q
        empty = keep.sum(0) == 0
        keep[:, empty] = norms[:, empty] >= q[:, empty]
        rows.append((delta * keep[..., None]).sum(0) / keep.sum(0)[:, None])
        kept[c] = keep.sum(0).tolist()
    return _make(torch.stack(rows), cats, _layer_labels(layers, n_layers), normalize=normalize, site=site,
                 method="p2_pruned", provenance=provenance,
                 options={"safe_data": kind, "quantile": quantile, "pairing": pairing, "seed": seed,
                          "n_pairs": {c: min(len(safe[c]), len(unsafe_acts_by_cat[c])) for c in cats},
                          "n_kept": kept})


JudgeLabels = (Mapping[str, Bool[Tensor, "_prompt"] | Sequence[bool]] | Callable[[Mapping[str, Any]], bool])


def p2_guided(
    unsafe_acts_by_cat: Mapping[str, Float[Tensor, "_prompt layer d_model"]],
    safe_acts: SafeActs,
    *,
    judge_labels: JudgeLabels,
    records: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    quantile: float | None = None,
    pairing: Literal["truncate", "random"] = "truncate",
    seed: int = 0,
    normalize: bool = False,
    layers: Sequence[int] | None = None,
    site: str = "attn_out",
    provenance: Mapping[str, Any] | None = None,
) -> Directions:
    """P2's guided vector (PAPERS.md §3.2, §3.7 item 4): only unsafe prompts whose *responses* a judge labels
    unsafe contribute to ``mean(unsafe_c)``; the safe side is used as given. Then as :func:`p2_unsupervised`,
    or as :func:`p2_pruned` when ``quantile`` is given.

    The judge is a parameter, in one of two forms:

    * a mapping ``{category: mask}`` with one boolean per row of ``unsafe_acts_by_cat[category]``
      (True = the response was judged unsafe = keep), e.g. precomputed by a guard model;
    * a callable ``judge(record) -> bool`` (True = unsafe = keep) applied to ``records[category][i]``, the record
      of row i (for example ``{"prompt": ..., "response": ...}``); ``records`` is then required.

    A category with no prompt judged unsafe is an error (its guided mean is undefined).
    ``provenance["n_judged_unsafe"]`` records how many rows each category kept.
    """
    _check_group(unsafe_acts_by_cat, "unsafe_acts_by_cat")
    kept: dict[str, Tensor] = {}
    for c, x in unsafe_acts_by_cat.items():
        if callable(judge_labels):
            if records is None or c not in records:
                raise ValueError(f"judge_labels is a callable, so records[{c!r}] (one record per prompt) is needed; "
                                 f"got records for {sorted(records) if records else 'no category'}.")
            if len(records[c]) != len(x):
                raise ValueError(f"records[{c!r}] has {len(records[c])} entries but there are {len(x)} activations.")
            mask = torch.tensor([bool(judge_labels(r)) for r in records[c]], dtype=torch.bool)
        else:
            if c not in judge_labels:
                raise ValueError(unknown_name_message("category in judge_labels", c, list(judge_labels)))
            mask = torch.as_tensor(judge_labels[c], dtype=torch.bool).reshape(-1)
            if len(mask) != len(x):
                raise ValueError(f"judge_labels[{c!r}] has {len(mask)} labels but there are {len(x)} activations.")
        if not bool(mask.any()):
            raise ValueError(f"category {c!r}: the judge labelled none of its {len(x)} responses unsafe, so the "
                             f"guided mean is undefined. Drop the category or use p2_unsupervised.")
        kept[c] = x[mask]
    if quantile is None:
        d = p2_unsupervised(kept, safe_acts, normalize=normalize, layers=layers, site=site, provenance=provenance)
    else:
        d = p2_pruned(kept, safe_acts, quantile=quantile, pairing=pairing, seed=seed, normalize=normalize,
                      layers=layers, site=site, provenance=provenance)
    options = {"guided": True, "n_judged_unsafe": {c: len(x) for c, x in kept.items()},
               "n_unsafe_total": {c: len(x) for c, x in unsafe_acts_by_cat.items()},
               "judge": "callable" if callable(judge_labels) else "mask", "base_method": d.method}
    return replace(d, method="p2_guided", provenance={**d.provenance, "method": "p2_guided", **options})


# --------------------------------------------------------------------------------------------- the registry
def _orth(harmful: Mapping[str, Tensor], benign: Tensor, *, normalize: bool = False, **kw: Any) -> Directions:
    base = one_vs_benign(harmful, benign, **kw)
    refusal = refusal_direction(torch.cat([harmful[c] for c in harmful]), benign)
    return orthogonalize_against(base, refusal, normalize=normalize)


def _p1(harmful: Mapping[str, Tensor], benign: Tensor, *, top_k: int | str | None = P1_TOP_K_MODE,
        **kw: Any) -> Directions:
    if isinstance(top_k, int) and not isinstance(top_k, bool) and harmful:
        top_k = min(top_k, next(iter(harmful.values())).shape[-1])
    return p1_mean_difference(harmful, benign, top_k=top_k, **kw)


@dataclass(frozen=True)
class Method:
    """One entry of :data:`METHODS`: how ``fit_directions`` calls a constructor."""

    fit: Callable[..., Directions]
    """``fit(harmful_by_category, benign, **options)``."""
    needs_benign: bool = True
    """False when the method uses the harmful prompts only (``one_vs_rest``)."""
    summary: str = ""


METHODS: dict[str, Method] = {
    "one_vs_benign": Method(one_vs_benign, summary="mean(harmful c) - mean(benign)"),
    "one_vs_rest": Method(lambda h, b, **kw: one_vs_rest(h, **kw), needs_benign=False,
                          summary="mean(harmful c) - mean(the other harmful categories)"),
    "one_vs_benign_orth": Method(_orth, summary="one_vs_benign with the harmful-vs-benign direction projected out"),
    "p1_mean_difference": Method(_p1, summary="P1: normalise(topK(mask_tau(mu_c) - mask_tau(mu_b))), top_k "
                                              "p1_top_k(d_model) by default, an int is capped at d_model"),
    "p1_contrastive": Method(p1_contrastive, summary="P1's paired variant; benign is {category: paired acts}"),
    "p2_unsupervised": Method(p2_unsupervised, summary="P2: mean(safe) - mean(unsafe c); benign is a tensor "
                                                       "(generic) or {category: tensor} (matched)"),
    "p2_pruned": Method(p2_pruned, summary="P2: mean of the paired differences above a norm quantile"),
    "p2_guided": Method(p2_guided, summary="P2: only the unsafe prompts a judge labels unsafe (judge_labels=...)"),
}
"""Direction methods by name: what :func:`fit_directions` accepts (``method=``)."""


def check_method(method: str) -> Method:
    """The registry entry of ``method``, or a ``ValueError`` with a did-you-mean listing the methods."""
    if method not in METHODS:
        raise ValueError(unknown_name_message("direction method", method, METHODS,
                                              "See catlens.directions.METHODS."))
    return METHODS[method]


def fit_directions(
    source: Any,
    method: str,
    *,
    benign: Any = None,
    site: str | None = None,
    split: str | Sequence[str] | None = None,
    harmful_label: str = "harmful",
    **options: Any,
) -> Directions:
    """Fit category directions with a registered method (:data:`METHODS`), from activations or from a store.

    ``source`` is either

    * a mapping ``{category: Float[Tensor, "_prompt layer d_model"]}`` of the harmful activations, with ``benign``
      the benign side (a tensor; a ``{category: tensor}`` mapping for ``p1_contrastive`` and the matched
      ``p2_unsupervised``); or
    * an :class:`catlens.cache.ActivationStore` (anything with ``index`` and ``get(site)``): the harmful prompts
      (``label == harmful_label``) are grouped by ``category``, the others are the benign side, both restricted to
      ``split`` (one split name or several; all prompts when None), read at ``site`` (default ``resid_post``).
      ``layers`` default to the store's.

    Other keywords go to the constructor (``normalize``, ``layers``, ``site``, ``provenance``, ``tau``, ``top_k``,
    ``quantile``, ``judge_labels``...). Equal to calling the constructor directly::

        fit_directions(h, "one_vs_benign", benign=b, normalize=True) == one_vs_benign(h, b, normalize=True)

    >>> g = torch.Generator().manual_seed(0)
    >>> h = {"fraud": torch.randn(4, 2, 8, generator=g), "hate": torch.randn(5, 2, 8, generator=g) + 1}
    >>> fit_directions(h, "one_vs_rest").categories
    ('fraud', 'hate')
    >>> fit_directions(h, "one_vs_bengin", benign=torch.zeros(3, 2, 8))  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: Unknown direction method 'one_vs_bengin'. Did you mean: one_vs_benign...
    """
    entry = check_method(method)
    if hasattr(source, "index") and hasattr(source, "get"):
        if benign is not None:
            raise ValueError("fit_directions(store, ...): the benign side comes from the store's labels; do not pass "
                             "benign= as well (or pass activations instead of a store).")
        source, benign, store_layers = _from_store(source, site or "resid_post", split, harmful_label)
        options.setdefault("layers", store_layers)
        options.setdefault("site", site or "resid_post")
    elif site is not None:
        options.setdefault("site", site)
    if not isinstance(source, Mapping) or not source:
        raise ValueError(f"fit_directions: source must be a non-empty {{category: activations}} mapping or an "
                         f"ActivationStore; got {type(source).__name__}.")
    if entry.needs_benign and benign is None:
        raise ValueError(f"direction method {method!r} needs the benign side: pass benign=<activations>.")
    return entry.fit(source, benign, **options)


def _from_store(store: Any, site: str, split: str | Sequence[str] | None,
                harmful_label: str) -> tuple[dict[str, Tensor], Tensor, tuple[int, ...]]:
    idx = store.index
    keep = [True] * len(idx)
    if split is not None:
        splits = [split] if isinstance(split, str) else list(split)
        keep = idx["split"].isin(splits).to_numpy()
    acts = store.get(site)
    harmful = (idx["label"] == harmful_label).to_numpy() & keep
    benign_rows = (idx["label"] != harmful_label).to_numpy() & keep
    cats = sorted(idx.loc[harmful, "category"].dropna().unique())
    by_cat = {c: acts[torch.from_numpy((harmful & (idx["category"] == c).to_numpy()).nonzero()[0])] for c in cats}
    benign = acts[torch.from_numpy(benign_rows.nonzero()[0])]
    if not by_cat or len(benign) == 0:
        raise ValueError(f"the store has no harmful prompts with a category or no other prompts in split={split!r} "
                         f"(labels: {sorted(idx['label'].unique())}); check split= and harmful_label=.")
    return by_cat, benign, tuple(int(layer) for layer in store.layers)
