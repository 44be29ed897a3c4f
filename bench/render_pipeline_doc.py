"""Render docs/BENCHMARKS.md's "The main job, stage by stage" section from a main-job run folder (its manifest,
``summary.json`` and the stages' own manifests; numbers are never typed): every stage's time and model loads, what
the one shared model pool saved, and the first-position settings a stage read from the run's cache instead of
computing again. Replaces the text between the section's markers.

    python bench/render_pipeline_doc.py runs/main [--note "measured on an idle machine, fine-tune cached"]
        [--explore runs/bench-explore] [--baseline runs/main-before]

``--explore`` adds the explorer's first answers from a ``bench/bench_explore.py`` run folder. ``--baseline`` adds an
earlier run of the same job (an older commit, the same machine) beside each stage's time, and checks that the two
runs wrote the same tables: every Parquet table of the baseline read back and compared (columns that record time,
and run caches and activations, left out).
"""

import argparse
import json
from pathlib import Path

from _markdown import put_section  # bench/_markdown.py (the script's own folder is on sys.path)

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
HEADING = "## The main job, stage by stage (issue 19)"


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    m, s = divmod(round(float(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def first_position_reuse(run: Path) -> list[tuple[str, str, int, int]]:
    """``(stage, purpose, cached, computed)`` per first-position call recorded in a stage's manifest (P1's
    ``first_position``; the specificity stage's per-variant ``cache``)."""
    rows = []
    p1 = _read(run / "p1" / "manifest.json").get("first_position", {})
    for purpose, status in p1.items():
        rows.append(("p1", purpose, sum(v == "cached" for v in status.values()),
                     sum(v == "computed" for v in status.values())))
    spec = _read(run / "specificity" / "manifest.json").get("summary", {}).get("cache", {})
    if spec:
        rows.append(("specificity", "variants", sum(v == "cached" for v in spec.values()),
                     sum(v == "computed" for v in spec.values())))
    return rows


TIME_COLUMNS = ("seconds", "tokens_per_s", "created", "timestamp")
"""Columns that record how long something took or when, not what was computed."""


def same_tables(run: Path, baseline: Path) -> tuple[int, list[str]]:
    """``(n_compared, differing)``: every Parquet table of ``baseline`` (outside ``cache/``, ``acts/`` and ``gen/``)
    against the same path in ``run``, time columns left out, numbers equal to 1e-9 relative; a table missing from
    ``run`` counts as differing."""
    import pandas as pd

    n, differing = 0, []
    for f in sorted(baseline.rglob("*.parquet")):
        rel = f.relative_to(baseline)
        if {"cache", "acts", "gen"} & set(rel.parts[:-1]):
            continue
        n += 1
        g = run / rel
        if not g.exists():
            differing.append(f"{rel} (missing)")
            continue
        a, b = pd.read_parquet(f), pd.read_parquet(g)
        keep = [c for c in a.columns if not any(t in str(c) for t in TIME_COLUMNS)]
        try:
            pd.testing.assert_frame_equal(a[keep], b[[c for c in keep if c in b.columns]], check_exact=False,
                                          rtol=1e-9, atol=1e-12)
        except AssertionError:
            differing.append(str(rel))
    return n, differing


def render(run: Path, note: str | None = None, baseline: Path | None = None) -> str:
    manifest = _read(run / "manifest.json")
    if not manifest:
        raise FileNotFoundError(f"no manifest.json in {str(run)!r}: give a folder `analyses/main.py --out` wrote.")
    summary = _read(run / "summary.json")
    stages = manifest.get("stages", {})
    bm = _read(baseline / "manifest.json") if baseline else {}
    base = bm.get("stages", {})
    if baseline and not base:
        raise FileNotFoundError(f"--baseline {str(baseline)!r} has no manifest.json with stages: give an earlier "
                                f"folder `analyses/main.py --out` wrote.")
    command = manifest.get("command") or ["analyses/main.py", "--out", str(run)]  # what ran, as the job recorded it
    columns = ["stage", "status", "time", *([f"`{baseline}`", "ratio"] if baseline else []), "model loads in the stage"]
    lines = [f"Run `{run}` (git {manifest.get('git_commit', '?')[:7]}{' (dirty)' if manifest.get('git_dirty') else ''},"
             f" started {manifest.get('created', '?')}), `python {' '.join(command)}`"
             + (f"; {note}" if note else "") + ".", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    total = 0.0
    for name, info in stages.items():
        sec = info.get("seconds")
        done = info.get("status") == "done"
        total += float(sec or 0) if done else 0.0
        loads = info.get("model_loads") or {}
        cells = [name, info.get("status", "?"), _minutes(sec)]
        if baseline:
            was = base.get(name) or {}
            b = was.get("seconds") if was.get("status") == "done" else None
            cells += [_minutes(b), f"{float(sec) / float(b):.2f}" if b and sec is not None and done else "n/a"]
        cells.append(f"{loads['n']} ({loads['seconds']:.1f} s)" if loads else "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Stages that ran: {_minutes(total)}; the whole job: {_minutes(summary.get('seconds'))}."]
    if baseline:
        n, differing = same_tables(run, baseline)
        base_seconds = _read(baseline / "summary.json").get("seconds")
        lines[-1] += (f" The baseline `{baseline}` (git {str(bm.get('git_commit', '?'))[:7]}, started "
                      f"{bm.get('created', '?')}): the whole job {_minutes(base_seconds)}."
                      f" Tables equal to the baseline's: {n - len(differing)} of {n}"
                      + (f" (differing: {', '.join(differing)})." if differing else "."))
    ml = summary.get("model_loads") or manifest.get("model_loads") or {}
    pool = ml.get("pool")
    if pool:
        copies = pool.get("plain_copies", 0)
        models = pool["loads"] - copies
        lines += ["", f"**One process, one model pool.** The job loaded {models} model(s) from disk and made "
                      f"{copies} plain Hugging Face cop(ies) of them in memory ({pool['load_seconds']:.1f} s for "
                      f"all), and answered {pool['hits']} further request(s) with a model already there: with a "
                      f"process per stage, each of those would have been a load of its own (plus the process's "
                      f"start and imports). `load_model` calls outside the pool: {max(ml.get('n', 0) - models, 0)}."]
    reuse = first_position_reuse(run)
    if reuse:
        cached = sum(r[2] for r in reuse)
        lines += ["", f"**Repeated prompt passes.** First-position settings read from the run's cache instead of "
                      f"computed again: {cached} of {cached + sum(r[3] for r in reuse)} "
                      "(`catlens.generation.first_position_cached`; a rerun of the job reads them all).", "",
                  "| stage | call | read from the cache | computed |", "|---|---|---|---|"]
        lines += [f"| {s} | {p} | {c} | {n} |" for s, p, c, n in reuse]
    return "\n".join(lines)


def render_explore(folder: Path) -> str:
    """The explorer's seconds to the unsteered answer, both answers and the map (``bench/bench_explore.py``)."""
    import csv

    rows = list(csv.DictReader((folder / "first_answer.csv").open()))
    m = _read(folder / "manifest.json")
    cmd = m.get("command", ["bench/bench_explore.py"])
    cmd = " ".join(["python", *cmd]) if isinstance(cmd, list) else str(cmd)
    lines = ["", f"**The explorer's first answer** (`{cmd}`, git "
                 f"{str(m.get('git_commit', '?'))[:7]}): seconds from creating the page's app to the request's "
                 "unsteered answer on the page, to both answers, and to the prompt's place in the map, the request sent "
                 "at once through the page's own callback; `cold` is an empty disk cache of the built-in prompts' "
                 "activations, `warm` a full one; the model loaded in float32 and in the dtype `catlens explore` "
                 "loads by default (`--dtype auto`: bfloat16 on a CPU with native bfloat16), in the same run.", "",
             ("| model dtype | method | activation cache | unsteered answer | both answers | map | both answers, "
              "float32 / this |"), "|---|---|---|---|---|---|---|"]
    base = {(r["method"], r["cache"]): float(r["answers_s"]) for r in rows if r.get("dtype", "float32") == "float32"}
    for r in rows:
        both = float(r["answers_s"])
        ratio = base.get((r["method"], r["cache"]))
        lines.append(f"| {r.get('dtype', 'float32')} | {r['method']} | {r['cache']} | {float(r['unsteered_s']):.1f} s "
                     f"| {both:.1f} s | {float(r['map_s']):.1f} s | "
                     f"{'-' if ratio is None else f'{ratio / both:.2f}x'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("run", help="a main-job run folder (analyses/main.py --out)")
    p.add_argument("--note", default=None, help="how it was measured (said after the command)")
    p.add_argument("--explore", default=None, help="a bench/bench_explore.py run folder")
    p.add_argument("--baseline", default=None, help="an earlier main-job run folder to compare with")
    args = p.parse_args(argv)
    body = render(Path(args.run), args.note, Path(args.baseline) if args.baseline else None)
    if args.explore:
        body += "\n" + render_explore(Path(args.explore))
    put_section(DOC, HEADING, "pipeline", body, before="## Foundation")  # after the main job's speed section
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
