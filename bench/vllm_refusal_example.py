"""The worked example of issue 20: one gated + routed policy on the refusal-token fine-tune, applied through
catlens.generate and through the vLLM engine to the held-out built-in prompts, refusal and over-refusal side by side,
with the equivalence figures (token agreement, decisions, gate scores).

Usage (under the CPU lock; the fine-tune from `catlens finetune` or `make demo`):
    flock /tmp/catlens-cpu.lock .venv/bin/python bench/vllm_refusal_example.py \\
        --model ~/.cache/catlens/finetunes/refusal-default [--policy runs/p1/policies/categorical_youden] \\
        --out runs/vllm-example

Without ``--policy`` a simple P1-style policy is built with catlens's own API from the built-in train/val prompts:
one-vs-benign category directions at ``--layer`` (resid_post, ``last_prompt``, coefficients as fractions of the
residual norm), a probe gate read ``--gate-layer`` (Youden threshold on val) and the refusal-token router; it is
saved to ``<out>/policy``. Writes ``<out>/table.csv`` (refusal rates per engine, setting and label) and
``<out>/agreement.json``.
"""

import argparse
import json
from pathlib import Path


def build_policy(model, layer: int, gate_layer: int, toward: float, away: float):
    """One-vs-benign directions + a probe gate + the refusal-token router, from the built-in train/val prompts."""
    from catlens.cache import collect
    from catlens.directions import one_vs_benign
    from catlens.probes import fit_gate
    from catlens.datasets import load_prompts
    from catlens.refusal import RefusalTokens
    from catlens.steer import Router, SteeringPolicy, from_directions, model_fingerprint

    ps = load_prompts("builtin")
    train, val = ps.where(split="train"), ps.where(split="val")
    layers = sorted({layer, gate_layer})
    acts = collect(model, train, ["resid_post"], layers, "last", show_progress=False)
    vacts = collect(model, val, ["resid_post"], layers, "last", show_progress=False)
    li, gi = layers.index(layer), layers.index(gate_layer)
    x = acts.get("resid_post")  # [prompt layer d]
    labels = list(train.to_frame()["label"])
    cats = list(train.to_frame()["category"])
    tokens = RefusalTokens.from_model(model)
    harmful_cats = [c for c in dict.fromkeys(c for c, lab in zip(cats, labels) if lab == "harmful")
                    if c in tokens.categories]
    by_cat = {c: x[[i for i, (cc, lab) in enumerate(zip(cats, labels)) if cc == c and lab == "harmful"]]
              for c in harmful_cats}
    benign = x[[i for i, lab in enumerate(labels) if lab == "benign"]]
    dirs = one_vs_benign(by_cat, benign, layers=layers, normalize=True).with_ref_norm(benign)
    ivs = from_directions(dirs, layer, positions="last_prompt", scale="norm")
    h = x[[i for i, lab in enumerate(labels) if lab == "harmful"], gi]
    vx = vacts.get("resid_post")
    vlab = list(val.to_frame()["label"])
    gate = fit_gate(h, benign[:, gi], layer=gate_layer,
                    val=(vx[[i for i, lab in enumerate(vlab) if lab == "harmful"], gi],
                         vx[[i for i, lab in enumerate(vlab) if lab == "benign"], gi]))
    return SteeringPolicy(tuple(ivs), gate=gate, router=Router("refusal_tokens", harmful_cats), toward=toward,
                          away=away, name="vllm-example", model=model_fingerprint(model),
                          meta={"built_by": "bench/vllm_refusal_example.py", "layer": layer, "gate_layer": gate_layer})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the refusal-token fine-tune folder")
    p.add_argument("--policy", default=None, help="a saved policy folder (default: build one, see above)")
    p.add_argument("--layer", type=int, default=18)
    p.add_argument("--gate-layer", type=int, default=15)
    p.add_argument("--toward", type=float, default=0.1)
    p.add_argument("--away", type=float, default=-0.2)
    p.add_argument("--split", default="test")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--vllm-dtype", default="float32")
    p.add_argument("--out", default="runs/vllm-example")
    args = p.parse_args(argv)

    import pandas as pd

    import catlens
    from catlens.engines.vllm import VLLMEngine
    from catlens.judges import judge_records
    from catlens.datasets import load_prompts
    from catlens.refusal import RefusalTokens
    from catlens.steer import SteeringPolicy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = catlens.load_model(args.model)
    if args.policy:
        policy = SteeringPolicy.load(args.policy)
    else:
        policy = build_policy(model, args.layer, args.gate_layer, args.toward, args.away)
        policy.save(out / "policy", overwrite=True)
    prompts = list(load_prompts("builtin").where(split=args.split))
    gen = dict(max_new_tokens=args.max_new_tokens, show_progress=False)
    recs = {("catlens", "unsteered"): catlens.generate(model, prompts, None, batch_size=32, **gen),
            ("catlens", "policy"): catlens.generate(model, prompts, policy, batch_size=32, allow_transfer=True,
                                                    **gen)}
    del model
    engine = VLLMEngine(args.model, dtype=args.vllm_dtype)
    recs[("vllm", "unsteered")] = engine.generate(prompts, None, **gen)
    recs[("vllm", "policy")] = engine.generate(prompts, policy, allow_transfer=True, **gen)
    single = engine.single_pass(policy)
    tokens = RefusalTokens.from_model(engine.model)
    engine.close()

    rows = []
    for (eng, setting), rs in recs.items():
        judged = judge_records(rs, ["refusal_token"], options={"refusal_token": {"tokens": tokens}})
        frame = pd.DataFrame({"label": [r["label"] for r in rs], "refused": list(judged["refused_refusal_token"])})
        for label, g in frame.groupby("label"):
            rows.append({"engine": eng, "setting": setting, "label": label, "n": len(g),
                         "refused": int(g.refused.sum()), "rate": float(g.refused.mean())})
    table = pd.DataFrame(rows)
    table.to_csv(out / "table.csv", index=False)
    wide = table.pivot_table(index=["setting", "label"], columns="engine", values="rate").reset_index()
    wide["diff_points"] = 100 * (wide["vllm"] - wide["catlens"])

    def agree(setting, n=None):
        a, b = recs[("catlens", setting)], recs[("vllm", setting)]
        return sum(x["token_ids"][:n] == y["token_ids"][:n] for x, y in zip(a, b)) / len(a)

    a, b = recs[("catlens", "policy")], recs[("vllm", "policy")]
    summary = {
        "model": args.model, "policy": args.policy or str(out / "policy"), "n_prompts": len(prompts),
        "vllm_dtype": args.vllm_dtype, "decided_in_engine": single,
        "unsteered_16_token_agreement": agree("unsteered", 16), "policy_16_token_agreement": agree("policy", 16),
        "unsteered_first_token_agreement": agree("unsteered", 1), "policy_first_token_agreement": agree("policy", 1),
        "same_gate_outcome": sum(x["gate"]["outcome"] == y["gate"]["outcome"] for x, y in zip(a, b)) / len(a),
        "same_route": sum(x["route"]["category"] == y["route"]["category"] for x, y in zip(a, b)) / len(a),
        "max_gate_score_diff": max(abs(x["gate"]["score"] - y["gate"]["score"]) for x, y in zip(a, b)),
        "max_refusal_rate_diff_points": float(wide["diff_points"].abs().max()),
    }
    (out / "agreement.json").write_text(json.dumps(summary, indent=1))
    with pd.option_context("display.width", 200):
        print(wide.to_string(index=False))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":  # vLLM's engine core is a spawned process
    raise SystemExit(main())
