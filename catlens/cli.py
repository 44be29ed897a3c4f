"""The ``catlens`` command.

    catlens models                       list the embedded model and the cached checkpoints / fine-tunes
    catlens data list|validate           list or validate the benchmark datasets in the data directory
    catlens cache --out runs/acts        collect activations for a prompt set into a resumable store
    catlens finetune --config quick      train the refusal-token model (see `catlens finetune -h`)
    catlens report runs/main             rebuild runs/main/report.html from the saved tables

Bad input exits with code 2 and a one-line reason.
"""

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("catlens")

_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError)


def parse_layers(text: str | None) -> list[int] | None:
    """``"all"``/None -> None (every layer); ``"0-3,10,-1"`` -> [0, 1, 2, 3, 10, -1]."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                a, b = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--layers {text!r}: cannot read {part!r}; use 'all', single layers and ranges like "
                             f"'0-5,10,-1'.") from None
    return out


def _positions(text: str) -> str | list[int]:
    if text.lstrip("-").replace(",", "").replace("-", "").isdigit():
        return [int(p) for p in text.split(",")]
    return text


def _add_common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="embedded name, checkpoint folder or hub id (default: %(default)s)")
    p.add_argument("--cache-dir", default=None, help="model cache (default: $CATLENS_CACHE or ~/.cache/catlens)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="catlens", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list models; --load to load one and print its provenance",
                       description="List the embedded model and cached checkpoints.\n\nExamples:\n"
                                   "  catlens models\n  catlens models --load smollm2-135m-instruct",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--load", metavar="SPEC", default=None, help="load this model and print its provenance")
    p.add_argument("--cache-dir", default=None)
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
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--out", required=True, help="store folder (rerun to resume)")
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
    p.set_defaults(func=_cmd_report)

    try:
        from catlens.finetune import add_cli
    except ImportError:  # fine-tuning module not available in this build
        pass
    else:
        add_cli(sub)
    return parser


def _cmd_models(args: argparse.Namespace) -> int:
    from catlens.model import list_models, load_model

    for row in list_models(args.cache_dir):
        state = "cached" if row["cached"] else "not converted yet"
        print(f"{row['name']:<32} {row['kind']:<9} {state:<18} {row['path']}")
    if args.load:
        model = load_model(args.load, cache=args.cache_dir)
        print(model)
        prov = model.provenance
        print(f"  source: {prov['source']}\n  load: {prov['load_seconds']} s, vocab {prov['vocab_size']}")
    return 0


def _cmd_data(args: argparse.Namespace) -> int:
    if args.action == "show":
        from catlens.prompts import load_prompts

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
    from catlens.cache import _parse_positions, collect
    from catlens.model import Site, load_model, resolve_spec
    from catlens.prompts import load_prompts

    # check the cheap arguments before any loading
    layers = parse_layers(args.layers)
    sites = [Site.parse(s.strip()).value for s in args.sites.split(",") if s.strip()]
    positions = _positions(args.positions)
    _parse_positions(positions)
    resolve_spec(args.model, args.cache_dir)
    prompts = load_prompts(args.prompts, data_dir=args.data_dir)
    if args.split:
        prompts = prompts.where(split=args.split)
    model = load_model(args.model, cache=args.cache_dir)
    store = collect(model, prompts, sites=sites, layers=layers, positions=positions,
                    fmt=args.fmt, batch_size=args.batch_size, shard_size=args.shard_size, out=args.out)
    print(f"{store!r}\nwrote {args.out}")
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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except _USER_ERRORS as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        print(f"catlens {args.command}: error: {message}".splitlines()[0], file=sys.stderr)
        if args.verbose:
            raise
        return 2


if __name__ == "__main__":
    sys.exit(main())
