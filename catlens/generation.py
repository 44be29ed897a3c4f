"""Batched, left-padded, KV-cached generation with per-row steering, gate and router decisions.

    >>> import catlens as cl
    >>> policy = cl.SteeringPolicy((cl.Intervention("resid_post", 3, directions.at(3), coeff=2.0),))
    >>> records = cl.generate(model, prompts, steer=policy, max_new_tokens=4, out=tmp_path / "gen",
    ...                       show_progress=False)
    >>> unsteered = cl.generate(model, prompts, max_new_tokens=4, show_progress=False)
    >>> from catlens.steer import with_coeff
    >>> zero = cl.generate(model, prompts, steer=with_coeff(policy, 0.0), max_new_tokens=4, show_progress=False)
    >>> len(records), [r["response"] for r in zero] == [r["response"] for r in unsteered]  # coefficient 0 = baseline
    (4, True)

The loop is catlens's own (not ``transformers.generate``) so that every forward call knows its batch context
(:class:`catlens.steer.BatchContext`): the prompt is run as two calls, all but the last prompt token and then the
last prompt token alone, then one call per generated token. A policy with a gate or router makes its decisions
from that second call's unsteered activations and logits (the gate's probe input at the last prompt token, the
refusal-token probabilities at the first response position) and then re-runs only what the decisions change: the
last prompt token when the policy edits it (``last_prompt``: one extra one-token call), nothing when it edits
generated tokens only, the whole prompt when it edits earlier prompt positions. Unsteered and steered generation
share this call structure, so a row the gate leaves alone generates exactly what the unsteered model generates.

Each record: ``id``, ``prompt``, ``label``, ``category``, ``source``, ``response`` (special tokens visible,
end-of-turn dropped), ``token_ids``, ``n_new_tokens``, ``finished`` (an end token was generated),
``first_probs`` (refusal-token probabilities at the first response position, steered, on refusal-token models),
``refusal_score``, ``gate`` and ``route`` (the decisions, ``None`` without a gate/router), ``steer`` (per
intervention: active, coefficient, direction index) and ``seconds`` (the batch's wall time divided by its rows).

With ``out``, records are appended to ``<out>/generations.partial.jsonl`` batch by batch; an interrupted run
resumes from the finished batches, and the final ``<out>/generations.jsonl`` (input order, without the timing,
which goes to ``timing.jsonl``) is byte-identical to an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from catlens import decisions
from catlens.errors import GenerationCancelled
from catlens.steer import (
    BatchContext,
    Rows,
    Session,
    SteeringPolicy,
    as_policy,
    reading,
)

log = logging.getLogger(__name__)

SPECIAL_MODES = ("auto", "first_only", "free")


@dataclass(frozen=True)
class _Item:
    id: str
    text: str
    label: str | None = None
    category: str | None = None
    source: str | None = None


def prompt_items(prompts: Any) -> list[_Item]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a sequence of prompts, not one string; wrap it in a list: [text].")
    items = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            items.append(_Item(f"{i:06d}", p))
        elif isinstance(p, Mapping):
            items.append(_Item(str(p.get("id", f"{i:06d}")), p["text"], p.get("label"), p.get("category"),
                               p.get("source")))
        elif hasattr(p, "text") and hasattr(p, "id"):
            items.append(_Item(str(p.id), p.text, getattr(p, "label", None), getattr(p, "category", None),
                               getattr(p, "source", None)))
        else:
            raise TypeError(f"prompt {i} is a {type(p).__name__}; give strings, dicts with 'text', or a PromptSet.")
        if not isinstance(items[-1].text, str) or not items[-1].text.strip():
            raise ValueError(f"prompt {items[-1].id!r} has empty or non-string text ({items[-1].text!r}).")
    if not items:
        raise ValueError("no prompts given: pass at least one prompt.")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
        raise ValueError(f"prompt ids must be unique; repeated: {dup}.")
    return items


def row_seed(seed: int, prompt_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


class _Decoder:
    """One batch: the call structure, the context and the session's enable switch."""

    def __init__(self, model: Any, ids: Tensor, mask: Tensor, session: Session | None, use_cache: bool) -> None:
        from transformers import DynamicCache

        self.model, self.session, self.use_cache = model, session, use_cache
        self.seq, self.mask = ids, mask
        self.T = ids.shape[1]
        self.start = self.T - mask.sum(dim=1)
        self.cache = DynamicCache() if use_cache else None
        self._new_cache = DynamicCache

    def reset(self) -> None:
        if self.use_cache:
            self.cache = self._new_cache()

    def crop(self, length: int) -> None:
        if self.use_cache:  # a negative count removes that many tokens in every transformers version
            extra = self.cache.get_seq_length() - length
            if extra > 0:
                self.cache.crop(-extra)

    def forward(self, start: int, end: int) -> Tensor:
        """Run positions ``[start, end)`` (with a cache: those not cached yet); the last position's logits."""
        attn = self.mask[:, :end]
        pos = attn.long().cumsum(-1) - 1
        pos = pos.masked_fill(attn == 0, 1)
        if not self.use_cache:
            start = 0
        if self.session is not None:
            self.session.context = BatchContext(attn, self.T, start, self.start)
        kwargs: dict[str, Any] = {"input_ids": self.seq[:, start:end], "attention_mask": attn,
                                  "position_ids": pos[:, start:end], "use_cache": self.use_cache,
                                  "logits_to_keep": 1}
        if self.use_cache:
            kwargs["past_key_values"] = self.cache
            kwargs["cache_position"] = torch.arange(start, end, device=self.seq.device)
        out = self.model.hf(**kwargs)
        return out.logits[:, -1, :].float()

    def prompt(self) -> Tensor:
        """Logits at the last prompt token, run as [0, T-1) then [T-1, T) (one call when there is no cache)."""
        if self.use_cache and self.T > 1:
            self.forward(0, self.T - 1)
        return self.forward(self.T - 1, self.T) if self.use_cache else self.forward(0, self.T)

    def append(self, tokens: Tensor) -> None:
        self.seq = torch.cat([self.seq, tokens[:, None]], dim=1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)


