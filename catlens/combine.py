"""P1's learned low-rank combination (PAPERS.md §2.3 I-J): a steering map ``Δ = U (Vᵀ z)`` initialised from the
whitened orthonormal basis of the category directions and trained with a refusal-token loss plus a KL penalty.

    >>> basis = init_basis(directions, whitener, layer=3)
    >>> result = train_low_rank(model, harm, benign, layer=3, basis=basis, steps=2, out=tmp_path / "lr",
    ...                         show_progress=False)
    >>> policy = result.policy(gate, toward=4.0, away=-6.0)       # P1's strengths
    >>> records = catlens.generate(model, prompts, steer=policy, max_new_tokens=4, show_progress=False)
    >>> basis.shape[1] == len(directions.categories), len(records)
    (True, 4)

**Basis** (:func:`init_basis`). With ``V = [v_1 ... v_k]`` the category directions at the layer, ``W`` a
whitener fitted on benign activations (:func:`catlens.geometry.fit_whitener`) and ``Q, R = qr(W V)``
(:func:`catlens.geometry.orthonormal_basis`):

* ``mode="residual"`` (catlens default): the columns of ``W⁻¹ Q = V R⁻¹``, the basis mapped back into
  residual-stream coordinates. They span the category directions, are orthonormal in the whitened
  (Mahalanobis) inner product and satisfy ``W (W⁻¹ Q) = Q`` exactly when ``W`` is invertible. Their Euclidean
  norms are not 1: roughly the inverse whitening gain along each direction (small when the whitener's gain is
  large, e.g. off the data span with ``N < d``). ``normalize=True`` rescales each column to unit length (this
  breaks the ``W B = Q`` identity).
* ``mode="verbatim"``: ``Q`` itself, added to the residual stream unchanged, as P1's code does (§2.3 I: ``Q``
  holds orthonormal directions of the *whitened* space; only meaningful for ZCA whitening, whose coordinates
  share the residual basis). Unit-norm, Euclidean-orthonormal columns.

**Which one reproduces P1** (PAPERS.md §2.7, checked numerically against P1's code at commit 5ffd3a4): only
``"verbatim"``. The two modes span different subspaces in general; on the tuned default model's activations §2.7
found the ``"residual"`` columns far from ``Q`` (per-column |cos| well below 1) and about three orders of magnitude
shorter, while ``"verbatim"`` matched P1's ``Q`` and its low-rank map ``U(Vᵀz)`` (up to column signs).
``"residual"`` stays the default because it keeps the steering inside the span of the category directions;
pass ``mode="verbatim"`` to run P1's method as its code runs it.

**Map and variants** (:func:`train_low_rank`). ``U, V ∈ R^{d×r}`` start at the basis (``r = k`` by default).
With ``rank < k`` they start at the first ``rank`` columns (the basis order is the category order, which fixes
the QR); with ``rank > k`` the ``rank - k`` extra columns of ``U`` and ``V`` are seeded Gaussian noise with
standard deviation ``pad_scale`` times the mean basis column norm divided by ``sqrt(d)`` (so each extra column
has about ``pad_scale`` times a basis column's norm). ``variant="fixed_z"``: ``Δ = U (Vᵀ z)`` with a trained
``z ∈ R^d`` initialised to ``z_scale · N(0, I)`` (P1: 0.01), one vector for every prompt; ``variant="input"``:
``Δ = U (Vᵀ h)`` with ``h`` the activation being steered (P1's commented-out variant), so the edit depends on
the prompt.

**Loss** (P1, §2.3 J). At the first response position (the logits of the last prompt token), with the edit
``h ← h + c Δ`` applied to the last prompt token at ``(site, layer)``:

* harmful prompts: ``−log Σ_k max(p_s(k), 1e-6)`` over the refusal tokens ``k`` (``[respond]`` excluded);
* benign prompts: ``KL(p_base ‖ p_s)`` over the whole vocabulary (``p_base`` unsteered, computed once and
  cached);
* ``L = mean harm + kl_weight · mean KL``; AdamW on ``U, V (, z)`` only, gradient norm clipped at 1.0; the
  model is frozen (its weights get no gradient). Prompts are rendered with ``model.format`` (the chat template
  by default).

Each step takes ``batch_size`` harmful and ``batch_size`` benign prompts from two independent streams of
seeded permutations (an epoch = ``ceil(max(n_harmful, n_benign) / batch_size)`` steps; the smaller set cycles,
reshuffled each pass), so the schedule, like the ``z`` and padding noise (local ``torch.Generator``\\s),
depends only on ``seed``.

**Forward modes** (``forward``). Steering touches only the last prompt token and the loss reads only its
logits, so the prompt prefix is the same at every step:

* ``"cached"``: one unsteered pass stores, per prompt, the keys/values of the prefix in the layers *above*
  ``layer`` and the activation at ``(site, layer)`` of the last token; each step then runs the last token
  alone, its activation at ``(site, layer)`` replaced by the stored one plus ``c Δ`` (what the layers below
  compute for it is discarded, so their cache is zeros). Only for ``site`` ``resid_post`` or ``resid_pre``
  (the whole residual stream is replaced). Memory: ``2 · n_kv_heads · d_head · 4`` bytes per prefix token per
  layer kept (SmolLM2-135M, ``resid_post`` of layer 20: 9 layers, 13.5 KiB per token, about 0.8 GiB for 1,000
  prompts of 60 tokens).
* ``"prefix"``: each step recomputes the prefix without gradient, then runs the last token with the edit.
* ``"full"``: the whole prompt with gradient at every step (the reference; slowest).
* ``"auto"`` (default): ``"cached"`` when the stored prefix fits in ``cache_gb`` and every cache layer is a
  plain (full-attention) one, else ``"prefix"``.

All three compute the same function (tests check agreement to float rounding); only their cost differs.

**Runs** (``out``). ``<out>/manifest.json`` (RunDir), ``checkpoints/step_NNNNNN/`` (``state.safetensors`` with
``U``, ``V``, ``z`` and the optimizer state, ``state.json`` with the step, the loss curve so far and the run
key; written atomically every ``checkpoint_every`` steps and at the end), ``loss_curve.parquet`` / ``.csv``
(schema :data:`CURVE_COLUMNS`, one row per step) and ``low_rank/`` (the trained map as a one-intervention
:class:`catlens.steer.SteeringPolicy` folder that ``catlens generate --policy`` applies). Calling again with
the same arguments resumes from the last checkpoint and ends with the same tensors and curve (except the
wall-clock ``seconds`` column) as an uninterrupted run; a finished run is loaded, not retrained.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from catlens.errors import NonFiniteLossError, unknown_name_message
from catlens.model import Site
from catlens.steer import Gate, Intervention, SteeringPolicy, model_fingerprint, steering

log = logging.getLogger(__name__)

__all__ = [
    "BASIS_MODES",
    "VARIANTS",
    "FORWARDS",
    "CURVE_COLUMNS",
    "init_basis",
    "train_low_rank",
    "LowRankResult",
    "load_low_rank",
    "low_rank_policy",
    "evaluate_low_rank",
]

BASIS_MODES = ("residual", "verbatim")
VARIANTS = ("fixed_z", "input")
FORWARDS = ("auto", "cached", "prefix", "full")
CURVE_COLUMNS = ("step", "epoch", "loss", "harm", "kl", "refusal_prob", "grad_norm", "delta_norm", "lr", "seconds")
"""Loss-curve table: ``step`` (1-based), ``epoch`` (fractional, steps / steps-per-epoch), ``loss`` (total),
``harm`` (mean refusal-token loss on the step's harmful batch), ``kl`` (mean KL(base || steered) on its benign batch),
``refusal_prob`` (mean summed refusal-token probability on the harmful batch), ``grad_norm`` (before clipping),
``delta_norm`` (``||c Δ||`` after the step; the batch mean for ``variant="input"``: harmful and benign rows),
``lr``, ``seconds`` (wall time since the start of this call; the only column that differs after a resume)."""
_PROB_FLOOR = 1e-6
_FORMAT = 1


# ------------------------------------------------------------------------------------------------ basis
def init_basis(
    directions: Any,
    whitener: Any,
    *,
    layer: int | None = None,
    mode: str = "residual",
    normalize: bool = False,
) -> Float[Tensor, "d_model k"]:
    """The initial basis ``[d_model k]`` (columns in category order) for :func:`train_low_rank`.

    ``directions`` is a :class:`catlens.directions.Directions` (``layer`` picks its layer) or a ``[category d_model]``
    tensor of the directions at one layer; ``whitener`` a :class:`catlens.geometry.Whitener` fitted on benign
    activations at that layer. ``mode``: ``"residual"`` = ``W⁻¹ Q`` (default), ``"verbatim"`` = ``Q`` as P1 uses it
    (see the module docstring). ``normalize=True`` rescales each column to unit Euclidean norm.
    """
    from catlens.geometry import Whitener, orthonormal_basis

    if mode not in BASIS_MODES:
        raise ValueError(unknown_name_message("basis mode", mode, BASIS_MODES,
                                              "'residual' is W^-1 Q (catlens), 'verbatim' is Q (P1)."))
    if not isinstance(whitener, Whitener):
        raise TypeError(f"whitener must be a catlens.geometry.Whitener (from fit_whitener), got "
                        f"{type(whitener).__name__}.")
    if isinstance(directions, Tensor):
        if directions.dim() != 2:
            raise ValueError(f"directions must be [category d_model], got shape {tuple(directions.shape)}.")
        vecs, cats = directions, None
    elif hasattr(directions, "at") and hasattr(directions, "categories"):
        if layer is None:
            raise ValueError(f"layer is needed to pick the directions' layer; give one of {list(directions.layers)}.")
        vecs, cats = directions.at(layer), directions.categories
    else:
        raise TypeError(f"directions must be a catlens Directions or a [category d_model] tensor, got "
                        f"{type(directions).__name__}.")
    sb = orthonormal_basis(vecs.float(), whitener, categories=cats)
    cols = sb.residual_directions("residual" if mode == "residual" else "whitened").T.contiguous()
    if normalize:
        cols = cols / cols.norm(dim=0, keepdim=True)
    return cols


# ------------------------------------------------------------------------------------------------ inputs
def _texts(name: str, prompts: Any) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError(f"{name} must be a sequence of prompts, not one string; wrap it in a list.")
    out = []
    for i, p in enumerate(prompts):
        t = p if isinstance(p, str) else p.get("text") if isinstance(p, Mapping) else getattr(p, "text", None)
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{name}[{i}] has no text ({p!r}); give strings, dicts with 'text', or a PromptSet.")
        out.append(t)
    if not out:
        raise ValueError(f"{name} is empty; give at least one prompt.")
    return out


def _check_number(name: str, value: Any, *, lo: float = -math.inf, hi: float = math.inf, lo_open: bool = False,
                  hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a number.")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}={value!r} is not finite; give a finite number{hint}.")
    if v < lo or v > hi or (lo_open and v == lo):
        raise ValueError(f"{name}={value!r} is out of range; allowed: {'(' if lo_open else '['}{lo}, {hi}]{hint}.")
    return v


def _check_int(name: str, value: Any, lo: int, hint: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} must be a whole number >= {lo}{hint}.")
    if value < lo:
        raise ValueError(f"{name}={value} must be >= {lo}{hint}.")
    return int(value)


def _sha(texts: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()


def _tensor_sha(t: Tensor) -> str:
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


def _refusal_ids(model: Any, refusal_ids: Sequence[int] | None) -> list[int]:
    if refusal_ids is not None:
        ids = [int(i) for i in refusal_ids]
        vocab = len(model.tokenizer)
        if not ids or any(not 0 <= i < vocab for i in ids):
            raise ValueError(f"refusal_ids={list(refusal_ids)!r}: give at least one token id in [0, {vocab}).")
        return ids
    from catlens.refusal import RefusalTokens

    tokens = RefusalTokens.from_model(model)  # clear error on a model without refusal tokens
    return tokens.ids(model.tokenizer)[:-1]  # the refusal tokens; [respond] is last


def _stream(n: int, seed: int, tag: str, start: int, count: int) -> list[int]:
    """Items ``[start, start + count)`` of the concatenation of seeded permutations of ``range(n)``."""
    out = []
    pos = start
    while len(out) < count:
        epoch, off = divmod(pos, n)
        perm = random.Random(f"catlens.combine:{seed}:{tag}:{epoch}").sample(range(n), n)
        take = perm[off:off + count - len(out)]
        out += take
        pos += len(take)
    return out


def _pad_left(seqs: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s):] = s
        mask[b, width - len(s):] = 1
    return ids, mask


def _positions(mask: Tensor) -> Tensor:
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


# -------------------------------------------------------------------------------------------- forward paths
_BASE_BATCH = 32
"""Batch size of the base pass (no gradient; prompts longest first)."""
_BASE_PASSES: dict[int, tuple[str, Any]] = {}
"""Per model (by ``id``, dropped when the model is garbage-collected), the base pass a ``train_low_rank(...,
keep_base_pass=True)`` call kept (the training prompts' activations, unsteered log-probabilities and prefix
keys/values, up to ``cache_gb``) with its key: the next map trained on the same prompts, site, layer and forward mode
(another basis, rank or learning rate) reuses it instead of running the prompts again, and releases it unless it
keeps it too. Weights edited in place after loading are not detected (the key holds the recorded weight hash)."""


def base_pass(model: Any) -> Any:
    """The base pass :func:`train_low_rank` keeps for ``model`` (None when there is none)."""
    entry = _BASE_PASSES.get(id(model))
    return None if entry is None else entry[1]


class _Forward:
    """The steered first-response logits of a batch of prompts, with gradient to the map's parameters."""

    def __init__(self, model: Any, texts: Sequence[str], *, site: Site, layer: int, mode: str, batch_size: int,
                 cache_gb: float, base_rows: Sequence[int], show_progress: bool) -> None:
        from transformers import DynamicCache

        self.model, self.site, self.layer = model, site, layer
        self.hook_name = model.hook_name(site, layer)
        self.layer_idx = layer % model.n_layers
        pad = model.tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else model.tokenizer.eos_token_id)
        self.device = model.device
        self.seqs = [model.tokenize([t])[0][0].cpu() for t in texts]
        if any(len(s) < 2 for s in self.seqs):
            short = [i for i, s in enumerate(self.seqs) if len(s) < 2][:5]
            raise ValueError(f"prompts {short} render to fewer than 2 tokens; the low-rank map needs a prompt and "
                             f"a last token to steer (use the chat format).")
        # the cached path replaces the whole residual stream of the last token at (site, layer), so it needs a
        # residual site: resid_post (keep the prefix keys/values of the layers above) or resid_pre (from `layer` on)
        self.keep_from = {Site.RESID_POST: self.layer_idx + 1, Site.RESID_PRE: self.layer_idx}.get(site)
        if mode == "cached" and self.keep_from is None:
            raise ValueError(f"forward='cached' needs site 'resid_post' or 'resid_pre' (it replaces the whole "
                             f"residual stream of the last token), got {site.value!r}; use forward='prefix'.")
        want_cache = mode in ("auto", "cached") and self.keep_from is not None
        self.h: list[Tensor] = [None] * len(texts)  # activation at (site, layer), last token
        self.kv: list[list[tuple[Tensor, Tensor]]] | None = [None] * len(texts) if want_cache else None
        base_set = set(base_rows)
        self.base_logp: dict[int, Tensor] = {}
        n_tokens = sum(len(s) - 1 for s in self.seqs)
        bytes_per_token = None
        from tqdm.auto import tqdm

        order = sorted(range(len(texts)), key=lambda i: (-len(self.seqs[i]), i))  # longest first: little padding
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc="low-rank: base pass", disable=not show_progress):
            ids, mask = _pad_left([self.seqs[i] for i in batch], self.pad_id)
            store: dict[str, Tensor] = {}

            def read(act: Tensor, hook: Any = None) -> Tensor:
                store["h"] = act[:, -1].detach().clone()
                return act

            cache = DynamicCache() if self.kv is not None else None
            with torch.no_grad(), model.bridge.hooks(fwd_hooks=[(self.hook_name, read)]):
                out = model.hf(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                               position_ids=_positions(mask).to(self.device), use_cache=cache is not None,
                               past_key_values=cache, logits_to_keep=1)
            logp = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
            T = ids.shape[1]
            for j, i in enumerate(batch):
                self.h[i] = store["h"][j]
                if i in base_set:
                    self.base_logp[i] = logp[j].clone()
            if self.kv is not None:
                layers = list(cache.layers)
                plain = all(type(lay).__name__ == "DynamicLayer" for lay in layers) and len(layers) == model.n_layers
                upper = layers[self.keep_from:]
                if bytes_per_token is None:
                    bytes_per_token = sum((lay.keys[0, :, 0].numel() + lay.values[0, :, 0].numel())
                                          * lay.keys.element_size() for lay in upper) if plain else -1
                    need = bytes_per_token * n_tokens / 2**30
                    if not plain or (mode == "auto" and need > cache_gb):
                        why = ("the cache has sliding-window or other special layers" if not plain else
                               f"the stored prefix would need {need:.2f} GiB > cache_gb={cache_gb}")
                        if mode == "cached" and not plain:
                            raise ValueError(f"forward='cached' is not possible here: {why}; use forward='prefix'.")
                        if mode == "auto":
                            log.info("low-rank: forward 'prefix' (%s)", why)
                            self.kv = None
                    else:
                        log.info("low-rank: forward 'cached' (%.3f GiB of prefix keys/values)", need)
                if self.kv is not None:
                    for j, i in enumerate(batch):
                        start = T - int(mask[j].sum())
                        self.kv[i] = [(lay.keys[j:j + 1, :, start:T - 1].clone(),
                                       lay.values[j:j + 1, :, start:T - 1].clone()) for lay in upper]
        self.mode = "cached" if self.kv is not None else ("prefix" if mode in ("auto", "cached") else mode)
        if self.kv is not None:
            self.zero_shape = [(lay.keys.shape[1], lay.keys.shape[3], lay.values.shape[3], lay.keys.dtype)
                               for lay in layers[:self.keep_from]]

    # --------------------------------------------------------------------------------------------- run
    def logits(self, rows: Sequence[int], edit: Callable[[Tensor], Tensor]) -> Tensor:
        """``[len(rows) d_vocab]`` logits at the last prompt token with ``edit`` applied there."""
        if self.mode == "cached":
            return self._cached(rows, edit)
        from transformers import DynamicCache

        ids, mask = _pad_left([self.seqs[i] for i in rows], self.pad_id)
        ids, mask, pos = ids.to(self.device), mask.to(self.device), _positions(mask).to(self.device)
        T = ids.shape[1]

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            new_last = edit(act[:, -1])[:, None]
            return torch.cat([act[:, :-1], new_last], dim=1) if act.shape[1] > 1 else new_last

        if self.mode == "full":
            with self.model.bridge.hooks(fwd_hooks=[(self.hook_name, hook)]):
                out = self.model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False,
                                    logits_to_keep=1)
            return out.logits[:, -1].float()
        cache = DynamicCache()  # "prefix": all but the last token, unsteered and without gradient
        with torch.no_grad():
            self.model.hf(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=pos[:, :-1],
                          past_key_values=cache, use_cache=True, logits_to_keep=1)
        with self.model.bridge.hooks(fwd_hooks=[(self.hook_name, hook)]):
            out = self.model.hf(input_ids=ids[:, -1:], attention_mask=mask, position_ids=pos[:, -1:],
                                past_key_values=cache, use_cache=True,
                                cache_position=torch.tensor([T - 1], device=self.device), logits_to_keep=1)
        return out.logits[:, -1].float()

    def _cached(self, rows: Sequence[int], edit: Callable[[Tensor], Tensor]) -> Tensor:
        from transformers import DynamicCache

        lens = [len(self.seqs[i]) - 1 for i in rows]  # prefix lengths
        P, B = max(lens), len(rows)
        data = []
        for n_kv, dk, dv, dtype in self.zero_shape:  # layers below the site: their output is replaced, never read
            data.append((torch.zeros(B, n_kv, P, dk, dtype=dtype, device=self.device),
                         torch.zeros(B, n_kv, P, dv, dtype=dtype, device=self.device)))
        for lay in range(len(self.kv[rows[0]])):
            ks, vs = [], []
            for i, n in zip(rows, lens):
                k, v = self.kv[i][lay]
                ks.append(torch.nn.functional.pad(k, (0, 0, P - n, 0)))
                vs.append(torch.nn.functional.pad(v, (0, 0, P - n, 0)))
            data.append((torch.cat(ks), torch.cat(vs)))
        cache = DynamicCache(data)
        mask = torch.zeros(B, P + 1, dtype=torch.long, device=self.device)
        for b, n in enumerate(lens):
            mask[b, P - n:] = 1
        ids = torch.stack([self.seqs[i][-1:] for i in rows]).to(self.device)
        pos = torch.tensor([[n] for n in lens], device=self.device)
        h = torch.stack([self.h[i] for i in rows])

        def hook(act: Tensor, hook: Any = None) -> Tensor:
            return edit(h.to(act.dtype))[:, None]

        with self.model.bridge.hooks(fwd_hooks=[(self.hook_name, hook)]):
            out = self.model.hf(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                                use_cache=True, cache_position=torch.tensor([P], device=self.device), logits_to_keep=1)
        return out.logits[:, -1].float()


