"""vLLM backend benchmarks (issue 20): catlens's policies on vLLM against catlens.generate, in one run.

Usage (under the CPU lock on the shared machine):
    flock /tmp/catlens-cpu.lock .venv/bin/python bench/bench_vllm.py --out runs/bench-vllm
    python bench/bench_vllm.py --n-prompts 16 --new-tokens 8 --out /tmp/bench-vllm-smoke      # a smoke run

On the embedded model (or --model), the same ``--n-prompts`` built-in prompts, greedy, ``--new-tokens`` tokens each
with no early stop (every configuration decodes the same number of tokens), three settings:

* ``unsteered``;
* ``steered``: one additive resid_post intervention at layer ``--layer`` at P1's positions (``last_prompt``);
* ``gated_routed``: the same vectors behind a probe gate and a probe router read ``--layer - 4`` layers earlier
  (decided inside the engine in the same pass); on vLLM also ``gated_routed_two_pass`` (decided on a separate
  unsteered prefill first, the mode a refusal-token router with ``last_prompt`` needs).

catlens.generate runs in vLLM's dtype unless ``--catlens-dtype`` says otherwise (the fair comparison; a CPU without
native bfloat16 runs both slowly in bfloat16). Reports: vLLM / catlens.generate throughput per setting (goal: steered and gated+routed >= 1.4x); the gate's cost
inside the engine (gated_routed / steered time - 1; goal <= 5 %); what steering costs vLLM (steered / unsteered
time - 1); the engine's start time; first-token agreement of the unsteered runs; the machine (CPU, whether it has
native bfloat16, the threads each engine computes with). Writes ``<out>/bench_vllm.csv`` and
``<out>/bench_vllm_summary.csv``.
"""

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _texts(n: int) -> list[str]:
    from catlens.datasets import load_prompts

    base = load_prompts("builtin").texts
    return [base[(i * 7) % len(base)] for i in range(n)]


def _machine() -> dict:
    """The CPU the numbers were measured on (vLLM's CPU kernels and bfloat16 speed depend on its instruction set)."""
    import os
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"cpu": name, "cpu_count": os.cpu_count(), "cpu_avx512": "avx512f" in flags,
            "cpu_bf16_native": bool(flags & {"avx512_bf16", "amx_bf16"})}