def _prepare_batch(model: Any, items: Sequence[_Item], *, fmt: str, system: str | None,
                   use_cache: bool = True) -> _Decoder:
    """A batch's prompts rendered (``fmt``, ``system``), tokenised (left-padded) and wrapped in a :class:`_Decoder`
    (no session yet: set ``.session`` before the steered calls)."""
    ids, mask = model.tokenize(model.format([it.text for it in items], fmt, system=system))
    return _Decoder(model, ids, mask, None, use_cache)


def _read_spec(policy: SteeringPolicy | None) -> dict[str, tuple[Any, int, str]]:
    """What ``policy``'s decisions read: role -> ``(site, layer, pool)`` (:func:`catlens.decisions.reads` and
    :func:`catlens.decisions.read_pools`)."""
    pools = decisions.read_pools(policy)
    return {role: (site, layer, pools[role]) for role, (site, layer) in decisions.reads(policy).items()}


def _read_key(site: Any, layer: int, pool: str) -> str:
    return f"{getattr(site, 'value', site)}.{layer}.{pool}"


def _rerun_scope(policy: SteeringPolicy) -> str:
    """What a decision changes (:func:`catlens.decisions.rerun_scope`)."""
    return decisions.rerun_scope(policy)


def _decide(model: Any, policy: SteeringPolicy, items: Sequence[_Item], reads: dict[str, Tensor], logits: Tensor | None,
            tokens: Any, rows: Rows) -> tuple[list[dict | None], list[dict | None]]:
    """Fill ``rows`` from the gate and router (:func:`catlens.decisions.decide`); this engine supplies the reads and
    the refusal-token probabilities at the first response position."""
    probs = lo = None
    if decisions.needs_logits(policy):
        from catlens.refusal import special_token_probs

        if policy.router is not None and policy.router.kind == "refusal_tokens":
            probs = special_token_probs(logits, decisions.router_token_ids(policy, tokens, model.token_id))
        if policy.gate is not None and policy.gate.logodds:
            from catlens.steer import refusal_logodds

            lo = refusal_logodds(logits, [model.token_id(t) for t in tokens.all_tokens[:-1]])
    return decisions.decide(policy, rows, reads=reads, router_probs=probs, logodds=lo,
                            categories=[it.category for it in items], ids=[it.id for it in items])


def _apply_row_overrides(policy: SteeringPolicy, rows: Rows, overrides: Mapping[str, Sequence[Any]] | None,
                         batch: Sequence[int]) -> None:
    decisions.apply_overrides(policy, rows, overrides, batch)


def _check_overrides(policy: SteeringPolicy | None, overrides: Mapping[str, Sequence[Any]] | None, n: int) -> None:
    decisions.check_overrides(policy, overrides, n)


