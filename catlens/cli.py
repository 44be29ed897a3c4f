"""The ``catlens`` command.

    catlens models                       list the embedded model and the cached checkpoints / fine-tunes
    catlens data list|validate           list or validate the benchmark datasets in the data directory
    catlens cache --out runs/acts        collect activations for a prompt set into a resumable store
    catlens finetune --config quick      train the refusal-token model (see `catlens finetune -h`)
    catlens generate --prompts builtin   generate (optionally steered by --policy) and judge the answers
    catlens report runs/main             rebuild runs/main/report.html from the saved tables
    catlens explore --model <folder>     a local web page: type a prompt, steer it, compare the answers

Threads: --threads N (default: $OMP_NUM_THREADS, else torch's default); two jobs on a 2-core machine each want
--threads 1.

Bad input exits with code 2 and the reason (what was given, what is allowed, how to fix it); no traceback
unless -v is given.
"""

import argparse
import logging
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

from catlens.errors import check_folder_target, unknown_name_message
from catlens.options import READ_POSITIONS, parse_layers, parse_read_positions

log = logging.getLogger("catlens")

_USER_ERRORS = (ValueError, KeyError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, PermissionError, ConnectionError)
# options whose value may start with '-' (negative layers / offsets): "--positions -3,-1" is read as
# "--positions=-3,-1" (argparse would take "-3,-1" for an option)
_NEGATIVE_VALUE_OPTIONS = ("--positions", "--layers")
_NEGATIVE_VALUE = re.compile(r"^-\d")


def parse_floats(text: str | None, name: str, *, example: str = "0.1,0.2", positive: bool = False,
                 allow_none: bool = False, allow_empty: bool = False, unique: bool = False,
                 note: str = "") -> list[float | None]:
    """Comma-separated finite numbers given to the option ``--<name>`` (blank items are skipped): ``positive``, each
    must be > 0; ``allow_none``, ``none`` reads as None; ``allow_empty``, no numbers (or ``None``) gives ``[]``
    instead of an error; ``unique``, repeats are dropped (the first kept). A bad item is a ``ValueError`` naming
    the option, the given text and an example (``example``, then ``note`` in parentheses where a number is bad).

    >>> parse_floats(" 0.5, 1,0.5", "coeffs", unique=True)
    [0.5, 1.0]
    >>> parse_floats("0.1,x", "toward")
    Traceback (most recent call last):
    ...
    ValueError: --toward '0.1,x': cannot read 'x' as a number; give comma-separated numbers like '0.1,0.2'.
    """
    like = f"'{example}'" + (" (or 'none')" if allow_none else "")
    out: list[float | None] = []
    for part in (p.strip() for p in ("" if text is None else str(text)).split(",")):
        if not part:
            continue
        if allow_none and part.lower() == "none":
            out.append(None)
            continue
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"--{name} {text!r}: cannot read {part!r} as a number; give comma-separated numbers "
                             f"like {like}.") from None
        if not math.isfinite(v) or (positive and v <= 0):
            raise ValueError(f"--{name} {text!r}: {part!r} must be a finite number{' > 0' if positive else ''}"
                             f"{f' ({note})' if note else ''}; give e.g. {like}.")
        out.append(v)
    if not out and not allow_empty:
        raise ValueError(f"--{name} is empty (given {text!r}); give at least one number, e.g. {like}.")
    return list(dict.fromkeys(out)) if unique else out


def _positions(text: str) -> str | list[int]:
    """``--positions``: a named position, or comma-separated negative offsets like ``-3,-1``."""

    t = text.strip()
    if t in READ_POSITIONS:
        return t
    if t and t[0] in "-+0123456789":
        try:
            return [int(p) for p in t.split(",")]
        except ValueError:
            raise ValueError(f"--positions {text!r}: cannot read it as offsets; give comma-separated negative "
                             f"offsets like '-3,-1', or one of {', '.join(READ_POSITIONS)}.") from None
    raise ValueError("--positions: " + unknown_name_message(
        "positions", text, READ_POSITIONS, "Or give comma-separated negative offsets like '-3,-1'."))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}; give a positive whole number.") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; give a positive whole number (1 or more).")
    return value


def _join_negative_values(argv: Sequence[str]) -> list[str]:
    """``["--positions", "-3,-1"]`` -> ``["--positions=-3,-1"]`` (the form argparse accepts)."""
    out: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in _NEGATIVE_VALUE_OPTIONS:
            nxt = next(it, None)
            if nxt is not None and _NEGATIVE_VALUE.match(nxt):
                out.append(f"{arg}={nxt}")
                continue
            out.append(arg)
            if nxt is not None:
                out.append(nxt)
            continue
        out.append(arg)
    return out


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    from catlens.model import DEFAULT_MODEL, add_model_options

    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="embedded name, checkpoint folder or hub id (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="model cache (default: $CATLENS_CACHE or ~/.cache/catlens)")
    add_model_options(p, device_note="; with --engine vllm, vLLM computes on its own build's platform")


