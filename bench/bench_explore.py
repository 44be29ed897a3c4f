"""The explorer's first answer: seconds from creating the page's app (``Explorer`` + :func:`create_app`, which starts
preparing the map in the background) to the first request's unsteered answer on the page (``unsteered_s``: the page's
``shown`` is first set, ``"<job>:unsteered"``, or straight to both answers when the steered one is as quick), to both
answers (``answers_s``: ``shown`` is ``"<job>:answers"``, ``":map"`` or ``":failed"``) and to its map (``map_s``:
``":map"``), with a cold and a warm on-disk cache of the built-in prompts' activations. The request is sent at once
(the worst case: nothing of the map is ready yet) through the page's own callback
(:func:`catlens.explore.on_event`), without a browser.

Usage (loads the model: run it alone, under the CPU lock):
    flock /tmp/catlens-cpu.lock python bench/bench_explore.py --model ~/.cache/catlens/finetunes/refusal-default \\
        [--policy runs/p1/policies/categorical_youden] [--dtypes float32,auto] [--out runs/bench-explore]
Cases: with ``--policy``, the page's method is the policy as loaded (it needs nothing from the built-in prompts);
always also ``one_vs_benign`` directions (the page's default without a policy: the steered answer needs the built-in
train prompts' activations). Each case once per model dtype (``--dtypes``: float32, the baseline, and ``auto``, what
``catlens explore`` loads by default: bfloat16 where the CPU has it natively), all in one run. Writes
<out>/manifest.json and first_answer.csv (+ parquet) and prints the table.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "How does a phone's find-my-device feature locate a lost phone?"


def first_answer(model, policy, cache: Path, max_new_tokens: int, timeout: float = 1800.0) -> dict:
    from catlens.explore import Explorer, create_app, on_event

    t0 = time.perf_counter()
    ex = Explorer(model, policy, cache=cache)
    create_app(model, explorer=ex)
    created = time.perf_counter() - t0
    values = {**ex.defaults(), "prompt": PROMPT, "max_new_tokens": str(max_new_tokens)}
    out = on_event(ex, "run", values, None)
    if out.get("message"):
        raise RuntimeError(str(out["message"]))
    job, shown, unsteered, answers, map_s = out["job"], None, None, None, None
    try:
        while time.perf_counter() - t0 < timeout:
            out = on_event(ex, "poll", {}, job, shown)
            if out.get("message"):
                raise RuntimeError(str(out["message"]))
            shown = out.get("shown", shown)
            now = time.perf_counter() - t0
            view = shown.split(":")[1] if shown is not None else None
            if view is not None and unsteered is None:
                unsteered = now
            if view in ("answers", "map", "failed") and answers is None:
                answers = now
            if view in ("map", "failed"):
                map_s = now if view == "map" else None
                break
            time.sleep(0.05)
        else:
            raise TimeoutError(f"no map within {timeout} s")
        result = ex.status(job)["result"]
    finally:
        ex.close()
    return {"method": values["method"], "created_s": created, "unsteered_s": unsteered, "answers_s": answers,
            "map_s": map_s, "map": view, "generation_s": result["seconds"],
            "steered": result["steered"]["response"][:80]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--policy", default=None, help="a saved policy folder (adds the 'policy' cases)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--dtypes", default="float32,auto", help="model dtypes, comma-separated (default: %(default)s)")
    p.add_argument("--out", default="runs/bench-explore")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    import pandas as pd

    from catlens.model import load_model
    from catlens.runs import RunDir
    from catlens.steer import SteeringPolicy

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    run = RunDir.create(args.out, config=vars(args), overwrite=args.overwrite)
    policies = [None] if args.policy is None else [SteeringPolicy.load(args.policy), None]
    rows = []
    for asked in dtypes:
        model = load_model(args.model, dtype=asked)
        dtype = model.provenance["dtype"]
        run.record_model(model, role=f"model_{dtype}")
        for policy in policies:
            with tempfile.TemporaryDirectory(prefix="catlens-explore-cache-") as cache:
                for state in ("cold", "warm"):
                    row = {"dtype": dtype, "asked": asked, "cache": state,
                           **first_answer(model, policy, Path(cache), args.max_new_tokens)}
                    rows.append(row)
                    print(row, flush=True)
        del model
    table = pd.DataFrame(rows)
    run.save_table("first_answer", table)
    key = "{dtype}/{method}/{cache}"
    run.finish(unsteered_s={key.format(**r): round(r["unsteered_s"], 2) for r in rows},
               answers_s={key.format(**r): round(r["answers_s"], 2) for r in rows})
    print(table.round(2).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