def _pick(logits: Tensor, sample: bool, temperature: float, top_k: int | None, top_p: float | None,
          gens: Sequence[torch.Generator] | None) -> Tensor:
    if not sample:
        return logits.argmax(dim=-1)
    x = logits / temperature
    if top_k is not None:
        kth = x.topk(min(top_k, x.shape[-1]), dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p is not None:
        sorted_x, order = x.sort(dim=-1, descending=True)
        cum = sorted_x.softmax(-1).cumsum(-1)
        drop = cum - sorted_x.softmax(-1) > top_p
        x = x.scatter(-1, order, sorted_x.masked_fill(drop, float("-inf")))
    out = []
    for b in range(x.shape[0]):  # Gumbel-max with each row's own generator: batch-composition independent
        u = torch.rand(x.shape[-1], generator=gens[b]).clamp_(1e-20, 1.0)
        out.append(int((x[b].cpu() - torch.log(-torch.log(u))).argmax()))
    return torch.tensor(out, device=logits.device)


@torch.inference_mode()
def _generate_batch(model: Any, items: Sequence[_Item], policy: SteeringPolicy | None, *, fmt: str,
                    system: str | None, max_new_tokens: int, sample: bool, temperature: float, top_k: int | None,
                    top_p: float | None, seed: int, use_cache: bool, special_first_only: bool, tokens: Any,
                    token_ids: list[int], overrides: Mapping[str, Sequence[Any]] | None, batch_index: Sequence[int],
                    trace: list | None = None, stop_at_eos: bool = True,
                    should_stop: Callable[[int], bool] | None = None) -> list[dict[str, Any]]:
    from catlens.refusal import decode_response, special_token_probs

    t0 = time.perf_counter()
    _check_stop(should_stop, 0)
    dec = _prepare_batch(model, items, fmt=fmt, system=system, use_cache=use_cache)
    B = dec.seq.shape[0]
    session = Session(model, policy) if policy is not None else None
    rows = Rows.default(policy, B) if policy is not None else None
    if policy is not None:
        _apply_row_overrides(policy, rows, overrides, batch_index)
        session.rows = rows
        session.trace = trace
    dec.session = session
    gens = [torch.Generator().manual_seed(row_seed(seed, it.id)) for it in items] if sample else None
    eos = model.tokenizer.eos_token_id
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else eos
    gates: list[dict | None] = [None] * B
    routes: list[dict | None] = [None] * B

    hooks = []
    if session is not None:
        hooks = [(model.hook_name(iv.site, iv.layer), session.hook(i)) for i, iv in enumerate(policy.interventions)]
    reads: dict[str, Tensor] = {}
    read_spec = _read_spec(policy)

    from contextlib import ExitStack

    with ExitStack() as stack:
        if hooks:
            stack.enter_context(model.bridge.hooks(fwd_hooks=hooks))
        if policy is not None and policy.decides:
            session.enabled = False
            with reading(model, read_spec, reads, mask=dec.mask) if read_spec else ExitStack():
                logits = dec.prompt()
            gates, routes = _decide(model, policy, items, reads, logits, tokens, rows)
            session.enabled = True
            scope = _rerun_scope(policy)
            if scope == "last":
                if use_cache:
                    dec.crop(dec.T - 1)
                    logits = dec.forward(dec.T - 1, dec.T)
                else:
                    logits = dec.prompt()
            elif scope == "all":
                dec.reset()
                logits = dec.prompt()
        else:
            if policy is not None and policy.router is not None:  # a fixed router needs no activations
                gates, routes = _decide(model, policy, items, reads, None, tokens, rows)
            logits = dec.prompt()

        first_probs = special_token_probs(logits, token_ids) if token_ids else None
        special = torch.tensor(token_ids, dtype=torch.long, device=logits.device) if token_ids else None
        out_tokens: list[list[int]] = [[] for _ in range(B)]
        finished = torch.zeros(B, dtype=torch.bool, device=logits.device)
        for step in range(max_new_tokens):
            if special is not None and special_first_only and step > 0:
                logits[:, special] = float("-inf")
            nxt = _pick(logits, sample, temperature, top_k, top_p, gens)
            nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            for b in range(B):
                if not finished[b]:
                    out_tokens[b].append(int(nxt[b]))
            if stop_at_eos:
                finished |= nxt == eos
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            _check_stop(should_stop, step + 1)
            dec.append(nxt)
            end = dec.seq.shape[1]
            logits = dec.forward(end - 1, end)
    seconds = time.perf_counter() - t0

    records = []
    for b, it in enumerate(items):
        toks = out_tokens[b]
        rec: dict[str, Any] = {
            "id": it.id, "prompt": it.text, "label": it.label, "category": it.category, "source": it.source,
            "response": decode_response(model.tokenizer, toks), "token_ids": toks, "n_new_tokens": len(toks),
            "finished": bool(toks) and toks[-1] == eos,
            "first_probs": ({t: float(first_probs[b, k]) for k, t in enumerate(tokens.all_tokens)}
                            if first_probs is not None else None),
            "refusal_score": float(first_probs[b, :-1].sum()) if first_probs is not None else None,
            "gate": gates[b], "route": routes[b],
            "steer": decisions.steer_record(rows, b),
            "seconds": seconds / B,
        }
        records.append(rec)
    return records


def _check_stop(should_stop: Callable[[int], bool] | None, n_tokens: int) -> None:
    if should_stop is not None and should_stop(n_tokens):
        raise GenerationCancelled(f"generation stopped by should_stop after {n_tokens} new token(s) of a batch.")


def generate(model: Any, prompts: Any, steer: Any = None, *, max_new_tokens: int = 64, batch_size: int = 16,
             sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             seed: int = 0, use_cache: bool = True, fmt: str = "chat", system: str | None = None,
             special_tokens: str = "auto", rows: Mapping[str, Sequence[Any]] | None = None,
             allow_transfer: bool = False, out: str | os.PathLike[str] | None = None, overwrite: bool = False,
             show_progress: bool = True, trace: list | None = None, stop_at_eos: bool = True,
             should_stop: Callable[[int], bool] | None = None) -> list[dict[str, Any]]:
    """Generate answers to ``prompts`` (strings, dicts with ``text``, or a :class:`catlens.prompts.PromptSet`),
    steered by ``steer`` (a :class:`catlens.steer.SteeringPolicy`, interventions, or a saved policy folder).

    Greedy by default; ``sample=True`` samples with ``temperature``/``top_k``/``top_p`` from a per-prompt generator
    seeded from ``(seed, prompt id)``, so results do not depend on batching or resumption. ``rows`` overrides
    per-row parameters (``coeff``, ``active``, ``direction`` as a label or index; one entry per prompt).
    ``special_tokens``: on refusal-token models ``"first_only"`` (the ``"auto"`` default) allows the special tokens
    only at the first response position; ``"free"`` does not restrict them. ``use_cache=False`` recomputes the whole
    sequence at every step (slow; steers the same positions). ``trace`` (a list) collects ``(intervention, row,
    position)`` of every edit, for tests. ``stop_at_eos=False`` always decodes ``max_new_tokens`` (benchmarks).
    ``should_stop(n)`` (optional) is called before each batch's prefill (``n=0``) and before each further decoding
    step (``n`` = tokens generated so far in the batch); when it returns True, :class:`GenerationCancelled` is
    raised (finished batches stay in ``out``, so a rerun resumes). It also serves as a per-token progress signal.
    See the module docstring for the records and the ``out`` folder.
    """
    from tqdm.auto import tqdm

    from catlens.errors import unknown_name_message

    if max_new_tokens < 1 or isinstance(max_new_tokens, bool):
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1.")
    if sample and not (temperature > 0 and temperature == temperature and temperature != float("inf")):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0.")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} must be in (0, 1].")
    if special_tokens not in SPECIAL_MODES:
        raise ValueError(unknown_name_message("special_tokens mode", special_tokens, SPECIAL_MODES))
    items = prompt_items(prompts)
    policy = as_policy(steer)
    if policy is not None:
        policy.check_model(model, allow_transfer=allow_transfer)
    _check_overrides(policy, rows, len(items))
    max_new_tokens = _fit_context(model, items, max_new_tokens, fmt, system)
    lock = _lock_out(out) if out is not None else None  # held until this call returns
    from catlens.refusal import refusal_token_ids

    tokens, token_ids = refusal_token_ids(model)
    # the dtype and device too: the same weights in bfloat16 give other answers, so a folder of one never resumes the
    # other (as in first_position_key)
    config = {"model": model.name, "dtype": str(getattr(model, "dtype", "")),
              "device": str(getattr(model, "device", "")), "policy": policy_digest(policy),
              "max_new_tokens": max_new_tokens,
              "batch_size": batch_size, "sample": sample, "temperature": temperature, "top_k": top_k,
              "top_p": top_p, "seed": seed, "use_cache": use_cache, "fmt": fmt, "system": system,
              "special_tokens": special_tokens, "rows": jsonable(rows), "stop_at_eos": stop_at_eos,
              "prompts": hashlib.sha256(json.dumps([it.__dict__ for it in items]).encode()).hexdigest()}
    run = open_generation_run(out, config, overwrite) if out is not None else None
    done: dict[str, dict[str, Any]] = {}
    if run is not None:
        if (run.path / "generations.jsonl").exists() and run.manifest.get("status") == "done":
            lock.release()
            return read_finished_generation(run)
        done = {r["id"]: r for r in run.read_jsonl("generations.partial")}
        if done:
            log.info("generate: resuming %s, %d of %d prompts done", run.path, len(done), len(items))
        run.record_model(model)

    rendered_len = [len(t) for t in model.format([it.text for it in items], fmt, system=system)]
    order = sorted(range(len(items)), key=lambda i: (-rendered_len[i], i))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    results: dict[str, dict[str, Any]] = {}
    with tqdm(total=len(items), desc="generate", unit="prompt", disable=not show_progress) as bar:
        for batch in batches:
            if all(items[i].id in done for i in batch):
                results.update({items[i].id: done[items[i].id] for i in batch})
                bar.update(len(batch))
                continue
            recs = _generate_batch(model, [items[i] for i in batch], policy, fmt=fmt, system=system,
                                   max_new_tokens=max_new_tokens, sample=sample, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=seed, use_cache=use_cache,
                                   special_first_only=special_tokens != "free", tokens=tokens, token_ids=token_ids,
                                   overrides=rows, batch_index=batch, trace=trace, stop_at_eos=stop_at_eos,
                                   should_stop=should_stop)
            if run is not None:
                run.append_jsonl("timing", [{"ids": [r["id"] for r in recs], "seconds": sum(r["seconds"] for r in recs)}])
                run.append_jsonl("generations.partial", [{k: v for k, v in r.items() if k != "seconds"} for r in recs])
            results.update({r["id"]: r for r in recs})
            bar.update(len(batch))
    records = [results[it.id] for it in items]
    if run is not None:
        finish_generation_run(run, records)
    if lock is not None:
        lock.release()
    return records


