"""Render the papers' results as Markdown from saved tables only (no model): P1 (headline, per-dataset safety table,
probe-vs-refusal-token AUROC, gate errors, low-rank choice, transfer), P2 (chosen settings on test) and the category
specificity summary, by :func:`catlens.results.render_results` (every number and sentence from a run's tables and
manifest; a missing run folder is reported as not run).

    python analyses/summarise.py --p1 runs/p1 --p2 runs/p2/stock runs/p2/tuned --specificity runs/specificity \
        --out docs/RESULTS.md
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from catlens.results import render_results


def main(argv: Sequence[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--p1", type=Path, default=None)
    p.add_argument("--p2", type=Path, nargs="*", default=[])
    p.add_argument("--p1-earlier", type=Path, nargs="*", default=[],
                   help="earlier P1 runs that read the same test split (their headline and what changed since)")
    p.add_argument("--specificity", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None, help="write the Markdown here (default: print it)")
    args = p.parse_args(argv)
    text = render_results(args.p1, args.p2, args.p1_earlier, args.specificity)
    if args.out:
        from catlens.runs import write_text_atomic

        write_text_atomic(args.out, text)
    else:
        print(text)
    return text


if __name__ == "__main__":
    main()
