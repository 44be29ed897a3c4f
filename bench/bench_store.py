"""Activation-store benchmarks: peak memory of a store larger than memory, and caching throughput against a plain
``transformers`` forward pass.

Usage (on an idle machine; each measurement runs in its own fresh process):
    python bench/bench_store.py                                   # both parts, default sizes
    python bench/bench_store.py --sizes 1000,8000 --n-throughput 256 --batch-size 16 --out runs/bench-store
    python bench/bench_store.py --only memory --sizes 1000,8000   # one part: memory or throughput
    python bench/bench_store.py --sizes 20,40 --n-throughput 16   # smoke run (seconds; numbers meaningless)
    python bench/bench_store.py --tiny --only memory              # the memory part on a proxy model (~1 minute)
    python bench/bench_store.py --only memory --pin-malloc        # glibc's mmap threshold pinned (see below)
Writes: <out>/memory.csv, <out>/throughput.csv and <out>/summary.json, and prints a summary.

(a) memory: for each size N, a child process loads the model, runs ``collect(model, N prompts,
    sites=["resid_post"], layers=None, out=<tmp>)`` and then makes a full pass over the returned (lazy) store: every
    layer of every prompt is read once (``store.at(site, layer)`` per layer, summed), plus one ``where`` selection.
    Peak RSS is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of that process (psutil's RSS is recorded too).
    A baseline child only loads the model and runs one batch. Goal: peak(largest N) <= 1.10 * peak(smallest N).
    ``collect_peak_rss_mib`` is the peak when ``collect`` returns (before the pass), to tell the two apart.
    ``--pin-malloc`` runs the children with ``MALLOC_MMAP_THRESHOLD_=1048576``: glibc's mmap threshold is
    otherwise dynamic, and the forward passes' peak then varies by tens of MiB from run to run and creeps up with
    the number of batches (measured on the proxy: 544-666 MiB over runs of the same job; pinned, 538-541 MiB).
    ``--tiny``: a random proxy with the real model's residual width and depth (d_model 576, 30 layers) but a narrow
    MLP, narrow heads and a tiny vocabulary (``catlens.testing.make_tiny_model_dir``), so the memory part runs in
    about a minute. To store per prompt what a larger run stores, it reads 8 positions (``positions=(-8..-1)``,
    8x the bytes of "last") with ``shard_size=32`` (so a shard has the bytes of a default 256-row shard of the real
    model); default sizes 64,512 (8x, like 1000 vs 8000), allocator pinned (``--no-pin-malloc`` to unpin), one
    thread per child unless ``OMP_NUM_THREADS`` says otherwise. (Its throughput part only smoke-tests the code: the
    proxy's forward pass is too cheap for the ratio to mean anything.)
(b) throughput: one child, the same prompts, formatting, left padding and batches (``--batch-size``):
    * ``hf``: a plain ``transformers`` copy of the model (``LensModel.plain_hf``), forward with
      ``output_hidden_states=True``, the last position of every layer's hidden state copied to the CPU; batches are
      tokenised inside the timed loop;
    * ``collect_memory``: ``collect(..., sites=["resid_post"], layers=None, positions="last")`` in memory;
    * ``collect_disk``: the same streamed to a store folder (shards, checksums, lazy store returned).
    Each is run ``--repeats`` times alternately (after one warm-up batch each); the minimum is kept.
    Goal: hf_seconds / collect_seconds >= 0.9 for both collect variants.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # measure this checkout's catlens, not an installed copy


def _texts(n: int) -> list[str]:
    """``n`` distinct prompts cycling over the built-in set, every one with a suffix of the same width, so that
    batches of the same lengths recur whatever ``n`` is (a suffix only on the repeats made the larger runs' prompts
    longer, and so their forward passes bigger, than the smaller runs')."""
    from catlens.datasets import load_prompts

    base = load_prompts("builtin").texts
    return [f"{base[i % len(base)]} (variant {i // len(base):03d})" for i in range(n)]


def _rss_mib() -> dict[str, float]:
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        import psutil

        out["rss_now_mib"] = psutil.Process().memory_info().rss / 2**20
    except ImportError:
        pass
    return out


# the --tiny proxy: SmolLM2-135M's residual width and depth, everything else small (fast forward passes)
TINY_PROXY = {"n_layers": 30, "d_model": 576, "n_heads": 2, "n_kv_heads": 1, "d_head": 8, "d_mlp": 16}


def _load(model_spec: str | None):
    from catlens.model import load_model

    return load_model() if model_spec is None else load_model(model_spec)


def _child_memory(n: int, batch_size: int, model_spec: str | None = None, n_positions: int = 1,
                  shard_size: int = 256) -> dict:
    import torch

    from catlens.cache import collect

    model = _load(model_spec)
    out: dict = {"n": n}
    if n == 0:  # baseline: model + one batch
        ids, mask = model.tokenize(model.format(_texts(batch_size)))
        with torch.inference_mode():
            model.bridge(ids, attention_mask=mask)
        return {**out, **_rss_mib()}
    texts = _texts(n)
    with tempfile.TemporaryDirectory() as tmp:
        out["rss_before_collect_mib"] = _rss_mib().get("rss_now_mib")
        t0 = time.perf_counter()
        positions = "last" if n_positions == 1 else tuple(range(-n_positions, 0))
        store = collect(model, texts, sites=["resid_post"], out=Path(tmp) / "store", batch_size=batch_size,
                        positions=positions, shard_size=shard_size, show_progress=False)
        out["collect_s"] = time.perf_counter() - t0
        out["collect_peak_rss_mib"] = _rss_mib()["peak_rss_mib"]
        t0 = time.perf_counter()
        total = 0.0
        for layer in store.layers:  # full pass: every value read once
            for pos in range(n_positions):
                total += float(store.at("resid_post", layer, pos).double().sum())
        half = store.where(id=[f"p{i}" for i in range(0, n, 2)])
        total += float(half.at("resid_post", store.layers[-1]).double().sum())
        out["pass_s"] = time.perf_counter() - t0
        out["checksum"] = total
        out["lazy"] = store.lazy
    import catlens

    return {**out, "catlens": catlens.__file__, **_rss_mib()}


def _child_throughput(n: int, batch_size: int, repeats: int, model_spec: str | None = None) -> dict:
    import torch

    from catlens.cache import collect

    model = _load(model_spec)
    hf = model.plain_hf()
    texts = _texts(n)
    rendered = model.format(texts)

    def run_hf() -> int:
        tokens = 0
        with torch.inference_mode():
            for i in range(0, n, batch_size):
                ids, mask = model.tokenize(rendered[i:i + batch_size])
                hidden = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
                torch.stack([h[:, -1] for h in hidden[1:]], dim=1).float().cpu()
                tokens += int(mask.sum())
        return tokens

    def run_collect(disk: bool) -> None:
        if disk:
            with tempfile.TemporaryDirectory() as tmp:
                collect(model, texts, sites=["resid_post"], out=Path(tmp) / "s", batch_size=batch_size,
                        show_progress=False)
        else:
            collect(model, texts, sites=["resid_post"], batch_size=batch_size, show_progress=False)

    warm = texts[:batch_size]
    with torch.inference_mode():
        ids, mask = model.tokenize(model.format(warm))
        hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    collect(model, warm, sites=["resid_post"], batch_size=batch_size, show_progress=False)
    timings: dict[str, list[float]] = {"hf_s": [], "collect_memory_s": [], "collect_disk_s": []}
    tokens = 0
    for _ in range(repeats):  # alternate, to share any drift in machine load
        t0 = time.perf_counter()
        tokens = run_hf()
        timings["hf_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_collect(False)
        timings["collect_memory_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_collect(True)
        timings["collect_disk_s"].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in timings.items()}
    return {"n": n, "batch_size": batch_size, "tokens": tokens, **best,
            "ratio_memory": best["hf_s"] / best["collect_memory_s"],
            "ratio_disk": best["hf_s"] / best["collect_disk_s"], "threads": torch.get_num_threads()}


def _spawn(args: list[str], env: dict | None = None) -> dict:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False, cwd=REPO,
                         env=env)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {args} failed:\n{res.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help="prompt counts for the memory part (comma-separated; default 1000,8000, "
                        "or 64,512 with --tiny)")
    p.add_argument("--n-throughput", type=int, default=None, help="prompts for the throughput part (default 256, or "
                                                                   "64 with --tiny)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", choices=["memory", "throughput"])
    p.add_argument("--out", default=None, help="output folder (default runs/bench-store, or runs/bench-store-tiny)")
    p.add_argument("--tiny", action="store_true",
                   help="use a random proxy model of the real width and depth (fast; default sizes 64,512)")
    p.add_argument("--pin-malloc", action=argparse.BooleanOptionalAction, default=None,
                   help="run the children with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_=1048576); "
                        "default: on with --tiny, off otherwise")
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--positions", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--shard-size", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--child", choices=["memory", "throughput"], help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child == "memory":
        print("RESULT " + json.dumps(_child_memory(args.n, args.batch_size, args.model, args.positions,
                                                   args.shard_size)))
        return
    if args.child == "throughput":
        print("RESULT " + json.dumps(_child_throughput(args.n, args.batch_size, args.repeats, args.model)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_spec = None
        if args.tiny:
            from catlens.testing import make_tiny_model_dir

            model_spec = str(make_tiny_model_dir(Path(tmp) / "proxy", **TINY_PROXY))
        _run(args, model_spec)


def _run(args: argparse.Namespace, model_spec: str | None) -> None:
    import pandas as pd

    tiny = model_spec is not None
    args.sizes = args.sizes or ("64,512" if tiny else "1000,8000")
    args.n_throughput = args.n_throughput or (64 if tiny else 256)
    out = Path(args.out or ("runs/bench-store-tiny" if tiny else "runs/bench-store"))
    out.mkdir(parents=True, exist_ok=True)
    pin = tiny if args.pin_malloc is None else args.pin_malloc
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(1 << 20)} if pin else {}),
           **({"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")} if tiny else {})}
    summary: dict = {"sizes": args.sizes, "n_throughput": args.n_throughput, "batch_size": args.batch_size,
                     "model": "tiny proxy " + json.dumps(TINY_PROXY) if tiny else "default (real) model",
                     "malloc_mmap_threshold_pinned": pin}
    common = ["--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
              *(["--model", model_spec] if tiny else [])]
    memory_args = ["--positions", "8", "--shard-size", "32"] if tiny else []
    if args.only in (None, "memory"):
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
        rows = [_spawn(["--child", "memory", "--n", "0", *common], env)]
        rows += [_spawn(["--child", "memory", "--n", str(n), *common, *memory_args], env) for n in sizes]
        table = pd.DataFrame(rows)
        table.to_csv(out / "memory.csv", index=False)
        small, large = table[table.n == min(sizes)].iloc[0], table[table.n == max(sizes)].iloc[0]
        summary["memory_ratio_largest_vs_smallest"] = float(large.peak_rss_mib / small.peak_rss_mib)
        summary["collect_memory_ratio_largest_vs_smallest"] = float(large.collect_peak_rss_mib
                                                                    / small.collect_peak_rss_mib)
        summary["memory_goal_met"] = summary["memory_ratio_largest_vs_smallest"] <= 1.10
        print(table.to_string(index=False))
        print(f"peak RSS {max(sizes)} vs {min(sizes)} prompts: {summary['memory_ratio_largest_vs_smallest']:.3f}x "
              f"(goal <= 1.10; at the end of collect: {summary['collect_memory_ratio_largest_vs_smallest']:.3f}x)")
    if args.only in (None, "throughput"):
        row = _spawn(["--child", "throughput", "--n", str(args.n_throughput), *common], env)
        pd.DataFrame([row]).to_csv(out / "throughput.csv", index=False)
        summary.update({k: row[k] for k in ("ratio_memory", "ratio_disk", "hf_s", "collect_memory_s",
                                            "collect_disk_s")})
        print(json.dumps(row, indent=1))
        print(f"throughput hf/collect: memory {row['ratio_memory']:.3f}x, disk {row['ratio_disk']:.3f}x "
              f"(goal >= 0.9)")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
