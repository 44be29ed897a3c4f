"""Steering sweep on validation prompts only: method x layer x coefficients, with a probe gate and a router.

Usage:
    python analyses/steer_sweep.py --model <refusal-tuned folder> --out runs/sweep
    python analyses/steer_sweep.py --model <spec> --layers 16,20,24 --toward 0.05,0.1,0.2 --away 0.05,0.1,0.2 \
        --methods one_vs_benign,one_vs_rest --out runs/sweep

Protocol (every hyperparameter is chosen on validation prompts; no test prompt is ever read here):

* directions, the reference norms, the gate's probe and the probe router are fitted on the built-in ``train`` split;
  the gate's threshold (Youden's J, or ``--target-fpr``) and every setting below are chosen on the ``val`` split;
  the leakage check runs between the two;
* for each method (direction constructor) and layer, every prompt's gate decision is fixed by the probe, so a row
  the gate flags only ever sees the ``toward`` coefficient and the others only ``away`` (identical to the unsteered
  answer when the coefficient is ``None``, an exact identity of the engine). The sweep therefore generates the
  ``toward`` grid and the ``away`` grid separately and combines them per row: ``|T| + |A|`` passes instead of
  ``|T| x |A|``;
* coefficients are fractions of the residual norm at the layer (``scale="norm"``, unit directions) unless
  ``--scale raw``;
* a coherence guard rejects settings whose benign answers' perplexity under the *unsteered* model (coherence proxy)
  rises by more than ``--ppl-guard`` (default 10 %) over the unsteered answers';
* the chosen setting (:mod:`catlens.selection`, :func:`catlens.recipes.steer_sweep.sweep_rule`) maximises refusal
  on harmful minus over-refusal on benign validation prompts among admissible settings (ties: smaller
  ``|toward| + |away|``, then table order) and is saved as a policy folder (``<out>/policy``) that
  ``catlens generate --policy`` applies; when no setting is admissible nothing is saved and the manifest says why
  (``selection``).

Writes ``<out>/sweep.parquet`` (+ CSV; one row per method, layer, toward, away, with n, rates, SE, Wilson
intervals, perplexity ratio, admissible, pareto, chosen), ``runs.parquet`` (one row per generation pass),
``gates.parquet`` (gate AUROC and threshold per layer on val), ``policy/`` and the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from catlens.cli import parse_floats
from catlens.recipes import steer_sweep as recipe
from catlens.stages import SteerSweepOptions, build_parser, from_namespace

if TYPE_CHECKING:
    from catlens.model import ModelPool


def main(argv: Sequence[str] | None = None) -> int:
    p = build_parser(SteerSweepOptions, __doc__)  # the options: catlens.stages.SteerSweepOptions
    return run(from_namespace(SteerSweepOptions, p.parse_args(argv)))


def run(options: SteerSweepOptions, models: ModelPool | None = None) -> int:
    """What the command line does, from typed options and a model pool (default: a new one). The steps:
    :mod:`catlens.recipes.steer_sweep`."""
    from catlens.model import ModelPool
    from catlens.runs import RunDir

    models = ModelPool() if models is None else models
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    layers = [int(x) for x in options.layers.split(",") if x.strip()]
    toward = parse_floats(options.toward, "toward", example="0.05,0.1", allow_none=True, allow_empty=True)
    away = parse_floats(options.away, "away", example="0.05,0.1", allow_none=True, allow_empty=True)
    methods = [m.strip() for m in options.methods.split(",") if m.strip()]
    prompts = recipe.sweep_prompts(options.prompts, options.n_per_split, options.seed)

    run = RunDir.create(options.out, dataclasses.asdict(options), overwrite=options.overwrite, seed=options.seed)
    model = models.get(options.model)
    run.record_model(model)
    run.record_data("prompts", prompts.provenance)
    result = recipe.run_sweep(model, prompts, layers=layers, toward=toward, away=away, methods=methods,
                              scale=options.scale, positions=options.positions,
                              max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
                              ppl_guard=options.ppl_guard, target_fpr=options.target_fpr, run=run)
    c = result["chosen"]
    if c is None:
        print(f"no setting is admissible on val: {result['selection'].reason}; no policy written.")
        return 1
    print(f"chosen on val: {c['method']} layer {c['layer']} toward {c['toward']} away {c['away']}: refusal "
          f"{c['refusal']:.3f}, over-refusal {c['over_refusal']:.3f}, benign ppl ratio {c['ppl_ratio']:.3f} "
          f"-> {Path(options.out) / 'policy'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
