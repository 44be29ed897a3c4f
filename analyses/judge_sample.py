"""Generate the answers of the judges' hand-labelled sample (``catlens/data/judge_labels.jsonl``), unlabelled.

Usage (loads real models: run under the CPU lock):
    flock /tmp/catlens-cpu.lock python analyses/judge_sample.py --tuned <fine-tune folder> --out runs/judge_sample

Answers (greedy, ``--max-new-tokens`` 64) to catlens's own built-in prompts only (``load_prompts("builtin")``,
every split; no benchmark text), from four sources:

* ``<tuned>`` / ``none``: the refusal-token fine-tune, unsteered, on harmful prompts, lookalike benign prompts and
  ordinary benign prompts;
* ``<tuned>`` / ``away_generated``: the fine-tune steered *away* from refusal on generated tokens only (the first
  response token, refusal or ``[respond]``, is the unsteered model's), on harmful prompts: the source of
  "refusal token, then an answer" cases;
* ``<tuned>`` / ``toward_generated``: steered *toward* refusal on generated tokens only, on benign prompts: the
  source of "``[respond]``, then a refusal" and "answer, then a disclaimer" cases;
* ``stock`` / ``none``: SmolLM2-135M-Instruct (``load_model()``), which never refuses: more "answered" examples.

The steering direction is the difference of the mean residual stream at the last prompt token (``resid_post``,
``--layer``) between harmful and benign prompts of the built-in ``train`` split, a unit vector scaled by
``--coeff`` times the layer's mean activation norm. Prompts are drawn with a fixed seed, stratified by category.

Writes ``<out>/sample.jsonl`` (one row per answer with every field of ``judge_labels.jsonl`` except ``label`` and
``note``, which are left empty for the labeller) and a manifest. Nothing here labels anything.

``--from-gen DIR`` draws the sample from generations already on disk instead (no model is loaded; seconds):
    python analyses/judge_sample.py --from-gen runs/p1-demo/gen --out runs/judge_sample_gen

Every ``DIR/<folder>/generations.jsonl`` (a ``catlens generate`` folder with its ``manifest.json``) is read; a
row is kept when its prompt is one of catlens's own (a packaged set, or a packaged harmful prompt wrapped in one of
catlens's own jailbreak templates, ``catlens.jailbreaks``) with exactly the packaged text, its
``(prompt_id, response)`` pair is not already labelled (``--labels``, default the packaged sample) nor drawn from
an earlier folder, and its row id ``model|policy|prompt_id`` is not taken by another answer. Folders are read
unsteered first (``*unsteered``), then by name, so an answer several policies produced identically is stored once,
under the first. ``model`` is ``stock`` for the embedded model and the model's
name otherwise; ``policy`` is ``none`` for an unsteered folder and otherwise the folder name without its
``val_`` / ``test_`` / ``stock_`` / ``jailbreak_`` prefix. ``--max-per-source N`` keeps at most N rows per
``model|policy`` (a seeded random draw); by default every new pair is kept.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tuned", help="the refusal-token fine-tune (folder or model spec): generate the sample")
    src.add_argument("--from-gen", help="a folder of generation folders (e.g. runs/p1-demo/gen): draw the sample "
                                        "from answers already on disk, no model loaded")
    p.add_argument("--labels", default=None, help="with --from-gen: labelled JSONL whose (prompt_id, response) "
                                                  "pairs are skipped (default: the packaged sample)")
    p.add_argument("--max-per-source", type=int, default=None, help="with --from-gen: at most this many rows per "
                                                                    "model|policy (seeded draw; default all)")
    p.add_argument("--out", default="runs/judge_sample")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--layer", type=int, default=15, help="layer of the steering direction and intervention")
    p.add_argument("--coeff", type=float, default=0.6, help="steering strength, fraction of the layer's norm")
    p.add_argument("--per-category", type=int, default=5, help="harmful and lookalike prompts per category "
                                                                "for the unsteered fine-tune")
    p.add_argument("--ordinary", type=int, default=16, help="ordinary benign prompts for the unsteered fine-tune")
    p.add_argument("--steered-per-category", type=int, default=6, help="prompts per category for each policy")
    p.add_argument("--stock", type=int, default=24, help="prompts per side (harmful, benign) for the stock model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


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


def main_from_gen(args: argparse.Namespace) -> int:
    import json

    from catlens.judges import load_judge_labels
    from catlens.runs import RunDir

    run = RunDir.create(args.out, vars(args), overwrite=args.overwrite)
    rows, skipped = draw_from_generations(args.from_gen, load_judge_labels(args.labels), own_prompts(),
                                          args.max_per_source, args.seed)
    run.append_jsonl("sample", rows)
    run.finish(n_rows=len(rows), skipped=skipped,
               sources={f"{m}|{p}": sum(r["model"] == m and r["policy"] == p for r in rows)
                        for m, p in sorted({(r["model"], r["policy"]) for r in rows})})
    print(json.dumps(run.manifest.get("summary", {}), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    import json

    import numpy as np

    from catlens.datasets import load_prompts
    from catlens.generation import generate
    from catlens.model import load_model
    from catlens.runs import RunDir, configure_process

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.from_gen:
        return main_from_gen(args)
    configure_process(threads=args.threads, seed=args.seed)
    run = RunDir.create(args.out, vars(args), overwrite=args.overwrite)
    rng = np.random.default_rng(args.seed)
    prompts = load_prompts("builtin")
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

    rows: list[dict[str, Any]] = []
    model = load_model(args.tuned)
    run.record_model(model, role="tuned")
    name = model.name
    gen = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, show_progress=False)
    rows += rows_from(generate(model, [p.to_dict() for p in plain], **gen), plain, name, "none",
                      args.max_new_tokens)
    log.info("unsteered fine-tune: %d answers", len(rows))
    train = [p for p in prompts if p.split == "train"]
    policies = steering_policies(model, train, args.layer, args.coeff)
    for policy, chosen in (("away_generated", away), ("toward_generated", toward)):
        rows += rows_from(generate(model, [p.to_dict() for p in chosen], policies[policy], **gen), chosen, name,
                          policy, args.max_new_tokens)
        log.info("%s: %d answers", policy, len(chosen))
    del model
    stock_model = load_model()
    run.record_model(stock_model, role="stock")
    rows += rows_from(generate(stock_model, [p.to_dict() for p in stock], **gen), stock, "stock", "none",
                      args.max_new_tokens)
    run.append_jsonl("sample", rows)
    run.finish(n_rows=len(rows), sources={f"{m}|{p}": sum(r["model"] == m and r["policy"] == p for r in rows)
                                          for m, p in sorted({(r["model"], r["policy"]) for r in rows})})
    print(json.dumps(run.manifest.get("summary", {}), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
