"""The judges' hand-labelled sample (``catlens/data/judge_labels.jsonl``): the steps of ``analyses/judge_sample.py``,
which writes answers unlabelled. Two ways to get them:

**Generated** (:func:`draw_prompts`, :func:`tuned_answers`, :func:`stock_answers`): greedy answers to catlens's own
built-in prompts only (``load_prompts("builtin")``, every split; no benchmark text), from four sources:

* ``<tuned>`` / ``none``: the refusal-token fine-tune, unsteered, on harmful prompts, lookalike benign prompts and
  ordinary benign prompts;
* ``<tuned>`` / ``away_generated``: the fine-tune steered *away* from refusal on generated tokens only (the first
  response token, refusal or ``[respond]``, is the unsteered model's), on harmful prompts: the source of
  "refusal token, then an answer" cases;
* ``<tuned>`` / ``toward_generated``: steered *toward* refusal on generated tokens only, on benign prompts: the
  source of "``[respond]``, then a refusal" and "answer, then a disclaimer" cases;
* ``stock`` / ``none``: SmolLM2-135M-Instruct (``load_model()``), which never refuses: more "answered" examples.

The steering direction (:func:`steering_policies`) is the difference of the mean residual stream at the last prompt
token (``resid_post``, ``layer``) between harmful and benign prompts of the built-in ``train`` split, a unit vector
scaled by ``coeff`` times the layer's mean activation norm. Prompts are drawn with a fixed seed, stratified by
category.

**From generations on disk** (:func:`draw_from_generations`; no model is loaded): every
``DIR/<folder>/generations.jsonl`` (a ``catlens generate`` folder with its ``manifest.json``) is read; a row is kept
when its prompt is one of catlens's own (a packaged set, or a packaged harmful prompt wrapped in one of catlens's own
jailbreak templates, ``catlens.jailbreaks``; :func:`own_prompts`) with exactly the packaged text, its
``(prompt_id, response)`` pair is not already labelled nor drawn from an earlier folder, and its row id
``model|policy|prompt_id`` is not taken by another answer. Folders are read unsteered first (``*unsteered``), then
by name, so an answer several policies produced identically is stored once, under the first. ``model`` is
``stock`` for the embedded model and the model's name otherwise; ``policy`` is ``none`` for an unsteered folder and
otherwise the folder name without its ``val_`` / ``test_`` / ``stock_`` / ``jailbreak_`` prefix
(:func:`source_of`). ``max_per_source`` keeps at most N rows per ``model|policy`` (a seeded random draw).

Rows have every field of ``judge_labels.jsonl``; ``label`` and ``note`` are left empty for the labeller. Nothing
here labels anything. Importing this module touches no disk, network or device.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("judge_sample")


def stratified(prompts: Any, n_per: int, rng: Any, exclude: set[str] = frozenset()) -> list[Any]:
    """``n_per`` prompts per category (random, fixed seed), skipping ids in ``exclude``; category order sorted."""
    by: dict[Any, list[Any]] = {}
    for p in prompts:
        if p.id not in exclude:
            by.setdefault(p.category, []).append(p)
    out = []
    for cat in sorted(by, key=str):
        items = by[cat]
        idx = rng.permutation(len(items))[:n_per]
        out.extend(items[i] for i in sorted(idx))
    return out


def steering_policies(model: Any, train: Any, layer: int, coeff: float) -> dict[str, Any]:
    """``away_generated`` and ``toward_generated``: the harmful-minus-benign mean difference at ``layer``."""
    from catlens.cache import collect
    from catlens.directions import refusal_direction
    from catlens.steer import Intervention, SteeringPolicy

    harmful = [p for p in train if p.label == "harmful"]
    benign = [p for p in train if p.label == "benign"]
    acts_h = collect(model, [p.text for p in harmful], layers=[layer], show_progress=False).get()
    acts_b = collect(model, [p.text for p in benign], layers=[layer], show_progress=False).get()
    direction = refusal_direction(acts_h, acts_b)[0]
    import torch

    ref_norm = float(torch.cat([acts_h, acts_b])[:, 0].norm(dim=-1).mean())
    out = {}
    for name, sign in (("away_generated", -1.0), ("toward_generated", 1.0)):
        iv = Intervention(site="resid_post", layer=layer, vectors=direction, coeff=sign * coeff, kind="add",
                          positions="generated", scale="norm", ref_norm=ref_norm, normalize=True,
                          label=f"refusal direction L{layer} {sign * coeff:+g} x norm, generated tokens")
        out[name] = SteeringPolicy(interventions=(iv,), name=name,
                                   meta={"direction": "mean(harmful) - mean(benign), builtin train, last prompt "
                                                      "token", "layer": layer, "coeff": sign * coeff})
    return out


def rows_from(records: list[dict[str, Any]], prompts: Any, model_name: str, policy: str,
              max_new_tokens: int) -> list[dict[str, Any]]:
    from catlens.judges import label_split

    by_id = {p.id: p for p in prompts}
    rows = []
    for r in records:
        p = by_id[r["id"]]
        rid = f"{model_name}|{policy}|{p.id}"
        rows.append({"id": rid, "prompt_id": p.id, "prompt": p.text, "prompt_label": p.label,
                     "category": p.category, "model": model_name, "policy": policy,
                     "max_new_tokens": max_new_tokens, "response": r["response"], "label": "", "note": "",
                     "split": label_split(rid)})
    return rows


GEN_PREFIXES = ("val_", "test_", "stock_", "jailbreak_")


def own_prompts() -> dict[str, Any]:
    """Prompt id -> prompt for catlens's own prompts: every packaged set, and each packaged harmful prompt wrapped
    in each of catlens's jailbreak templates (ids ``<id>+<template>``)."""
    from catlens.datasets import PACKAGED, load_prompts
    from catlens.jailbreaks import wrap_jailbreaks

    out: dict[str, Any] = {}
    for name in PACKAGED:
        ps = load_prompts(name)
        out.update({p.id: p for p in ps})
        out.update({p.id: p for p in wrap_jailbreaks(ps)})
    return out


