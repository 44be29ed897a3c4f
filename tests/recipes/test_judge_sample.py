"""catlens.recipes.judge_sample (the steps of analyses/judge_sample.py) without a model: the sample drawn from
generation folders on disk, and the seeded prompt draw of the generated sample."""

import argparse
import json

import pytest

from catlens.judges import label_split
from catlens.recipes.judge_sample import draw_from_generations, draw_prompts, own_prompts, source_of, stratified


def write_gen(folder, model, records):
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"config": {"model": model, "max_new_tokens": 64}}))
    (folder / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_judge_sample_draws_new_pairs_from_generation_folders(tmp_path):
    from catlens.datasets import load_prompts
    from catlens.model import DEFAULT_MODEL

    prompts = own_prompts()
    builtin = list(load_prompts("builtin"))
    a, b = builtin[0], builtin[1]
    wrapped = next(p for p in prompts.values() if p.id.endswith("+role_play"))

    def g(p, resp, text=None):
        return {"id": p.id, "prompt": text or p.text, "response": resp}

    gen = tmp_path / "gen"
    # the steered folder sorts before the unsteered one by name, but unsteered folders are read first
    write_gen(gen / "stock_alpha", DEFAULT_MODEL, [g(a, "same"), g(a, "other"), g(b, "labelled before")])
    write_gen(gen / "stock_unsteered", DEFAULT_MODEL, [g(a, "same"), g(b, "b text", text="edited prompt")])
    write_gen(gen / "test_alpha", "/cache/finetunes/refusal-default",
              [g(a, "same"), g(a, "tuned"), {"id": "xstest/1", "prompt": "x", "response": "y"}, g(wrapped, "w")])
    write_gen(gen / "val_alpha", "refusal-default", [g(a, "a second answer under the same id")])
    labelled = [{"id": "m|none|x", "prompt_id": b.id, "response": "labelled before"}]
    rows, skipped = draw_from_generations(str(gen), labelled, prompts)
    assert [(r["id"], r["response"]) for r in rows] == [
        (f"stock|none|{a.id}", "same"), (f"stock|alpha|{a.id}", "other"),
        (f"refusal-default|alpha|{a.id}", "tuned"), (f"refusal-default|alpha|{wrapped.id}", "w")]
    # "same" is stored once (any model, any policy); the val folder's answer would repeat the test folder's id
    assert skipped == {"not_own_prompt": 1, "prompt_text_differs": 1, "already_labelled": 1, "repeat": 2,
                       "id_taken": 1}
    assert all(r["label"] == "" and r["split"] == label_split(r["id"]) and r["max_new_tokens"] == 64
               for r in rows)
    assert rows[3]["prompt"] == wrapped.text and rows[3]["prompt_id"] == wrapped.id
    capped, _ = draw_from_generations(str(gen), labelled, prompts, max_per_source=1, seed=3)
    assert capped == draw_from_generations(str(gen), labelled, prompts, max_per_source=1, seed=3)[0]
    assert sorted(f"{r['model']}|{r['policy']}" for r in capped) == ["refusal-default|alpha", "stock|alpha",
                                                                      "stock|none"]
    with pytest.raises(FileNotFoundError, match="no <folder>/generations.jsonl"):
        draw_from_generations(str(tmp_path / "empty"), [], prompts)


def test_source_of_names_model_and_policy_by_folder():
    from catlens.model import DEFAULT_MODEL

    assert source_of("stock_unsteered", {"config": {"model": DEFAULT_MODEL}}) == ("stock", "none")
    assert source_of("val_categorical", {"config": {"model": "/x/refusal-default"}}) == ("refusal-default",
                                                                                         "categorical")
    assert source_of("other", {"config": {"model": "m"}}) == ("m", "other")
    with pytest.raises(ValueError, match="names no config.model"):
        source_of("val_x", {"config": {}})


def sample_args(**kw):
    base = {"seed": 0, "per_category": 2, "ordinary": 3, "steered_per_category": 3, "stock": 4}
    return argparse.Namespace(**{**base, **kw})


def test_draw_prompts_is_seeded_stratified_and_keeps_the_steered_prompts_apart():
    from catlens.datasets import load_prompts

    prompts = load_prompts("builtin")
    chosen = draw_prompts(prompts, sample_args())
    assert chosen.keys() == {"plain", "away", "toward", "stock"}
    assert {k: [p.id for p in v] for k, v in chosen.items()} == {
        k: [p.id for p in v] for k, v in draw_prompts(prompts, sample_args()).items()}
    assert [p.id for p in chosen["plain"]] != [p.id for p in draw_prompts(prompts, sample_args(seed=1))["plain"]]
    plain = {p.id for p in chosen["plain"]}
    assert not plain & {p.id for p in chosen["away"] + chosen["toward"]}  # steered prompts are new prompts
    harmful_cats = {p.category for p in prompts if p.label == "harmful"}
    plain_harmful = [p for p in chosen["plain"] if p.label == "harmful"]
    assert len(plain_harmful) == 2 * len(harmful_cats)  # per_category of every category
    assert sum(p.meta.get("kind") == "ordinary" for p in chosen["plain"]) == 3
    assert all(p.label == "harmful" for p in chosen["away"])
    assert all(p.label == "benign" for p in chosen["toward"])
    assert [p.label for p in chosen["stock"]] == ["harmful"] * 4 + ["benign"] * 4


def test_stratified_takes_n_per_category_and_skips_excluded():
    import numpy as np

    from catlens.datasets import load_prompts

    harmful = [p for p in load_prompts("builtin") if p.label == "harmful"]
    first = harmful[0]
    out = stratified(harmful, 1, np.random.default_rng(0), exclude={first.id})
    assert first.id not in {p.id for p in out}
    assert sorted(p.category for p in out) == sorted({p.category for p in harmful})
