"""Fine-tuning benchmarks (issue 3): self-distillation and training-step cost, each against a baseline from the
same run.

Usage:
    python bench/bench_finetune.py [--n 128] [--tokens 24] [--steps 5] [--out runs/bench-finetune]
Writes: <out>/manifest.json, distill.csv and step.csv (+ parquet twins) and prints a summary.

  * distill: greedy answers of the stock model to ``--n`` built-in prompts (``--tokens`` new tokens each) with
    :func:`catlens.finetune.greedy_answers` (plain Hugging Face model, batches of 64; what ``finetune`` uses) vs
    :func:`catlens.refusal.generate_ids` through the TransformerLens bridge (batches of 16; what it used before);
    the answers must be identical;
  * step: one optimiser step of a full fine-tune (the quick preset's built-in training data with method="full",
    batch 8, the first batches of its schedule) vs a forward pass alone over the same batch;
  * adam: the AdamW update alone over every parameter of the full fine-tune, with the gradients of one real batch:
    the fused kernel (what ``finetune`` uses) vs the default single-tensor loop, and the largest parameter
    difference between the two after ``--steps`` updates (float rounding only).

    python bench/bench_finetune.py --only adam      # a minute
"""

import argparse
import sys
import time
from typing import Any

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="prompts to self-distil")
    p.add_argument("--tokens", type=int, default=24, help="new tokens per answer")
    p.add_argument("--steps", type=int, default=5, help="training steps timed")
    p.add_argument("--out", default="runs/bench-finetune")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS, else torch's)")
    p.add_argument("--only", default="distill,step,adam", help="comma-separated parts: distill, step, adam")
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.only.split(",") if x.strip()]
    bad = sorted(set(parts) - {"distill", "step", "adam"})
    if bad or not parts:
        p.error(f"--only {args.only!r}: parts are distill, step and adam (comma-separated), e.g. --only adam")
    from catlens.datasets import load_builtin
    from catlens.runs import RunDir, configure_process

    configure_process(threads=args.threads, seed=0)
    run = RunDir.create(args.out, config=vars(args), overwrite=args.overwrite, seed=0)
    texts = load_builtin().texts[: args.n]
    summary: dict[str, float] = {}
    if "distill" in parts:
        summary["distill_speedup"] = bench_distill(args, run, texts)
    if "step" in parts or "adam" in parts:
        summary.update(bench_step(args, run, parts))
    run.finish(**summary)
    return 0


def bench_distill(args: argparse.Namespace, run: Any, texts: list[str]) -> float:
    import pandas as pd

    from catlens.finetune import greedy_answers
    from catlens.model import load_model
    from catlens.refusal import generate_ids

    # ------------------------------------------------------------------------------------ self-distillation
    lens = load_model()
    run.record_model(lens, "stock")
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(lens.provenance["source"]["folder"], dtype=torch.float32).eval()
    t0 = time.perf_counter()
    fast = greedy_answers(plain, lens.tokenizer, texts, max_new_tokens=args.tokens, batch_size=64)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = generate_ids(lens, texts, max_new_tokens=args.tokens, batch_size=16, tokens=None, gate=False,
                        show_progress=False)
    t_slow = time.perf_counter() - t0
    same = sum(a == b for a, b in zip(fast, slow))
    distill = pd.DataFrame([{"prompts": len(texts), "new_tokens": args.tokens, "plain_hf_batch64_s": t_fast,
                             "bridge_batch16_s": t_slow, "speedup": t_slow / t_fast,
                             "identical_answers": same}])
    run.save_table("distill", distill)
    print(distill.round(3).to_string(index=False))
    return float(distill.speedup.iloc[0])


def bench_step(args: argparse.Namespace, run: Any, parts: list[str]) -> dict[str, float]:
    import pandas as pd

    from catlens.finetune import assemble_data, collate, get_config, prepare, response_loss

    # -------------------------------------------------------------------------------------- training step
    config = get_config("quick", method="full", steps=args.steps, checkpoint_every=0)
    data = assemble_data(config)
    prep = prepare(config, data, show_progress=False)
    from catlens.finetune import make_schedule

    schedule = make_schedule([e.side for e in prep.examples], args.steps, config.batch_size, config.seed)
    batches = [collate([prep.examples[i] for i in b], config.first_token_weight, prep.tokenizer.pad_token_id)
               for b in schedule]
    model = prep.model
    out: dict[str, float] = {}
    if "step" in parts:
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-5, fused=True)
        model.train()
        t0 = time.perf_counter()
        for batch in batches:
            loss, _ = response_loss(model, batch, prep.special_ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        t_step = (time.perf_counter() - t0) / len(batches)
        model.eval()
        t0 = time.perf_counter()
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        t_fwd = (time.perf_counter() - t0) / len(batches)
        tokens = sum(int(b["attention_mask"].sum()) for b in batches) / len(batches)
        step = pd.DataFrame([{"batch_size": config.batch_size, "tokens_per_batch": tokens, "train_step_s": t_step,
                              "forward_s": t_fwd, "ratio": t_step / t_fwd}])
        run.save_table("step", step)
        print(step.round(3).to_string(index=False))
        out["step_over_forward"] = float(step.ratio.iloc[0])
    if "adam" in parts:
        model.train()
        loss, _ = response_loss(model, batches[0], prep.special_ids)
        loss.backward()
        params = [q for q in model.parameters() if q.requires_grad]
        start = [q.detach().clone() for q in params]
        grads = [q.grad.detach().clone() for q in params]
        timings, finals = {}, {}
        for kind in ("single_tensor", "fused"):
            with torch.no_grad():
                for q, s0, g in zip(params, start, grads):
                    q.copy_(s0)
                    q.grad = g.clone()
            opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, **(
                {"fused": True} if kind == "fused" else {"foreach": False}))
            opt.step()  # the state is allocated on the first step: not timed
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            timings[kind] = (time.perf_counter() - t0) / args.steps
            finals[kind] = [q.detach().clone() for q in params]
        diff = max(float((a - b).abs().max()) for a, b in zip(finals["single_tensor"], finals["fused"]))
        adam = pd.DataFrame([{"parameters": sum(q.numel() for q in params), "updates": args.steps + 1,
                              "single_tensor_s": timings["single_tensor"], "fused_s": timings["fused"],
                              "speedup": timings["single_tensor"] / timings["fused"], "max_abs_diff": diff}])
        run.save_table("adam", adam)
        print(adam.to_string(index=False))
        out["adam_speedup"] = float(adam.speedup.iloc[0])
    return out

if __name__ == "__main__":
    sys.exit(main())
