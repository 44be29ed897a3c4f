"""Steering benchmarks (issue 9): steered batched generation against baselines measured in the same run.

Usage:
    python bench/bench_steer.py --out runs/bench-steer            # defaults: 64 prompts, 64 new tokens, batch 16,32
    python bench/bench_steer.py --n-prompts 16 --new-tokens 8 --batch-sizes 4 --loop-prompts 4   # a smoke run

Measures, on the embedded model (or --model), greedy decoding with a fixed number of new tokens (no early stop,
so every configuration decodes the same number of tokens):

* ``steered / unsteered``: :func:`catlens.generate` with one additive resid_post intervention at the P1 positions
  (``last_prompt``) vs the same call with no steering, per batch size (goal: throughput ratio >= 0.9);
* ``batched vs batch-1 loop``: steered batched generation vs the loop P1's public code uses (one prompt at a time,
  ``transformers.generate`` through the bridge with a hook adding the vector at position -1 of every call; goal >= 8x);
* ``gated + routed vs ungated``: a probe gate and a probe router deciding per row in the prefill vs the same vectors
  without them (goal: at most 5 % overhead);
* ``catlens.generate vs transformers.generate``: unsteered, same batches (context only: the bridge's hook points cost
  time on every call).

Writes ``<out>/bench_steer.csv`` and prints the ratios. Run it on an otherwise idle machine.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _texts(n: int) -> list[str]:
    from catlens.datasets import load_prompts

    base = load_prompts("builtin").texts
    return [base[(i * 7) % len(base)] for i in range(n)]


def _timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--n-prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="16,32")
    p.add_argument("--loop-prompts", type=int, default=16, help="prompts for the (slow) batch-1 loop")
    p.add_argument("--layer", type=int, default=18)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="runs/bench-steer")
    args = p.parse_args(argv)

    from catlens.runs import RunDir

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import catlens.generation as gen
    from catlens.model import DEFAULT_MODEL, load_model
    from catlens.steer import Gate, Intervention, Router, SteeringPolicy

    run = RunDir.create(args.out, vars(args), overwrite=True)
    model = load_model(args.model or DEFAULT_MODEL)
    run.record_model(model)
    texts = _texts(args.n_prompts)
    d = model.d_model
    vecs = torch.randn(3, d) * 4
    cats = ("a", "b", "c")
    add = Intervention("resid_post", args.layer, vecs, labels=cats, positions="last_prompt")
    gate = Gate(torch.randn(d) * 0.01, 0.0, 0.5, args.layer - 4)
    router = Router("probe", cats, weight=torch.randn(3, d), bias=torch.zeros(3), layer=args.layer - 4)
    gated = SteeringPolicy((add,), gate=gate, router=router, toward=1.0, away=-1.0)

    rows = []  # no early stop anywhere: every configuration decodes exactly new_tokens tokens
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        def run_gen(steer, bs=bs):
            return gen.generate(model, texts, steer, max_new_tokens=args.new_tokens, batch_size=bs,
                                show_progress=False, stop_at_eos=False)

        t_plain = _timed(lambda: run_gen(None), args.repeats)
        t_steer = _timed(lambda: run_gen(add), args.repeats)
        t_gated = _timed(lambda: run_gen(gated), args.repeats)

        def hf_gen(bs=bs):
            order = sorted(texts, key=len, reverse=True)
            for s in range(0, len(order), bs):
                ids, mask = model.tokenize(model.format(order[s:s + bs]))
                with torch.inference_mode():
                    model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False,
                                      pad_token_id=model.tokenizer.pad_token_id)

        t_hf = _timed(hf_gen, args.repeats)
        tokens = len(texts) * args.new_tokens
        rows.append({"batch_size": bs, "tokens": tokens, "unsteered_s": t_plain, "steered_s": t_steer,
                     "gated_routed_s": t_gated, "transformers_generate_s": t_hf,
                     "steered_over_unsteered_throughput": t_plain / t_steer,
                     "gated_overhead": t_gated / t_steer - 1.0,
                     "catlens_over_transformers_throughput": t_hf / t_plain})
        print(json.dumps(rows[-1]), flush=True)

    # P1's loop: one prompt at a time, transformers.generate through the bridge, a hook at position -1
    loop_texts = texts[: args.loop_prompts]
    v = vecs[0]

    def p1_hook(act, hook):
        act = act.clone()
        act[:, -1, :] += v.to(act)
        return act

    def loop():
        with model.bridge.hooks(fwd_hooks=[(model.hook_name("resid_post", args.layer), p1_hook)]):
            for t in loop_texts:
                ids, mask = model.tokenize(model.format([t]))
                with torch.inference_mode():
                    model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                      min_new_tokens=args.new_tokens, do_sample=False,
                                      pad_token_id=model.tokenizer.pad_token_id)

    t_loop = _timed(loop, 1)
    loop_tps = len(loop_texts) * args.new_tokens / t_loop
    for r in rows:
        r["batch1_loop_tokens_per_s"] = loop_tps
        r["steered_tokens_per_s"] = r["tokens"] / r["steered_s"]
        r["steered_over_batch1_loop"] = r["steered_tokens_per_s"] / loop_tps
    import pandas as pd

    table = pd.DataFrame(rows)
    run.save_table("bench_steer", table)
    run.finish()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["batch_size", "steered_over_unsteered_throughput", "steered_over_batch1_loop",
                     "gated_overhead", "catlens_over_transformers_throughput"]].to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