def _fit_context(model: Any, items: Sequence[_Item], max_new_tokens: int, fmt: str, system: str | None) -> int:
    """Check every prompt against the model's context before any work (a prompt longer than the context is an
    error naming it); ``max_new_tokens`` beyond what the longest prompt leaves is capped, with a warning."""
    ctx = getattr(model, "n_ctx", None)
    if ctx is None or not items:
        return max_new_tokens
    rendered = model.format([it.text for it in items], fmt, system=system)
    lengths = [len(ids) for ids in model.tokenizer(list(rendered), add_special_tokens=False)["input_ids"]]
    longest = max(range(len(items)), key=lambda i: lengths[i])
    if lengths[longest] >= ctx:
        too_long = sum(n >= ctx for n in lengths)
        raise ValueError(f"prompt {items[longest].id!r} is {lengths[longest]} tokens with the chat template, which "
                         f"does not fit {model.name!r}'s context of {ctx} tokens (with room for an answer); "
                         f"{too_long} of {len(items)} prompt(s) are too long. Shorten them or leave them out.")
    room = ctx - lengths[longest]
    if max_new_tokens > room:
        log.warning("max_new_tokens=%d does not fit the context of %s (%d tokens; the longest prompt takes %d): "
                    "capped at %d.", max_new_tokens, model.name, ctx, lengths[longest], room)
        return room
    return max_new_tokens


