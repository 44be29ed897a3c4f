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
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tuned", required=True, help="the refusal-token fine-tune (folder or model spec)")
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


def main(argv: list[str] | None = None) -> int:
    import json

    import numpy as np

    from catlens.datasets import load_prompts
    from catlens.generation import generate
    from catlens.model import load_model
    from catlens.runs import RunDir, configure_process

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
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
