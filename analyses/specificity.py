"""Category specificity of steering (issue 10; PAPERS.md §3b, Joad et al. arXiv 2602.02132): steer with category
i's direction, measure refusal on harmful prompts and over-refusal on benign lookalikes of category j.

Usage:
    python analyses/specificity.py --model ~/.cache/catlens/finetunes/refusal-default --policy runs/p1/policy \
        --out runs/specificity
    python analyses/specificity.py --model <spec> --layers 15,21 --scales 0.1,0.2 --method one_vs_benign --out runs/spec
    python analyses/specificity.py --model <folder> --prompts prompts.jsonl --layers 2 --quick --out runs/spec-smoke

Protocol (choose on one split, measure on another; the steps are :mod:`catlens.recipes.specificity`'s):

* **layer and scale are chosen on the selection split and measured on the measurement split.** The grid has two
  layers and two scales by default (``--layers``/``--scales``; ``auto``: the ``--policy`` folder's layer and another
  one, its scale and twice it; without a policy the layers at 50 % and 70 % of the depth and scales 0.1, 0.2). Every
  grid point is run with the raw directions on the selection split (the built-in ``val`` harmful prompts and
  lookalikes; with ``--prompts`` the file's ``val``); ``choose_setting`` keeps the one with the largest category
  specificity of the refusal score (``selection_rule``, :mod:`catlens.selection`; table ``selection``). Only
  that setting is measured, once, on the measurement split (everything else below). The manifest records the
  choice (``selection``). A ``--policy`` also gives the site, positions and method. Coefficients are fractions of
  the residual norm (``Intervention(scale="norm", ref_norm=...)``, unit directions, ``ref_norm`` = mean activation
  norm of the training prompts at the layer); the same magnitude steers toward (+) and away (-).
* **directions** (one per category, ``--method``) are fitted on training prompts only: the built-in ``train``
  split plus, when the benchmark data are there, the refusal fine-tune's own training prompts
  (``catlens.finetune.assemble_data``: ``.harmful`` with categories, ``.benign``). With ``--prompts FILE`` the
  file's ``train`` split is used instead.
* **measurement prompts** per category j: *harmful* = the fine-tune's held-out harmful prompts
  (``eval_sets["harmful_heldout"]``) plus the built-in harmful ``test`` prompts; *lookalike* = benign prompts that
  carry category j (built-in lookalikes ``test``, ``eval_sets["builtin_lookalike_test"]``, XSTest safe). With
  ``--prompts FILE``: the file's ``test`` prompts, harmful or benign-with-a-category. Evaluation prompts that
  duplicate a training prompt (and measurement prompts that duplicate a selection prompt) (``check_leakage``, near
  threshold 0.8) are dropped and counted in the manifest; the check then runs again and must pass.
* **measurement**: :func:`catlens.generation.first_position`, one call for every setting of every variant (one
  prefill per batch shared by all of them; each setting cached in the run folder by
  :func:`catlens.generation.first_position_cached` and reused on a rerun): with
  greedy decoding its ``refused`` column is exactly the ``refusal_token`` judge's verdict on ``generate``'s answer;
  ``refusal_score`` is the summed refusal-token probability at the first response position.
* **the matrix**: cell (i, j) = steered minus unsteered refusal rate on prompts of category j when steering with
  direction i, for each set (harmful, lookalike) and sign (``away`` = negative coefficient ``-away``, ``toward`` =
  positive ``+toward``). The headline cells are harmful/away (harmful refusal is near ceiling unsteered) and
  lookalike/toward. Intervals: **paired percentile bootstrap over prompts** (``--n-boot`` draws, a local
  ``numpy.random.default_rng(seed)``; each draw resamples the prompts of every (set, category) with replacement and
  the same draw serves every cell and summary, so cells and summaries are paired with the unsteered answers of the
  same prompts). ``delta_score`` is the mean refusal-score change, the less saturated companion. **Tests**: each
  cell's rate change has an exact McNemar p-value (paired refusals), adjusted across every cell of the table as one
  family (``--correction``: ``fdr_bh`` Benjamini-Hochberg, or ``holm``; ``statsmodels`` ``multipletests``):
  columns ``p_value``, ``p_adjusted``, ``significant`` (adjusted p <= 0.05), ``correction``, ``family_size``.
* **variants**: ``raw`` category directions; ``orthogonalised`` (each direction minus its component along the
  shared refusal direction ``mean(harmful) - mean(benign)`` of the training prompts, renormalised); ``control``
  (the shared refusal direction itself, and ``--n-random`` seeded random unit directions), all at the same scale;
  **label-permutation control** (``--n-perm`` permutations, seeded: the same constructor fitted on the same
  harmful training prompts with their category labels shuffled; tables ``permutation``, ``permutation_summary``).
* **summary**: per variant, set, sign and metric (rate, score): mean diagonal effect, mean off-diagonal effect,
  their ratio and difference, each with a bootstrap interval (for the control: the mean effect of the refusal
  direction and of the random directions over all categories); **cosines** between the directions (raw,
  orthogonalised, with the refusal direction) for context. Every category summary row carries the permuted
  directions' mean diagonal-minus-off-diagonal and a permutation p-value (``perm_mean_diag_minus_offdiag``,
  ``perm_p``, ``n_perm``; the smallest possible p is 1 / (n_perm + 1)).

Writes ``<out>/selection.parquet`` (the grid on the selection split), ``specificity.parquet``, ``summary.parquet``,
``permutation.parquet``, ``permutation_summary.parquet``, ``cosines.parquet`` (each + csv), ``first_position.parquet``
(the measured first-position table, column ``variant``), ``directions/`` (every direction set), ``cache/``
(first-position results per setting, keyed by model, prompts, setting and batch size, and per selection grid point,
reused when the same command runs again) and the manifest. Figures: ``python figures/fig_specificity.py <out>``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from catlens.recipes import specificity as recipe
from catlens.stages import SpecificityOptions, build_parser, from_namespace

if TYPE_CHECKING:
    import argparse

    from catlens.model import ModelPool

log = logging.getLogger("analyses.specificity")


def _parser() -> argparse.ArgumentParser:
    return build_parser(SpecificityOptions, __doc__)  # the options: catlens.stages.SpecificityOptions


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(from_namespace(SpecificityOptions, _parser().parse_args(argv)))


def run(options: SpecificityOptions, models: ModelPool | None = None) -> dict[str, Any]:
    """What the command line does, from typed options and a model pool (the main job's, so each model is loaded
    once per job; default: a new one). The steps: :mod:`catlens.recipes.specificity`."""
    from catlens.model import ModelPool
    from catlens.runs import RunDir, configure_process

    models = ModelPool() if models is None else models
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    process = configure_process(options.threads, options.seed)
    plan = recipe.check_options(options)  # every check that needs no model, before anything is loaded or written
    seed, progress = options.seed, not options.no_progress

    # the model and the prompt sets: train (directions), selection (layer and scale), measurement (once)
    model = models.get(options.model, device=options.device, dtype=options.dtype)
    m = recipe.check_model(model, plan, options.finetune_config)
    site, positions, ft_config = m["site"], m["positions"], m["finetune_config"]
    train, sel_evals, meas_evals, data_info = recipe.assemble_prompts(
        m["tokens"].categories, prompts=options.prompts, data_dir=options.data_dir, finetune_config=ft_config)
    train, sel_evals, sel_index, categories, sel_notes = recipe.prepare_sets(
        train, sel_evals, plan.categories, quick=options.quick, seed=seed)
    train, meas_evals, index, categories, notes = recipe.prepare_sets(
        train, meas_evals, categories, quick=options.quick, seed=seed, against=sel_evals)

    run = RunDir.create(plan.out, plan.config, overwrite=options.overwrite, resume=plan.resume, seed=seed)
    run.record_model(model)
    for role, ps in (("train", train), ("selection", sel_evals), ("measurement", meas_evals)):
        run.record_data(role, ps.provenance)
    layers, scales = recipe.resolve_grid(model.n_layers, plan.setting, plan.layers, plan.scales,
                                         recipe.policy_scale(model, train, plan.setting, site))
    layers = [model.layer(x) for x in layers]
    run.update_manifest(setting={"policy": plan.setting, "candidate_layers": layers, "candidate_scales": scales,
                                 "site": site, "positions": positions, "method": plan.method,
                                 "n_random": plan.n_random, "n_perm": plan.n_perm, "correction": options.correction,
                                 "n_boot": plan.n_boot, "quick": options.quick, "categories": categories,
                                 "finetune_config": ft_config, "process": process},
                        prompts={**data_info, "selection": sel_notes, "measurement": notes})

    # choose the layer and scale on the selection split
    t0 = time.perf_counter()
    selection, sel = recipe.choose_setting(model, train, sel_evals, sel_index, categories, layers=layers,
                                           scales=scales, method=plan.method, site=site, positions=positions,
                                           seed=seed, batch_size=options.batch_size, run=run, show_progress=progress)
    run.save_table("selection", selection)
    run.update_manifest(selection={"split": "selection", "selection_prompts": sel_evals.content_hash,
                                   "measurement_prompts": meas_evals.content_hash,
                                   "measurement_read": False, "choices": [sel.record()]})
    if not sel.chosen:
        run.finish(not_chosen=sel.reason)
        raise RuntimeError(f"no layer and scale is admissible on the selection split: {sel.reason}")
    layer, scale = int(sel.row["layer"]), float(sel.row["scale"])
    log.info("chosen on the selection split: layer %d, scale %g (%s)", layer, scale, sel.reason)

    # measure the chosen setting once on the measurement split: the matrix, its summary, the controls
    result = recipe.run_specificity(model, train, meas_evals, index, categories, layer=layer, toward=scale,
                                    away=scale, method=plan.method, site=site, positions=positions,
                                    n_random=plan.n_random, n_perm=plan.n_perm, n_boot=plan.n_boot, seed=seed,
                                    correction=options.correction, batch_size=options.batch_size, run=run,
                                    show_progress=progress)
    run.update_manifest(selection={"measurement_read": True})
    head = recipe.headline(result["summary"])
    run.finish(headline=head, chosen={"layer": layer, "scale": scale}, seconds=time.perf_counter() - t0,
               cache=result["cache"])
    for line in recipe.headline_lines(head):
        print(line)
    return {**result, "run_dir": plan.out, "layer": layer, "toward": scale, "away": scale, "method": plan.method,
            "categories": categories, "selection": selection, "chosen": sel}


if __name__ == "__main__":
    main()
    sys.exit(0)