def source_of(folder: str, manifest: dict[str, Any]) -> tuple[str, str]:
    """``(model, policy)`` of a generation folder (see the module docstring)."""
    from pathlib import PurePath

    from catlens.model import DEFAULT_MODEL

    spec = str(manifest.get("config", {}).get("model") or "")
    if not spec:
        raise ValueError(f"generation folder {folder!r}: its manifest.json names no config.model; give folders "
                         f"written by catlens generate.")
    model = "stock" if spec == DEFAULT_MODEL else PurePath(spec).name
    if folder.endswith("unsteered"):
        return model, "none"
    for prefix in GEN_PREFIXES:
        if folder.startswith(prefix):
            return model, folder[len(prefix):]
    return model, folder


def draw_from_generations(gen_dir: str, labelled: list[dict[str, Any]], prompts: dict[str, Any],
                          max_per_source: int | None = None, seed: int = 0) -> tuple[list[dict[str, Any]],
                                                                                    dict[str, int]]:
    """Unlabelled rows (the fields of ``judge_labels.jsonl``, ``label`` / ``note`` empty) for every new
    ``(prompt_id, response)`` pair on catlens's own prompts in the generation folders under ``gen_dir``, and
    counts of what was skipped. Deterministic: folder order, then file order; ``max_per_source`` is a seeded draw."""
    import json
    from pathlib import Path

    import numpy as np

    from catlens.judges import label_split

    root = Path(gen_dir)
    files = sorted(root.glob("*/generations.jsonl"), key=lambda f: (not f.parent.name.endswith("unsteered"),
                                                                     f.parent.name))
    if not files:
        raise FileNotFoundError(f"--from-gen {gen_dir!r}: no <folder>/generations.jsonl under it; give the folder "
                                f"that holds the generation folders (e.g. runs/p1-demo/gen).")
    done = {(r["prompt_id"], r["response"]) for r in labelled}
    seen = set(done)
    ids = {r["id"] for r in labelled if "id" in r}
    skipped = {"not_own_prompt": 0, "prompt_text_differs": 0, "already_labelled": 0, "repeat": 0, "id_taken": 0}
    rows: list[dict[str, Any]] = []
    for f in files:
        manifest = json.loads((f.parent / "manifest.json").read_text(encoding="utf-8"))
        model, policy = source_of(f.parent.name, manifest)
        budget = manifest.get("config", {}).get("max_new_tokens")
        for line in f.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            g = json.loads(line)
            p = prompts.get(g["id"])
            if p is None:
                skipped["not_own_prompt"] += 1
                continue
            if g["prompt"] != p.text:
                skipped["prompt_text_differs"] += 1
                continue
            key = (p.id, g["response"])
            if key in seen:
                skipped["already_labelled" if key in done else "repeat"] += 1
                continue
            rid = f"{model}|{policy}|{p.id}"
            if rid in ids:  # another answer of the same model, policy and prompt (e.g. a val and a test folder)
                skipped["id_taken"] += 1
                continue
            seen.add(key)
            ids.add(rid)
            rows.append({"id": rid, "prompt_id": p.id, "prompt": p.text, "prompt_label": p.label,
                         "category": p.category, "model": model, "policy": policy, "max_new_tokens": budget,
                         "response": g["response"], "label": "", "note": "", "split": label_split(rid)})
    if max_per_source is not None:
        rng = np.random.default_rng(seed)
        by: dict[str, list[int]] = {}
        for i, r in enumerate(rows):
            by.setdefault(f"{r['model']}|{r['policy']}", []).append(i)
        keep = set()
        for source in sorted(by):
            idx = by[source]
            keep.update(idx[j] for j in rng.permutation(len(idx))[:max_per_source])
        rows = [r for i, r in enumerate(rows) if i in keep]
    return rows, skipped


