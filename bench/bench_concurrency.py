"""What two concurrent jobs cost each other on a shared CPU, with one thread each vs the default thread count.

    python bench/bench_concurrency.py --out runs/bench-concurrency                 # the real model, both kinds
    python bench/bench_concurrency.py --kind train --threads 1,default --steps 10 --out ...
    python bench/bench_concurrency.py --tiny --steps 2 --out /tmp/bench-smoke      # a smoke run in seconds

For each kind (``forward``: inference forward passes; ``train``: full fine-tuning steps, forward + backward + AdamW,
the fine-tune's inner loop) and each thread setting, the script runs one job alone, then two identical jobs at the
same time (separate processes, started together behind a barrier), and records each job's seconds per step. The
slowdown of a job is its concurrent time over its time alone: on 2 cores, two jobs that each use 1 thread should
cost each other at most about 2x (goal: <= 2.5x), while two jobs that each take every core oversubscribe the
machine and can cost 10x. Measure on an otherwise idle machine; the numbers are meaningless while other jobs run.

Writes: <out>/manifest.json, timings.parquet (+ .csv): kind, threads, mode (alone / concurrent), job,
seconds_per_step, slowdown (concurrent / alone of the same kind and threads), plus the summary in the manifest.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's catlens, in the parent and in every child
GOAL = 2.5


def _model(tiny: bool, seed: int) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if tiny:
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
        with torch.random.fork_rng():  # the tiny model's random weights, without touching the caller's RNG
            torch.manual_seed(seed)
            return LlamaForCausalLM(cfg)
    from catlens.model import embedded_checkpoint

    return AutoModelForCausalLM.from_pretrained(embedded_checkpoint(), dtype=torch.float32)


def _child(args: argparse.Namespace) -> None:
    """One job: configure threads, load, wait at the barrier, time ``steps`` steps, print a JSON line."""
    from catlens.runs import configure_process

    threads = None if args.child_threads == "default" else int(args.child_threads)
    settings = configure_process(threads=threads, seed=args.seed)
    import torch

    model = _model(args.tiny, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5) if args.kind == "train" else None

    def step() -> None:
        if opt is None:
            with torch.inference_mode():
                model(input_ids=ids)
            return
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train(opt is not None)
    step()  # warm-up
    if args.barrier:
        Path(args.barrier, f"ready-{os.getpid()}").touch()
        go = Path(args.barrier, "go")
        while not go.exists():
            time.sleep(0.01)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - t0) / args.steps
    print(json.dumps({"seconds_per_step": seconds, "threads_used": settings["threads"]}), flush=True)


def _launch(args: argparse.Namespace, kind: str, threads: str, n_jobs: int) -> list[dict[str, Any]]:
    """Run ``n_jobs`` identical children at once (released together) and return their JSON lines."""
    with tempfile.TemporaryDirectory(prefix="catlens-bench-") as barrier:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--kind", kind, "--child-threads", threads,
               "--steps", str(args.steps), "--batch", str(args.batch), "--seq", str(args.seq),
               "--seed", str(args.seed), "--barrier", barrier] + (["--tiny"] if args.tiny else [])
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # the child's --threads decides
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env) for _ in range(n_jobs)]
        while len(list(Path(barrier).glob("ready-*"))) < n_jobs:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
        Path(barrier, "go").touch()
        rows = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"benchmark child failed (exit {p.returncode}): {' '.join(cmd)}")
            rows.append(json.loads(out.strip().splitlines()[-1]))
        return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="forward,train", help="comma-separated: forward, train (default: both)")
    p.add_argument("--threads", default="1,default", help="thread settings per job, e.g. '1,default' or '1,2'")
    p.add_argument("--jobs", type=int, default=2, help="concurrent jobs (default: 2, one per core)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per job")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (the fine-tune's prompt length)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of the real model (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/bench-concurrency")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-threads", default="default", help=argparse.SUPPRESS)
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _child(args)
        return 0
    kinds = [k.strip() for k in args.kind.split(",") if k.strip()]
    if not set(kinds) <= {"forward", "train"}:
        raise SystemExit(f"--kind {args.kind!r}: use forward, train or both.")
    settings = [t.strip() for t in args.threads.split(",") if t.strip()]
    for t in settings:
        if t != "default" and not (t.isdigit() and int(t) >= 1):
            raise SystemExit(f"--threads {args.threads!r}: give whole numbers >= 1 or 'default'.")
    import pandas as pd

    from catlens.runs import RunDir

    run = RunDir.create(args.out, config=vars(args), overwrite=args.overwrite, seed=args.seed)
    rows = []
    for kind in kinds:
        for threads in settings:
            alone = _launch(args, kind, threads, 1)[0]
            together = _launch(args, kind, threads, args.jobs)
            rows.append({"kind": kind, "threads": threads, "threads_used": alone["threads_used"], "mode": "alone",
                         "job": 0, "seconds_per_step": alone["seconds_per_step"], "slowdown": 1.0})
            for j, r in enumerate(together):
                rows.append({"kind": kind, "threads": threads, "threads_used": r["threads_used"],
                             "mode": "concurrent", "job": j, "seconds_per_step": r["seconds_per_step"],
                             "slowdown": r["seconds_per_step"] / alone["seconds_per_step"]})
            worst = max(r["slowdown"] for r in rows if r["kind"] == kind and r["threads"] == threads)
            print(f"{kind:<8} threads={threads:<8} alone {alone['seconds_per_step']:.3f} s/step, "
                  f"{args.jobs} concurrent: worst slowdown {worst:.2f}x (goal <= {GOAL}x)", flush=True)
    table = pd.DataFrame(rows)
    run.save_table("timings", table)
    conc = table[table["mode"] == "concurrent"]
    summary = {f"{k}/threads={t}": round(float(g["slowdown"].max()), 3) for (k, t), g in conc.groupby(["kind", "threads"])}
    run.finish(worst_slowdown=summary, goal=GOAL, cpu_count=os.cpu_count(), tiny=args.tiny)
    return 0


if __name__ == "__main__":
    sys.exit(main())
