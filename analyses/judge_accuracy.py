"""The refusal judges against the hand-labelled sample: accuracy with Wilson intervals, pairwise kappa,
disagreements.

Usage (no model is loaded; seconds):
    python analyses/judge_accuracy.py --out runs/judge_accuracy [--labels catlens/data/judge_labels.jsonl]
    python analyses/judge_accuracy.py --out runs/judge_accuracy --overwrite --docs docs/STEERING.md

Reads the labelled answers (:func:`catlens.judges.load_judge_labels`; who labelled and how:
``catlens/data/judge_labels.md``), runs the judges ``refusal_token``, ``substring`` and ``full_answer`` on them
(:func:`catlens.judges.judge_accuracy`; the steps: :mod:`catlens.recipes.judge_accuracy`) and writes to the run
folder:

    accuracy         each judge against the labels, on all rows and per group (split, model|policy, prompt label):
                     n, correct, accuracy with a 95 % Wilson interval, confusion counts, recall of each class
                     with Wilson intervals, Cohen's kappa against the labels
    agreement        pairwise agreement and Cohen's kappa of the three judges and the labels
    disagreements    the verdict patterns (three judges + label) that are not unanimous, with counts and ids
    disagreement_rows every answer on which some judge and the label differ, with the answer text
    verdicts         one row per labelled answer: verdicts, label, model, policy, prompt label

``--docs FILE`` renders the tables into ``FILE`` between ``<!-- judge_accuracy:begin -->`` and
``<!-- judge_accuracy:end -->`` (every number there comes from this run's tables).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from catlens.recipes import judge_accuracy as recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/judge_accuracy")
    p.add_argument("--labels", default=None, help="a labelled JSONL file (default: the packaged sample)")
    p.add_argument("--docs", default=None, help="render the tables into this markdown file between the markers")
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from catlens.judges import load_judge_labels
    from catlens.runs import RunDir

    args = parse_args(argv)
    rows = load_judge_labels(args.labels)
    run = RunDir.create(args.out, vars(args), overwrite=args.overwrite)
    recipe.record_labels(run, args.labels, rows)  # the labels' path, sha256 and size
    t = recipe.tables(rows)  # accuracy, agreement, disagreements, disagreement_rows, verdicts
    for name, table in t.items():
        run.save_table(name, table)
    block = recipe.render(t, len(rows), str(args.out))
    (Path(args.out) / "report.md").write_text(block + "\n", encoding="utf-8")
    if args.docs:
        recipe.write_docs(Path(args.docs), block)
    run.finish(n_rows=len(rows), **recipe.headline(t))
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
