"""A steering policy's per-row decisions, independent of the engine that runs it.

An engine (catlens's own loop in :mod:`catlens.generation`, vLLM in :mod:`catlens.engines.vllm`) supplies
activations and logits and applies edits; everything a policy *decides* lives here, so that both engines decide
exactly alike:

* :func:`reads`: what the gate and a probe router read, ``role -> (site, layer)``, at the last prompt token of the
  prompt's unsteered prefill;
* :func:`router_token_ids`: the refusal-token ids a ``refusal_tokens`` router compares at the first response
  position (the logits of that same unsteered last-prompt-token call);
* :func:`decide`: the gate outcome, the route and the resulting per-row coefficient / direction / on-off
  (:class:`catlens.steer.Rows`), with the records ``generate`` writes (``gate``, ``route``);
* :func:`apply_overrides` / :func:`check_overrides`: explicit per-row parameters given by the caller;
* :func:`rerun_scope`: what a decision changes in catlens's own loop (which prompt positions to re-run steered);
* :func:`single_pass`: whether an engine that cannot pause between the decision and the first edit (vLLM) can
  still decide inside the same forward pass, or needs the two-pass mode (decide on an unsteered prefill, then
  generate with the decision);
* :func:`digest`: a content hash of the policy (run folders record it);
* :func:`steer_record`: the per-row ``steer`` record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from catlens.model import Site

# hooks of one block fire in this order (kept equal to catlens.steer._SITE_ORDER)
SITE_ORDER = {Site.RESID_PRE: 0, Site.Z: 1, Site.ATTN_OUT: 2, Site.RESID_MID: 3, Site.MLP_OUT: 4, Site.RESID_POST: 5}


def reads(policy: Any) -> dict[str, tuple[Site, int]]:
    """What ``policy``'s decisions read from its unsteered prefill: ``"gate:<i>"`` for each of the gate's reads (in
    :attr:`catlens.steer.Gate.feature_reads` order) and ``"router"`` (a probe router) -> ``(site, layer)``; empty
    without them (a refusal-token router reads logits, not a site). :func:`read_pools` says how each is pooled."""
    spec: dict[str, tuple[Site, int]] = {}
    if policy is not None and policy.gate is not None:
        for i, (site, layer, _) in enumerate(policy.gate.feature_reads):
            spec[f"gate:{i}"] = (Site.parse(site), layer)
    if policy is not None and policy.router is not None and policy.router.kind == "probe":
        spec["router"] = (policy.router.site, policy.router.layer)
    return spec


def read_pools(policy: Any) -> dict[str, str]:
    """How each role of :func:`reads` pools the prompt: ``"last"`` (the last prompt token) or ``"mean_all"`` (the
    mean over every real prompt token)."""
    pools: dict[str, str] = {}
    if policy is not None and policy.gate is not None:
        for i, (_, _, pool) in enumerate(policy.gate.feature_reads):
            pools[f"gate:{i}"] = pool
    if policy is not None and policy.router is not None and policy.router.kind == "probe":
        pools["router"] = "last"
    return pools


def needs_logits(policy: Any) -> bool:
    """Whether a decision reads the first response position's logits (a ``refusal_tokens`` router, or a gate with
    the refusal-token log-odds feature)."""
    if policy is None:
        return False
    router = policy.router is not None and policy.router.kind == "refusal_tokens"
    return router or (policy.gate is not None and bool(policy.gate.logodds))


def rerun_scope(policy: Any) -> str:
    """What a decision changes: 'none' (generated tokens only), 'last' (the last prompt token), 'all'."""
    scope = "none"
    for iv in policy.interventions:
        pos = iv.positions
        if pos == "generated":
            continue
        if pos == "last_prompt" or pos == (-1,) or (isinstance(pos, str) and pos.startswith("last_prompt+")):
            scope = "last" if scope == "none" else scope
        else:
            return "all"
    return scope


def single_pass(policy: Any, n_layers: int) -> bool:
    """Whether an engine can make ``policy``'s decisions inside the forward pass that applies its edits.

    True when no decision is needed, or when every edit comes after every read in the pass: either the policy edits
    generated tokens only (the decision is made at the end of the prefill, logits included), or it edits the last
    prompt token and later only, does not read logits, and every read ``(layer, site)`` fires before the first
    intervention's. Otherwise an engine decides on an unsteered prefill first (two passes)."""
    if not policy.decides:
        return True
    scope = rerun_scope(policy)
    if scope == "none":
        return True
    if scope == "all" or needs_logits(policy):
        return False
    key = (lambda site, layer: (layer % n_layers, SITE_ORDER[Site.parse(site)]))
    last_read = max(key(s, l) for s, l in reads(policy).values())
    first_edit = min(key(iv.site, iv.layer) for iv in policy.interventions)
    return last_read < first_edit


def router_token_ids(policy: Any, tokens: Any, token_id: Any) -> list[int]:
    """The vocabulary ids of the refusal tokens of ``policy.router.categories`` (``tokens``: the model's
    :class:`catlens.refusal.RefusalTokens`; ``token_id``: token string -> id); empty for other routers."""
    if policy is None or policy.router is None or policy.router.kind != "refusal_tokens":
        return []
    return [token_id(tokens.token_of(c)) for c in policy.router.categories]