class _OutLock:
    """An exclusive lock on an output folder, held by one ``generate`` at a time: a hidden lock file beside the
    folder (``.<name>.lock``; beside, so that ``overwrite`` can replace the folder), locked with ``flock`` (the
    lock goes with the process, so a crashed run leaves no stale lock)."""

    def __init__(self, out: Path) -> None:
        import fcntl

        out.parent.mkdir(parents=True, exist_ok=True)
        self.path = out.parent / f".{out.name}.lock"
        self.file = open(self.path, "a+")  # noqa: SIM115  (held until release)
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise FileExistsError(f"--out {str(out)!r} is being written by another catlens generate ({holder}); "
                                  f"wait for it to finish (a rerun then resumes or reads its result) or choose "
                                  f"another --out.") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()}")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.path.unlink(missing_ok=True)
            self.file.close()


def _lock_out(out: str | os.PathLike[str]) -> _OutLock:
    from catlens.errors import check_writable_folder

    out = Path(out)
    check_writable_folder(out, "--out")
    return _OutLock(out)


FIRST_POSITION_COLUMNS = ("policy", "id", "label", "category", "source", "top_token", "refused", "responded",
                          "refusal_score", "p_respond", "special_refused", "route", "gate_score", "gate_flagged", "gate_zone",
                          "coeff", "kl_from_base")
"""Columns of :func:`first_position`'s table (one row per policy and prompt)."""


