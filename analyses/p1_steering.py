"""P1's steering result, with a protocol a referee accepts: categorical steering with a three-zone feature gate and
a refusal-token router, chosen on validation prompts by the headline's own objective and evaluated once on
held-out benchmark halves, XSTest and catlens's hard-benign test split, judged on whole answers, with intervals;
the learned low-rank combination; transfer in both directions; refusal under jailbreak templates.

Usage:
    python analyses/p1_steering.py --model ~/.cache/catlens/finetunes/refusal-default --out runs/p1
    python analyses/p1_steering.py --model <folder> --out runs/p1-quick --quick

This page runs the recipe's steps in order; the protocol (the splits, how every choice is made on val, the tables
written) and the steps themselves are the library's, in ``catlens/recipes/p1.py`` (printed below by ``--help``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

from catlens.recipes import p1
from catlens.recipes.p1 import prepare

def _parse(argv: Sequence[str] | None) -> tuple[Any, argparse.Namespace]:
    """The typed options of a command line and the arguments :func:`prepare` makes of them (checked once; a bad value
    is an argparse usage error, exit 2)."""
    from catlens.stages import P1Options, build_parser, from_namespace

    p = build_parser(P1Options, f"{__doc__}\n{p1.__doc__}")  # the options: catlens.stages.P1Options
    options = from_namespace(P1Options, p.parse_args(argv))
    return options, prepare(options, error=p.error)


def parse_options(argv: Sequence[str] | None = None) -> Any:
    """The typed options (``catlens.stages.P1Options``) of a command line, checked (:func:`prepare`) before any work;
    a bad value is an argparse usage error (exit 2)."""
    return _parse(argv)[0]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The checked arguments of a command line (:func:`prepare` of :func:`parse_options`)."""
    return _parse(argv)[1]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run(parse_options(argv))


def run(options: Any, models: Any = None) -> dict[str, Any]:
    """What the command line does, from typed options (``catlens.stages.P1Options``, checked by :func:`prepare`) and
    a ``catlens.model.ModelPool`` (the main job's, so each model, the stock partner too, is loaded once per job;
    default: a new one)."""
    from catlens.engines import EnginePool
    from catlens.model import ModelPool
    from catlens.runs import configure_process

    args = prepare(options)
    models = ModelPool() if models is None else models
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    configure_process(threads=args.threads, seed=args.seed)
    methods, toward, away = p1.sweep_grid(args)  # checked before the run folder exists
    run = p1.open_run(args)  # resumes the same configuration; refuses another
    t_start = time.perf_counter()
    # what generates the full answers: catlens's own loop by default; vLLM engines are closed at the end
    with EnginePool(args.engine) as engines:
        # the model and the prompt sets (train / val / test, leakage-checked)
        model = models.get(args.model, device=args.device, dtype=args.dtype)
        run.record_model(model)
        layers, gate_layers, sweep_layers = p1.resolve_layers(model, args)
        sets = p1.build_sets(args.model, args.data_dir, seed=args.seed, train_cap=args.train_cap,
                             val_cap=args.val_cap, test_cap=args.test_cap)
        p1.record_splits(run, sets, args.seed)

        # fit on train (directions, gate, router), sweep and choose on val
        with run.timed("fit"):
            fit = p1.fit_everything(model, sets, layers, gate_layers, methods, run, args)
        run.save_table("gates", fit["gate_table"])
        with run.timed("sweep"):
            swept = p1.run_sweep(model, sets, fit, sweep_layers, methods, toward, away, run, args)
        run.save_table("sweep", swept["sweep"])
        run.save_table("frontier", swept["frontier"])
        with run.timed("choose"):
            chosen = p1.choose(model, sets, fit, swept["sweep"], run, args, engines)
        run.update_manifest(selection=p1.selection_record(swept["sweep"], chosen["rows"], args,
                                                          chosen["selections"]))
        policies = dict(chosen["policies"])
        with run.timed("lowrank"):
            policies.update(p1.train_lowrank(model, sets, fit, chosen, layers, run, args, engines) or {})
        for name, pol in policies.items():
            if pol is not None:
                pol.save(run.path / "policies" / name, overwrite=True)

        # the test split, read once with the chosen policies; then transfer to and from the stock model
        run.update_manifest(selection={**run.manifest.get("selection", {}), "test_read": True})
        with run.timed("test"):
            test = p1.evaluate_test(model, sets, fit, policies, run, args, chosen["rows"], engines)
        transfer = reverse = None
        if args.stock_model.lower() != "none":
            with run.timed("transfer"):
                transfer = p1.evaluate_transfer(sets, fit, policies, layers, run, args, models=models,
                                                engines=engines)
            if args.reverse_n > 0:
                with run.timed("reverse_transfer"):
                    reverse = p1.evaluate_reverse(model, sets, fit, policies, run, args, models=models)

    summary = p1.summary(chosen, fit, test, transfer, reverse, seconds=round(time.perf_counter() - t_start, 1))
    run.save_json("summary", summary)
    run.finish(seconds=summary["seconds"])
    p1.print_headline(test["headline"])
    return summary


if __name__ == "__main__":
    main()