def decide(policy: Any, rows: Any, *, reads: Mapping[str, Tensor] | None = None, router_probs: Tensor | None = None,
           logodds: Tensor | None = None, categories: Sequence[str | None] = (), ids: Sequence[str] = ()
           ) -> tuple[list[dict | None], list[dict | None]]:
    """Fill ``rows`` (a :class:`catlens.steer.Rows` for ``B`` prompts) from the router and the gate (the router
    first: a gate may have thresholds per category); return the per-row ``gate`` and ``route`` records.

    ``reads``: role -> ``[B d]`` unsteered activations (:func:`reads`, pooled as :func:`read_pools` says);
    ``router_probs``: ``[B category]`` probabilities of the router categories' refusal tokens at the first response
    position (softmax over the whole vocabulary; :func:`catlens.refusal.special_token_probs`); ``logodds``: ``[B]``
    refusal-token log-odds at that position (:func:`catlens.steer.refusal_logodds`; a gate with ``logodds``);
    ``categories``/``ids``: each prompt's own category and id (a ``fixed`` router).

    The gate's zones: ``score >= threshold`` steers toward refusal, ``score < lower`` away, in between the row is
    not steered (:meth:`catlens.steer.Gate.outcome`)."""
    B = rows.active[0].shape[0] if rows.active else len(categories)
    gates: list[dict | None] = [None] * B
    routes: list[dict | None] = [None] * B
    r = policy.router
    if r is not None:
        if r.kind == "refusal_tokens":
            probs = router_probs
            choice = probs.argmax(dim=1).tolist()
            extra = [{"p": float(probs[b, choice[b]])} for b in range(B)]
        elif r.kind == "probe":
            x = reads["router"]
            scores = x @ r.weight.T.to(x.device) + r.bias.to(x.device)
            choice = scores.argmax(dim=1).tolist()
            extra = [{"logit": float(scores[b, choice[b]])} for b in range(B)]
        else:  # fixed: the prompt's own category
            choice, extra = [], []
            for b, cat in enumerate(categories):
                if cat not in r.categories:
                    pid = ids[b] if b < len(ids) else b
                    raise ValueError(f"router kind 'fixed' needs each prompt's category among {list(r.categories)}; "
                                     f"prompt {pid!r} has category {cat!r}.")
                choice.append(r.categories.index(cat))
                extra.append({})
        for b in range(B):
            cat = r.categories[choice[b]]
            for i, iv in enumerate(policy.interventions):
                if iv.kind != "low_rank" and iv.n_directions > 1:
                    rows.direction[i][b] = iv.direction_index(cat)
            routes[b] = {"kind": r.kind, "category": cat, **extra[b]}
    if policy.gate is not None:
        g = policy.gate
        feats = g.features([reads[f"gate:{i}"] for i in range(len(g.feature_reads))], logodds)
        score = g.score(feats)
        for b in range(B):
            cat = routes[b]["category"] if routes[b] else None
            outcome = g.outcome(float(score[b]), cat)
            c = policy.toward if outcome == "toward" else policy.away if outcome == "away" else None
            for i in range(len(policy.interventions)):
                rows.active[i][b] = c is not None
                rows.coeff[i][b] = 0.0 if c is None else c
            lower, upper = g.bounds(cat)
            gates[b] = {"score": float(score[b]), "threshold": upper, "lower": lower,
                        "outcome": outcome if c is not None else "none", "zone": outcome,
                        "flagged": outcome == "toward", "coeff": c}
    return gates, routes


def apply_overrides(policy: Any, rows: Any, overrides: Mapping[str, Sequence[Any]] | None,
                    batch: Sequence[int]) -> None:
    """Set explicit per-row parameters (``coeff``, ``active``, ``direction``: one entry per prompt of the whole
    call; ``batch`` the call-level indices of ``rows``' prompts)."""
    if not overrides:
        return
    for key, values in overrides.items():
        for j, idx in enumerate(batch):
            v = values[idx]
            for i, iv in enumerate(policy.interventions):
                if key == "coeff":
                    rows.coeff[i][j] = float(v)
                elif key == "active":
                    rows.active[i][j] = bool(v)
                elif key == "direction":
                    rows.direction[i][j] = iv.direction_index(v) if isinstance(v, str) else int(v)


def check_overrides(policy: Any, overrides: Mapping[str, Sequence[Any]] | None, n: int) -> None:
    """Clear errors for per-row parameters that do not fit ``policy`` or ``n`` prompts."""
    if not overrides:
        return
    if policy is None:
        raise ValueError("rows= needs a steering policy (steer=...).")
    import math

    for key, values in overrides.items():
        if key not in ("coeff", "active", "direction"):
            from catlens.errors import unknown_name_message

            raise ValueError(unknown_name_message("per-row parameter", key, ["active", "coeff", "direction"]))
        if len(values) != n:
            raise ValueError(f"rows[{key!r}] has {len(values)} entries for {n} prompts; give one per prompt.")
        if key == "coeff" and not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError("rows['coeff'] must hold finite numbers.")
        if key == "direction":
            for iv in policy.interventions:
                for v in values:
                    if isinstance(v, str):
                        iv.direction_index(v)
                    elif not 0 <= int(v) < iv.n_directions:
                        raise ValueError(f"rows['direction'] value {v} is out of range for {iv.n_directions} "
                                         f"directions.")


def digest(policy: Any) -> str | None:
    """sha256 of the policy's plain spec and tensors (``None`` for no policy)."""
    if policy is None:
        return None
    spec, tensors = policy.to_plain()
    h = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].numpy().tobytes())
    return h.hexdigest()


def steer_record(rows: Any, b: int) -> dict[str, list] | None:
    """Row ``b``'s ``steer`` record: per intervention ``active``, ``coeff``, ``direction``."""
    if rows is None:
        return None
    return {"active": [bool(a[b]) for a in rows.active], "coeff": [float(c[b]) for c in rows.coeff],
            "direction": [int(d[b]) for d in rows.direction]}


