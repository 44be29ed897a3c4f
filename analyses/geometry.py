"""Geometry of category directions at every layer: separability, cosine structure (raw, whitened, P1's orthonormal
basis), anisotropy and massive dimensions, PCA/t-SNE projections, probe-vs-direction cosines, and optionally the
cosines between two models' directions (P1's model diffing).

Usage:
    python analyses/geometry.py --out runs/geometry/smollm2                      # embedded model, builtin prompts
    python analyses/geometry.py --model runs/finetune/model --other-model smollm2-135m-instruct \\
        --out runs/geometry/tuned-vs-stock
    python analyses/geometry.py --acts runs/acts-builtin --out runs/geometry/from-store   # reuse a saved store

Reads:  the model(s) and the prompt set (activations collected in memory), or activation stores (--acts,
        --other-acts) written by ``catlens cache``.
Writes: <out>/manifest.json (first), log.txt, directions/<direction>.safetensors (+ .dims.json) and the tidy tables
        (Parquet, plus a CSV twin when small):
        separability   task, layer, metric, value, n_prompts, n_classes
        cosine         direction, layer, space, category_a, category_b, cosine
                       (space: raw | whitened | basis_whitened | basis_residual)
        basis_alignment direction, layer, category, cos_basis_whitened, cos_basis_residual, off_span_share, r_diag,
                       lapack_sign_flipped
        probe_cosine   direction, layer, category, cosine          (harmful-vs-benign probe weight vs directions)
        anisotropy     subset, layer, measure, value, n_prompts, d_model
        spectrum       subset, layer, index, eigenvalue, share     (top --spectrum-top eigenvalues)
        massive_dims   layer, dim, mean_share, max_share, mean_abs, median_ratio, massive
        whitening      layer, method, eps, shrinkage, restrict_to_span, n_samples, rank, rank_deficient
        projections    subset, method, layer, x, y, var_x, var_y | perplexity, id, label, category, group
        direction_norms direction, method, site, category, layer, norm
        model_diff     direction, category, layer, cosine, ...    (only with --other-model / --other-acts)

Direction sets (all layers; fitted on the prompts of --direction-splits, default the train split):
    one_vs_benign            mean(harmful c) - mean(benign)
    one_vs_rest              mean(harmful c) - mean(other harmful categories), prompt-weighted
    one_vs_benign_orth       one_vs_benign with the global harmful-vs-benign direction projected out
    p1                       P1 (tau=1e-3, top-K = catlens.directions.p1_top_k(d), P1's share of dims; the same
                             K as the P1 stage); read position = the store's, not a category token
    p2_generic               P2 unsupervised, safe = ordinary benign prompts (category None)
    p2_matched               P2 unsupervised, safe = benign look-alikes of the same category
    p2_pruned                P2 pruned (median norm, truncate pairing), safe = generic
Whitening (per layer) is fitted on the benign prompts of the fitting split, as P1 fits it on benign prompts.
"""

import logging
from collections.abc import Sequence
from typing import Any

from catlens.recipes import geometry_tables as recipe
from catlens.recipes.geometry_tables import Args
from catlens.runs import RunDir, configure_process
from catlens.stages import GeometryOptions, build_parser, from_namespace

log = logging.getLogger("analyses.geometry")


def parse_args(argv: Sequence[str] | None = None) -> Args:
    p = build_parser(GeometryOptions, __doc__)  # the options: catlens.stages.GeometryOptions
    return recipe.args_of(from_namespace(GeometryOptions, p.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> RunDir:
    """The command line: its options (:func:`parse_args`) run by :func:`run_args` on a new model pool."""
    return run_args(parse_args(argv))


def run(options: GeometryOptions, models: Any = None) -> RunDir:
    """What the command line does, from typed options and a model pool (the main job's, so each model is loaded
    once per job; default: a new one)."""
    return run_args(recipe.args_of(options), models)


def run_args(args: Args, models: Any = None) -> RunDir:
    """The analysis of checked :class:`catlens.recipes.geometry_tables.Args` into the run folder ``args.out``."""
    configure_process(threads=args.threads, seed=args.seed)  # the one place this script sets process-wide state
    run = RunDir.create(args.out, config=args, overwrite=args.overwrite, seed=args.seed)  # manifest first
    handlers = recipe.setup_logging(run)
    try:
        _run(args, run, models)
    finally:
        for handler in handlers:
            logging.getLogger().removeHandler(handler)
            handler.close()
    return run


def _run(args: Args, run: RunDir, models: Any = None) -> None:
    """The steps (:mod:`catlens.recipes.geometry_tables`): activations, directions, then one table after another."""
    from catlens.model import ModelPool

    models = ModelPool() if models is None else models
    a = recipe.load_activations(args, model_spec=args.model, acts_path=args.acts, models=models)
    run.record_model(a.model)
    run.record_data("activations", a.data)
    log.info("activations %s over layers %s", tuple(a.acts.shape), a.layers)
    dirs = recipe.compute_directions(args, a)
    recipe.save_directions(run, dirs)
    log.info("separability ...")
    run.save_table("separability", recipe.separability_tables(args, a))
    log.info("anisotropy ...")
    for name, table in zip(("anisotropy", "spectrum", "massive_dims"), recipe.anisotropy_tables(args, a)):
        run.save_table(name, table)
    log.info("cosines, whitening, orthonormal basis ...")
    for name, table in zip(("cosine", "basis_alignment", "whitening"), recipe.cosine_tables(args, a, dirs)):
        run.save_table(name, table)
    log.info("probe ...")
    run.save_table("probe_cosine", recipe.probe_table(args, a, dirs))
    log.info("projections ...")
    run.save_table("projections", recipe.projection_table(args, a))
    if args.other_model is not None or args.other_acts is not None:
        b = recipe.load_activations(args, model_spec=args.other_model or "", acts_path=args.other_acts,
                                    models=models)
        run.record_model(b.model, role="other_model")
        run.save_table("model_diff", recipe.model_diff_table(args, a, b, dirs))
    run.finish(**recipe.summarise(run))
    log.info("wrote %s", run.path)


if __name__ == "__main__":
    main()