@torch.inference_mode()
def first_position(model: Any, prompts: Any, policies: Mapping[str, Any], *, batch_size: int = 32,
                   fmt: str = "chat", system: str | None = None, allow_transfer: bool = False,
                   rows: Mapping[str, Mapping[str, Sequence[Any]]] | None = None, show_progress: bool = True) -> Any:
    """The first response position of ``prompts`` under many steering settings at once: a tidy table.

    ``policies`` maps a name to a :class:`~catlens.steer.SteeringPolicy` (or anything :func:`generate` accepts as
    ``steer``; ``None`` is the unsteered model). Per batch, the prompt minus its last token runs **once**, unsteered,
    into a KV cache that every policy shares; the last prompt token runs once unsteered (the gate's and router's
    reads, the base distribution) and then once per policy that edits it (``last_prompt``), with the cache cropped
    back in between. A policy that edits earlier prompt positions re-runs its whole prompt; one that edits
    generated tokens only equals the base here. The decisions and logits are those :func:`generate` computes for
    its first token, so with greedy decoding ``refused`` is exactly the ``refusal_token`` judge's verdict on
    ``generate(...)``'s answer (tested). For a sweep over ``P`` last-position settings this costs one prompt pass
    plus ``P`` one-token calls instead of ``P`` prompt passes.

    ``rows`` optionally gives per-policy per-row overrides (``{name: {"coeff"|"active"|"direction": [...]}}``, one
    entry per prompt, as in :func:`generate`).

    Columns (:data:`FIRST_POSITION_COLUMNS`): ``top_token`` (greedy first token id); ``refused`` (it is a category
    refusal token); ``responded`` (it is ``[respond]``); ``refusal_score`` (summed refusal-token probability);
    ``p_respond``; ``special_refused`` (the most probable refusal token beats ``[respond]``, the fine-tune
    evaluation's first-token rule); ``route`` (the router's category), ``gate_score``/``gate_flagged``; ``coeff``
    (the first intervention's coefficient for the row, 0 when inactive); ``kl_from_base`` (KL(unsteered || steered)
    of the full next-token distribution, nats). Refusal columns are ``None`` on a model without refusal tokens.
    """
    import pandas as pd
    from tqdm.auto import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be an int >= 1.")
    if not isinstance(policies, Mapping) or not policies:
        raise ValueError(f"policies must be a non-empty mapping name -> policy (None = unsteered); got "
                         f"{type(policies).__name__} {policies!r:.80}.")
    items = prompt_items(prompts)
    resolved: dict[str, SteeringPolicy | None] = {}
    for name, steer in policies.items():
        pol = as_policy(steer)
        if pol is not None:
            pol.check_model(model, allow_transfer=allow_transfer)
        _check_overrides(pol, (rows or {}).get(name), len(items))
        resolved[str(name)] = pol
    unknown = set(rows or {}) - set(resolved)
    if unknown:
        from catlens.errors import unknown_name_message

        raise ValueError(unknown_name_message("policy in rows", sorted(unknown)[0], list(resolved)))
    from catlens.refusal import refusal_token_ids

    tokens, token_ids = refusal_token_ids(model)
    refuse_ids = token_ids[:-1] if token_ids else []
    respond_id = token_ids[-1] if token_ids else None

    # every (site, layer) a gate or probe router reads, read once from the unsteered last-token call
    read_spec = {_read_key(*spec): spec for pol in resolved.values() for spec in _read_spec(pol).values()}

    rendered_len = [len(t) for t in model.format([it.text for it in items], fmt, system=system)]
    order = sorted(range(len(items)), key=lambda i: (-rendered_len[i], i))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    out: dict[str, list[dict[str, Any]]] = {name: [None] * len(items) for name in resolved}  # type: ignore[list-item]
    with tqdm(total=len(items), desc="first position", unit="prompt", disable=not show_progress) as bar:
        for batch in batches:
            b_items = [items[i] for i in batch]
            dec = _prepare_batch(model, b_items, fmt=fmt, system=system)
            T = dec.T
            reads: dict[str, Tensor] = {}
            with reading(model, read_spec, reads, mask=dec.mask) if read_spec else nullcontext():
                if T > 1:
                    dec.forward(0, T - 1)
                base = dec.forward(T - 1, T)
            base_logp = base.log_softmax(-1)
            for name, pol in resolved.items():
                gates: list[dict | None] = [None] * len(b_items)
                routes: list[dict | None] = [None] * len(b_items)
                prow: Rows | None = None
                if pol is None:
                    logits = base
                else:
                    prow = Rows.default(pol, len(b_items))
                    _apply_row_overrides(pol, prow, (rows or {}).get(name), batch)
                    if pol.gate is not None or pol.router is not None:
                        mine = {role: reads[_read_key(*spec)] for role, spec in _read_spec(pol).items()}
                        gates, routes = _decide(model, pol, b_items, mine, base, tokens, prow)
                    scope = _rerun_scope(pol)
                    if scope == "none":
                        logits = base
                    else:
                        session = Session(model, pol)
                        session.rows = prow
                        hooks = [(model.hook_name(iv.site, iv.layer), session.hook(i))
                                 for i, iv in enumerate(pol.interventions)]
                        run = dec if scope == "last" else _Decoder(model, dec.seq, dec.mask, None, use_cache=True)
                        run.session = session
                        try:
                            with model.bridge.hooks(fwd_hooks=hooks):
                                if scope == "last":
                                    run.crop(T - 1)
                                    logits = run.forward(T - 1, T)
                                else:
                                    logits = run.prompt()
                        finally:
                            run.session = None
                        if scope == "last":
                            dec.crop(T - 1)
                logp = logits.log_softmax(-1)
                kl = (base_logp.exp() * (base_logp - logp)).sum(-1)
                top = logits.argmax(-1)
                probs = logp.exp()
                for j, it in enumerate(b_items):
                    t = int(top[j])
                    rs = float(probs[j, refuse_ids].sum()) if refuse_ids else None
                    pr = float(probs[j, respond_id]) if respond_id is not None else None
                    g = gates[j]
                    out[name][batch[j]] = {
                        "policy": name, "id": it.id, "label": it.label, "category": it.category, "source": it.source,
                        "top_token": t, "refused": (t in refuse_ids) if refuse_ids else None,
                        "responded": (t == respond_id) if respond_id is not None else None,
                        "refusal_score": rs, "p_respond": pr,
                        "special_refused": (float(probs[j, refuse_ids].max()) > pr) if refuse_ids else None,
                        "route": routes[j]["category"] if routes[j] else None,
                        "gate_score": g["score"] if g else None, "gate_flagged": g["flagged"] if g else None,
                        "gate_zone": g["zone"] if g else None,
                        "coeff": (float(prow.coeff[0][j]) if bool(prow.active[0][j]) else 0.0) if prow else 0.0,
                        "kl_from_base": max(float(kl[j]), 0.0),
                    }
            bar.update(len(batch))
    return pd.DataFrame([r for name in resolved for r in out[name]], columns=list(FIRST_POSITION_COLUMNS))


def _first_position_spec(model: Any, prompts: Any, *, batch_size: int, fmt: str, system: str | None
                         ) -> dict[str, Any]:
    """What every cached first-position table of ``prompts`` on ``model`` depends on, whatever the policy."""
    from catlens.steer import model_fingerprint

    items = hashlib.sha256(json.dumps([[it.id, it.text, it.label, it.category, it.source]
                                       for it in prompt_items(prompts)], default=str).encode()).hexdigest()
    return {"model": model_fingerprint(model), "dtype": str(getattr(model, "dtype", "")),
            "device": str(getattr(model, "device", "")), "prompts": items, "batch_size": batch_size, "fmt": fmt,
            "system": system}


def _key_of(spec: Mapping[str, Any], policy: Any) -> str:
    return hashlib.sha256(json.dumps({**spec, "policy": policy_digest(as_policy(policy))}, sort_keys=True,
                                     default=str).encode()).hexdigest()


def first_position_key(model: Any, prompts: Any, policy: Any, *, batch_size: int, fmt: str = "chat",
                       system: str | None = None) -> str:
    """sha256 of what a cached :func:`first_position` table of one policy depends on: the model
    (:func:`catlens.steer.model_fingerprint`, dtype and device), the prompts (ids, texts, labels, categories and
    sources, in order), the policy (:func:`policy_digest`; ``None`` for the unsteered model), the batch size
    (padding) and the chat rendering."""
    return _key_of(_first_position_spec(model, prompts, batch_size=batch_size, fmt=fmt, system=system), policy)