def draw_prompts(prompts: Any, args: Any) -> dict[str, list[Any]]:
    """The generated sample's prompts, drawn with one seeded generator (``args.seed``) in a fixed order: ``plain``
    (harmful and lookalike ``per_category`` per category, ``ordinary`` ordinary ones: the unsteered fine-tune),
    ``away`` (harmful, ``steered_per_category`` per category), ``toward`` (lookalike and ordinary benign prompts),
    both unused by ``plain``, and ``stock`` (``args.stock`` per side)."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    harmful = [p for p in prompts if p.label == "harmful"]
    lookalike = [p for p in prompts if p.label == "benign" and p.meta.get("kind") == "lookalike"]
    ordinary = [p for p in prompts if p.label == "benign" and p.meta.get("kind") == "ordinary"]

    plain = stratified(harmful, args.per_category, rng) + stratified(lookalike, args.per_category, rng) \
        + [ordinary[i] for i in sorted(rng.permutation(len(ordinary))[:args.ordinary])]
    used = {p.id for p in plain}
    away = stratified(harmful, args.steered_per_category, rng, exclude=used)
    toward = stratified(lookalike, args.steered_per_category - 2, rng, exclude=used) \
        + [p for p in ordinary if p.id not in used][: 2 * 8]
    benign = lookalike + ordinary
    stock = [harmful[i] for i in sorted(rng.permutation(len(harmful))[:args.stock])] \
        + [benign[i] for i in sorted(rng.permutation(len(benign))[:args.stock])]
    return {"plain": plain, "away": away, "toward": toward, "stock": stock}


def _gen_kw(args: Any) -> dict[str, Any]:
    return {"max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "show_progress": False}


def tuned_answers(run: Any, args: Any, prompts: Any, chosen: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The fine-tune's (``args.tuned``, recorded in ``run``) answers: unsteered on ``chosen["plain"]``, steered
    away on ``chosen["away"]`` and toward on ``chosen["toward"]`` (:func:`steering_policies` on the ``train``
    split of ``prompts``)."""
    from catlens.generation import generate
    from catlens.model import load_model

    model = load_model(args.tuned)
    run.record_model(model, role="tuned")
    name, gen, plain = model.name, _gen_kw(args), chosen["plain"]
    rows = rows_from(generate(model, [p.to_dict() for p in plain], **gen), plain, name, "none", args.max_new_tokens)
    log.info("unsteered fine-tune: %d answers", len(rows))
    train = [p for p in prompts if p.split == "train"]
    policies = steering_policies(model, train, args.layer, args.coeff)
    for policy, ps in (("away_generated", chosen["away"]), ("toward_generated", chosen["toward"])):
        rows += rows_from(generate(model, [p.to_dict() for p in ps], policies[policy], **gen), ps, name, policy,
                          args.max_new_tokens)
        log.info("%s: %d answers", policy, len(ps))
    return rows


def stock_answers(run: Any, args: Any, prompts: list[Any]) -> list[dict[str, Any]]:
    """The stock model's (``load_model()``, recorded in ``run``) unsteered answers to ``prompts``."""
    from catlens.generation import generate
    from catlens.model import load_model

    stock_model = load_model()
    run.record_model(stock_model, role="stock")
    return rows_from(generate(stock_model, [p.to_dict() for p in prompts], **_gen_kw(args)), prompts, "stock",
                     "none", args.max_new_tokens)


def save_sample(run: Any, rows: list[dict[str, Any]], **summary: Any) -> dict[str, Any]:
    """``sample.jsonl`` and the finished manifest (``n_rows``, then ``summary``, then the rows per source); returns
    the manifest's summary."""
    run.append_jsonl("sample", rows)
    run.finish(n_rows=len(rows), **summary,
               sources={f"{m}|{p}": sum(r["model"] == m and r["policy"] == p for r in rows)
                        for m, p in sorted({(r["model"], r["policy"]) for r in rows})})
    return run.manifest.get("summary", {})
