"""The part of catlens's vLLM backend that runs inside vLLM's worker process (imported there by name).

vLLM's engine core is a spawned process; :class:`catlens.engines.vllm.VLLMEngine` reaches it only through
``LLM.collective_rpc(fn)`` with functions of this module (``fn(worker, ...)``). :func:`install` registers, on the
worker's model, a pre-hook on the decoder stack (it reads which flattened rows of the batch belong to which request
from the model runner: per-token request index, absolute position, prompt length) and, per ``(layer, site)`` that a
registered policy or capture needs, one forward hook that (in this order) reads the gate / router inputs, captures
activations, makes in-engine decisions and applies the edits, with catlens's own :meth:`Intervention.edit`.

Each request carries ``SamplingParams.extra_args["catlens"]``:

* ``key``: the request's catlens id (its results are fetched by it);
* ``policy``: the digest of a registered policy, or absent;
* ``mode``: ``"rows"`` (the per-row parameters are given: ``steer`` = ``{"active", "coeff", "direction"}``),
  ``"decide"`` (decide from this request's own activations in this pass, then steer) or ``"probe"`` (decide only,
  no edit: the first pass of the two-pass mode);
* ``capture``: ``[site, ...]`` x ``layers``: record every prompt position's activation (``collect``);
* ``first``: the special-token ids whose probabilities are recorded at the first response position (after the
  edits, as ``catlens.generate`` records ``first_probs``).

vLLM's Llama layers return ``(hidden, residual)`` and the residual stream is their sum: a ``resid_*`` edit adds
``new - old`` to the residual part. Only eager execution runs these hooks (the engine is started with
``enforce_eager=True`` and torch.compile off).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

_RT: "_Runtime | None" = None

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")
_ORDER = {"resid_pre": 0, "z": 1, "attn_out": 2, "resid_mid": 3, "mlp_out": 4, "resid_post": 5}


class _Req:
    """One request's catlens state in the worker."""

    def __init__(self, spec: dict[str, Any], prompt_len: int, policy: Any) -> None:
        self.key = spec["key"]
        self.spec = spec
        self.T = prompt_len
        self.policy = policy  # _Compiled or None
        self.mode = spec.get("mode", "rows")
        self.rows = None  # Rows for one request, once known
        self.reads: dict[str, Tensor] = {}
        self.router_probs: Tensor | None = None
        self.gate = self.route = None
        self.decided = False
        self.first: Tensor | None = None
        self.capture: dict[str, Tensor] = {}
        self.edited = [0] * (len(policy.policy.interventions) if policy is not None else 0)
        self.rows_init = _rows_from(policy.policy, spec["steer"]) if policy is not None and spec.get("steer") else None
        if policy is not None and self.mode == "rows":
            self.rows = self.rows_init
            self.decided = True

    def result(self) -> dict[str, Any]:
        from catlens import decisions

        return {"key": self.key, "gate": self.gate, "route": self.route,
                "steer": decisions.steer_record(self.rows, 0) if self.rows is not None else None,
                "decided": self.decided, "edited": list(self.edited),
                "first": self.first.tolist() if self.first is not None else None,
                "capture": {k: v for k, v in self.capture.items()}}


def _rows_from(policy: Any, steer: dict[str, Any]) -> Any:
    from catlens.steer import Rows

    return Rows.from_records(policy, [steer])


class _Compiled:
    """A registered policy: its interventions grouped by ``(layer, site)`` and its decision reads."""

    def __init__(self, policy: Any, n_layers: int, single_pass: bool) -> None:
        from catlens import decisions

        self.policy = policy
        self.single_pass = single_pass
        self.by_key: dict[tuple[int, str], list[int]] = {}
        for i, iv in enumerate(policy.interventions):
            self.by_key.setdefault((iv.layer % n_layers, iv.site.value), []).append(i)
        self.reads = {role: (layer % n_layers, site.value) for role, (site, layer) in decisions.reads(policy).items()}
        self.needs_logits = decisions.needs_logits(policy)
        self.router_ids: list[int] = []
        self._cast: dict[tuple[int, Any], tuple[Any, ...]] = {}

    def params(self, i: int, like: Tensor) -> tuple[Any, ...]:
        key = (i, like.dtype)
        if key not in self._cast:
            iv = self.policy.interventions[i]
            cast = (lambda t: None if t is None else t.to(device=like.device, dtype=like.dtype))
            self._cast[key] = (cast(iv.vectors), cast(iv.U), cast(iv.V), cast(iv.z))
        return self._cast[key]


