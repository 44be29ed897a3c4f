"""``catlens.metrics.auroc_with_ci``'s bootstrap against the loop it replaced (one ``sklearn.metrics.roc_auc_score``
per resample), on the same draws, in the same run: seconds per call and the ratio, and the largest difference of any
returned number (0 up to float rounding). The sizes default to P1's test-stage calls (``catlens.recipes.p1``: 500
resamples of 339 harmful vs 40 benign prompts, the largest pair; 32 calls per run). Writes ``<out>/auroc.csv`` (+
parquet) and a manifest, and renders docs/BENCHMARKS.md's section "AUROC intervals" with ``--doc``.

    python bench/bench_auroc.py --out runs/bench-auroc [--doc]
"""

import argparse
import time
from pathlib import Path

from _markdown import put_section  # bench/_markdown.py (the script's own folder is on sys.path)

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def loop_bootstrap(y, score, *, rng, n_boot: int, alpha: float = 0.05) -> dict:
    """The old interval: a loop of ``roc_auc_score`` calls, each on one stratified resample."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, bool)
    s = np.asarray(score, float)
    pos, neg = s[y], s[~y]
    labels = np.r_[np.ones(len(pos), bool), np.zeros(len(neg), bool)]
    boots = np.array([roc_auc_score(labels, np.r_[pos[rng.integers(0, len(pos), len(pos))],
                                                  neg[rng.integers(0, len(neg), len(neg))]]) for _ in range(n_boot)])
    low, high = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return {"auroc": float(roc_auc_score(y, s)), "ci_low": float(low), "ci_high": float(high),
            "se": float(boots.std(ddof=1))}


def main(argv=None) -> int:
    import numpy as np
    import pandas as pd

    from catlens.metrics import auroc_with_ci
    from catlens.runs import RunDir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-auroc")
    p.add_argument("--sizes", default="339:40,37:17,2:2", help="n_pos:n_neg pairs, comma-separated")
    p.add_argument("--n-boot", type=int, default=500)
    p.add_argument("--repeats", type=int, default=3, help="calls timed per size and method (the best is kept)")
    p.add_argument("--doc", action="store_true", help="render docs/BENCHMARKS.md's section from this run")
    args = p.parse_args(argv)
    run = RunDir.create(args.out, config=vars(args), overwrite=True)
    rows = []
    for pair in args.sizes.split(","):
        n_pos, n_neg = (int(v) for v in pair.split(":"))
        gen = np.random.default_rng(0)
        score = np.round(np.r_[gen.normal(1, 1, n_pos), gen.normal(0, 1, n_neg)], 2)  # rounded: ties, as real scores
        y = np.r_[np.ones(n_pos, bool), np.zeros(n_neg, bool)]
        timing, out = {}, {}
        for name, fn in (("loop of roc_auc_score", loop_bootstrap), ("auroc_with_ci", auroc_with_ci)):
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                out[name] = fn(y, score, rng=np.random.default_rng(1), n_boot=args.n_boot)
                best = min(best, time.perf_counter() - t)
            timing[name] = best
        diff = max(abs(out["loop of roc_auc_score"][k] - out["auroc_with_ci"][k])
                   for k in ("auroc", "ci_low", "ci_high", "se"))
        rows.append({"n_pos": n_pos, "n_neg": n_neg, "n_boot": args.n_boot,
                     "loop_s": timing["loop of roc_auc_score"], "catlens_s": timing["auroc_with_ci"],
                     "speedup": timing["loop of roc_auc_score"] / timing["auroc_with_ci"], "max_abs_diff": diff})
    table = pd.DataFrame(rows)
    run.save_table("auroc", table)
    run.finish()
    print(table.to_string(index=False))
    if args.doc:
        m = run.manifest
        lines = [(f"`python bench/bench_auroc.py --out {args.out} --doc` (git {str(m.get('git_commit', '?'))[:7]}, "
                 f"{m.get('created', '?')}): seconds per call, the best of {args.repeats}, both methods in the same "
                 f"run on the same resamples; the largest difference of any returned number (AUROC, interval, SD)."),
                 "", ("| positives | negatives | resamples | loop of roc_auc_score | auroc_with_ci | speed-up | largest "
                 "difference |"), "|---|---|---|---|---|---|---|"]
        lines += [f"| {r.n_pos} | {r.n_neg} | {r.n_boot} | {r.loop_s:.3f} s | {r.catlens_s:.4f} s | {r.speedup:.0f}x | "
                  f"{r.max_abs_diff:.1e} |" for r in table.itertuples()]
        put_section(DOC, "## AUROC intervals", "auroc", "\n".join(lines), before="## Foundation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