def build_parser() -> argparse.ArgumentParser:
    from catlens.model import DEFAULT_MODEL, add_model_options

    parser = argparse.ArgumentParser(prog="catlens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads of this process (default: $OMP_NUM_THREADS, else torch's default)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list models; --load to load one and print its provenance",
                       description="List the embedded model and cached checkpoints.\n\nExamples:\n"
                                   f"  catlens models\n  catlens models --load {DEFAULT_MODEL}",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", metavar="SPEC", default=None, help="load this model and print its provenance")
    p.add_argument("--cache-dir", default=None, help="model cache (default: $CATLENS_CACHE or ~/.cache/catlens)")
    add_model_options(p)
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("data", help="list or validate the benchmark datasets",
                       description="Datasets are read from --data-dir, $CATLENS_DATA_DIR or ../shared/data.\n\n"
                                   "Examples:\n  catlens data list\n  catlens data validate --data-dir /data/bench\n"
                                   "  catlens data show builtin",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["list", "validate", "show"])
    p.add_argument("name", nargs="?", default=None, help="dataset for 'show' (or 'builtin')")
    p.add_argument("--data-dir", default=None)
    p.set_defaults(func=_cmd_data)

    p = sub.add_parser("cache", help="collect activations into a resumable on-disk store",
                       description="Run a prompt set through a model and store activations in shards.\n"
                                   "Rerunning the same command resumes an interrupted store.\n\nExamples:\n"
                                   "  catlens cache --out runs/acts-builtin\n"
                                   "  catlens cache --prompts catqa --sites resid_post,attn_out --layers 10-20 "
                                   "--positions mean --out runs/acts-catqa",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common_model_args(p)
    p.add_argument("--prompts", default="builtin", help="'builtin', a dataset name or a .jsonl/.csv file")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default=None, help="only this split (train/val/test)")
    p.add_argument("--sites", default="resid_post", help="comma-separated: resid_pre,resid_mid,resid_post,attn_out,"
                                                         "mlp_out,z (default: %(default)s)")
    p.add_argument("--layers", default="all", help="'all' or e.g. '0-5,10,-1'")
    p.add_argument("--positions", default="last", help="last | mean | mean_all | post_instruction | offsets like -3,-1")
    p.add_argument("--fmt", default="chat", help="chat | raw | p1_header | p1_append")
    p.add_argument("--batch-size", type=_positive_int, default=16)
    p.add_argument("--shard-size", type=_positive_int, default=256)
    p.add_argument("--out", required=True, help="store folder (rerun to resume)")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with other arguments")
    p.add_argument("--engine", default="catlens", help="catlens (default) | vllm (pip install 'catlens[vllm]')")
    p.add_argument("--tensor-parallel-size", type=_positive_int, default=1, help="GPUs per model (--engine vllm)")
    p.set_defaults(func=_cmd_cache)

    p = sub.add_parser("report", help="rebuild report.html of a run folder from its saved tables",
                       description="One self-contained report.html from a run folder's tables (no model is "
                                   "loaded).\n\nExamples:\n  catlens report runs/main\n"
                                   "  catlens report runs/main --out /tmp/report.html --screenshot report.png",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="run folder (e.g. runs/main)")
    p.add_argument("--out", default=None, help="page to write (default: RUN_DIR/report.html)")
    p.add_argument("--screenshot", default=None, metavar="PNG", help="also a full-page PNG (needs playwright and "
                                                                     "a Chromium)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any section is not complete (missing or "
                                                         "partial tables), not only when one fails")
    p.set_defaults(func=_cmd_report)

    _add_finetune_parser(sub)
    from catlens.generate_cli import add_cli as add_generate_cli

    add_generate_cli(sub)
    from catlens.explore import add_cli as add_explore_cli

    add_explore_cli(sub)
    return parser


def _check_cache_dir(path: str | None) -> None:
    from catlens.model import cache_dir

    check_folder_target(cache_dir(path), "--cache-dir" if path is not None else "model cache ($CATLENS_CACHE)",
                        "Give a folder (it is created if missing), or leave --cache-dir out for ~/.cache/catlens.")


def _cmd_models(args: argparse.Namespace) -> int:
    from catlens.model import check_model_options, list_models, load_model

    _check_cache_dir(args.cache_dir)
    device, dtype = check_model_options(args)
    for row in list_models(args.cache_dir):
        state = "cached" if row["cached"] else "not converted yet"
        print(f"{row['name']:<32} {row['kind']:<9} {state:<18} {row['path']}")
    if args.load:
        model = load_model(args.load, cache=args.cache_dir, device=device, dtype=dtype)
        print(model)
        prov = model.provenance
        print(f"  source: {prov['source']}\n  load: {prov['load_seconds']} s, vocab {prov['vocab_size']}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.action == "show":
        from catlens.datasets import load_prompts

        if not args.name:
            raise ValueError("'catlens data show' needs a dataset name, e.g. 'catlens data show builtin'.")
        ps = load_prompts(args.name, data_dir=args.data_dir)
        print(repr(ps))
        frame = ps.to_frame()
        print(frame.groupby(["label", "category", "split"], dropna=False).size().to_string())
        return 0
    from catlens import datasets

    if args.action == "list":
        table = datasets.list_datasets(args.data_dir)
        shown = ["name", "n", "labels", "n_categories", "path_exists", "license", "hub_id"]
    else:
        table = datasets.validate_datasets(args.data_dir)
        shown = ["name", "ok", "n", "expected_n", "n_harmful", "n_benign", "n_categorised", "n_categories", "sha256_ok",
                 "error"]
    with _wide_pandas():
        print(table[[c for c in shown if c in table.columns]].to_string(index=False))
    if args.action == "validate" and "ok" in table.columns and not table["ok"].all():
        return 1
    return 0


def _cmd_cache(args: argparse.Namespace) -> int:
    from catlens.cache import collect
    from catlens.datasets import load_prompts
    from catlens.model import FORMATS, Site, check_model_options, load_model, resolve_spec

    # check every argument before anything is loaded or written
    device, dtype = check_model_options(args)
    layers = parse_layers(args.layers)
    sites = [Site.parse(s.strip()).value for s in args.sites.split(",") if s.strip()]
    if not sites:
        raise ValueError(f"--sites {args.sites!r} names no site; give one or more of "
                         f"{', '.join(s.value for s in Site)}, comma-separated (e.g. 'resid_post').")
    positions = _positions(args.positions)
    parse_read_positions(positions)
    if args.fmt not in FORMATS:
        raise ValueError("--fmt: " + unknown_name_message("prompt format", args.fmt, FORMATS))
    check_folder_target(args.out, "--out", "The store is a folder: choose another --out.")
    _check_cache_dir(args.cache_dir)
    resolve_spec(args.model, args.cache_dir)
    from catlens.engines import check_engine, engine_dtype

    check_engine(args.engine)
    prompts = load_prompts(args.prompts, data_dir=args.data_dir)
    if args.split:
        every, prompts = prompts, prompts.where(split=args.split)
        if not len(prompts):
            present = sorted({s for s in every.splits if s is not None})
            fix = (f"its splits are {', '.join(present)}: choose one of those" if present else
                   "it has no splits: leave --split out")
            raise ValueError(f"--split {args.split!r} leaves no prompts of {args.prompts!r}; {fix}.")
    if not len(prompts):
        raise ValueError(f"--prompts {args.prompts!r} holds no prompts; give a prompt set with at least one prompt.")
    engine = None
    if args.engine == "vllm":  # the same store, computed by vLLM (catlens.engines.vllm)
        from catlens.engines.vllm import VLLMEngine

        engine = VLLMEngine(args.model, cache=args.cache_dir, tensor_parallel_size=args.tensor_parallel_size,
                            dtype=engine_dtype(args.dtype))
        model = engine.model
    else:
        model = load_model(args.model, cache=args.cache_dir, device=device, dtype=dtype)
    store = collect(model, prompts, sites=sites, layers=layers, positions=positions,
                    fmt=args.fmt, batch_size=args.batch_size, shard_size=args.shard_size, out=args.out,
                    overwrite=args.overwrite, engine=engine)
    print(f"{store!r}\nwrote {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------- finetune
_FINETUNE_EXAMPLES = """\
Examples:
  catlens finetune --config quick                    # built-in prompts, about 3 min
  catlens finetune                                   # default config, 12-18 min on 2 CPU cores
  catlens finetune --method lora --init mean --seed 1
  catlens finetune --config coconot --data-dir ../shared/data
  catlens finetune --base meta-llama/Meta-Llama-3-8B-Instruct --device cuda --dtype bfloat16 --method lora
  catlens finetune --resume                          # continue an interrupted run
The folder is printed on success and reused by later runs with the same config and data.
"""


def _add_finetune_parser(sub: Any) -> None:
    from catlens.finetune.config import CONFIGS, INITS, METHODS
    from catlens.model import DTYPES

    p = sub.add_parser(
        "finetune", help="train a refusal-token model (category refusal tokens + [respond])",
        description="Fine-tune a chat model to open every response with a category refusal token or [respond]. "
                    "The result is a checkpoint folder in the cache, loadable with catlens.load_model.\n\n"
                    + _FINETUNE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help=f"preset: {', '.join(CONFIGS)} (default: %(default)s)")
    p.add_argument("--method", default=None, help=f"override: {', '.join(METHODS)}")
    p.add_argument("--init", default=None, help=f"override the new-token initialisation: {', '.join(INITS)}")
    p.add_argument("--categories", default=None, help="comma-separated categories (default: the preset's)")
    p.add_argument("--single-token", action="store_true", help="binary variant: one [refuse] token")
    p.add_argument("--steps", type=int, default=None, help="override the number of optimiser steps")
    p.add_argument("--seed", type=int, default=None, help="override the training seed")
    p.add_argument("--base", default=None, help="model to fine-tune (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--device", default=None, help="device to train on, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--dtype", default=None, help=f"weight dtype: {', '.join(DTYPES)} (default: float32)")
    p.add_argument("--data-dir", default=None, help="benchmark data folder (default: $CATLENS_DATA_DIR or "
                                                    "../shared/data; the built-in prompts when absent)")
    p.add_argument("--out", default=None, help="output folder (default: <cache>/finetunes/refusal-<config>)")
    p.add_argument("--cache-dir", default=None, help="cache (default: $CATLENS_CACHE or ~/.cache/catlens)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any FinetuneConfig field; VALUE is JSON when it parses, else a string "
                        "(e.g. --set lr=1e-4 --set prototype_anchor=null); repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder / interrupted run")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args: argparse.Namespace) -> int:
    from catlens.finetune import finetune, get_config, parse_overrides

    categories = None
    if args.categories:
        categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give a positive number of steps.")
    extra = parse_overrides(args.set)  # typed and checked here, before any data or model is touched
    config = get_config(args.config, method=args.method, init=args.init, categories=categories,
                        single_token=True if args.single_token else None, steps=args.steps, seed=args.seed,
                        base=args.base, device=args.device, dtype=args.dtype)
    config = config.replace(**extra) if extra else config
    folder = finetune(config, data_dir=args.data_dir, out=args.out, overwrite=args.overwrite, resume=args.resume,
                      cache=args.cache_dir)
    print(folder)
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from catlens.report import build_report, screenshot

    rep = build_report(args.run_dir, out=args.out)
    for s in rep.sections:
        print(f"{s.id:<14} {s.status:<8} {len(s.figures)} figure(s)" + (f"  missing: {', '.join(s.missing)}"
                                                                       if s.missing else ""))
    print(f"wrote {rep.path}")
    if args.screenshot:
        try:
            import playwright.sync_api  # noqa: F401
        except ImportError:
            raise ValueError(f"--screenshot needs playwright (pip install playwright, part of the dev extra) and a "
                             f"Chromium (apt-get install -y chromium); {rep.path} was written.") from None
        errors = screenshot(rep.path, args.screenshot)
        print(f"wrote {args.screenshot}" + (f" ({len(errors)} browser console error(s))" if errors else ""))
    failed = [s.id for s in rep.sections if s.status == "error"]
    incomplete = [s.id for s in rep.sections if s.status in ("partial", "not run")]
    if failed:
        print(f"catlens report: section(s) {', '.join(failed)} could not be drawn (see the page and the warnings "
              f"above); exit 1.", file=sys.stderr)
        return 1
    if all(s.status == "not run" for s in rep.sections):
        print(f"catlens report: {args.run_dir!r} holds none of the tables a report draws (is it a run folder of "
              f"analyses/main.py?); exit 1.", file=sys.stderr)
        return 1
    if args.strict and incomplete:
        print(f"catlens report --strict: section(s) {', '.join(incomplete)} are incomplete (missing tables listed "
              f"above); exit 1.", file=sys.stderr)
        return 1
    return 0


class _wide_pandas:
    def __enter__(self) -> None:
        import pandas as pd

        self._ctx = pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60)
        self._ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from catlens.runs import configure_process

        configure_process(threads=args.threads)
        return int(args.func(args) or 0)
    except _USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"catlens {args.command}: error: {message}", file=sys.stderr)
        if args.verbose:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