class _Plan:
    """Which flattened rows of the current forward call belong to which request."""

    def __init__(self, rt: "_Runtime", positions: Tensor) -> None:
        runner = rt.runner
        n = runner.input_batch.num_reqs
        req_ids = runner.input_batch.req_ids[:n]
        total = int(runner.query_start_loc.np[n])
        idx = torch.from_numpy(runner.req_indices.np[:total].copy()).long()
        self.total = total
        self.pos = positions[:total].long().cpu()
        self.reqs: list[_Req | None] = []
        for rid in req_ids:
            self.reqs.append(rt.request(rid))
        self.active = [j for j, r in enumerate(self.reqs) if r is not None]
        # per catlens request in the batch: its token rows
        self.rows_of: dict[int, Tensor] = {}
        if self.active:
            for j in self.active:
                self.rows_of[j] = (idx == j).nonzero().flatten()
        self.T_tok = torch.zeros(total, dtype=torch.long)
        for j in self.active:
            self.T_tok[self.rows_of[j]] = self.reqs[j].T
        self.req_of_tok = idx

    def last_prompt_row(self, j: int) -> int | None:
        rows = self.rows_of[j]
        hit = (self.pos[rows] == self.reqs[j].T - 1).nonzero().flatten()
        return int(rows[hit[0]]) if len(hit) else None