# ------------------------------------------------------------------------------------------------ result
@dataclass(frozen=True, eq=False)
class LowRankResult:
    """What :func:`train_low_rank` returns: the trained map and its loss curve."""

    intervention: Intervention
    """``kind="low_rank"``, ``positions="last_prompt"`` (the last prompt token and every generated token, P1
    §2.3 H), ``coeff`` = the training coefficient; ``z`` is None for ``variant="input"``."""
    curve: Any
    """The loss curve, a pandas DataFrame with :data:`CURVE_COLUMNS`."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """Every setting, the data hashes and the run key."""
    forward: str = ""
    """The forward mode used (``cached``, ``prefix`` or ``full``)."""
    resumed_from: int = 0
    """The step this call started from (0 = from scratch; the total = loaded from a finished run)."""
    seconds: float = 0.0
    out: Path | None = None

    def policy(self, gate: Gate | None = None, *, toward: float | int | None = None, away: float | int | None = None,
               coeff: float | int | None = None, name: str = "low_rank", model: Any = None,
               meta: Mapping[str, Any] | None = None) -> SteeringPolicy:
        """:func:`low_rank_policy` of this map (with the training config in ``meta``)."""
        return low_rank_policy(self.intervention, gate, toward=toward, away=away, coeff=coeff, name=name,
                               model=model, meta={"low_rank": dict(self.config), **(meta or {})})


def low_rank_policy(intervention: Intervention, gate: Gate | None = None, *, toward: float | int | None = None,
                    away: float | int | None = None, coeff: float | int | None = None, name: str = "low_rank",
                    model: Any = None, meta: Mapping[str, Any] | None = None) -> SteeringPolicy:
    """A :class:`catlens.steer.SteeringPolicy` that applies a trained low-rank map.

    With a ``gate`` (a fitted probe, :func:`catlens.probes.fit_gate`), rows it flags get ``c = toward`` and the
    others ``c = away`` (P1: +4 / −6 with the map trained at c = 1; ``None`` leaves that side unsteered). Without a
    gate every row gets ``coeff`` (default: the intervention's own). ``model`` records what the policy was made on
    (for ``check_model``'s transfer guard).
    """
    if not isinstance(intervention, Intervention) or intervention.kind != "low_rank":
        raise TypeError("low_rank_policy needs a kind='low_rank' Intervention (LowRankResult.intervention).")
    if gate is None and (toward is not None or away is not None):
        raise ValueError("toward/away need a gate (fit one with catlens.probes.fit_gate); without a gate pass coeff.")
    if gate is not None and coeff is not None:
        raise ValueError("with a gate the coefficients are toward/away; coeff is only for an ungated policy.")
    iv = intervention if coeff is None else replace(intervention, coeff=coeff)
    return SteeringPolicy((iv,), gate=gate, toward=toward, away=away, name=name,
                          model=model_fingerprint(model) if model is not None else {}, meta=dict(meta or {}))


# ---------------------------------------------------------------------------------------------- training
def _run_key(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _save_checkpoint(folder: Path, step: int, params: Mapping[str, Tensor], opt: torch.optim.Optimizer,
                     history: list[dict[str, Any]], run_key: str, names: Sequence[str]) -> None:
    from safetensors.torch import save_file

    from catlens.runs import atomic_path

    sd = opt.state_dict()
    tensors = {f"param.{n}": p.detach().clone().contiguous() for n, p in params.items()}
    state_meta: dict[str, Any] = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"opt.{idx}.{k}"] = v.detach().clone().contiguous()
            else:
                state_meta[f"{idx}.{k}"] = v
    info = {"format": _FORMAT, "step": step, "run_key": run_key, "names": list(names), "history": history,
            "param_groups": sd["param_groups"], "state_meta": state_meta}
    target = folder / f"step_{step:06d}"
    with atomic_path(target) as tmp:
        tmp.mkdir()
        save_file(tensors, str(tmp / "state.safetensors"), metadata={"catlens": "low_rank_checkpoint"})
        (tmp / "state.json").write_text(json.dumps(info, indent=1))


def _latest_checkpoint(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step_*")
                  if (p / "state.json").exists() and (p / "state.safetensors").exists())
    return done[-1] if done else None


def _load_checkpoint(path: Path, params: Mapping[str, Tensor], opt: torch.optim.Optimizer, run_key: str
                     ) -> tuple[int, list[dict[str, Any]]]:
    from safetensors.torch import load_file

    info = json.loads((path / "state.json").read_text())
    if info.get("run_key") != run_key:
        raise ValueError(f"the checkpoint {str(path)!r} belongs to a different run (settings, data, basis or model "
                         f"changed); pass overwrite=True to start afresh, or another out folder.")
    tensors = load_file(str(path / "state.safetensors"))
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, idx, k = key.split(".", 2)
            state.setdefault(int(idx), {})[k] = t
    for key, v in info["state_meta"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
    return int(info["step"]), list(info["history"])


def _initial_params(basis: Tensor, rank: int, variant: str, seed: int, z_scale: float, pad_scale: float
                    ) -> dict[str, Tensor]:
    d, k = basis.shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(d, generator=g) * z_scale  # drawn first, so z does not depend on the rank
    if rank <= k:
        U = basis[:, :rank].clone()
        V = basis[:, :rank].clone()
    else:
        sd = pad_scale * float(basis.norm(dim=0).mean()) / math.sqrt(d)
        U = torch.cat([basis, torch.randn(d, rank - k, generator=g) * sd], dim=1)
        V = torch.cat([basis, torch.randn(d, rank - k, generator=g) * sd], dim=1)
    params = {"U": U.float().contiguous(), "V": V.float().contiguous()}
    if variant == "fixed_z":
        params["z"] = z.float()
    return params


def _delta(params: Mapping[str, Tensor], h: Tensor, coeff: float) -> Tensor:
    """``c U (Vᵀ src)`` for rows ``h`` ``[batch d]``: ``src`` = ``z`` (fixed) or ``h`` (input variant)."""
    U, V = params["U"].to(h.dtype), params["V"].to(h.dtype)
    if "z" in params:
        return (coeff * (U @ (V.T @ params["z"].to(h.dtype))))[None].expand_as(h)
    return coeff * ((h @ V) @ U.T)


def train_low_rank(
    model: Any,
    harmful: Any,
    benign: Any,
    *,
    layer: int,
    basis: Float[Tensor, "d_model k"],
    site: str = "resid_post",
    rank: int | None = None,
    variant: str = "fixed_z",
    coeff: float | int = 1.0,
    kl_weight: float | int = 1.0,
    lr: float | int = 1e-3,
    weight_decay: float | int = 0.01,
    epochs: int | None = None,
    steps: int | None = None,
    batch_size: int = 8,
    seed: int = 0,
    z_scale: float | int = 0.01,
    pad_scale: float | int = 0.01,
    fmt: str = "chat",
    system: str | None = None,
    refusal_ids: Sequence[int] | None = None,
    forward: str = "auto",
    cache_gb: float | int = 2.0,
    checkpoint_every: int = 50,
    out: Any = None,
    resume: bool = True,
    overwrite: bool = False,
    callback: Callable[[int, dict[str, Any]], Any] | None = None,
    show_progress: bool = True,
    keep_base_pass: bool = False,
) -> LowRankResult:
    """Train P1's low-rank steering map on ``harmful`` and ``benign`` prompts (see the module docstring).

    ``harmful`` / ``benign``: strings, dicts with ``text``, or :class:`catlens.prompts.PromptSet`. ``basis``:
    ``[d_model k]`` from :func:`init_basis`. ``rank`` (default ``k``) in ``[1, d_model]``. ``variant``:
    ``"fixed_z"`` (``U(Vᵀ z)``, P1) or ``"input"`` (``U(Vᵀ h)``). ``coeff``: the strength during training (P1: 1).
    ``lr`` / ``weight_decay``: AdamW (P1's notebook used lr 1e-5, its function default 1e-3; torch's default weight
    decay 0.01). Length: ``steps``, or ``epochs`` (default 5, P1) of ``ceil(max(n_harmful, n_benign) /
    batch_size)`` steps. ``refusal_ids``: the refusal-token ids (default: the model's refusal tokens, ``[respond]``
    excluded). ``forward`` / ``cache_gb``: see the module docstring. ``callback(step, row)`` runs after every step
    (after any checkpoint); an exception there stops training, and a later call resumes from the last checkpoint.
    ``keep_base_pass``: keep this run's pass over the prompts in memory for the next call on the same prompts, site,
    layer and forward mode (e.g. a second basis), which reuses it (:data:`_BASE_PASSES`). A non-finite loss raises
    :class:`NonFiniteLossError` naming the step.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from catlens.runs import RunDir

    # ---- validation ------------------------------------------------------------------------------------
    site_ = Site.parse(site)
    if site_ in (Site.Z, Site.PATTERN):
        raise ValueError(f"site={site!r}: the low-rank map steers a d_model-wide site (resid_pre, resid_mid, "
                         f"resid_post, attn_out, mlp_out).")
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise TypeError(f"layer={layer!r} must be an int.")
    layer = model.layer(layer)
    if variant not in VARIANTS:
        raise ValueError(unknown_name_message("low-rank variant", variant, VARIANTS,
                                              "'fixed_z' is U(V^T z) (P1), 'input' is U(V^T h)."))
    if forward not in FORWARDS:
        raise ValueError(unknown_name_message("forward mode", forward, FORWARDS))
    if not isinstance(basis, Tensor) or basis.dim() != 2:
        raise ValueError(f"basis must be a [d_model k] tensor (init_basis), got "
                         f"{tuple(basis.shape) if isinstance(basis, Tensor) else type(basis).__name__}.")
    d, k = basis.shape
    if d != model.d_model:
        raise ValueError(f"basis has {d} rows but {model.name!r} has d_model={model.d_model}; a [k d_model] basis "
                         f"must be transposed ([d_model k], columns = directions).")
    if k < 1 or not bool(torch.isfinite(basis).all()) or bool((basis.norm(dim=0) == 0).any()):
        raise ValueError("basis needs at least one column, finite entries and no zero column.")
    rank = k if rank is None else rank
    _check_int("rank", rank, 1, f" (the map's rank; at most d_model={d}; default k={k})")
    if rank > d:
        raise ValueError(f"rank={rank} exceeds d_model={d}; give a rank in [1, {d}] (default k={k}).")
    coeff = _check_number("coeff", coeff, lo=-1e6, hi=1e6)
    kl_weight = _check_number("kl_weight", kl_weight, lo=0.0, hi=1e6)
    lr = _check_number("lr", lr, lo=0.0, hi=10.0, lo_open=True, hint=" (e.g. 1e-3)")
    weight_decay = _check_number("weight_decay", weight_decay, lo=0.0, hi=1e3)
    z_scale = _check_number("z_scale", z_scale, lo=0.0, hi=1e6)
    pad_scale = _check_number("pad_scale", pad_scale, lo=0.0, hi=1e6)
    cache_gb = _check_number("cache_gb", cache_gb, lo=0.0, hi=1e6)
    batch_size = _check_int("batch_size", batch_size, 1)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    seed = _check_int("seed", seed, 0)
    if epochs is not None and steps is not None:
        raise ValueError(f"give steps ({steps}) or epochs ({epochs}), not both.")
    h_texts, b_texts = _texts("harmful", harmful), _texts("benign", benign)
    per_epoch = math.ceil(max(len(h_texts), len(b_texts)) / batch_size)
    if steps is None:
        epochs = 5 if epochs is None else _check_int("epochs", epochs, 1)
        total = epochs * per_epoch
    else:
        total = _check_int("steps", steps, 1)
    ids = _refusal_ids(model, refusal_ids)
    rendered_h = model.format(h_texts, fmt, system=system)
    rendered_b = model.format(b_texts, fmt, system=system)

    config: dict[str, Any] = {
        "layer": layer, "site": site_.value, "variant": variant, "rank": rank, "k": k, "coeff": coeff,
        "kl_weight": kl_weight, "lr": lr, "weight_decay": weight_decay, "steps": total, "steps_per_epoch": per_epoch,
        "batch_size": batch_size, "seed": seed, "z_scale": z_scale, "pad_scale": pad_scale, "fmt": fmt,
        "system": system, "refusal_ids": ids, "forward": forward, "cache_gb": cache_gb,
        "checkpoint_every": checkpoint_every, "grad_clip": 1.0, "positions": "last_prompt",
        "basis_sha256": _tensor_sha(basis), "n_harmful": len(h_texts), "n_benign": len(b_texts),
        "harmful_sha256": _sha(rendered_h), "benign_sha256": _sha(rendered_b),
        "model": model_fingerprint(model),
    }
    run_key = _run_key(config)
    config["run_key"] = run_key

    # ---- run folder ------------------------------------------------------------------------------------
    run = None
    if out is not None:
        out = Path(out)
        manifest = out / "manifest.json"
        if manifest.exists() and not overwrite:
            if not resume:
                raise FileExistsError(f"run folder {str(out)!r} exists; pass resume=True to continue it, "
                                      f"overwrite=True to start afresh, or another out.")
            old = json.loads(manifest.read_text())
            old_key = (old.get("config") or {}).get("run_key")
            if old_key != run_key:
                raise ValueError(f"{str(out)!r} holds a low-rank run with other settings, data, basis or model "
                                 f"(run key {old_key} != {run_key}); pass overwrite=True or another out.")
            if old.get("status") == "done" and (out / "low_rank").exists():
                log.info("low-rank: %s is finished; loading it", out)
                return load_low_rank(out)
        run = RunDir.create(out, config, overwrite=overwrite, resume=resume and not overwrite, seed=seed)
        run.record_model(model)
        run.record_data("harmful", {"n": len(h_texts), "sha256": config["harmful_sha256"]})
        run.record_data("benign", {"n": len(b_texts), "sha256": config["benign_sha256"]})

    # ---- state -----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    base_key = _sha([json.dumps([config[k] for k in ("harmful_sha256", "benign_sha256", "site", "layer", "forward",
                                                     "cache_gb", "model")], sort_keys=True, default=str)])
    kept = _BASE_PASSES.get(id(model))
    fwd = kept[1] if kept is not None and kept[0] == base_key else None
    if fwd is None:
        fwd = _Forward(model, rendered_h + rendered_b, site=site_, layer=layer, mode=forward,
                       batch_size=max(batch_size, _BASE_BATCH), cache_gb=cache_gb,
                       base_rows=range(len(h_texts), len(h_texts) + len(b_texts)), show_progress=show_progress)
    if keep_base_pass:
        if id(model) not in _BASE_PASSES:
            weakref.finalize(model, _BASE_PASSES.pop, id(model), None)
        _BASE_PASSES[id(model)] = (base_key, fwd)
    else:
        _BASE_PASSES.pop(id(model), None)
    n_h = len(h_texts)
    base_logp = {i - n_h: v for i, v in fwd.base_logp.items()}
    init = _initial_params(basis.detach().float().cpu(), rank, variant, seed, z_scale, pad_scale)
    params = {n: t.to(model.device).requires_grad_(True) for n, t in init.items()}
    names = list(params)
    opt = torch.optim.AdamW([params[n] for n in names], lr=lr, weight_decay=weight_decay)
    start, history = 0, []
    ckpt_dir = out / "checkpoints" if out is not None else None
    if ckpt_dir is not None:
        latest = _latest_checkpoint(ckpt_dir)
        if latest is not None:
            start, history = _load_checkpoint(latest, params, opt, run_key)
            log.info("low-rank: resuming from step %d (%s)", start, latest.name)
    resumed_from = start
    ids_t = torch.tensor(ids, device=model.device)

    # ---- loop ------------------------------------------------------------------------------------------
    bar = tqdm(range(start, total), desc=f"low-rank [{fwd.mode}]", disable=not show_progress, initial=start,
               total=total)
    for step in bar:
        h_rows = _stream(n_h, seed, "harmful", step * batch_size, batch_size)
        b_rows = _stream(len(b_texts), seed, "benign", step * batch_size, batch_size)
        rows = h_rows + [n_h + i for i in b_rows]
        deltas: list[Tensor] = []

        def edit(h: Tensor) -> Tensor:
            dl = _delta(params, h, coeff)
            deltas.append(dl.detach())
            return h + dl

        logits = fwd.logits(rows, edit)
        logp = torch.log_softmax(logits, dim=-1)
        p_ref = logp[:len(h_rows)][:, ids_t].exp()
        harm = -torch.log(p_ref.clamp_min(_PROB_FLOOR).sum(-1)).mean()
        base = torch.stack([base_logp[i] for i in b_rows])
        kl = torch.nn.functional.kl_div(logp[len(h_rows):], base, log_target=True, reduction="batchmean")
        loss = harm + kl_weight * kl
        loss_v, harm_v, kl_v = float(loss.detach()), float(harm.detach()), float(kl.detach())
        if not math.isfinite(loss_v):
            raise NonFiniteLossError(
                f"the low-rank training loss became {loss_v} at step {step + 1} of {total} (harm {harm_v}, kl "
                f"{kl_v}; lr {lr:g}, coeff {coeff:g}); training stopped. Lower lr or coeff, or check the basis "
                f"scale.")
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for n, g in zip(names, grads):
            params[n].grad = g
        gn = float(torch.nn.utils.clip_grad_norm_([params[n] for n in names], 1.0))
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if variant == "fixed_z":
                dn = float(_delta(params, params["z"][None], coeff)[0].norm())
            else:
                dn = float(deltas[0].norm(dim=-1).mean()) if deltas else 0.0
        row = {"step": step + 1, "epoch": (step + 1) / per_epoch, "loss": loss_v, "harm": harm_v, "kl": kl_v,
               "refusal_prob": float(p_ref.detach().sum(-1).mean()), "grad_norm": gn, "delta_norm": dn, "lr": lr,
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.3f}", harm=f"{row['harm']:.3f}", kl=f"{row['kl']:.4f}")
        if ckpt_dir is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == total):
            _save_checkpoint(ckpt_dir, step + 1, params, opt, history, run_key, names)
        if callback is not None:
            callback(step + 1, row)
    bar.close()

    final = {n: p.detach().cpu().clone() for n, p in params.items()}
    iv = Intervention(site_, layer, kind="low_rank", U=final["U"], V=final["V"], z=final.get("z"), coeff=coeff,
                      positions="last_prompt", label=f"low_rank {variant} rank={rank} layer={layer}")
    curve = pd.DataFrame(history, columns=list(CURVE_COLUMNS))
    seconds = time.perf_counter() - t0
    result = LowRankResult(iv, curve, config, fwd.mode, resumed_from, seconds, out)
    if run is not None:
        run.save_table("loss_curve", curve)
        pol = result.policy(model=model)
        pol.save(out / "low_rank", overwrite=True)
        run.update_manifest(outputs={"low_rank": {"kind": "steering policy folder"}})
        run.finish(forward=fwd.mode, steps=total, resumed_from=resumed_from, seconds=round(seconds, 2),
                   final_loss=history[-1]["loss"] if history else None)
    return result


