"""Issue 20's worked example through the command line: a saved P1 policy (say, the one `make demo` chose) applied by
`catlens generate` and by `catlens generate --engine vllm` to held-out sets, the two engines' refusal and
over-refusal tables side by side, with how often they agree row by row.

Usage (under the CPU lock; the fine-tune and the policy of a `make demo` run):
    flock /tmp/catlens-cpu.lock .venv/bin/python bench/vllm_cli_example.py \\
        --model ~/.cache/catlens/finetunes/refusal-default --policy runs/main/p1/policies/categorical_global \\
        --out runs/vllm-cli-example

Each held-out set (``--sets``: ``name`` or ``name:split``) is one pair of command lines, run in this process through
``catlens.cli.main`` (the code path of the ``catlens`` command), with the command line's default judge (the refusal
token on a refusal-token model). Writes ``<out>/<engine>/<set>/`` (the command's own folders), ``<out>/table.csv``
(pooled rate per set and side for each engine, and the difference in points) and ``<out>/agreement.json``.
"""

import argparse
import json


def _set_args(spec: str) -> tuple[str, list[str]]:
    name, _, split = spec.partition(":")
    return spec.replace(":", "-"), ["--prompts", name, *(["--split", split] if split else [])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the refusal-token fine-tune folder")
    p.add_argument("--policy", required=True, help="a saved policy folder (e.g. runs/main/p1/policies/...)")
    p.add_argument("--sets", default="xstest,builtin:test,hardbenign:test")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--engine-dtype", default="float32", help="vLLM's dtype (catlens.generate runs the model's)")
    p.add_argument("--out", default="runs/vllm-cli-example")
    args = p.parse_args(argv)

    import pandas as pd

    from catlens.cli import main as catlens_cli
    from catlens.runs import RunDir

    run = RunDir.create(args.out, vars(args), resume=True)
    rows, pairs = [], []
    for spec in [s.strip() for s in args.sets.split(",") if s.strip()]:
        tag, prompt_args = _set_args(spec)
        got = {}
        for engine in ("catlens", "vllm"):
            folder = run.path / engine / tag
            argv_ = ["generate", "--model", args.model, "--policy", args.policy, *prompt_args,
                     "--max-new-tokens", str(args.max_new_tokens), "--out", str(folder)]
            if engine == "vllm":
                argv_ += ["--engine", "vllm", "--engine-dtype", args.engine_dtype]
            print("catlens " + " ".join(argv_), flush=True)
            if catlens_cli(argv_) != 0:
                raise SystemExit(f"catlens {' '.join(argv_)} failed")
            rates = pd.read_csv(folder / "rates.csv")
            for r in rates[rates["row"] == "pooled"].itertuples():
                rows.append({"set": spec, "engine": engine, "side": r.side, "metric": r.metric, "n": int(r.n),
                             "k": int(r.k), "rate": float(r.rate), "ci_low": float(r.ci_low),
                             "ci_high": float(r.ci_high)})
            got[engine] = [json.loads(x) for x in (folder / "responses.jsonl").read_text().splitlines() if x]
        for a, b in zip(got["catlens"], got["vllm"]):
            if a["id"] != b["id"]:
                raise SystemExit(f"{spec}: the engines' records are not in the same order ({a['id']} vs {b['id']})")
            pairs.append({"set": spec, "same_tokens": a["token_ids"] == b["token_ids"],
                          "same_first_token": a["token_ids"][:1] == b["token_ids"][:1],
                          "same_refused": a["refused"] == b["refused"],
                          "same_gate": (a.get("gate") or {}).get("outcome") == (b.get("gate") or {}).get("outcome"),
                          "same_route": (a.get("route") or {}).get("category") == (b.get("route") or {}).get("category"),
                          "gate_score_diff": abs(((a.get("gate") or {}).get("score") or 0.0)
                                                 - ((b.get("gate") or {}).get("score") or 0.0))})
    long = pd.DataFrame(rows)
    table = long.pivot_table(index=["set", "side", "metric", "n"], columns="engine",
                             values=["k", "rate", "ci_low", "ci_high"], aggfunc="first")
    table.columns = [f"{engine}_{what}" for what, engine in table.columns]
    table = table.reset_index()
    table["diff_points"] = 100 * (table["vllm_rate"] - table["catlens_rate"])
    run.save_table("table", table)
    pf = pd.DataFrame(pairs)
    summary = {"model": args.model, "policy": args.policy, "sets": args.sets, "n_prompts": len(pf),
               "engine_dtype": args.engine_dtype, "max_new_tokens": args.max_new_tokens,
               "same_tokens": float(pf.same_tokens.mean()), "same_first_token": float(pf.same_first_token.mean()),
               "same_refused": float(pf.same_refused.mean()), "same_gate": float(pf.same_gate.mean()),
               "same_route": float(pf.same_route.mean()), "max_gate_score_diff": float(pf.gate_score_diff.max()),
               "max_rate_diff_points": float(table["diff_points"].abs().max())}
    run.save_json("agreement", summary)
    run.finish()
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":  # vLLM's engine core is a spawned process
    raise SystemExit(main())