class _Runtime:
    def __init__(self, worker: Any) -> None:
        self.runner = worker.model_runner
        self.model = self.runner.get_model()
        inner = getattr(self.model, "model", None)
        self.layers = list(inner.layers)
        self.n_layers = len(self.layers)
        self.inner = inner
        self.policies: dict[str, _Compiled] = {}
        self.capture_keys: set[tuple[int, str]] = set()
        self.requests: dict[str, _Req] = {}  # vLLM request id -> state
        self.done: dict[str, dict[str, Any]] = {}  # catlens key -> result
        self.handles: dict[tuple[int, str], list[Any]] = {}
        self.plan: _Plan | None = None
        self.tp_rank = getattr(worker, "rank", 0)
        self.stats = {"forwards": 0, "planned": 0, "last_req_ids": [], "extra": None}
        # the decoder stack's own forward bypasses module hooks (vLLM's compile wrapper calls forward directly), so
        # the batch plan is made by a pre-hook on the first decoder layer, whose first argument is the positions
        self.first_layer = getattr(inner, "start_layer", 0)
        self.layers[self.first_layer].register_forward_pre_hook(self._pre, with_kwargs=True)
        inner.norm.register_forward_hook(self._final)

    # ------------------------------------------------------------------------------------------ requests
    def request(self, rid: str) -> _Req | None:
        st = self.requests.get(rid)
        if st is not None:
            return st
        cached = self.runner.requests.get(rid)
        params = getattr(cached, "sampling_params", None)
        extra = (getattr(params, "extra_args", None) or {}).get("catlens") if params is not None else None
        if not extra:
            return None
        pol = self.policies.get(extra["policy"]) if extra.get("policy") else None
        if extra.get("policy") and pol is None:
            raise RuntimeError(f"catlens: request {extra['key']} names policy {extra['policy'][:12]} which is not "
                               f"registered in this worker.")
        st = _Req(extra, int(cached.num_prompt_tokens), pol)
        self.requests[rid] = st
        return st

    def finish(self, keys: list[str]) -> list[dict[str, Any] | None]:
        by_key = {st.key: (rid, st) for rid, st in self.requests.items()}
        out = []
        for k in keys:
            if k in by_key:
                rid, st = by_key[k]
                out.append(st.result())
                del self.requests[rid]
            else:
                out.append(None)
        return out

    # ------------------------------------------------------------------------------------------ hooks
    def ensure(self, layer: int, site: str) -> None:
        key = (layer, site)
        if key in self.handles:
            return
        block = self.layers[layer]
        hs = []
        if site == "resid_post":
            def post(mod, args, out):
                h, r = out
                new = self._process(key, h + r)
                return out if new is None else (h, r + (new - (h + r)))
            hs.append(block.register_forward_hook(post))
        elif site == "resid_pre":
            def pre(mod, args):
                positions, h, r = args[0], args[1], args[2] if len(args) > 2 else None
                s = h if r is None else h + r
                new = self._process(key, s)
                if new is None:
                    return None
                return (positions, new, r) if r is None else (positions, h + (new - s), r)
            hs.append(block.register_forward_pre_hook(pre))
        elif site == "resid_mid":
            # catlens's resid_mid is TransformerLens 4's blocks.L.hook_resid_mid, an alias of ln2.hook_in: an edit
            # there changes the MLP's input only, not the residual stream carried to resid_post. The same here:
            # the norm's output is recomputed from the edited sum; the residual it passes on is left as it was.
            def mid(mod, args, out):
                normed, r = out
                new = self._process(key, r)
                return out if new is None else (mod.forward(new), r)
            hs.append(block.post_attention_layernorm.register_forward_hook(mid))
        elif site in ("attn_out", "mlp_out"):
            mod = block.self_attn if site == "attn_out" else block.mlp

            def direct(mod, args, out):
                new = self._process(key, out)
                return out if new is None else new
            hs.append(mod.register_forward_hook(direct))
        elif site == "z":
            def zpre(mod, args):
                new = self._process(key, args[0])
                return None if new is None else (new, *args[1:])
            hs.append(block.self_attn.o_proj.register_forward_pre_hook(zpre))
        else:
            raise ValueError(f"site {site!r} is not supported by the vLLM backend; supported: {', '.join(SITES)}.")
        self.handles[key] = hs

    def _pre(self, mod: Any, args: tuple, kwargs: dict) -> None:
        positions = kwargs.get("positions", args[0] if args else None)
        self.stats["forwards"] += 1
        plan = _Plan(self, positions)
        self.stats["planned"] += bool(plan.active)
        for j in plan.active:  # a prompt continued from an earlier forward call: chunked prefill
            p = plan.pos[plan.rows_of[j]]
            if len(p) and 0 < int(p.min()) < plan.reqs[j].T:
                self.stats["chunked"] = self.stats.get("chunked", 0) + 1
        self.stats["max_batch"] = max(self.stats.get("max_batch", 0), len(plan.active))
        self.stats["last_req_ids"] = list(self.runner.input_batch.req_ids[:self.runner.input_batch.num_reqs])
        self.plan = plan if plan.active else None

    # ------------------------------------------------------------------------------------------ the work
    def _process(self, key: tuple[int, str], s: Tensor) -> Tensor | None:
        plan = self.plan
        if plan is None:
            return None
        layer, site = key
        # 1. reads of pending decisions at the last prompt token (unsteered: nothing edits before them)
        for j in plan.active:
            st = plan.reqs[j]
            if st.policy is None or st.decided or st.mode == "rows":
                continue
            for role, k in st.policy.reads.items():
                if k == key and role not in st.reads:
                    row = plan.last_prompt_row(j)
                    if row is not None:
                        st.reads[role] = s[row].float().clone()[None]
        # 2. captures (every prompt position)
        if key in self.capture_keys:
            for j in plan.active:
                st = plan.reqs[j]
                layers = st.spec.get("capture_layers")
                if not layers or site not in st.spec.get("capture", ()) or layer not in layers:
                    continue
                rows = plan.rows_of[j]
                p = plan.pos[rows]
                keep = p < st.T
                buf = st.capture.setdefault(f"{site}.{layer}", torch.zeros(st.T, s.shape[-1]))
                buf[p[keep]] = s[rows[keep]].float().cpu()
        # 3. in-engine decisions whose reads are complete (single-pass policies that read no logits)
        self._decide(plan, final=False)
        # 4. edits
        out = None
        for pid, comp in self.policies.items():
            idx = comp.by_key.get(key)
            if not idx:
                continue
            members = [j for j in plan.active if plan.reqs[j].policy is comp and plan.reqs[j].decided
                       and plan.reqs[j].mode != "probe"]
            if not members:
                continue
            tok = torch.cat([plan.rows_of[j] for j in members])
            owner = torch.cat([torch.full((len(plan.rows_of[j]),), m, dtype=torch.long)
                               for m, j in enumerate(members)])
            p = plan.pos[tok]
            T = plan.T_tok[tok]
            for i in idx:
                iv = comp.policy.interventions[i]
                active = torch.tensor([bool(plan.reqs[j].rows.active[i][0]) for j in members])[owner]
                sel = _position_mask(iv.positions, p, T) & active
                if not bool(sel.any()):
                    continue
                rows_t = tok[sel]
                own = owner[sel]
                coeff = torch.tensor([float(plan.reqs[j].rows.coeff[i][0]) for j in members])[own]
                direction = torch.tensor([int(plan.reqs[j].rows.direction[i][0]) for j in members],
                                         dtype=torch.long)[own]
                base = s if out is None else out
                x = base[rows_t]
                if iv.site.value == "z" and iv.head is not None:
                    d = x.shape[-1] // _n_heads(iv, x)
                    xs = x[:, iv.head * d:(iv.head + 1) * d]
                else:
                    xs = x
                vectors, U, V, z = comp.params(i, xs)
                mask = torch.ones(len(rows_t), 1, dtype=torch.bool)
                new = iv.edit(xs[:, None, :], mask, coeff, direction, vectors, U, V, z)[:, 0, :]
                if iv.site.value == "z" and iv.head is not None:
                    x = x.clone()
                    x[:, iv.head * d:(iv.head + 1) * d] = new
                    new = x
                if out is None:
                    out = s.clone()
                out[rows_t] = new.to(out.dtype)
                for j, n in zip(*torch.unique(own, return_counts=True)):
                    plan.reqs[members[int(j)]].edited[i] += int(n)
        return out

    def _decide(self, plan: _Plan, final: bool, hidden: Tensor | None = None) -> None:
        pending = [j for j in plan.active if plan.reqs[j].policy is not None and not plan.reqs[j].decided
                   and plan.reqs[j].mode in ("decide", "probe")]
        if not pending:
            return
        for j in pending:
            st = plan.reqs[j]
            comp = st.policy
            if set(comp.reads) - set(st.reads):
                continue
            if comp.needs_logits:
                if not final:
                    continue
                if st.router_probs is None:
                    continue
            elif not final and plan.last_prompt_row(j) is None:
                continue
            if not comp.reads and not comp.needs_logits:
                continue  # nothing to decide from activations (fixed router): the driver gives rows
            from catlens.steer import Rows

            rows = st.rows_init if st.rows_init is not None else Rows.default(comp.policy, 1)
            st.gate, st.route = [x[0] for x in comp.policy.decide(
                rows, reads=st.reads, router_probs=st.router_probs, categories=[st.spec.get("category")],
                ids=[st.key])]
            st.rows = rows
            st.decided = True

    def _final(self, mod: Any, args: tuple, out: Any) -> None:
        """After the last layer: the first response position's probabilities (refusal-token router, first_probs)."""
        plan = self.plan
        if plan is None:
            return
        h = out[0] if isinstance(out, tuple) else out
        need = []
        for j in plan.active:
            st = plan.reqs[j]
            wants_router = st.policy is not None and st.policy.needs_logits and not st.decided
            if (st.spec.get("first") or wants_router):
                row = plan.last_prompt_row(j)
                if row is not None:
                    need.append((j, row, wants_router))
        if need:
            logits = self.model.compute_logits(h[[r for _, r, _ in need]])
            if logits is not None:
                logp = torch.log_softmax(logits.float(), dim=-1)
                for k, (j, row, wants_router) in enumerate(need):
                    st = plan.reqs[j]
                    if wants_router:
                        st.router_probs = logp[k, st.spec["router_ids"]].exp()[None]
                    if st.spec.get("first"):
                        st.first = logp[k, st.spec["first"]].exp().cpu()
        self._decide(plan, final=True)
        self.plan = None


