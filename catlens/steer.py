"""Steering: plain-data interventions, a probe gate and a category router, applied per row of a batch.

A steering *spec* is frozen plain data (tensors and numbers, no closures): :class:`Intervention` (one edit at one
``(site, layer)``), :class:`Gate` (a fitted probe that decides, per prompt, whether to steer toward refusal, away
from it, or not at all), :class:`Router` (picks each prompt's category) and :class:`SteeringPolicy` (all of them
plus the coefficients of the gate's two outcomes). A policy saves to JSON + safetensors and loads back exactly, so
a setting found by a sweep can be reapplied by anyone (``catlens generate --policy``) and compiled for an inference
engine that takes one steering vector per request (:func:`request_vectors`).

Applying a spec is the job of :func:`steering` (any forward call inside a ``with`` block) and of
:func:`catlens.generation.generate` (batched KV-cached generation that keeps a :class:`BatchContext` up to date).

Positions are defined from the batch context, not guessed from a call's sequence length. With a left-padded
prompt of padded length ``T`` (row ``b``'s real tokens start at ``T - n_b``) and absolute position ``p``:

* ``"all"``: every real (non-pad) position, prompt and generated (P2);
* ``"prompt"``: real prompt positions ``p < T``;
* ``"generated"``: positions ``p >= T``, i.e. generated tokens fed back as input;
* ``"last_prompt"``: ``p = T - 1`` and every ``p >= T`` (P1, PAPERS §2.3 H: the last prompt token and every
  generated token);
* ``"last_prompt+K"`` (``K >= 0``): ``T - 1 <= p <= T - 1 + K``, the decision position and the first ``K``
  generated tokens (``"last_prompt+0"`` is the last prompt token alone);
* a tuple of ints: explicit prompt offsets; negative ones count back from the end of the prompt (``-1`` is the last
  prompt token), non-negative ones count from the row's first real token.

Pad positions are never edited, and the same absolute positions are edited with and without a KV cache. Outside a
context (a bare forward call inside :func:`steering`), each call is treated as one unpadded prompt, unless an
``attention_mask`` is given to :func:`steering`.

Kinds, with ``c`` the row's coefficient (times the layer's reference norm when ``scale="norm"``) and ``û`` the
row's unit direction:

* ``"add"``: ``x + c v`` (``v`` as given, or unit when ``normalize``);
* ``"ablate"``: ``x - (x·û) û`` (coefficient ignored);
* ``"clamp"``: ``x + (c - x·û) û`` (projection set to ``c``);
* ``"low_rank"``: ``x + c U(Vᵀ z)``, with ``z`` a fixed input vector or, when ``z`` is ``None``, the activation
  itself (the input-conditioned variant).

Every hook counts its calls and the positions it edited; leaving a :func:`steering` block in which an intervention
never fired raises, because silently skipped hooks are a known failure mode of hook-based tooling.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from catlens.errors import unknown_name_message
from catlens.model import Site

log = logging.getLogger(__name__)

KINDS = ("add", "ablate", "clamp", "low_rank")
NAMED_POSITIONS = ("all", "prompt", "generated", "last_prompt")
SCALES = ("raw", "norm")
GATE_OUTCOMES = ("toward", "away", "none")
ROUTER_KINDS = ("refusal_tokens", "probe", "fixed")
POLICY_FORMAT = 1
# A site's (layer, order) key: hooks of one block fire in this order, so a reader at an earlier key sees an
# activation no later intervention has touched yet.
_SITE_ORDER = {Site.RESID_PRE: 0, Site.Z: 1, Site.ATTN_OUT: 2, Site.RESID_MID: 3, Site.MLP_OUT: 4, Site.RESID_POST: 5}


def _finite(name: str, value: Any, *, lo: float = -math.inf, hi: float = math.inf, allow_none: bool = False
            ) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a number, got {type(value).__name__}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} is not finite; give a finite number"
                         f"{f' in [{lo}, {hi}]' if math.isfinite(lo) or math.isfinite(hi) else ''}.")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is out of range; allowed: [{lo}, {hi}].")
    return value


def _check_tensor(name: str, t: Any, ndim: int | tuple[int, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}.")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} has NaN or inf entries; recompute it (a zero-norm normalisation is the usual "
                         f"cause).")
    return t.detach().float().cpu()


def positions_window(positions: Any) -> int | None:
    """``K`` of a ``"last_prompt+K"`` positions spec, else ``None``.

    >>> positions_window("last_prompt+4"), positions_window("last_prompt")
    (4, None)
    """
    if isinstance(positions, str):
        m = re.fullmatch(r"last_prompt\+(\d{1,6})", positions)
        if m:
            return int(m.group(1))
    return None


def parse_positions(positions: str | int | Sequence[int]) -> str | tuple[int, ...]:
    """Validate a positions spec: a name of :data:`NAMED_POSITIONS` or a non-empty sequence of int offsets.

    >>> parse_positions("last_prompt"), parse_positions([-2, -1])
    ('last_prompt', (-2, -1))
    """
    if isinstance(positions, str):
        if positions in NAMED_POSITIONS:
            return positions
        if positions_window(positions) is not None:
            return positions
        if positions == "last":
            raise ValueError("positions='last' was renamed: use 'last_prompt' (the last prompt token and every "
                             "generated token, P1) or offsets such as (-1,) (the last prompt token only).")
        raise ValueError(unknown_name_message("positions", positions, NAMED_POSITIONS,
                                              "Or 'last_prompt+K' (the last prompt token and the first K "
                                              "generated tokens), or prompt offsets such as (-3, -2, -1)."))
    if isinstance(positions, int) and not isinstance(positions, bool):
        return (int(positions),)
    out = tuple(positions)
    if not out or not all(isinstance(p, int) and not isinstance(p, bool) for p in out):
        raise ValueError(f"positions={positions!r}: give a name ({', '.join(NAMED_POSITIONS)}) or a non-empty "
                         f"sequence of int prompt offsets (negative from the end, e.g. (-1,)).")
    return tuple(sorted(set(out)))


# ------------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True, eq=False)
class Intervention:
    """One edit at one ``(site, layer)``, with one or several directions (rows picked per prompt).

    ``vectors`` is ``[direction d]`` (or one ``[d]`` vector); ``labels`` names each direction (e.g. categories) so
    that a :class:`Router` can pick one per prompt, and ``direction`` is the default row. ``coeff`` is the default
    coefficient; a policy's gate or explicit per-row coefficients replace it. With ``scale="norm"`` every
    coefficient is a fraction of ``ref_norm``, the site's typical activation norm at this layer (see
    :meth:`catlens.directions.Directions.with_ref_norm`), so that 0.15 means the same at every layer and model.

    For the per-head site ``z`` the width is ``n_heads * d_head`` (all heads, flattened) or ``d_head`` with
    ``head`` set. ``low_rank`` uses ``U`` and ``V`` (``[d r]``) and ``z`` (``[d]``, or ``None`` for the activation).
    """

    site: Site | str
    layer: int
    vectors: Tensor | None = None
    coeff: float | int = 1.0
    kind: str = "add"
    positions: str | Sequence[int] = "all"
    scale: str = "raw"
    ref_norm: float | int | None = None
    normalize: bool = False
    labels: Sequence[str] = ()
    direction: int = 0
    head: int | None = None
    U: Tensor | None = None
    V: Tensor | None = None
    z: Tensor | None = None
    label: str = ""
    """Free text carried into logs and tables."""

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "site", Site.parse(self.site))
        if self.site is Site.PATTERN:
            raise ValueError("site='pattern' cannot be steered with a direction; choose one of resid_pre, "
                             "resid_mid, resid_post, attn_out, mlp_out, z.")
        if self.kind not in KINDS:
            raise ValueError(unknown_name_message("intervention kind", self.kind, KINDS))
        if self.scale not in SCALES:
            raise ValueError(unknown_name_message("coefficient scale", self.scale, SCALES))
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise TypeError(f"layer={self.layer!r} must be an int.")
        set_(self, "positions", parse_positions(self.positions))
        set_(self, "coeff", _finite("coeff", self.coeff, lo=-1e6, hi=1e6))
        if self.scale == "norm":
            if self.ref_norm is None:
                raise ValueError("scale='norm' needs ref_norm (the site's typical activation norm at this layer); "
                                 "use Directions.with_ref_norm(...) before from_directions, or scale='raw'.")
            set_(self, "ref_norm", _finite("ref_norm", self.ref_norm, lo=1e-12))
        elif self.ref_norm is not None:
            set_(self, "ref_norm", _finite("ref_norm", self.ref_norm, lo=1e-12))
        if self.kind == "low_rank":
            if self.U is None or self.V is None:
                raise ValueError("kind='low_rank' needs U and V ([d r] each).")
            U, V = _check_tensor("U", self.U, 2), _check_tensor("V", self.V, 2)
            if U.shape != V.shape:
                raise ValueError(f"U {tuple(U.shape)} and V {tuple(V.shape)} must have the same shape [d r].")
            set_(self, "U", U)
            set_(self, "V", V)
            if self.z is not None:
                z = _check_tensor("z", self.z, 1)
                if z.shape[0] != U.shape[0]:
                    raise ValueError(f"z has {z.shape[0]} dims, U has {U.shape[0]} rows; they must match.")
                set_(self, "z", z)
            if self.vectors is not None:
                raise ValueError("kind='low_rank' takes U, V (and z), not vectors.")
        else:
            if self.vectors is None:
                raise ValueError(f"kind={self.kind!r} needs vectors ([d] or [direction d]).")
            v = _check_tensor("vectors", self.vectors, (1, 2))
            v = v.unsqueeze(0) if v.dim() == 1 else v
            if v.shape[0] == 0:
                raise ValueError("vectors is empty; give at least one direction.")
            if (self.kind != "add" or self.normalize) and bool((v.norm(dim=-1) == 0).any()):
                raise ValueError(f"kind={self.kind!r} (or normalize=True) needs non-zero vectors; direction(s) "
                                 f"{(v.norm(dim=-1) == 0).nonzero().flatten().tolist()} are zero.")
            set_(self, "vectors", v)
            labels = tuple(self.labels)
            if labels and len(labels) != v.shape[0]:
                raise ValueError(f"{len(labels)} labels for {v.shape[0]} directions; give one label per direction.")
            if len(set(labels)) != len(labels):
                raise ValueError(f"labels must be distinct, got {labels}.")
            set_(self, "labels", labels)
            if not 0 <= self.direction < v.shape[0]:
                raise ValueError(f"direction={self.direction} is out of range for {v.shape[0]} directions.")
        if self.head is not None and self.site is not Site.Z:
            raise ValueError(f"head={self.head} is only meaningful at site 'z' (got site {self.site.value!r}).")

    # ----------------------------------------------------------------------------------------- helpers
    @property
    def width(self) -> int:
        return int(self.U.shape[0] if self.kind == "low_rank" else self.vectors.shape[1])

    @property
    def n_directions(self) -> int:
        return 1 if self.kind == "low_rank" else int(self.vectors.shape[0])

    @property
    def scale_factor(self) -> float:
        return float(self.ref_norm) if self.scale == "norm" else 1.0

    def direction_index(self, label: str) -> int:
        if label not in self.labels:
            raise ValueError(unknown_name_message(f"direction label of intervention at layer {self.layer}", label,
                                                  self.labels or ["(unlabelled)"]))
        return self.labels.index(label)

    def check_model(self, model: Any) -> None:
        """Clear errors for a layer or a width that does not fit ``model``."""
        n = model.n_layers
        if not -n <= self.layer < n:
            raise ValueError(f"intervention {self.label or ''} layer={self.layer} is out of range for "
                             f"{model.name!r} with {n} layers (0..{n - 1}).")
        if self.site is Site.Z:
            want = model.d_head if self.head is not None else model.n_heads * model.d_head
            if self.head is not None and not 0 <= self.head < model.n_heads:
                raise ValueError(f"head={self.head} is out of range for {model.n_heads} heads.")
        else:
            want = model.d_model
        ctx = getattr(model, "n_ctx", None)
        far = [k for k in (self.positions if not isinstance(self.positions, str) else ()) if ctx and abs(k) >= ctx]
        if far:
            raise ValueError(f"intervention at {self.site.value} layer {self.layer}: positions={self.positions} has "
                             f"offset(s) {far} beyond {model.name!r}'s context of {ctx} tokens, so it would never "
                             f"edit anything; give prompt offsets such as (-1,) or a name like 'last_prompt'.")
        if self.width != want:
            raise ValueError(f"intervention at {self.site.value} layer {self.layer} has width {self.width}, but "
                             f"{model.name!r} needs {want} there (d_model={model.d_model}); the vectors were made "
                             f"for another model.")

    # --------------------------------------------------------------------------------------- the edit
    def edit(self, x: Float[Tensor, "batch pos d"], mask: Tensor, coeff: Float[Tensor, " batch"],
             direction: Tensor, vectors: Tensor | None, U: Tensor | None, V: Tensor | None, z: Tensor | None
             ) -> Float[Tensor, "batch pos d"]:
        """The edited activation: positions where ``mask`` ([batch pos] bool) is False are returned unchanged."""
        c = (coeff * self.scale_factor).to(x.dtype)[:, None, None]
        if self.kind == "low_rank":
            src = x if z is None else z.expand_as(x)
            delta = c * ((src @ V) @ U.T)
            return torch.where(mask[..., None], x + delta, x)
        v = vectors[direction]  # [batch d]
        if self.kind == "add":
            if self.normalize:
                v = v / v.norm(dim=-1, keepdim=True)
            new = x + c * v[:, None, :]
        else:
            u = (v / v.norm(dim=-1, keepdim=True))[:, None, :]
            proj = (x * u).sum(-1, keepdim=True)
            new = x - proj * u if self.kind == "ablate" else x + (c - proj) * u
        return torch.where(mask[..., None], new, x)

    # ------------------------------------------------------------------------------------ plain data
    def to_dict(self, key: str, tensors: dict[str, Tensor]) -> dict[str, Any]:
        d: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                tensors[f"{key}.{f.name}"] = v.contiguous()
                d[f.name] = f"{key}.{f.name}"
            elif isinstance(v, Site):
                d[f.name] = v.value
            elif isinstance(v, tuple):
                d[f.name] = list(v)
            else:
                d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> "Intervention":
        kw = dict(d)
        for name in ("vectors", "U", "V", "z"):
            if kw.get(name) is not None:
                kw[name] = tensors[kw[name]]
        kw["labels"] = tuple(kw.get("labels", ()))
        kw["positions"] = parse_positions(kw.get("positions", "all"))
        return cls(**kw)

    @classmethod
    def from_directions(cls, directions: Any, layer: int, *, site: str | None = None,
                        categories: Sequence[str] | None = None, **kwargs: Any) -> "Intervention":
        """One intervention at ``layer`` holding every category's direction of a
        :class:`catlens.directions.Directions` (``labels`` = its categories, so a :class:`Router` picks one per
        prompt), with that layer's reference norm when the directions carry one
        (:meth:`~catlens.directions.Directions.with_ref_norm`), so that ``scale="norm"`` needs nothing more.

        ``kwargs`` go to the constructor (``coeff``, ``kind``, ``positions``, ``scale``, ``normalize``...)."""
        if categories is not None:
            directions = directions.select(categories=list(categories))
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer={layer!r} must be one int, a layer of the directions {list(directions.layers)}; "
                            f"for several layers use catlens.steer.from_directions.")
        ref = getattr(directions, "ref_norm", None)
        ref_norm = float(ref[directions.layer_index(layer)]) if ref is not None else None
        return cls(site=site or directions.site, layer=int(layer), vectors=directions.at(layer),
                   labels=tuple(directions.categories), ref_norm=ref_norm, **kwargs)

    def same_as(self, other: "Intervention") -> bool:
        t1, t2 = {}, {}
        if self.to_dict("x", t1) != other.to_dict("x", t2) or t1.keys() != t2.keys():
            return False
        return all(torch.equal(t1[k], t2[k]) for k in t1)


def from_directions(directions: Any, layers: int | Sequence[int] | None = None, *, site: str | None = None,
                    categories: Sequence[str] | None = None, **kwargs: Any) -> list[Intervention]:
    """One :class:`Intervention` per layer from a :class:`catlens.directions.Directions` object: each holds every
    category's vector at that layer (labels = categories), with the reference norm when the directions carry one.

    ``kwargs`` go to :class:`Intervention` (``coeff``, ``kind``, ``positions``, ``scale``, ``normalize``...).
    """
    if categories is not None:
        directions = directions.select(categories=list(categories))
    chosen = directions.layers if layers is None else ([layers] if isinstance(layers, int) else list(layers))
    if not chosen:
        raise ValueError("layers is empty; give at least one layer of the directions "
                         f"({list(directions.layers)}).")
    return [Intervention.from_directions(directions, int(layer), site=site, **kwargs) for layer in chosen]


GATE_POOLS = ("last", "mean_all")
"""How a gate read pools a prompt's positions: the last prompt token, or the mean over every real (non-pad) token of
the rendered prompt (:func:`catlens.cache.collect`'s ``"mean_all"``)."""


@dataclass(frozen=True, eq=False)
class Gate:
    """A fitted linear probe that decides, per prompt, which way to steer: ``p = σ(w·((f − μ) / s) + b)``.

    The features ``f`` are read from the prompt's own unsteered prefill. By default (``reads=()``) they are the
    activation at ``(site, layer)`` at the last prompt token (P1's probe). ``reads`` gives several
    ``(site, layer, pool)`` reads instead (``pool`` in :data:`GATE_POOLS`), concatenated in order, and ``logodds``
    appends one more feature: the refusal-token log-odds at the first response position of the unsteered prefill,
    ``log Σ p(refusal tokens) − log(1 − Σ p(refusal tokens))``. ``mean`` (μ) and ``scale`` (s) standardise the
    features; either may be ``None``.

    Zones: ``p >= threshold`` steers toward refusal (the policy's ``toward``), ``p < lower`` away from it
    (``away``), and in between the row is not steered; ``lower=None`` means ``lower = threshold`` (two zones, P1).
    ``per_category`` maps a router category to its own ``(lower, threshold)``; rows routed elsewhere, or a policy
    without a router, use the global pair. No extra forward pass: the decision is made in the prefill.
    """

    weight: Tensor
    bias: float | int
    threshold: float | int
    layer: int
    site: Site | str = "resid_post"
    mean: Tensor | None = None
    name: str = "probe"
    reads: Sequence[tuple[str, int, str]] = ()
    scale: Tensor | None = None
    logodds: bool = False
    lower: float | int | None = None
    per_category: Mapping[str, tuple[float, float]] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", Site.parse(self.site))
        if self.site in (Site.PATTERN, Site.Z):
            raise ValueError(f"a gate reads a d_model-wide site; got {self.site.value!r}.")
        reads = []
        for r in self.reads:
            if len(r) != 3:
                raise ValueError(f"gate read {r!r}: give (site, layer, pool), e.g. ('resid_post', 18, 'last').")
            site, layer, pool = Site.parse(r[0]), r[1], r[2]
            if site in (Site.PATTERN, Site.Z):
                raise ValueError(f"a gate reads a d_model-wide site; got {site.value!r}.")
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(f"gate read {r!r}: the layer must be an int.")
            if pool not in GATE_POOLS:
                raise ValueError(unknown_name_message("gate read pool", pool, GATE_POOLS))
            reads.append((site.value, int(layer), str(pool)))
        object.__setattr__(self, "reads", tuple(reads))
        object.__setattr__(self, "weight", _check_tensor("gate weight", self.weight, 1))
        for name in ("mean", "scale"):
            t = getattr(self, name)
            if t is not None:
                t = _check_tensor(f"gate {name}", t, 1)
                if t.shape != self.weight.shape:
                    raise ValueError(f"gate {name} {tuple(t.shape)} and weight {tuple(self.weight.shape)} differ.")
                if name == "scale" and not bool((t > 0).all()):
                    raise ValueError("gate scale must be positive (it divides the features).")
                object.__setattr__(self, name, t)
        object.__setattr__(self, "bias", _finite("gate bias", self.bias))
        object.__setattr__(self, "threshold", _finite("gate threshold", self.threshold, lo=0.0, hi=1.0))
        object.__setattr__(self, "lower", _finite("gate lower threshold", self.lower, lo=0.0, hi=1.0,
                                                  allow_none=True))
        if self.lower is not None and self.lower > self.threshold:
            raise ValueError(f"gate lower threshold {self.lower} is above its threshold {self.threshold}: the "
                             f"not-steered zone is [lower, threshold); give lower <= threshold.")
        per = {}
        for cat, pair in dict(self.per_category or {}).items():
            if len(pair) != 2:
                raise ValueError(f"per_category[{cat!r}] = {pair!r}: give (lower, threshold).")
            lo = _finite(f"per_category[{cat!r}] lower", pair[0], lo=0.0, hi=1.0)
            hi = _finite(f"per_category[{cat!r}] threshold", pair[1], lo=0.0, hi=1.0)
            if lo > hi:
                raise ValueError(f"per_category[{cat!r}] = ({lo}, {hi}): lower must be <= threshold.")
            per[str(cat)] = (lo, hi)
        object.__setattr__(self, "per_category", per or None)
        if self.reads and (self.reads[0][0], self.reads[0][1]) != (self.site.value, self.layer):
            raise ValueError(f"gate site/layer ({self.site.value}, {self.layer}) must be its first read "
                             f"{self.reads[0][:2]} (they name the read for older code).")

    @property
    def feature_reads(self) -> tuple[tuple[str, int, str], ...]:
        """The ``(site, layer, pool)`` reads whose activations make the features, in order."""
        return self.reads or ((self.site.value, self.layer, "last"),)

    @property
    def d_model(self) -> int:
        n = int(self.weight.shape[0]) - int(self.logodds)
        return n // len(self.feature_reads)

    def check_model(self, model: Any) -> None:
        if self.d_model != model.d_model or self.d_model * len(self.feature_reads) + int(self.logodds) != len(
                self.weight):
            raise ValueError(f"the gate {self.name!r} was fitted on a model of width {self.d_model}, but "
                             f"{model.name!r} has d_model={model.d_model}: refit the probe on this model.")
        for _, layer, _ in self.feature_reads:
            if not -model.n_layers <= layer < model.n_layers:
                raise ValueError(f"gate layer={layer} is out of range for {model.n_layers} layers.")
        if self.logodds:
            from catlens.refusal import RefusalTokens

            RefusalTokens.from_model(model)  # raises with the fix when the model has no refusal tokens

    def features(self, reads: Sequence[Tensor], logodds: Tensor | None = None) -> Float[Tensor, "batch feature"]:
        """Concatenate the reads (``[batch d_model]`` each, in :attr:`feature_reads` order) and the log-odds."""
        if len(reads) != len(self.feature_reads):
            raise ValueError(f"the gate {self.name!r} reads {len(self.feature_reads)} activations, got {len(reads)}.")
        parts = [r.float() for r in reads]
        if self.logodds:
            if logodds is None:
                raise ValueError(f"the gate {self.name!r} uses the refusal-token log-odds; pass logodds.")
            parts.append(logodds.float().reshape(-1, 1).to(parts[0].device))
        return torch.cat(parts, dim=1)

    def score(self, h: Float[Tensor, "batch feature"]) -> Float[Tensor, " batch"]:
        """The probability for each row of ``h``: one read's activation (the default gate) or the
        :meth:`features` of several."""
        h = h.float()
        if h.shape[-1] != len(self.weight):
            raise ValueError(f"the gate {self.name!r} takes {len(self.weight)} features per row, got {h.shape[-1]}; "
                             f"build them with Gate.features.")
        if self.mean is not None:
            h = h - self.mean.to(h.device)
        if self.scale is not None:
            h = h / self.scale.to(h.device)
        return torch.sigmoid(h @ self.weight.to(h.device) + self.bias)

    def bounds(self, category: str | None = None) -> tuple[float, float]:
        """``(lower, threshold)`` for a row routed to ``category`` (the global pair when it has none)."""
        if category is not None and self.per_category and category in self.per_category:
            return self.per_category[category]
        return (self.threshold if self.lower is None else self.lower), self.threshold

    def outcome(self, p: float, category: str | None = None) -> str:
        """``"toward"`` (``p >= threshold``), ``"away"`` (``p < lower``) or ``"none"`` (in between)."""
        lo, hi = self.bounds(category)
        return "toward" if p >= hi else "away" if p < lo else "none"


def refusal_logodds(logits: Tensor, refuse_ids: Sequence[int]) -> Float[Tensor, " batch"]:
    """``log Σ p(refuse) − log(1 − Σ p(refuse))`` over ``refuse_ids`` at one position (``logits [batch vocab]``),
    computed in log space so that probabilities near 0 or 1 stay finite."""
    logp = logits.float().log_softmax(-1)
    lse = logp[:, list(refuse_ids)].logsumexp(-1)
    return lse - torch.log1p(-lse.exp().clamp(max=1 - 1e-7))


@dataclass(frozen=True, eq=False)
class Router:
    """Picks one category per prompt.

    kind:
      * ``"refusal_tokens"``: the most probable refusal token at the first response position of the prompt's
        unsteered prefill (P1 §2.3 G; ``[respond]`` excluded, so every prompt gets a category);
      * ``"probe"``: a multi-class linear probe ``argmax(W h + b)`` at ``(site, layer)``, last prompt token;
      * ``"fixed"``: the prompt's own ``category`` field (for experiments where the category is known).
    ``categories`` is the output order; each must be a label of the interventions it routes.
    """

    kind: str
    categories: Sequence[str]
    weight: Tensor | None = None
    bias: Tensor | None = None
    layer: int | None = None
    site: Site | str = "resid_post"

    def __post_init__(self) -> None:
        if self.kind not in ROUTER_KINDS:
            raise ValueError(unknown_name_message("router kind", self.kind, ROUTER_KINDS))
        object.__setattr__(self, "categories", tuple(self.categories))
        if not self.categories:
            raise ValueError("a router needs at least one category.")
        object.__setattr__(self, "site", Site.parse(self.site))
        if self.kind == "probe":
            if self.weight is None or self.bias is None or self.layer is None:
                raise ValueError("a probe router needs weight [category d_model], bias [category] and layer.")
            w = _check_tensor("router weight", self.weight, 2)
            b = _check_tensor("router bias", self.bias, 1)
            if w.shape[0] != len(self.categories) or b.shape[0] != len(self.categories):
                raise ValueError(f"router weight {tuple(w.shape)} / bias {tuple(b.shape)} do not match "
                                 f"{len(self.categories)} categories.")
            object.__setattr__(self, "weight", w)
            object.__setattr__(self, "bias", b)

    def check_model(self, model: Any) -> None:
        if self.kind == "probe":
            if self.weight.shape[1] != model.d_model:
                raise ValueError(f"the router probe was fitted on a model of width {self.weight.shape[1]}, but "
                                 f"{model.name!r} has d_model={model.d_model}: refit it on this model.")
            if not -model.n_layers <= self.layer < model.n_layers:
                raise ValueError(f"router layer={self.layer} is out of range for {model.n_layers} layers.")
        if self.kind == "refusal_tokens":
            from catlens.refusal import RefusalTokens

            tokens = RefusalTokens.from_model(model)
            missing = [c for c in self.categories if c not in tokens.categories]
            if missing:
                raise ValueError(f"router categories {missing} have no refusal token in {model.name!r} (it has "
                                 f"{list(tokens.categories)}).")


@dataclass(frozen=True, eq=False)
class SteeringPolicy:
    """Interventions plus an optional gate and router: the unit a sweep chooses and ``catlens generate`` applies.

    Without a gate every row uses each intervention's own coefficient. With a gate, rows it flags get ``toward``
    and the others ``away`` (``None``: that side is not steered) in place of the interventions' coefficients.
    ``model`` records what the policy was made on (name, widths, weights hash) for :meth:`check_model`.
    """

    interventions: tuple[Intervention, ...] | Intervention
    """The edits; one :class:`Intervention` may be given alone (it is stored as a one-element tuple)."""
    gate: Gate | None = None
    router: Router | None = None
    toward: float | int | None = None
    away: float | int | None = None
    name: str = "policy"
    model: Mapping[str, Any] = field(default_factory=dict)
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Free JSON-able provenance: how the policy was chosen (sweep, validation sets, seeds)."""

    def __post_init__(self) -> None:
        ivs = tuple(self.interventions) if not isinstance(self.interventions, Intervention) else (self.interventions,)
        if not ivs:
            raise ValueError("a policy needs at least one intervention.")
        for iv in ivs:
            if not isinstance(iv, Intervention):
                raise TypeError(f"interventions must be Intervention objects, got {type(iv).__name__}.")
        object.__setattr__(self, "interventions", ivs)
        object.__setattr__(self, "toward", _finite("toward", self.toward, lo=-1e6, hi=1e6, allow_none=True))
        object.__setattr__(self, "away", _finite("away", self.away, lo=-1e6, hi=1e6, allow_none=True))
        if self.gate is None and (self.toward is not None or self.away is not None):
            raise ValueError("toward/away coefficients need a gate; without one set each intervention's coeff.")
        if self.gate is not None and self.toward is None and self.away is None:
            raise ValueError("a gated policy needs toward and/or away coefficients (None on both steers nothing).")
        if self.router is not None and self.router.kind != "fixed":
            for iv in ivs:
                if iv.kind != "low_rank" and iv.n_directions > 1:
                    missing = [c for c in self.router.categories if c not in iv.labels]
                    if missing:
                        raise ValueError(f"router categories {missing} are not labels of the intervention at layer "
                                         f"{iv.layer} (labels {list(iv.labels)}).")

    @property
    def decides(self) -> bool:
        """Whether rows need a decision from the prefill (gate or router)."""
        return self.gate is not None or (self.router is not None and self.router.kind != "fixed")

    # decisions, the same for every engine (catlens.decisions)
    def reads(self) -> dict[str, tuple[Site, int]]:
        """What the gate and a probe router read at the last prompt token: role -> ``(site, layer)``."""
        from catlens import decisions

        return decisions.reads(self)

    def decide(self, rows: "Rows", **inputs: Any) -> tuple[list[dict | None], list[dict | None]]:
        """Fill ``rows`` from the gate and router; the ``gate`` and ``route`` records (:func:`catlens.decisions.decide`)."""
        from catlens import decisions

        return decisions.decide(self, rows, **inputs)

    def digest(self) -> str:
        """sha256 of the policy's content (spec and tensors)."""
        from catlens import decisions

        return decisions.digest(self)

    def check_model(self, model: Any, *, allow_transfer: bool = False) -> None:
        """Clear errors when ``model`` cannot take this policy: widths, layers, refusal tokens; and, unless
        ``allow_transfer``, a model other than the one the policy was made on."""
        for iv in self.interventions:
            iv.check_model(model)
        if self.gate is not None:
            self.gate.check_model(model)
        if self.router is not None:
            self.router.check_model(model)
        made = dict(self.model)
        if made and not allow_transfer:
            mine = model_fingerprint(model)
            for key in ("name", "weights_sha256"):
                if made.get(key) and mine.get(key) and made[key] != mine[key]:
                    raise ValueError(f"policy {self.name!r} was made on model {made.get('name')!r} ({key} "
                                     f"{str(made[key])[:16]}...), not on {model.name!r} ({str(mine[key])[:16]}...). "
                                     f"Pass allow_transfer=True (CLI: --transfer) to apply it to a same-architecture "
                                     f"variant on purpose.")

    # ------------------------------------------------------------------------------------------ save/load
    def to_plain(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        tensors: dict[str, Tensor] = {}
        spec: dict[str, Any] = {
            "format": POLICY_FORMAT, "name": self.name, "toward": self.toward, "away": self.away,
            "model": dict(self.model), "meta": dict(self.meta),
            "interventions": [iv.to_dict(f"iv{i}", tensors) for i, iv in enumerate(self.interventions)],
            "gate": None, "router": None,
        }
        if self.gate is not None:
            g = self.gate
            tensors["gate.weight"] = g.weight.contiguous()
            if g.mean is not None:
                tensors["gate.mean"] = g.mean.contiguous()
            if g.scale is not None:
                tensors["gate.scale"] = g.scale.contiguous()
            spec["gate"] = {"bias": g.bias, "threshold": g.threshold, "layer": g.layer, "site": g.site.value,
                            "name": g.name, "weight": "gate.weight",
                            "mean": "gate.mean" if g.mean is not None else None}
            if g.reads or g.logodds or g.scale is not None or g.lower is not None or g.per_category:
                spec["gate"].update(reads=[list(r) for r in g.reads], logodds=g.logodds, lower=g.lower,
                                    scale="gate.scale" if g.scale is not None else None,
                                    per_category={c: list(v) for c, v in (g.per_category or {}).items()})
        if self.router is not None:
            r = self.router
            spec["router"] = {"kind": r.kind, "categories": list(r.categories), "layer": r.layer, "site": r.site.value}
            if r.weight is not None:
                tensors["router.weight"], tensors["router.bias"] = r.weight.contiguous(), r.bias.contiguous()
                spec["router"].update(weight="router.weight", bias="router.bias")
        return spec, tensors

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write ``path/`` = ``policy.json`` + ``tensors.safetensors`` as one unit (a temp folder renamed into
        place); the JSON records the tensor file's sha256, checked on load."""
        from safetensors.torch import save_file

        from catlens.runs import sha256_file

        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True (CLI --overwrite) or another path.")
        spec, tensors = self.to_plain()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            save_file(tensors, str(tmp / "tensors.safetensors"), metadata={"catlens": "policy"})
            spec["tensors_sha256"] = sha256_file(tmp / "tensors.safetensors")
            (tmp / "policy.json").write_text(json.dumps(spec, indent=1, sort_keys=True))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "SteeringPolicy":
        from safetensors.torch import load_file

        from catlens.runs import sha256_file

        path = Path(path)
        spec_file, tensor_file = path / "policy.json", path / "tensors.safetensors"
        if not spec_file.exists() or not tensor_file.exists():
            raise FileNotFoundError(f"{str(path)!r} is not a steering policy folder (needs policy.json and "
                                    f"tensors.safetensors, as written by SteeringPolicy.save).")
        try:
            spec = json.loads(spec_file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(spec_file)!r} is not valid JSON ({e}); the policy file is damaged, save it "
                             f"again.") from None
        if spec.get("format") != POLICY_FORMAT:
            raise ValueError(f"{str(spec_file)!r} has policy format {spec.get('format')!r}; this catlens reads "
                             f"format {POLICY_FORMAT}.")
        if sha256_file(tensor_file) != spec.get("tensors_sha256"):
            raise ValueError(f"{str(tensor_file)!r} does not match the checksum recorded in policy.json: the file is "
                             f"damaged or from another save. Save the policy again.")
        tensors = load_file(str(tensor_file))
        for i, d in enumerate(spec.get("interventions") or ()):
            try:
                Intervention.from_dict(d, tensors)
            except (TypeError, ValueError, KeyError) as e:
                raise ValueError(f"{str(spec_file)!r}: interventions[{i}] cannot be read: {e} Fix the file or save "
                                 f"the policy again (SteeringPolicy.save).") from None
        return cls.from_plain(spec, tensors)

    @classmethod
    def from_plain(cls, spec: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> "SteeringPolicy":
        """The policy of :meth:`to_plain`'s ``(spec, tensors)`` (what :meth:`load` reads and engines receive)."""
        ivs = tuple(Intervention.from_dict(d, tensors) for d in spec["interventions"])
        gate = router = None
        if spec.get("gate"):
            g = dict(spec["gate"])
            gate = Gate(weight=tensors[g.pop("weight")], mean=tensors[g["mean"]] if g.get("mean") else None,
                        scale=tensors[g["scale"]] if g.get("scale") else None,
                        reads=tuple(tuple(r) for r in g.get("reads") or ()),
                        per_category={c: tuple(v) for c, v in (g.get("per_category") or {}).items()} or None,
                        **{k: v for k, v in g.items() if k not in ("mean", "scale", "reads", "per_category")})
        if spec.get("router"):
            r = dict(spec["router"])
            if r.get("weight"):
                r["weight"], r["bias"] = tensors[r["weight"]], tensors[r["bias"]]
            router = Router(**r)
        return cls(ivs, gate=gate, router=router, toward=spec["toward"], away=spec["away"], name=spec["name"],
                   model=spec.get("model", {}), meta=spec.get("meta", {}))

    def same_as(self, other: "SteeringPolicy") -> bool:
        a, ta = self.to_plain()
        b, tb = other.to_plain()
        return a == b and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What a policy records about the model it was made on."""
    prov = getattr(model, "provenance", {}) or {}
    return {"name": model.name, "d_model": model.d_model, "n_layers": model.n_layers,
            "weights_sha256": prov.get("weights_sha256") or prov.get("source", {}).get("weights_sha256")}


def as_policy(steer: Any) -> SteeringPolicy | None:
    """Accept a policy, one intervention, a list of them, a saved policy folder, or None."""
    if steer is None or isinstance(steer, SteeringPolicy):
        return steer
    if isinstance(steer, Intervention):
        return SteeringPolicy((steer,))
    if isinstance(steer, (str, os.PathLike)):
        return SteeringPolicy.load(steer)
    return SteeringPolicy(tuple(steer))


# ---------------------------------------------------------------------------------------------- runtime
@dataclass
class Rows:
    """Per-row parameters of one batch for every intervention of a policy (runtime state, not a spec).

    ``coeff[i]`` [batch] float, ``direction[i]`` [batch] long, ``active[i]`` [batch] bool.
    """

    coeff: list[Tensor]
    direction: list[Tensor]
    active: list[Tensor]

    @classmethod
    def from_records(cls, policy: SteeringPolicy, records: Sequence[Mapping[str, Any]]) -> Rows:
        """Rows rebuilt from per-row ``steer`` records (the inverse of :func:`catlens.decisions.steer_record`)."""
        n = len(policy.interventions)
        return cls([torch.tensor([float(r["coeff"][i]) for r in records]) for i in range(n)],
                   [torch.tensor([int(r["direction"][i]) for r in records], dtype=torch.long) for i in range(n)],
                   [torch.tensor([bool(r["active"][i]) for r in records], dtype=torch.bool) for i in range(n)])

    @classmethod
    def default(cls, policy: SteeringPolicy, batch: int) -> "Rows":
        return cls([torch.full((batch,), iv.coeff) for iv in policy.interventions],
                   [torch.full((batch,), iv.direction, dtype=torch.long) for iv in policy.interventions],
                   [torch.ones(batch, dtype=torch.bool) for _ in policy.interventions])


@dataclass
class BatchContext:
    """What a hook needs to know about the current forward call.

    ``attention_mask`` covers every position so far ([batch total], 1 = real token); ``prompt_len`` is the padded
    prompt length ``T``; ``offset`` is the absolute position of the call's first token.
    """

    attention_mask: Tensor
    prompt_len: int
    offset: int = 0
    start: Tensor | None = None
    """Each row's first real prompt position ([batch]); computed from ``attention_mask`` when it covers the prompt."""

    def position_mask(self, positions: str | tuple[int, ...], length: int) -> Tensor:
        """Bool ``[batch length]``: which positions of the current call ``positions`` selects (never a pad)."""
        p = torch.arange(self.offset, self.offset + length, device=self.attention_mask.device)
        real = self.attention_mask[:, self.offset:self.offset + length].bool()
        T = self.prompt_len
        if positions == "all":
            sel = torch.ones_like(p, dtype=torch.bool)[None]
        elif positions == "prompt":
            sel = (p < T)[None]
        elif positions == "generated":
            sel = (p >= T)[None]
        elif positions == "last_prompt":
            sel = (p >= T - 1)[None]
        elif positions_window(positions) is not None:
            sel = ((p >= T - 1) & (p <= T - 1 + positions_window(positions)))[None]
        else:
            start = self.start if self.start is not None else T - self.attention_mask[:, :T].sum(dim=1)
            sel = torch.zeros(real.shape, dtype=torch.bool, device=real.device)
            for k in positions:
                target = (T + k) if k < 0 else (start + k)  # [batch] or int
                target = torch.as_tensor(target, device=real.device).expand(real.shape[0])
                ok = (target >= start) & (target < T)
                sel |= (p[None, :] == target[:, None]) & ok[:, None]
        return sel & real


@dataclass
class SteeringReport:
    """Per intervention: forward calls its hook saw (``fired``) and positions it edited (``edited``)."""

    fired: list[int] = field(default_factory=list)
    edited: list[int] = field(default_factory=list)


class Session:
    """The live state behind one ``with steering(...)`` block: the policy, the current batch context and rows."""

    def __init__(self, model: Any, policy: SteeringPolicy) -> None:
        self.model = model
        self.policy = policy
        self.context: BatchContext | None = None
        self.rows: Rows | None = None
        self.enabled = True
        self.trace: list | None = None
        self.report = SteeringReport([0] * len(policy.interventions), [0] * len(policy.interventions))
        self._tensors: dict[int, tuple[Any, ...]] = {}

    def _params(self, i: int, like: Tensor) -> tuple[Any, ...]:
        key = (i, like.dtype, like.device)
        if key not in self._tensors:
            iv = self.policy.interventions[i]
            cast = (lambda t: None if t is None else t.to(device=like.device, dtype=like.dtype))
            self._tensors[key] = (cast(iv.vectors), cast(iv.U), cast(iv.V), cast(iv.z))
        return self._tensors[key]

    def hook(self, i: int) -> Any:
        iv = self.policy.interventions[i]

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            self.report.fired[i] += 1
            if not self.enabled:
                return act
            flat = act
            if act.dim() == 4:  # z: [batch pos head d_head]
                flat = act[:, :, iv.head, :] if iv.head is not None else act.flatten(2)
            b, length = flat.shape[:2]
            ctx = self.context or BatchContext(torch.ones(b, length, dtype=torch.long, device=act.device), length)
            mask = ctx.position_mask(iv.positions, length)
            rows = self.rows or Rows.default(self.policy, b)
            if rows.active[i].shape[0] != b:
                raise RuntimeError(f"steering rows were set for {rows.active[i].shape[0]} prompts but the forward "
                                   f"call has batch {b}.")
            mask = mask & rows.active[i].to(mask.device)[:, None]
            n = int(mask.sum())
            if n == 0:
                return act
            self.report.edited[i] += n
            if self.trace is not None:
                self.trace.extend((i, int(b_), ctx.offset + int(l_)) for b_, l_ in mask.nonzero().tolist())
            vectors, U, V, z = self._params(i, flat)
            out = iv.edit(flat, mask, rows.coeff[i].to(flat.device), rows.direction[i].to(flat.device),
                          vectors, U, V, z)
            if act.dim() == 4:
                if iv.head is not None:
                    act = act.clone()
                    act[:, :, iv.head, :] = out
                    return act
                return out.view_as(act)
            return out

        return hook


@contextmanager
def steering(model: Any, steer: SteeringPolicy | Intervention | Sequence[Intervention], *, check_fired: bool = True,
             attention_mask: Tensor | None = None, prompt_len: int | None = None, rows: Rows | None = None,
             allow_transfer: bool = True) -> Iterator[Session]:
    """Apply a policy (or interventions) to every forward pass of ``model`` inside the block.

    For bare forward calls, ``attention_mask`` (and ``prompt_len``, default: its width) give the batch context;
    ``rows`` sets per-row parameters (default: each intervention's own). A gate or router needs
    :func:`catlens.generation.generate`, which decides them in the prefill. The yielded :class:`Session` holds the
    report (``session.report.fired`` / ``.edited``).
    """
    policy = as_policy(steer)
    policy.check_model(model, allow_transfer=allow_transfer)
    session = Session(model, policy)
    if attention_mask is not None:
        session.context = BatchContext(attention_mask, prompt_len or attention_mask.shape[1])
    session.rows = rows
    hooks = [(model.hook_name(iv.site, iv.layer), session.hook(i)) for i, iv in enumerate(policy.interventions)]
    with model.bridge.hooks(fwd_hooks=hooks):
        yield session
    if check_fired:
        silent = [i for i, n in enumerate(session.report.fired) if n == 0]
        if silent:
            raise RuntimeError(f"interventions {silent} never fired inside the steering block: nothing was run, or "
                               f"the bridge skipped their hooks. Pass check_fired=False to allow an unused block.")


@contextmanager
def reading(model: Any, reads: Mapping[str, tuple], store: dict[str, Tensor], position: int = -1,
            mask: Tensor | None = None) -> Iterator[None]:
    """Record activations of each ``name -> (site, layer)`` or ``(site, layer, pool)`` into ``store`` on every
    forward call (the gate's and the probe router's inputs), without editing anything.

    ``pool="last"`` (the default) keeps ``act[:, position]`` of the latest call. ``pool="mean_all"`` keeps the mean
    over every real position seen so far in this block, weighted by ``mask`` (``[batch seq]``, 1 = real token; the
    calls must cover the sequence in order from position 0, as a prefill split into chunks does)."""
    seen: dict[str, int] = {}
    sums: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}

    def reader(name: str, pool: str) -> Any:
        def read(act: Tensor, hook: Any = None) -> Tensor:
            if pool == "last":
                store[name] = act[:, position].detach().float()
                return act
            if mask is None:
                raise ValueError(f"read {name!r} pools 'mean_all' and needs the batch's attention mask.")
            off = seen.get(name, 0)
            m = mask[:, off:off + act.shape[1]].to(act.device).float()
            seen[name] = off + act.shape[1]
            part = (act.detach().float() * m[..., None]).sum(1)
            sums[name] = part if name not in sums else sums[name] + part
            counts[name] = m.sum(1) if name not in counts else counts[name] + m.sum(1)
            store[name] = sums[name] / counts[name].clamp_min(1.0)[:, None]
            return act

        return read

    hooks = []
    for name, spec in reads.items():
        site, layer, pool = (*spec, "last") if len(spec) == 2 else spec
        if pool not in GATE_POOLS:
            raise ValueError(unknown_name_message("read pool", pool, GATE_POOLS))
        hooks.append((model.hook_name(site, layer), reader(name, pool)))
    with model.bridge.hooks(fwd_hooks=hooks):
        yield


def request_vectors(policy: SteeringPolicy, decisions: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Compile a policy's additive interventions into one plain steering spec per request (row): for each
    ``(site, layer)`` the vector ``c · v`` that row gets, plus its positions. This is the shape engines that take a
    steering vector per request (e.g. vllm-lens) accept; ablate/clamp/low_rank with an input-conditioned ``z`` are
    not additive and raise.

    ``decisions`` are the per-row ``steer`` records of :func:`catlens.generation.generate` (``coeff``,
    ``direction`` per intervention, ``active``).
    """
    out = []
    for d in decisions:
        vecs = []
        for i, iv in enumerate(policy.interventions):
            if iv.kind == "low_rank" and iv.z is not None:
                v = iv.U @ (iv.V.T @ iv.z)
            elif iv.kind == "add":
                v = iv.vectors[d["direction"][i]]
                v = v / v.norm() if iv.normalize else v
            else:
                raise ValueError(f"intervention {i} is {iv.kind!r}: not an additive vector an engine can apply "
                                 f"per request; only 'add' and 'low_rank' with a fixed z compile.")
            c = d["coeff"][i] * iv.scale_factor if d["active"][i] else 0.0
            vecs.append({"site": iv.site.value, "layer": iv.layer, "positions": iv.positions,
                         "vector": (c * v).tolist()})
        out.append({"interventions": vecs})
    return out


def with_coeff(policy: SteeringPolicy, coeff: float | None = None, *, toward: float | None = None,
               away: float | None = None) -> SteeringPolicy:
    """A copy of ``policy`` with every intervention's coefficient (and/or the gate's) replaced: sweeps use it."""
    ivs = policy.interventions if coeff is None else tuple(replace(iv, coeff=coeff) for iv in policy.interventions)
    return replace(policy, interventions=ivs, toward=policy.toward if toward is None else toward,
                   away=policy.away if away is None else away)
