"""Generate the answers of the judges' hand-labelled sample (``catlens/data/judge_labels.jsonl``), unlabelled.

Usage (loads real models: run under the CPU lock):
    flock /tmp/catlens-cpu.lock python analyses/judge_sample.py --tuned <fine-tune folder> --out runs/judge_sample

Greedy answers (``--max-new-tokens`` 64) to catlens's own built-in prompts from four sources: the fine-tune
unsteered, steered away from refusal (harmful prompts) and toward it (benign prompts) on generated tokens only
(the refusal direction at ``--layer``, ``--coeff`` times the layer's norm), and the stock model.

``--from-gen DIR`` draws the sample from generations already on disk instead (no model is loaded; seconds):
    python analyses/judge_sample.py --from-gen runs/p1-demo/gen --out runs/judge_sample_gen

keeping new ``(prompt_id, response)`` pairs on catlens's own prompts (not in ``--labels``, default the packaged
sample; at most ``--max-per-source`` per ``model|policy``, a seeded draw; by default all). The recipe (the sources,
the steering direction, which rows are kept): :mod:`catlens.recipes.judge_sample`. Writes ``<out>/sample.jsonl``
(one row per answer, every field of ``judge_labels.jsonl``; ``label`` and ``note`` left empty) and a manifest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from catlens.recipes import judge_sample as recipe


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


def main(argv: list[str] | None = None) -> int:
    from catlens.datasets import load_prompts
    from catlens.judges import load_judge_labels
    from catlens.runs import RunDir, configure_process

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.from_gen:  # answers already on disk: no model
        run = RunDir.create(args.out, vars(args), overwrite=args.overwrite)
        rows, skipped = recipe.draw_from_generations(args.from_gen, load_judge_labels(args.labels),
                                                     recipe.own_prompts(), args.max_per_source, args.seed)
        print(json.dumps(recipe.save_sample(run, rows, skipped=skipped), indent=1))
        return 0
    configure_process(threads=args.threads, seed=args.seed)
    run = RunDir.create(args.out, vars(args), overwrite=args.overwrite)
    prompts = load_prompts("builtin")
    chosen = recipe.draw_prompts(prompts, args)  # plain, away, toward, stock: one seeded draw
    rows = recipe.tuned_answers(run, args, prompts, chosen)  # unsteered, then steered away / toward
    rows += recipe.stock_answers(run, args, chosen["stock"])
    print(json.dumps(recipe.save_sample(run, rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