def _n_heads(iv: Any, x: Tensor) -> int:
    return _RT.model.config.num_attention_heads if _RT is not None else 1


def _position_mask(positions: Any, p: Tensor, T: Tensor) -> Tensor:
    """catlens's positions (:class:`catlens.steer.BatchContext`) on unpadded requests: ``p`` absolute positions,
    ``T`` each token's prompt length."""
    if positions == "all":
        return torch.ones_like(p, dtype=torch.bool)
    if positions == "prompt":
        return p < T
    if positions == "generated":
        return p >= T
    if positions == "last_prompt":
        return p >= T - 1
    if isinstance(positions, str) and positions.startswith("last_prompt+"):  # the decision position + K generated
        return (p >= T - 1) & (p <= T - 1 + int(positions.split("+", 1)[1]))
    sel = torch.zeros_like(p, dtype=torch.bool)
    for k in positions:
        target = T + k if k < 0 else torch.full_like(T, k)
        ok = (target >= 0) & (target < T)
        sel |= (p == target) & ok
    return sel


# ---------------------------------------------------------------------------------- collective_rpc entry points
def install(worker: Any) -> dict[str, Any]:
    """Set up the runtime in this worker (idempotent); the model's facts for the driver's checks."""
    global _RT
    # one runtime per loaded model: an engine run in this process (in_process=True) after another has its own model
    if _RT is None or _RT.model is not worker.model_runner.get_model():
        _RT = _Runtime(worker)
    cfg = _RT.model.config
    return {"n_layers": _RT.n_layers, "d_model": int(cfg.hidden_size), "n_heads": int(cfg.num_attention_heads),
            "architecture": type(_RT.model).__name__, "layer_class": type(_RT.layers[0]).__name__,
            "dtype": str(next(_RT.model.parameters()).dtype).removeprefix("torch.")}