def first_position_cached(model: Any, prompts: Any, policies: Mapping[str, Any], cache_dir: str | os.PathLike[str],
                          *, batch_size: int = 32, fmt: str = "chat", system: str | None = None,
                          allow_transfer: bool = False, show_progress: bool = True) -> tuple[Any, dict[str, str]]:
    """:func:`first_position` with one table per policy in ``cache_dir``, ``<name>-<key>.parquet`` where the key is
    :func:`first_position_key` (model, prompts, policy, batch size, rendering): a rerun computes only what it has
    not seen, a changed model or prompt set never reads a stale table, and a policy already computed under another
    name is read (and filed under the new name) instead of recomputed. The policies not cached run in **one**
    :func:`first_position` call (one prefill per batch shared among them).

    Returns the table (rows in the order of ``policies``, ``policy`` holding the names asked for) and
    ``{name: "cached" | "computed"}``. A damaged file is recomputed with a warning.

        >>> from catlens.generation import first_position_cached
        >>> a, s1 = first_position_cached(model, prompts, {"base": None}, tmp_path, show_progress=False)
        >>> b, s2 = first_position_cached(model, prompts, {"again": None}, tmp_path, show_progress=False)
        >>> s1, s2, a.drop(columns="policy").equals(b.drop(columns="policy"))
        ({'base': 'computed'}, {'again': 'cached'}, True)
    """
    import re

    import pandas as pd

    from catlens.runs import atomic_path

    if not isinstance(policies, Mapping) or not policies:
        raise ValueError(f"policies must be a non-empty mapping name -> policy (None = unsteered); got "
                         f"{type(policies).__name__} {policies!r:.80}.")
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    spec = _first_position_spec(model, prompts, batch_size=batch_size, fmt=fmt, system=system)  # once, not per policy
    keys = {str(n): _key_of(spec, p)[:24] for n, p in policies.items()}
    path = {n: root / f"{re.sub(r'[^A-Za-z0-9_.|:+=,-]', '_', n)}-{k}.parquet" for n, k in keys.items()}

    def read(n: str) -> Any:
        for f in dict.fromkeys([path[n], *sorted(root.glob(f"*-{keys[n]}.parquet"))]):  # its own file first
            if f.exists():
                try:
                    return pd.read_parquet(f).assign(policy=n)
                except (OSError, ValueError) as err:
                    log.warning("ignoring a damaged first-position cache %s (%s); recomputing it", f, err)
        return None

    tables = {n: t for n in keys if (t := read(n)) is not None}
    status = {n: "cached" if n in tables else "computed" for n in keys}
    todo: dict[str, Any] = {}
    todo_keys: set[str] = set()
    for name, pol in policies.items():
        n = str(name)
        if n not in tables and keys[n] not in todo_keys:
            todo[n] = pol
            todo_keys.add(keys[n])
    if todo:
        t0 = time.perf_counter()
        table = first_position(model, prompts, todo, batch_size=batch_size, fmt=fmt, system=system,
                               allow_transfer=allow_transfer, show_progress=show_progress)
        log.info("first position: %d settings x %d prompts in %.1f s (%d of %d cached)", len(todo), len(prompts),
                 time.perf_counter() - t0, sum(v == "cached" for v in status.values()), len(keys))
        for n, g in table.groupby("policy", sort=False):
            tables[n] = g.reset_index(drop=True)
        for n in keys:
            if n not in tables:  # another name of a policy computed just now
                tables[n] = next(tables[m] for m in todo if keys[m] == keys[n]).assign(policy=n)
    for n in keys:
        if not path[n].exists():
            with atomic_path(path[n]) as tmp:
                tables[n].to_parquet(tmp, index=False)
    return pd.concat([tables[n] for n in keys], ignore_index=True), status


def policy_digest(policy: SteeringPolicy | None) -> str | None:
    """sha256 of a policy's plain form (spec and tensors): the key of cached results computed under it
    (:func:`catlens.decisions.digest`)."""
    return decisions.digest(policy)