def load_low_rank(out: Any) -> LowRankResult:
    """A finished :func:`train_low_rank` run folder as a :class:`LowRankResult` (map, curve, config)."""
    from catlens.runs import RunDir, load_table

    run = RunDir.open(out)
    man = run.manifest
    if man.get("status") != "done" or not (run.path / "low_rank").exists():
        raise ValueError(f"{str(out)!r} is not a finished low-rank run (status {man.get('status')!r}); call "
                         f"train_low_rank with the same arguments to resume it.")
    pol = SteeringPolicy.load(run.path / "low_rank")
    summary = man.get("summary", {})
    return LowRankResult(pol.interventions[0], load_table(run.path / "loss_curve"), man.get("config") or {},
                         summary.get("forward", ""), int(summary.get("steps", 0)), 0.0, run.path)


# --------------------------------------------------------------------------------------------- evaluation
def evaluate_low_rank(model: Any, intervention: Intervention | None, harmful: Any, benign: Any, *,
                      coeff: float | int | None = None, batch_size: int = 16, fmt: str = "chat",
                      system: str | None = None, refusal_ids: Sequence[int] | None = None) -> dict[str, float]:
    """First-response-position numbers of a steering intervention through the ordinary steering engine
    (:func:`catlens.steer.steering`, full prompt, the intervention's own positions), against the unsteered model.

    Returns ``harm`` (the training's refusal-token loss on ``harmful``), ``refusal_prob`` and ``base_refusal_prob``
    (mean summed refusal-token probability on ``harmful``, steered and unsteered), ``kl`` (mean KL(base || steered)
    on ``benign``), ``benign_refusal_prob`` and ``base_benign_refusal_prob``; ``n_harmful``, ``n_benign``.
    ``coeff`` overrides the intervention's coefficient; ``intervention=None`` evaluates the unsteered model.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    ids = torch.tensor(_refusal_ids(model, refusal_ids), device=model.device)
    if intervention is not None and coeff is not None:
        intervention = replace(intervention, coeff=_check_number("coeff", coeff, lo=-1e6, hi=1e6))
    out: dict[str, float] = {}
    for name, prompts in (("harmful", harmful), ("benign", benign)):
        texts = model.format(_texts(name, prompts), fmt, system=system)
        p_s, p_b, kls, harms = [], [], [], []
        for s in range(0, len(texts), batch_size):
            tok, mask = model.tokenize(texts[s:s + batch_size])
            kw = {"input_ids": tok, "attention_mask": mask, "position_ids": _positions(mask), "use_cache": False,
                  "logits_to_keep": 1}
            with torch.no_grad():  # float64 softmax: a KL that is 0 in exact arithmetic stays >= 0
                base = torch.log_softmax(model.hf(**kw).logits[:, -1].double(), dim=-1)
                if intervention is None:
                    st = base
                else:
                    with steering(model, intervention, attention_mask=mask):
                        st = torch.log_softmax(model.hf(**kw).logits[:, -1].double(), dim=-1)
            ps = st[:, ids].exp()
            p_s.append(ps.sum(-1))
            p_b.append(base[:, ids].exp().sum(-1))
            harms.append(-torch.log(ps.clamp_min(_PROB_FLOOR).sum(-1)))
            kls.append((base.exp() * (base - st)).sum(-1))
        if name == "harmful":
            out.update(harm=float(torch.cat(harms).mean()), refusal_prob=float(torch.cat(p_s).mean()),
                       base_refusal_prob=float(torch.cat(p_b).mean()), n_harmful=len(texts))
        else:
            out.update(kl=float(torch.cat(kls).mean()), benign_refusal_prob=float(torch.cat(p_s).mean()),
                       base_benign_refusal_prob=float(torch.cat(p_b).mean()), n_benign=len(texts))
    return out
