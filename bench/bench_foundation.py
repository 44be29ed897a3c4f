"""Foundation benchmarks: model load time, caching throughput against a plain forward pass, peak memory.

Usage:
    python bench/bench_foundation.py [--n-throughput 256] [--memory-sizes 1000,4000] [--out runs/bench-foundation]
    python bench/bench_foundation.py --only memory --out runs/bench-memory      # one part: load, throughput, memory
Writes: <out>/manifest.json, load.csv, throughput.csv, memory.csv (+ parquet twins) and prints a summary.

Every number is reported with a baseline measured in the same run:
  * load: GGUF dequantisation (fresh cache) vs loading the cached safetensors folder;
  * throughput: `collect` (resid_post, every layer, last position, streamed to disk) vs a plain bridge forward pass
    over the same batches with no hooks;
  * memory: peak RSS of `collect` streaming N prompts to disk, each size in its own process, vs the peak RSS of a
    process that only loads the model and runs one batch;
  * dtype: bfloat16 vs float32 weights (what ``model.dtype = "auto"`` picks on a CPU with native bfloat16): the
    next-token logits of ``--n-throughput`` prompts (plain forward, batches of 32, longest first) and greedy
    generation of 16 tokens for 64 of them, with how often the two dtypes agree on the next token.

    python bench/bench_foundation.py --only dtype --out runs/bench-dtype      # about 2 minutes

  * scores: :func:`catlens.refusal.first_token_scores` over ``--n-throughput`` prompts of mixed lengths, through a
    plain Hugging Face copy with last-position logits (what the evaluation uses) and through the bridge, both in
    batches sorted by length, vs the loop it replaced (bridge, full logits, batches in the caller's order); ordinary
    vocabulary tokens stand in for the refusal tokens (the stock model has none). The largest score difference to
    the old loop is reported.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]


def _texts(n: int) -> list[str]:
    from catlens.datasets import load_prompts

    base = load_prompts("builtin").texts
    return [base[i % len(base)] + ("" if i < len(base) else f" (variant {i // len(base)})") for i in range(n)]


def _child(kind: str, n: int, cache: str | None) -> None:
    """Run one measurement in this (fresh) process and print a JSON line."""
    import torch

    from catlens.runs import configure_process

    configure_process()  # threads from $OMP_NUM_THREADS (else torch's default: the physical cores)
    import transformer_lens.model_bridge  # noqa: F401 - import cost is not load cost
    import transformers  # noqa: F401

    from catlens.cache import collect
    from catlens.model import load_model

    t0 = time.perf_counter()
    model = load_model(cache=cache)
    load_s = time.perf_counter() - t0
    out: dict = {"kind": kind, "n": n, "load_s": load_s}
    if kind == "load":
        pass
    elif kind == "baseline_memory":
        texts = _texts(16)
        ids, mask = model.tokenize(model.format(texts))
        with torch.inference_mode():
            model.bridge(ids, attention_mask=mask)
    elif kind == "memory":
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            collect(model, _texts(n), sites=["resid_post"], out=Path(tmp) / "store", show_progress=False)
            out["collect_s"] = time.perf_counter() - t0
    elif kind == "throughput":
        texts = _texts(n)
        rendered = model.format(texts)
        batches = [model.tokenize(rendered[i:i + 16]) for i in range(0, n, 16)]
        tokens = sum(int(m.sum()) for _, m in batches)
        with torch.inference_mode():  # warm-up
            model.bridge(*batches[0][:1], attention_mask=batches[0][1])
        timings = {"plain_forward_s": [], "collect_s": []}
        for _ in range(2):  # alternate to share any drift in machine load
            t0 = time.perf_counter()
            with torch.inference_mode():
                for ids, mask in batches:
                    model.bridge(ids, attention_mask=mask)
            timings["plain_forward_s"].append(time.perf_counter() - t0)
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                collect(model, texts, sites=["resid_post"], out=Path(tmp) / "s", batch_size=16, show_progress=False)
                timings["collect_s"].append(time.perf_counter() - t0)
        out.update({k: min(v) for k, v in timings.items()}, tokens=tokens)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def _spawn(kind: str, n: int = 0, cache: str | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n", str(n)] + (["--cache", cache] if cache else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [l for l in res.stdout.splitlines() if l.startswith("RESULT ")]
    if res.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark child {kind} failed:\n{res.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-throughput", type=int, default=256)
    p.add_argument("--memory-sizes", default="1000,4000")
    p.add_argument("--out", default="runs/bench-foundation")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--only", default="load,throughput,memory,dtype,scores",
                   help="comma-separated parts to run: load, throughput, memory, dtype, scores (default: all)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--cache", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args.child, args.n, args.cache)
        return
    sys.path.insert(0, str(REPO))
    from catlens.runs import RunDir

    parts = {x.strip() for x in args.only.split(",") if x.strip()}
    if not parts or parts - {"load", "throughput", "memory", "dtype", "scores"}:
        p.error(f"--only {args.only!r}: choose from load, throughput, memory, dtype, scores (comma-separated).")
    run = RunDir.create(args.out, config=vars(args), overwrite=args.overwrite)
    tables = []
    if "load" in parts:
        tables.append(_bench_load(run))
    if "throughput" in parts:
        tables.append(_bench_throughput(run, args.n_throughput))
    if "memory" in parts:
        tables.append(_bench_memory(run, [int(x) for x in args.memory_sizes.split(",") if x]))
    if "dtype" in parts:
        tables.append(_bench_dtype(run, args.n_throughput))
    if "scores" in parts:
        tables.append(_bench_scores(run, args.n_throughput))
    run.finish()
    with pd.option_context("display.width", 160):
        print(*(t.to_string(index=False) for t in tables), sep="\n\n")


def _bench_load(run) -> pd.DataFrame:
    with tempfile.TemporaryDirectory() as fresh:
        gguf = _spawn("load", cache=fresh)  # converts the GGUF into an empty cache
        cached = _spawn("load", cache=fresh)  # loads the folder it just wrote
    load = pd.DataFrame([{"route": "gguf_dequantise", "seconds": gguf["load_s"]},
                         {"route": "cached_folder", "seconds": cached["load_s"]}])
    load["ratio_to_cached"] = load["seconds"] / cached["load_s"]
    run.save_table("load", load)
    return load


def _bench_throughput(run, n: int) -> pd.DataFrame:
    thr = _spawn("throughput", n)
    throughput = pd.DataFrame([{"n_prompts": thr["n"], "tokens": thr["tokens"], "plain_forward_s": thr["plain_forward_s"],
                                "collect_s": thr["collect_s"],
                                "collect_over_plain": thr["collect_s"] / thr["plain_forward_s"],
                                "collect_tokens_per_s": thr["tokens"] / thr["collect_s"]}])
    run.save_table("throughput", throughput)
    return throughput


def _bench_memory(run, sizes: list[int]) -> pd.DataFrame:
    base = _spawn("baseline_memory")
    rows = [{"n_prompts": 0, "what": "load + one batch (baseline)", "peak_rss_mib": base["peak_rss_mib"],
             "seconds": None}]
    for n in sizes:
        r = _spawn("memory", n)
        rows.append({"n_prompts": n, "what": "collect resid_post x 30 layers to disk", "peak_rss_mib": r["peak_rss_mib"],
                     "seconds": r["collect_s"]})
    memory = pd.DataFrame(rows)
    memory["ratio_to_baseline"] = memory["peak_rss_mib"] / base["peak_rss_mib"]
    run.save_table("memory", memory)
    return memory


def _bench_dtype(run, n: int) -> pd.DataFrame:
    import torch

    from catlens.model import load_model, native_bfloat16, tokenize_left
    from catlens.refusal import greedy_batches

    texts = _texts(n)
    rows, argmax = [], {}
    for dtype in ("float32", "bfloat16"):
        lens = load_model(dtype=dtype)
        hf = lens.plain_hf()
        rendered = lens.format(texts)
        order = sorted(range(len(rendered)), key=lambda i: -len(rendered[i]))
        top = [0] * len(texts)
        t0 = time.perf_counter()
        with torch.inference_mode():
            for s in range(0, len(order), 32):
                batch = order[s:s + 32]
                ids, mask = tokenize_left(lens.tokenizer, [rendered[i] for i in batch])
                logits = hf(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits[:, -1]
                for j, i in enumerate(batch):
                    top[i] = int(logits[j].argmax())
        t_fwd = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = greedy_batches(hf, lens.tokenizer, rendered[:64], max_new_tokens=16, batch_size=32)
        t_gen = time.perf_counter() - t0
        argmax[dtype] = (top, gen)
        rows.append({"dtype": dtype, "native_bfloat16_cpu": native_bfloat16("cpu"), "prompts": len(texts),
                     "forward_s": t_fwd, "generate_64x16_s": t_gen})
        del lens, hf
    table = pd.DataFrame(rows)
    table["forward_speedup_vs_float32"] = table.forward_s.iloc[0] / table.forward_s
    table["generate_speedup_vs_float32"] = table.generate_64x16_s.iloc[0] / table.generate_64x16_s
    (t32, g32), (t16, g16) = argmax["float32"], argmax["bfloat16"]
    table["next_token_agreement"] = [1.0, sum(a == b for a, b in zip(t32, t16)) / len(t32)]
    table["identical_generations"] = [1.0, sum(a == b for a, b in zip(g32, g16)) / len(g32)]
    run.save_table("dtype", table)
    return table


def _bench_scores(run, n: int) -> pd.DataFrame:
    import torch

    from catlens.model import load_model
    from catlens.refusal import RefusalTokens, decide, first_token_scores, special_token_probs

    lens = load_model()
    tokens = RefusalTokens(categories=("stand_in",), refuse=("No",), respond="Sure")
    ids = tokens.ids(lens.tokenizer)
    texts = [t * (1 + i % 4) for i, t in enumerate(_texts(n))]  # one to four copies: lengths vary as in the eval

    def old_loop() -> list[float]:  # what first_token_scores did before: caller order, bridge, full logits
        out: list[float] = []
        with torch.inference_mode():
            for s in range(0, len(texts), 32):
                out += decide(special_token_probs(lens.logits(texts[s:s + 32]), ids)).refusal_score.tolist()
        return out

    t0 = time.perf_counter()
    old = old_loop()
    t_old = time.perf_counter() - t0
    t0 = time.perf_counter()
    bridge = first_token_scores(lens, texts, tokens=tokens, show_progress=False)
    t_bridge = time.perf_counter() - t0
    plain = lens.plain_hf()
    t0 = time.perf_counter()
    fast = first_token_scores(lens, texts, tokens=tokens, show_progress=False, hf=plain)
    t_fast = time.perf_counter() - t0
    rows = []
    for what, t, table in (("caller-order batches, bridge, full logits (before)", t_old, None),
                           ("sorted batches, bridge", t_bridge, bridge),
                           ("sorted batches, plain copy, last-position logits (now)", t_fast, fast)):
        diff = 0.0 if table is None else float(max(abs(a - b) for a, b in zip(table.refusal_score, old)))
        rows.append({"path": what, "prompts": len(texts), "seconds": t, "speedup_vs_before": t_old / t,
                     "max_abs_score_diff_vs_before": diff})
    table = pd.DataFrame(rows)
    run.save_table("scores", table)
    return table


if __name__ == "__main__":
    main()