def register_policy(worker: Any, pid: str, spec_json: str, tensor_bytes: bytes, single_pass: bool) -> int:
    """Register a policy (its ``to_plain()`` spec as JSON and its tensors as safetensors bytes) under ``pid`` and
    hook every ``(layer, site)`` it edits or reads."""
    import json

    from safetensors.torch import load

    from catlens.steer import SteeringPolicy

    rt = _RT
    if pid in rt.policies:
        return len(rt.policies)
    spec, tensors = json.loads(spec_json), load(tensor_bytes)
    policy = SteeringPolicy.from_plain(spec, tensors)
    comp = _Compiled(policy, rt.n_layers, single_pass)
    for layer, site in [*comp.by_key, *comp.reads.values()]:
        rt.ensure(layer, site)
    rt.policies[pid] = comp
    return len(rt.policies)


def register_capture(worker: Any, sites: list[str], layers: list[int]) -> None:
    rt = _RT
    for site in sites:
        for layer in layers:
            rt.ensure(layer % rt.n_layers, site)
            rt.capture_keys.add((layer % rt.n_layers, site))


def fetch(worker: Any, keys: list[str]) -> list[dict[str, Any] | None]:
    """The results of finished requests (and forget them)."""
    return _RT.finish(keys)


def n_pending(worker: Any) -> int:
    return len(_RT.requests)


def stats(worker: Any) -> dict[str, Any]:
    """Counters for tests and debugging: forward calls seen, calls with catlens requests, requests pending, the
    worker's torch threads."""
    rt = _RT
    out = dict(rt.stats, pending=len(rt.requests), policies=len(rt.policies), hooks=sorted(rt.handles),
               threads=torch.get_num_threads())
    rid = out["last_req_ids"][0] if out["last_req_ids"] else None
    cached = rt.runner.requests.get(rid) if rid else None
    out["extra"] = repr(getattr(getattr(cached, "sampling_params", None), "extra_args", None))[:300]
    return out


# ----------------------------------------------------------------------------------------- logits processor
def special_first_only_class() -> Any:
    """A vLLM logits processor that bans the ids in ``extra_args["catlens"]["ban_after_first"]`` after a request's
    first generated token (catlens's ``special_tokens="first_only"``)."""
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class SpecialFirstOnly(AdapterLogitsProcessor):
        def is_argmax_invariant(self) -> bool:
            return False

        def new_req_logits_processor(self, params: Any) -> Any:
            extra = (params.extra_args or {}).get("catlens") or {}
            ban = extra.get("ban_after_first")
            if not ban:
                return None

            def proc(output_ids: list[int], logits: Tensor) -> Tensor:
                if len(output_ids) >= 1:
                    logits[ban] = float("-inf")
                return logits

            return proc

    return SpecialFirstOnly


def __getattr__(name: str) -> Any:
    # resolved lazily, so importing this module does not import vLLM (vLLM finds the class by its qualified name)
    if name == "SpecialFirstOnly":
        cls = special_first_only_class()
        cls.__qualname__ = cls.__name__ = "SpecialFirstOnly"
        cls.__module__ = __name__
        globals()["SpecialFirstOnly"] = cls
        return cls
    raise AttributeError(name)
