"""Held-out evaluation of a refusal-token fine-tune (issue 3): does it refuse harmful prompts with the right category
token, how often does it over-refuse, and is its text still fluent?

    python analyses/finetune_eval.py --config default --out runs/finetune_eval
    python analyses/finetune_eval.py --config quick --out runs/finetune_eval_quick --per-category 10
    python analyses/finetune_eval.py --model ~/.cache/catlens/finetunes/refusal-default --config default --out ...

The recipe (the fine-tune and its held-out data, the two refusal decisions, first-token and generated, the
measures): :mod:`catlens.recipes.finetune_eval`. Outputs (tidy tables, CSV twins, in the run folder):

* ``scores`` one row per prompt and set (first-token scores, the greedy first token and its decision);
  ``generations`` (JSONL) the responses generated in full;
* ``per_category``: held-out harmful refusal and right-category rates per category (both decisions, all scored
  prompts);
* ``per_source``: the same per source benchmark and category (first token);
* ``confusion``: held-out harmful, true category x first token (greedy first token and refusal-token argmax);
* ``over_refusal`` per benign set and ``over_refusal_by_category`` per benign set and category;
* ``auroc``: logit refusal score, held-out harmful vs each benign set (and vs. each other harmful set's recall);
* ``fluency``: perplexity under the stock model of the answers after ``[respond]`` (and of the stock model's own
  answers to the same prompts, the reference), the rate of repeated special tokens with and without the gate,
  the rate of responses that open without a special token, and of answers whose first word was swallowed
  (the text after ``[respond]`` starts with whitespace or punctuation);
* ``form_mix``: question/instruction mix of both training sides;
* ``summary.json``: the headline numbers next to the issue's targets.
"""

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

from catlens.recipes import finetune_eval as recipe
from catlens.stages import FinetuneEvalOptions, build_parser, from_namespace

if TYPE_CHECKING:
    from catlens.model import ModelPool


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser(FinetuneEvalOptions, __doc__)  # the options: catlens.stages.FinetuneEvalOptions
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    return run(from_namespace(FinetuneEvalOptions, parse_args(argv)))


def run(options: FinetuneEvalOptions, models: "ModelPool | None" = None) -> int:
    """What the command line does, from typed options and a model pool (the main job's, so each model is loaded
    once per job; default: a new one). The steps: :mod:`catlens.recipes.finetune_eval`."""
    from catlens.model import ModelPool
    from catlens.runs import RunDir, configure_process

    args = recipe.prepare(options)
    models = ModelPool() if models is None else models
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    configure_process(threads=args.threads, seed=args.seed)  # process-wide threads and seeds: here, once
    config = recipe.resolve_config(args)  # the preset with the --set overrides, checked before any work
    run = RunDir.create(args.out, config=vars(args), overwrite=args.overwrite, seed=args.seed)
    ctx = recipe.start(args, config, run, models)  # the fine-tune (trained when missing), its data check, the models

    recipe.choose_sets(ctx)  # the scored sets and the sample generated in full
    scores = recipe.score_first_token(ctx)  # scores
    todo, gen, gens = recipe.generate_answers(ctx)  # generations.jsonl
    total = recipe.harmful_tables(ctx, scores)  # per_category, per_source, confusion
    refusal_by_set, au = recipe.over_refusal_tables(ctx, scores)  # over_refusal(_by_category), refusal_by_set, auroc
    fluency = recipe.fluency_table(ctx, scores, todo, gen, gens)  # fluency, form_mix

    summary = recipe.summarise(ctx, total, refusal_by_set, au, fluency)
    run.save_json("summary", summary)
    run.finish(**{k: v for k, v in summary.items() if isinstance(v, (int, float))})
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
