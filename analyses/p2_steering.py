"""P2 in miniature (PAPERS.md §3.7): category-wise safety steering with unsupervised, pruned and guided vectors.

Usage:
    python analyses/p2_steering.py --model smollm2-135m-instruct --out runs/p2/stock \\
        --exclude-ids ~/.cache/catlens/finetunes/refusal-default/training_prompt_ids.json
    python analyses/p2_steering.py --model ~/.cache/catlens/finetunes/refusal-default --out runs/p2/tuned
    python analyses/p2_steering.py --model <spec> --sites attn_out,resid_post --reductions mean,last \\
        --safe generic,matched --out runs/p2/compare          # the comparison axes (a larger grid)
    python analyses/p2_steering.py --model <spec> --quick --out runs/p2/smoke                 # smoke run
    python analyses/p2_steering.py --model <tiny folder> --prompts prompts.jsonl --quick --out /tmp/p2

The recipe (data, vectors, steering, selection on val, metrics, tables): :mod:`catlens.recipes.p2`. In short: the
prompts are split once into train (vectors, router), val (every choice) and test (evaluated once, for the chosen
settings and the unsteered model); split seeds whose test split was already looked at are refused unless
``--reuse-seen-split``. Writes (Parquet + CSV twins) into ``--out``: prompts.jsonl, p2_splits, p2_val,
p2_val_summary, p2_test, p2_test_summary, p2_agreement, p2_router, p2_guided, p2_runs, directions/, policies/<group>/
(``catlens generate --policy``), gen/ and acts/ (resumable caches). Rerunning the same command resumes; a finished
run returns its tables at once; a run folder made with other arguments is refused (``--overwrite``).

Cost: every setting generates ``max_new_tokens`` tokens for each val prompt; the log gives the estimate
``prompts x settings x max_new_tokens / 65`` seconds (the real model decodes about 65 tokens/s in batches of 32).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from catlens.recipes import p2
from catlens.stages import P2Options, build_parser, from_namespace

if TYPE_CHECKING:
    from catlens.model import ModelPool

log = logging.getLogger("analyses.p2_steering")


def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, p2.Plan]:
    """The command line's checked arguments and plan (no work): :func:`catlens.recipes.p2.prepare`."""
    return p2.prepare(from_namespace(P2Options, build_parser(P2Options, __doc__).parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(from_namespace(P2Options, build_parser(P2Options, __doc__).parse_args(argv)))


def run(options: P2Options, models: ModelPool | None = None) -> dict[str, Any]:
    """What the command line does, from typed options and a model pool (the main job's, so each model is loaded
    once per job; default: a new one)."""
    from catlens.model import ModelPool
    from catlens.runs import configure_process

    args, plan = p2.prepare(options)
    configure_process(threads=args.threads, seed=plan.seed)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ps, info = p2.build_prompts(plan)  # data errors before the run folder or the model
    run, finished = p2.open_run(plan, args)
    if finished:
        log.info("%s is finished; returning its tables", run.path)
        return p2.finished_tables(run)
    p2.save_prompts(run, ps)
    run.record_data("prompts", {**ps.provenance, "content_hash": ps.content_hash})
    model = (ModelPool() if models is None else models).get(plan.model, device=args.device, dtype=args.dtype)
    run.record_model(model)

    ctx = p2.start(model, ps, info, plan, run)  # the grid, the judges, the runtime estimate; p2_splits
    p2.fit(ctx)  # on train: activations, router (p2_router), guided labels (p2_guided), vectors (directions/)
    rows, summary = p2.validate(ctx)  # every setting and the unsteered model on val
    choice = p2.choose_on_val(ctx, rows, summary)  # one setting per group (p2_val, p2_val_summary, the manifest)
    test, test_summary = p2.final_test(ctx, choice)  # the unsteered model and the chosen settings on test, once
    policies = p2.save_policies(ctx, choice)  # policies/<group>/, with the probe router
    result = p2.finish(ctx, choice, test, test_summary, policies)  # p2_agreement, p2_runs; the run is done
    p2.print_test(test_summary)
    return result


if __name__ == "__main__":
    main()
    sys.exit(0)