def _timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--n-prompts", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32, help="catlens.generate's batch size")
    p.add_argument("--vllm-dtype", default="bfloat16", help="vLLM's dtype")
    p.add_argument("--catlens-dtype", default="same",
                   help="catlens.generate's dtype: 'same' (vLLM's: the fair comparison), float32 or bfloat16")
    p.add_argument("--layer", type=int, default=18)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs for vLLM (a CUDA machine)")
    p.add_argument("--device", default="cpu", help="catlens.generate's device (cuda on a GPU machine)")
    p.add_argument("--out", default="runs/bench-vllm")
    args = p.parse_args(argv)

    import pandas as pd

    import catlens.generation as gen
    from catlens.engines.vllm import VLLMEngine
    from catlens.model import DEFAULT_MODEL, load_model
    from catlens.runs import RunDir
    from catlens.steer import Gate, Intervention, Router, SteeringPolicy

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    run = RunDir.create(args.out, vars(args), overwrite=True)
    spec = args.model or DEFAULT_MODEL
    texts = _texts(args.n_prompts)

    # vLLM first (its worker process holds the cores while it runs; the engine is closed before catlens runs)
    t0 = time.perf_counter()
    engine = VLLMEngine(spec, dtype=args.vllm_dtype, max_num_seqs=256, tensor_parallel_size=args.tensor_parallel_size)
    start_s = time.perf_counter() - t0
    from catlens.engines import vllm_worker

    vllm_threads = engine.llm.collective_rpc(vllm_worker.stats)[0]["threads"]
    vllm_version = engine.model.provenance["backend"]
    model = engine.model
    d = model.d_model
    vecs = torch.randn(3, d) * 4
    cats = ("a", "b", "c")
    add = Intervention("resid_post", args.layer, vecs, labels=cats, positions="last_prompt")
    gate = Gate(torch.randn(d) * 0.01, 0.0, 0.5, args.layer - 4)
    router = Router("probe", cats, weight=torch.randn(3, d), bias=torch.zeros(3), layer=args.layer - 4)
    gated = SteeringPolicy((add,), gate=gate, router=router, toward=1.0, away=-1.0)
    steered = SteeringPolicy((add,))
    assert engine.single_pass(gated)

    def v(steer, two_pass=None):
        engine.llm.reset_prefix_cache()  # every timed run starts cold, as catlens.generate (no prefix cache) does
        return engine.generate(texts, steer, max_new_tokens=args.new_tokens, stop_at_eos=False, two_pass=two_pass,
                               show_progress=False)

    tokens = len(texts) * args.new_tokens

    def save_rows() -> "pd.DataFrame":  # after every setting: a run stopped midway keeps what it measured
        table = pd.DataFrame([{"engine": e, "setting": name, "seconds": s, "tokens": tokens, "tokens_per_s": tokens / s}
                              for (e, name), s in timings.items()])
        run.save_table("bench_vllm", table)
        return table

    # warm-up on a few prompts: the first requests allocate the KV cache
    engine.generate(texts[:8], None, max_new_tokens=2, stop_at_eos=False, show_progress=False)
    timings = {}
    outs = {}
    for name, fn in [("unsteered", lambda: v(None)), ("steered", lambda: v(steered)),
                     ("gated_routed", lambda: v(gated)), ("gated_routed_two_pass", lambda: v(gated, True))]:
        timings[("vllm", name)], outs[("vllm", name)] = _timed(fn, args.repeats)
        print(json.dumps({"engine": "vllm", "setting": name, "seconds": round(timings[("vllm", name)], 2)}),
              flush=True)
        save_rows()
    engine.close()
    del engine

    catlens_dtype = args.vllm_dtype if args.catlens_dtype == "same" else args.catlens_dtype
    lm = load_model(spec, device=args.device, dtype=catlens_dtype)
    run.record_model(lm)

    def c(steer):
        return gen.generate(lm, texts, steer, max_new_tokens=args.new_tokens, batch_size=args.batch_size,
                            show_progress=False, stop_at_eos=False)

    for name, steer in [("unsteered", None), ("steered", steered), ("gated_routed", gated)]:
        timings[("catlens", name)], outs[("catlens", name)] = _timed(lambda: c(steer), args.repeats)
        print(json.dumps({"engine": "catlens", "setting": name, "seconds": round(timings[("catlens", name)], 2)}),
              flush=True)
        table = save_rows()

    first = lambda k: [r["token_ids"][0] for r in outs[k]]  # noqa: E731
    agree = sum(a == b for a, b in zip(first(("vllm", "unsteered")), first(("catlens", "unsteered")))) / len(texts)
    decided = [[(r["steer"], (r["route"] or {}).get("category")) for r in outs[(e, "gated_routed")]]
               for e in ("vllm", "catlens")]
    same_gate = decided[0] == decided[1]
    decisions_agree = sum(a == b for a, b in zip(*decided)) / len(texts)
    summary = {
        "vllm_dtype": args.vllm_dtype, "catlens_dtype": catlens_dtype, "engine_start_s": start_s,
        "vllm_version": vllm_version, "vllm_worker_threads": vllm_threads, "catlens_threads": torch.get_num_threads(),
        **_machine(),
        "vllm_over_catlens_unsteered": timings[("catlens", "unsteered")] / timings[("vllm", "unsteered")],
        "vllm_over_catlens_steered": timings[("catlens", "steered")] / timings[("vllm", "steered")],
        "vllm_over_catlens_gated_routed": timings[("catlens", "gated_routed")] / timings[("vllm", "gated_routed")],
        "vllm_gate_cost": timings[("vllm", "gated_routed")] / timings[("vllm", "steered")] - 1.0,
        "vllm_two_pass_cost": timings[("vllm", "gated_routed_two_pass")] / timings[("vllm", "steered")] - 1.0,
        "vllm_steering_cost": timings[("vllm", "steered")] / timings[("vllm", "unsteered")] - 1.0,
        "catlens_gate_cost": timings[("catlens", "gated_routed")] / timings[("catlens", "steered")] - 1.0,
        "unsteered_first_token_agreement": agree,
        "gated_routed_same_decisions": same_gate,
        "gated_routed_decision_agreement": decisions_agree,
    }
    run.save_table("bench_vllm_summary", pd.DataFrame([summary]))
    run.finish(**{k: (round(v_, 4) if isinstance(v_, float) else v_) for k, v_ in summary.items()})
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":  # vLLM's engine core is a spawned process
    raise SystemExit(main())
