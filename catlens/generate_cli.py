"""``catlens generate``: the command line over :func:`catlens.generation.generate` and, with ``--engine vllm``,
:class:`catlens.engines.vllm.VLLMEngine` (kept apart from the generation loop, which the engines import)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from catlens.generation import generate
from catlens.steer import SteeringPolicy

CLI_UNOFFERED_JUDGES = ("llm",)
"""Judges ``catlens generate`` does not offer: they need a backend the command line has no flags for."""

def add_cli(sub: Any) -> None:
    """Register ``catlens generate`` on the CLI's subparsers."""
    import argparse

    from catlens.model import DEFAULT_MODEL, add_model_options

    p = sub.add_parser(
        "generate", help="generate answers, optionally steered by a saved policy, and judge them",
        description="Generate answers to a prompt file or dataset, steered by a saved policy (unsteered without\n"
                    "--policy). Writes <out>/generations.jsonl (resumable), <out>/responses.jsonl (the records plus\n"
                    "'refused' by the default judge) and <out>/rates.csv (refusal rate per label and category with\n"
                    "Wilson intervals).\n\nExamples:\n"
                    "  catlens generate --prompts builtin --split test --out runs/gen-unsteered\n"
                    "  catlens generate --model <tuned folder> --policy runs/sweep/policy --prompts xstest "
                    "--out runs/gen-xstest",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="embedded name, checkpoint folder or hub id")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--policy", default=None, help="a saved steering policy folder (SteeringPolicy.save)")
    p.add_argument("--transfer", action="store_true",
                   help="allow a policy made on another model of the same architecture")
    p.add_argument("--prompts", required=True, help="'builtin', a dataset name, or a .jsonl/.csv prompt file")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--split", default=None, help="only this split (train/val/test)")
    p.add_argument("--label", default=None, help="only this label (harmful/benign)")
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts (after filtering)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--judge", default=None, help="refusal_token | substring | logit_score (default: refusal_token "
                                                 "on refusal-token models, else substring)")
    p.add_argument("--out", required=True, help="output folder (rerun to resume)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--engine", default="catlens", help="catlens (default) | vllm (pip install 'catlens[vllm]')")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model with --engine vllm")
    add_model_options(p, dtype_aliases=("--engine-dtype",),
                      device_note="; with --engine vllm, vLLM computes on its own build's platform")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args: Any) -> int:
    import pandas as pd

    from catlens.judges import JUDGES, agreement_table, judge_records
    from catlens.metrics import rate_table
    from catlens.model import check_model_options, load_model, resolve_spec
    from catlens.datasets import load_prompts
    from catlens.runs import write_text_atomic

    # every cheap check before loading anything or creating a folder
    device, dtype = check_model_options(args)
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit {args.limit}: give a positive number of prompts.")
    if args.max_new_tokens < 1 or args.batch_size < 1:
        raise ValueError(f"--max-new-tokens {args.max_new_tokens} and --batch-size {args.batch_size} must be >= 1.")
    offered = [j for j in JUDGES if j not in CLI_UNOFFERED_JUDGES]
    if args.judge in CLI_UNOFFERED_JUDGES:
        raise ValueError(f"--judge {args.judge}: the {args.judge} judge needs a backend (a served model or an API), "
                         f"which the command line cannot set up; use one of {', '.join(offered)} here, and the "
                         f"{args.judge} judge from Python (catlens.judges.get_judge({args.judge!r}, ...)) on "
                         f"<out>/generations.jsonl.")
    if args.judge is not None and args.judge not in JUDGES:
        from catlens.errors import unknown_name_message

        raise ValueError(unknown_name_message("judge", args.judge, offered))
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {args.out!r} is a file; give a folder.")
    from catlens.engines import check_engine, engine_dtype

    check_engine(args.engine)

    from catlens.errors import check_writable_folder

    check_writable_folder(out, "--out")
    policy = SteeringPolicy.load(args.policy) if args.policy else None
    resolve_spec(args.model, args.cache_dir)
    prompts = load_prompts(args.prompts, data_dir=args.data_dir)
    if args.split:
        prompts = prompts.where(split=args.split)
    if args.label:
        prompts = prompts.where(label=args.label)
    items = list(prompts)[: args.limit] if args.limit else list(prompts)
    if not items:
        raise ValueError(f"no prompts left in {args.prompts!r} after --split {args.split} --label {args.label}.")
    if args.engine == "vllm":  # the same records and files from vLLM (catlens.engines.vllm)
        from catlens.engines.vllm import VLLMEngine

        engine = VLLMEngine(args.model, cache=args.cache_dir, dtype=engine_dtype(args.dtype),
                            tensor_parallel_size=args.tensor_parallel_size)
        model = engine.model
        records = engine.generate(items, policy, max_new_tokens=args.max_new_tokens, sample=args.sample,
                                  temperature=args.temperature, seed=args.seed, allow_transfer=args.transfer,
                                  out=out, overwrite=args.overwrite)
    else:
        model = load_model(args.model, cache=args.cache_dir, device=device, dtype=dtype)
        records = generate(model, items, policy, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                           sample=args.sample, temperature=args.temperature, seed=args.seed,
                           allow_transfer=args.transfer, out=out, overwrite=args.overwrite)
    from catlens.refusal import refusal_token_ids

    tokens, _ = refusal_token_ids(model)
    name = args.judge or ("refusal_token" if tokens is not None else "substring")
    # every judge that applies to this model runs; the default one fills 'refused', the others go into the
    # agreement table (percent agreement and Cohen's kappa)
    names = list(dict.fromkeys([name, *(["refusal_token", "logit_score"] if tokens is not None else []), "substring"]))
    judged = judge_records(records, names, options={"refusal_token": {"tokens": tokens}} if tokens is not None else {})
    verdicts = [bool(v) for v in judged[f"refused_{name}"]]
    lines = [json.dumps({**{k: v for k, v in r.items() if k != "seconds"}, "refused": v, "judge": name,
                         **{c: bool(judged[c].iloc[i]) for c in judged.columns if c.startswith("refused_")}})
             for i, (r, v) in enumerate(zip(records, verdicts))]
    write_text_atomic(out / "responses.jsonl", "\n".join(lines) + "\n")
    if len(names) > 1:
        agreement = agreement_table(judged)
        write_text_atomic(out / "judge_agreement.csv", agreement.to_csv(index=False))
    frame = pd.DataFrame({"label": [r["label"] or "unlabelled" for r in records],
                          "category": [r["category"] or "(none)" for r in records],
                          "dataset": [r["source"] or args.prompts for r in records], "refused": verdicts})
    labelled = frame[frame.label.isin(["harmful", "benign"])]
    if len(labelled):
        table = rate_table(labelled, value="refused", by=("dataset", "category"))
        write_text_atomic(out / "rates.csv", table.to_csv(index=False))
        shown = table[table["row"] != "group"][["side", "metric", "row", "n", "k", "rate", "interval"]]
        print(shown.to_string(index=False))
    print(f"{len(records)} answers ({sum(bool(v) for v in verdicts)} refused by {name}) -> {out}")
    return 0
