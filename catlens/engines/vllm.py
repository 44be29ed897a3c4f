"""catlens on vLLM: saved steering policies (gate and router included) and activation capture on a serving engine.

    >>> from catlens.engines.vllm import VLLMEngine                                         # doctest: +SKIP
    >>> engine = VLLMEngine("smollm2-135m-instruct", dtype="float32")                      # doctest: +SKIP
    >>> records = engine.generate(prompts, policy, max_new_tokens=64, out="runs/gen-vllm") # doctest: +SKIP

Scripts that start the engine need the ``if __name__ == "__main__":`` guard: vLLM's engine core is a spawned
process. vLLM is not forked or patched: catlens installs forward hooks on the worker's model through
``LLM.collective_rpc`` (functions of :mod:`catlens.engines.vllm_worker`), passes each request's steering through
``SamplingParams.extra_args`` and bans the special tokens after the first response position with a vLLM logits
processor. The engine runs eagerly (``enforce_eager=True`` and torch.compile off): compiled graphs and CUDA graphs
do not call Python hooks.

**Positions** are computed per request from vLLM's own absolute positions and the request's prompt length, so
continuous batching (requests joining and leaving the batch) and chunked prefill (a prompt split over several
forward calls) do not shift them. A request is never padded, so ``all`` means every position of the request.

**Decisions.** The gate and router decide with :mod:`catlens.decisions`, the code ``catlens.generate`` uses, from
the request's own unsteered activations at its last prompt token. When every edit of a policy comes after every
read in the forward pass (:func:`catlens.decisions.single_pass`: generated tokens only, or the last prompt token
with reads at earlier layers and no refusal-token router), the decision is made inside the engine in the same pass.
Otherwise (a refusal-token router with P1's ``last_prompt`` positions, reads after the steered layer, or edits of
earlier prompt positions) the engine runs **two passes**: an unsteered one-token prefill decides, then the request
is generated with the decision fixed. vLLM's prefix cache keys blocks by token ids and a ``cache_salt``, not by
the activations an edit produces, so every steered request gets a salt from its policy and row parameters: its KV
blocks are never shared with unsteered requests or other settings, and the second pass recomputes the prompt
(the first pass's prompt KV is not reused).

**Records** are those of :func:`catlens.generation.generate` (the same fields, the same ``out`` folder:
``generations.jsonl``, resumable, ``manifest.json`` with ``engine: vllm`` in its config).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from catlens import decisions
from catlens.engines import VLLM_INSTALL, EngineNotInstalled, vllm_available
from catlens.model import DEFAULT_MODEL, LensModel, Site
from catlens.steer import Intervention, Rows, SteeringPolicy, as_policy

log = logging.getLogger(__name__)

SUPPORTED_SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")
ARCHITECTURES = ("LlamaForCausalLM",)
_WORKER = "catlens.engines.vllm_worker"


class EngineModel(LensModel):
    """The facts of a model that catlens's checks, formatting and tokenising need, without its weights (they live in
    the engine): a :class:`catlens.model.LensModel` without a bridge (``hf`` is ``None``)."""

    def __init__(self, tokenizer: Any, name: str, provenance: dict[str, Any], config: Any, dtype: str) -> None:
        self.bridge = None
        self.tokenizer = tokenizer
        self.name = name
        self.provenance = provenance
        self.config = config
        self._dims = (int(config.num_hidden_layers), int(config.hidden_size), int(config.num_attention_heads),
                      int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads))
        self._dtype = getattr(torch, dtype)

    @property
    def hf(self) -> Any:
        return None

    @property
    def n_layers(self) -> int:
        return self._dims[0]

    @property
    def d_model(self) -> int:
        return self._dims[1]

    @property
    def n_heads(self) -> int:
        return self._dims[2]

    @property
    def d_head(self) -> int:
        return self._dims[3]

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def __repr__(self) -> str:
        return f"EngineModel({self.name!r}, n_layers={self.n_layers}, d_model={self.d_model}, engine=vllm)"


def _resolve(model: str | os.PathLike[str], cache: Any) -> tuple[str, str, dict[str, Any]]:
    from catlens.model import embedded_checkpoint, folder_source, resolve_spec

    kind, where = resolve_spec(model, cache)
    if kind == "embedded":
        folder = embedded_checkpoint(where, cache)
        return str(folder), where, folder_source(folder, model, kind)
    if kind == "folder":
        return where, Path(where).name, folder_source(where, model, kind)
    return where, where, {"kind": "hub", "spec": str(model)}


class VLLMEngine:
    """A vLLM engine on ``model`` (an embedded name, a checkpoint folder, or a hub id where the hub is reachable)
    that runs catlens policies and captures activations.

    ``dtype``: ``"float32"`` (catlens's default, for equivalence) or ``"bfloat16"``/``"float16"`` (faster).
    ``tensor_parallel_size``: GPUs per model (vLLM's tensor parallelism). ``max_model_len``: the longest request
    (prompt + answer) in tokens; ``None`` is 2048, or the model's own context length where that is shorter.
    ``enforce_eager`` must stay True (hooks do not run inside compiled or captured graphs). ``kv_cache_gib``: on the
    CPU build, the KV cache in whole GiB (vLLM's ``VLLM_CPU_KVCACHE_SPACE``; ``None`` is 2, or what that variable
    already says). ``in_process``: run vLLM's engine core in this process instead of its own (vLLM's
    ``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the same tokens, and on the 2-core CPU the tiny test model starts in about
    8 s instead of 22 s and closes in 1 s instead of 5; the default (its own process) is vLLM's serving layout.
    Other keyword arguments go to ``vllm.LLM``.

    :meth:`close` shuts the engine (its worker processes) down; ``with VLLMEngine(...) as engine:`` does it at the
    end of the block.
    """

    def __init__(self, model: str | os.PathLike[str] = DEFAULT_MODEL, *, dtype: str = "float32",
                 tensor_parallel_size: int = 1, cache: str | os.PathLike[str] | None = None,
                 max_model_len: int | None = None, max_num_seqs: int = 256, seed: int = 0,
                 enable_prefix_caching: bool = True, kv_cache_gib: int | None = None, in_process: bool = False,
                 **llm_kwargs: Any) -> None:
        if not vllm_available():
            raise EngineNotInstalled(VLLM_INSTALL)
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={dtype!r}: choose float32, bfloat16 or float16.")
        if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r} must be an int >= 1.")
        if in_process and tensor_parallel_size != 1:
            raise ValueError(f"in_process=True runs the model in this process, so tensor_parallel_size must be 1 "
                             f"(given {tensor_parallel_size}); leave in_process=False for tensor parallelism.")
        if llm_kwargs.get("enforce_eager", True) is not True:
            raise ValueError("enforce_eager=False: catlens's hooks do not run inside CUDA graphs; leave it True.")
        location, name, source = _resolve(model, cache)
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(location)
        archs = list(getattr(config, "architectures", None) or [])
        if not set(archs) & set(ARCHITECTURES):
            raise ValueError(f"model {name!r} is {archs or 'of unknown architecture'}; the vLLM backend supports "
                             f"{', '.join(ARCHITECTURES)} (the layer structure its hooks rely on).")
        if max_model_len is None:  # vLLM refuses a length beyond the model's context
            max_model_len = min(2048, int(getattr(config, "max_position_embeddings", None) or 2048))
        tokenizer = AutoTokenizer.from_pretrained(location)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        import vllm

        provenance = {"name": name, "source": source, "dtype": dtype, "device": "vllm",
                      "n_layers": int(config.num_hidden_layers), "d_model": int(config.hidden_size),
                      "vocab_size": len(tokenizer), "backend": f"vllm {vllm.__version__}",
                      "tensor_parallel_size": tensor_parallel_size}
        self.model = EngineModel(tokenizer, name, provenance, config, dtype)
        self.location, self.dtype, self.tp = location, dtype, tensor_parallel_size
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc with catlens's functions
        if kv_cache_gib is not None:
            if isinstance(kv_cache_gib, bool) or not isinstance(kv_cache_gib, int) or kv_cache_gib < 1:
                raise ValueError(f"kv_cache_gib={kv_cache_gib!r}: give whole GiB as an int >= 1 (vLLM's CPU build "
                                 "reads VLLM_CPU_KVCACHE_SPACE as an integer), e.g. kv_cache_gib=1.")
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
        else:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        from vllm import LLM

        from catlens.engines import vllm_worker

        t0 = time.perf_counter()
        kwargs = dict(model=location, tokenizer=location, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                      enforce_eager=True, compilation_config={"mode": 0}, seed=seed, max_model_len=max_model_len,
                      max_num_seqs=max_num_seqs, enable_prefix_caching=enable_prefix_caching,
                      logits_processors=[vllm_worker.SpecialFirstOnly])
        kwargs.update(llm_kwargs)
        import vllm.envs

        # vLLM caches its environment once an engine has started; clear it so this engine reads the settings above
        if hasattr(vllm.envs, "disable_envs_cache"):
            vllm.envs.disable_envs_cache()
        before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if in_process:  # engine core and model both in this process (vLLM's "uni" executor)
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            kwargs["distributed_executor_backend"] = "uni"
        try:
            self.llm = LLM(**kwargs)
        finally:
            if before is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
        self.in_process = in_process
        facts = self.llm.collective_rpc(vllm_worker.install)[0]
        self.start_seconds = time.perf_counter() - t0
        if facts["n_layers"] != self.model.n_layers or facts["d_model"] != self.model.d_model:
            raise RuntimeError(f"vLLM loaded {facts} but the checkpoint's config says n_layers="
                               f"{self.model.n_layers}, d_model={self.model.d_model}.")
        self.facts = facts
        self._registered: dict[str, SteeringPolicy] = {}
        self._captures: set[tuple[str, int]] = set()
        self._nonce = uuid.uuid4().hex[:8]
        log.info("vLLM engine on %s (%s, tp=%d) started in %.1f s", name, dtype, tensor_parallel_size,
                 self.start_seconds)

    # ---------------------------------------------------------------------------------------------- checks
    def check_policy(self, policy: SteeringPolicy, *, allow_transfer: bool = False) -> None:
        """Clear errors, before any request runs, for a policy this engine's model cannot take."""
        for iv in policy.interventions:
            if iv.site.value not in SUPPORTED_SITES:
                raise ValueError(f"intervention at site {iv.site.value!r} layer {iv.layer}: the vLLM backend applies "
                                 f"edits at {', '.join(SUPPORTED_SITES)}.")
            if iv.site is Site.Z and self.tp > 1:
                raise ValueError("site 'z' (per-head attention input of o_proj) is split across GPUs with tensor "
                                 "parallelism; use tensor_parallel_size=1 for z interventions, or a resid site.")
        g = policy.gate
        if g is not None and (g.logodds or any(pool != "last" for _, _, pool in g.feature_reads)):
            raise ValueError(f"the gate {g.name!r} reads {'the refusal-token log-odds' if g.logodds else ''}"
                             f"{' and ' if g.logodds and any(p != 'last' for *_, p in g.feature_reads) else ''}"
                             f"{'the prompt mean' if any(p != 'last' for *_, p in g.feature_reads) else ''}: the "
                             f"vLLM backend reads gate inputs at the last prompt token only. Apply this policy with "
                             f"catlens.generate (the default engine), or fit a gate on last-token reads "
                             f"(catlens.gate feature sets 'last@<layer>' or 'last@multi').")
        policy.check_model(self.model, allow_transfer=allow_transfer)

    def _register(self, policy: SteeringPolicy) -> str:
        from catlens.engines import vllm_worker

        pid = policy.digest()
        if pid not in self._registered:
            from safetensors.torch import save

            spec, tensors = policy.to_plain()  # as JSON text and safetensors bytes: RPC arguments stay plain data
            self.llm.collective_rpc(vllm_worker.register_policy,
                                    args=(pid, json.dumps(spec), save({k: t.contiguous() for k, t in tensors.items()}),
                                          decisions.single_pass(policy, self.model.n_layers)))
            self._registered[pid] = policy
        return pid

    def single_pass(self, policy: SteeringPolicy) -> bool:
        """Whether this engine decides ``policy`` inside the generating pass (else two passes)."""
        if not decisions.single_pass(policy, self.model.n_layers):
            return False
        return not (self.tp > 1 and decisions.needs_logits(policy))  # logits live on the first GPU only

    # ---------------------------------------------------------------------------------------------- running
    def _run(self, prompts: list[dict[str, Any]], params: list[Any], show_progress: bool = False) -> list[Any]:
        """Submit token prompts with their sampling params; vLLM outputs in input order."""
        return self.llm.generate(prompts, params, use_tqdm=show_progress)

    def _fetch(self, keys: list[str]) -> list[dict[str, Any] | None]:
        from catlens.engines import vllm_worker

        return self.llm.collective_rpc(vllm_worker.fetch, args=(keys,))[0]

    def generate(self, prompts: Any, steer: Any = None, *, max_new_tokens: int = 64, fmt: str = "chat",
                 system: str | None = None, special_tokens: str = "auto", rows: Mapping[str, Sequence[Any]] | None = None,
                 allow_transfer: bool = False, two_pass: bool | None = None, stop_at_eos: bool = True,
                 sample: bool = False, temperature: float = 1.0, seed: int = 0, out: str | os.PathLike[str] | None = None,
                 overwrite: bool = False, chunk: int = 1024, show_progress: bool = True) -> list[dict[str, Any]]:
        """:func:`catlens.generation.generate` on vLLM: the same arguments (greedy by default), the same records and
        ``out`` folder.

        ``steer`` is one policy for every prompt or, for one continuous batch that mixes settings, a list with one
        policy (or ``None``, unsteered) per prompt. ``two_pass``: ``None`` decides inside the engine when the policy
        allows it (:meth:`single_pass`), ``True`` always decides on a separate unsteered prefill first.
        ``sample=True`` samples with vLLM's sampler seeded per prompt (not the same draws as catlens's sampler).
        ``self.last_edits`` holds, per prompt id, how many positions each intervention edited."""
        from catlens.generation import (SPECIAL_MODES, finish_generation_run, jsonable, open_generation_run,
                                        prompt_items, read_finished_generation)
        from catlens.refusal import refusal_token_ids
        from catlens.refusal import decode_response

        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1.")
        if special_tokens not in SPECIAL_MODES:
            from catlens.errors import unknown_name_message

            raise ValueError(unknown_name_message("special_tokens mode", special_tokens, SPECIAL_MODES))
        if sample and not (temperature > 0 and temperature != float("inf")):
            raise ValueError(f"temperature={temperature!r} must be a finite number > 0.")
        if two_pass not in (None, True):
            raise ValueError(f"two_pass={two_pass!r}: None (decide in the engine when the policy allows it) or True.")
        items = prompt_items(prompts)
        if isinstance(steer, list) and not all(isinstance(p, Intervention) for p in steer):
            if len(steer) != len(items) or not all(p is None or isinstance(p, (SteeringPolicy, Intervention))
                                                   for p in steer):
                raise ValueError(f"steer as a list needs one policy (or Intervention, or None) per prompt "
                                 f"({len(items)} prompts); got {len(steer)} entries of "
                                 f"{sorted({type(p).__name__ for p in steer})}.")
            made: dict[int, SteeringPolicy | None] = {}
            pols = [made.setdefault(id(p), as_policy(p)) for p in steer]
        else:
            pols = [as_policy(steer)] * len(items)
        distinct = {id(p): p for p in pols if p is not None}
        for p in distinct.values():  # every check before any request runs
            self.check_policy(p, allow_transfer=allow_transfer)
            decisions.check_overrides(p, rows, len(items))
        if rows and not distinct:
            decisions.check_overrides(None, rows, len(items))
        model = self.model
        tokens, token_ids = refusal_token_ids(model)
        digests = [decisions.digest(p) for p in pols]
        config = {"model": model.name, "engine": "vllm", "engine_dtype": self.dtype, "tensor_parallel_size": self.tp,
                  "policy": digests[0] if len(set(digests)) == 1 else digests, "max_new_tokens": max_new_tokens,
                  "sample": sample, "temperature": temperature, "seed": seed, "fmt": fmt, "system": system,
                  "special_tokens": special_tokens, "rows": jsonable(rows), "stop_at_eos": stop_at_eos,
                  "two_pass": two_pass,
                  "prompts": hashlib.sha256(json.dumps([it.__dict__ for it in items]).encode()).hexdigest()}
        run = open_generation_run(out, config, overwrite) if out is not None else None
        done: dict[str, dict[str, Any]] = {}
        if run is not None:
            if (run.path / "generations.jsonl").exists() and run.manifest.get("status") == "done":
                return read_finished_generation(run)
            done = {r["id"]: r for r in run.read_jsonl("generations.partial")}
            run.record_model(model)
        pids = {k: self._register(p) for k, p in distinct.items()}
        eos = model.tokenizer.eos_token_id
        ban = token_ids if (token_ids and special_tokens != "free") else None
        todo = [i for i, it in enumerate(items) if it.id not in done]
        results: dict[str, dict[str, Any]] = {}
        self.last_edits: dict[str, list[int]] = {}
        for s in range(0, len(todo), chunk):
            idx = todo[s:s + chunk]
            recs = self._generate_chunk([items[i] for i in idx], idx, [pols[i] for i in idx], pids, two_pass, rows,
                                        fmt=fmt, system=system, max_new_tokens=max_new_tokens, eos=eos, ban=ban,
                                        first=token_ids, stop_at_eos=stop_at_eos, sample=sample,
                                        temperature=temperature, seed=seed, show_progress=show_progress)
            for r in recs:
                r["response"] = decode_response(model.tokenizer, r["token_ids"])
                if r["first_probs"] is not None:
                    fp = r["first_probs"]
                    r["first_probs"] = {t: float(fp[k]) for k, t in enumerate(tokens.all_tokens)}
                    r["refusal_score"] = float(sum(fp[:-1]))
                self.last_edits[r["id"]] = r.pop("_edited")
            if run is not None:
                run.append_jsonl("timing", [{"ids": [r["id"] for r in recs],
                                             "seconds": sum(r["seconds"] for r in recs)}])
                run.append_jsonl("generations.partial", [{k: v for k, v in r.items() if k != "seconds"}
                                                         for r in recs])
            results.update({r["id"]: r for r in recs})
        results.update(done)
        records = [results[it.id] for it in items]
        if run is not None:
            finish_generation_run(run, records)
        return records

    def _generate_chunk(self, items: list[Any], index: list[int], pols: list[SteeringPolicy | None],
                        pids: dict[int, str], two_pass: bool | None, overrides: Any, *, fmt: str, system: str | None,
                        max_new_tokens: int, eos: int, ban: list[int] | None, first: list[int], stop_at_eos: bool,
                        sample: bool, temperature: float, seed: int, show_progress: bool) -> list[dict[str, Any]]:
        from vllm import SamplingParams

        from catlens.generation import row_seed

        t0 = time.perf_counter()
        model = self.model
        rendered = model.format([it.text for it in items], fmt, system=system)
        enc = model.tokenizer(list(rendered), add_special_tokens=False)["input_ids"]
        B = len(items)
        gates: list[Any] = [None] * B
        routes: list[Any] = [None] * B
        steer: list[Any] = [None] * B  # per row: its steer record (rows of one prompt)
        mode: list[str | None] = [None] * B
        router_ids: dict[int, list[int]] = {}
        for k, pol in {id(p): p for p in pols if p is not None}.items():  # rows per policy, decided like generate
            members = [b for b in range(B) if pols[b] is pol]
            rows = Rows.default(pol, len(members))
            decisions.apply_overrides(pol, rows, overrides, [index[b] for b in members])
            if pol.router is not None and pol.router.kind == "fixed":  # decided from the prompts alone
                _, r = decisions.decide(replace_gate(pol), rows, categories=[items[b].category for b in members],
                                        ids=[items[b].id for b in members])
                for j, b in enumerate(members):
                    routes[b] = r[j]
            router_ids[k] = (decisions.router_token_ids(pol, _tokens(model), model.token_id)
                             if decisions.needs_logits(pol) else [])
            two = pol.decides and (two_pass is True or not self.single_pass(pol))
            for j, b in enumerate(members):
                steer[b] = decisions.steer_record(rows, j)
                mode[b] = ("probe" if two else "decide") if pol.decides else "rows"
        nonce = uuid.uuid4().hex[:8]

        def spec(b: int, m: str | None) -> dict[str, Any]:
            d: dict[str, Any] = {"key": f"{nonce}:{b}:{m}", "first": first or None}
            if pols[b] is not None:
                d.update(policy=pids[id(pols[b])], mode=m, steer=steer[b], category=items[b].category,
                         router_ids=router_ids[id(pols[b])])
            return d

        def prompt(b: int, d: dict[str, Any]) -> dict[str, Any]:
            p: dict[str, Any] = {"prompt_token_ids": list(enc[b])}
            if pols[b] is not None and d["mode"] != "probe":  # steered KV is never shared (module docstring)
                p["cache_salt"] = hashlib.sha256(json.dumps([d["policy"], d["mode"], d["steer"]],
                                                            sort_keys=True).encode()).hexdigest()[:32]
            return p

        def params(d: dict[str, Any], n_tokens: int, b: int) -> Any:
            kw: dict[str, Any] = {"max_tokens": n_tokens, "ignore_eos": True, "detokenize": False,
                                  "skip_special_tokens": False, "stop_token_ids": [eos] if stop_at_eos else []}
            if sample:
                kw.update(temperature=temperature, seed=row_seed(seed, items[b].id))
            else:
                kw.update(temperature=0.0)
            extra = dict(d)
            if ban:
                extra["ban_after_first"] = ban
            return SamplingParams(extra_args={"catlens": extra}, **kw)

        probe = [b for b in range(B) if mode[b] == "probe"]
        if probe:  # two-pass mode, pass 1: an unsteered one-token prefill decides
            specs = {b: spec(b, "probe") for b in probe}
            self._run([prompt(b, specs[b]) for b in probe], [params(specs[b], 1, b) for b in probe])
            for b, g in zip(probe, self._fetch([specs[b]["key"] for b in probe])):
                if g is None or not g["decided"]:
                    raise RuntimeError(f"the vLLM engine made no decision for prompt {items[b].id!r} in the first "
                                       f"pass; this is a catlens bug (the hooks did not see its last prompt token).")
                gates[b], routes[b], steer[b], mode[b] = g["gate"], g["route"], g["steer"], "rows"
        specs = {b: spec(b, mode[b]) for b in range(B)}
        outs = self._run([prompt(b, specs[b]) for b in range(B)],
                         [params(specs[b], max_new_tokens, b) for b in range(B)], show_progress)
        got = self._fetch([specs[b]["key"] for b in range(B)])
        seconds = time.perf_counter() - t0
        records = []
        for b, (it, o, g) in enumerate(zip(items, outs, got)):
            toks = list(o.outputs[0].token_ids)
            if g is None:
                raise RuntimeError(f"the vLLM engine has no catlens record for prompt {it.id!r}; its hooks did not "
                                   f"see the request (a catlens bug).")
            if pols[b] is not None:
                if not g["decided"]:
                    raise RuntimeError(f"the vLLM engine made no decision for prompt {it.id!r}; this is a catlens "
                                       f"bug (its hooks did not see the request's last prompt token).")
                steer[b] = g["steer"]
                if mode[b] == "decide":
                    gates[b], routes[b] = g["gate"], g["route"]
            records.append({
                "id": it.id, "prompt": it.text, "label": it.label, "category": it.category, "source": it.source,
                "response": None, "token_ids": toks, "n_new_tokens": len(toks),
                "finished": bool(toks) and toks[-1] == eos,
                "first_probs": g.get("first") if first else None, "refusal_score": None,
                "gate": gates[b], "route": routes[b], "steer": steer[b], "seconds": seconds / B,
                "_edited": g.get("edited"),
            })
        return records

    # ---------------------------------------------------------------------------------------------- capture
    def forward_batch(self, rendered: Sequence[str], sites: Sequence[Site], layers: Sequence[int]
                      ) -> list[dict[str, torch.Tensor]]:
        """Every prompt position's activation at each ``(site, layer)``: one dict per prompt, ``"site.layer"`` ->
        ``[T d]`` float32 (the prompt's own length, no padding). Prefills with one generated token."""
        from vllm import SamplingParams

        from catlens.engines import vllm_worker

        for s in sites:
            if s.value not in SUPPORTED_SITES:
                raise ValueError(f"site {s.value!r} cannot be captured by the vLLM backend; it reads "
                                 f"{', '.join(SUPPORTED_SITES)}.")
        layers = [int(layer) % self.model.n_layers for layer in layers]
        need = {(s.value, layer) for s in sites for layer in layers} - self._captures
        if need:
            self.llm.collective_rpc(vllm_worker.register_capture,
                                    args=(sorted({s for s, _ in need}), sorted({layer for _, layer in need})))
            self._captures |= need
        enc = self.model.tokenizer(list(rendered), add_special_tokens=False)["input_ids"]
        nonce = uuid.uuid4().hex
        keys = [f"{nonce}:{b}:capture" for b in range(len(enc))]
        prompts = [{"prompt_token_ids": list(e), "cache_salt": f"{nonce}:{b}"} for b, e in enumerate(enc)]
        params = [SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                 extra_args={"catlens": {"key": k, "capture": [s.value for s in sites],
                                                         "capture_layers": layers}}) for k in keys]
        self._run(prompts, params)
        got = self._fetch(keys)
        out = []
        for b, g in enumerate(got):
            if g is None:
                raise RuntimeError(f"the vLLM engine captured nothing for prompt {b}; this is a catlens bug.")
            missing = [f"{s.value}.{layer}" for s in sites for layer in layers if f"{s.value}.{layer}" not in g["capture"]]
            if missing:
                raise RuntimeError(f"hooks did not fire for {missing[:3]} of prompt {b} in the vLLM worker.")
            out.append(g["capture"])
        return out

    def close(self) -> None:
        """Shut the engine down (its worker process exits)."""
        llm = getattr(self, "llm", None)
        if llm is not None:
            procs: list[Any] = []
            try:
                core = llm.llm_engine.engine_core
                manager = getattr(getattr(core, "resources", None), "engine_manager", None)
                procs = list(getattr(manager, "processes", None) or [])
                core.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                pass
            for proc in procs:  # shutdown() signals the engine-core processes; wait until they have exited
                proc.join(timeout=30)
            self.llm = None

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _tokens(model: Any) -> Any:
    from catlens.refusal import RefusalTokens

    return RefusalTokens.from_model(model)


def replace_gate(policy: SteeringPolicy) -> SteeringPolicy:
    """``policy`` without its gate (and its gate coefficients): a fixed router's decision alone."""
    from dataclasses import replace

    return replace(policy, gate=None, toward=None, away=None)