def jsonable(x: Any) -> Any:
    return json.loads(json.dumps(x, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


RECORDED_SINCE = ("dtype", "device")
"""Settings a generation folder's config has not always held: a folder without them is resumed
as made with the caller's, so an interrupted run made before then is not lost (a folder that records another
dtype or device is refused)."""


def open_generation_run(out: str | os.PathLike[str], config: dict[str, Any], overwrite: bool) -> Any:
    from catlens.runs import RunDir

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {str(out)!r} is a file; give a folder path.")
    if out.exists() and any(out.iterdir()) and not overwrite:
        if not (out / "manifest.json").exists():
            raise FileExistsError(f"{str(out)!r} is not empty and is not a catlens generation folder; choose another "
                                  f"--out or pass --overwrite.")
        existing = RunDir.open(out)
        previous = existing.manifest.get("config")
        unrecorded = [k for k in RECORDED_SINCE if isinstance(previous, dict) and k not in previous and k in config]
        if unrecorded:  # a folder from before catlens recorded these: resumed as the same (the caller's) settings
            log.warning("generate: %s was made before catlens recorded the model's %s; resuming it as %s", out,
                        " and ".join(unrecorded), ", ".join(f"{k}={config[k]}" for k in unrecorded))
            previous = {**previous, **{k: config[k] for k in unrecorded}}
        if previous != config:
            diff = sorted(k for k in set(config) | set(previous or {}) if (previous or {}).get(k) != config.get(k))
            raise FileExistsError(f"{str(out)!r} holds generations made with other settings ({', '.join(diff)} "
                                  f"differ); choose another --out or pass --overwrite.")
        if existing.manifest.get("status") == "done" and (out / "generations.jsonl").exists():
            return existing  # finished: read back as it is (re-creating would mark it running and regenerate)
        return RunDir.create(out, config, resume=True)
    return RunDir.create(out, config, overwrite=overwrite)


def finish_generation_run(run: Any, records: Sequence[dict[str, Any]]) -> None:
    """Write a generation folder's ``generations.jsonl`` (every record, without timings) atomically, drop the
    partial file and mark the run done: the last step of :func:`generate` and of the vLLM engine."""
    from catlens.runs import write_text_atomic

    target = run.path / "generations.jsonl"
    write_text_atomic(target, "".join(json.dumps({k: v for k, v in r.items() if k != "seconds"}) + "\n"
                                      for r in records))
    run._register(target, rows=len(records))
    (run.path / "generations.partial.jsonl").unlink(missing_ok=True)
    run.finish(n=len(records))


def read_finished_generation(run: Any) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run.path / "generations.jsonl").read_text().splitlines() if line]
    timing = {i: t["seconds"] / len(t["ids"]) for t in run.read_jsonl("timing") for i in t["ids"]}
    for r in rows:
        r["seconds"] = timing.get(r["id"])
    return rows


# ------------------------------------------------------------------------------------------------- CLI
@torch.inference_mode()
def prefill_reads(model: Any, prompts: Any, reads: Sequence[tuple[Any, int, str]], *, batch_size: int = 32,
                  fmt: str = "chat", system: str | None = None, show_progress: bool = True) -> dict[str, Any]:
    """The unsteered prefill's inputs to a gate, by the same code a policy's decision runs in :func:`generate` and
    :func:`first_position`: for each ``(site, layer, pool)`` of ``reads`` a ``[n d_model]`` tensor (pool ``"last"``
    or ``"mean_all"``), and, on a model with refusal tokens, the refusal-token log-odds at the first response
    position (``logodds``), the unsteered first-position verdict (``refused``: the top token is a refusal token)
    and the most probable refusal token's category (``route``, as the ``refusal_tokens`` router picks it).

    Returns ``{"ids": [...], "reads": {(site, layer, pool): Tensor}, "logodds": Tensor | None, "refused": Tensor |
    None, "route": list | None}`` in the order of ``prompts``; batches run longest first (one forward pass each).
    """
    from tqdm.auto import tqdm

    from catlens.refusal import special_token_probs
    from catlens.steer import refusal_logodds

    items = prompt_items(prompts)
    if not items:
        raise ValueError("prefill_reads needs at least one prompt.")
    keys = [(getattr(s, "value", str(s)), int(layer), str(pool)) for s, layer, pool in reads]
    spec = {_read_key(*k): k for k in keys}
    from catlens.refusal import refusal_token_ids

    tokens, token_ids = refusal_token_ids(model)
    refuse_ids = token_ids[:-1] if token_ids else []
    cats = [c for c in tokens.categories] if tokens is not None else []
    rendered_len = [len(t) for t in model.format([it.text for it in items], fmt, system=system)]
    order = sorted(range(len(items)), key=lambda i: (-rendered_len[i], i))
    out: dict[str, list] = {_read_key(*k): [None] * len(items) for k in keys}
    lo: list = [None] * len(items)
    top: list = [None] * len(items)
    route: list = [None] * len(items)
    with tqdm(total=len(items), desc="prefill reads", unit="prompt", disable=not show_progress) as bar:
        for s in range(0, len(order), batch_size):
            batch = order[s:s + batch_size]
            dec = _prepare_batch(model, [items[i] for i in batch], fmt=fmt, system=system)
            got: dict[str, Tensor] = {}
            with reading(model, spec, got, mask=dec.mask) if spec else nullcontext():
                logits = dec.prompt()
            for j, i in enumerate(batch):
                for k in out:
                    out[k][i] = got[k][j].cpu()
            if refuse_ids:
                lod = refusal_logodds(logits, refuse_ids)
                first = logits.argmax(-1)
                cat_probs = special_token_probs(logits, [model.token_id(tokens.token_of(c)) for c in cats])
                pick = cat_probs.argmax(dim=1)
                for j, i in enumerate(batch):
                    lo[i] = float(lod[j])
                    top[i] = int(first[j]) in refuse_ids
                    route[i] = cats[int(pick[j])]
            bar.update(len(batch))
    return {"ids": [it.id for it in items],
            "reads": {k: torch.stack(out[_read_key(*k)]) for k in keys},
            "logodds": torch.tensor(lo, dtype=torch.float32) if refuse_ids else None,
            "refused": torch.tensor(top, dtype=torch.bool) if refuse_ids else None,
            "route": route if refuse_ids else None}
