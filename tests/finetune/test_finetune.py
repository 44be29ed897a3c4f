"""Refusal-token fine-tuning: configs, data assembly, examples, schedule, initialisation, and end-to-end runs on a
tiny random Llama (new tokens, loss decrease, reload, determinism, resume, reuse) plus the bad-input errors."""

import json
import random
from collections import Counter

import pytest
import torch

from catlens.finetune import (
    CONFIGS,
    FinetuneConfig,
    TrainingData,
    assemble_data,
    build_examples,
    collate,
    default_name,
    finetune,
    get_config,
    make_schedule,
    prompt_form,
    prototype_rows,
    read_manifest,
)
from catlens.errors import NonFiniteLossError
from catlens.prompts import Prompt, PromptSet, check_leakage


# ------------------------------------------------------------------------------------------------- configs
def test_presets_validate_and_name():
    for name, cfg in CONFIGS.items():
        assert cfg.name == name
        assert default_name(cfg) == f"refusal-{name}"
    changed = get_config("quick", seed=3)
    assert default_name(changed) == f"refusal-quick-{changed.hash[:8]}" and changed.hash != CONFIGS["quick"].hash
    assert get_config("quick", steps=None) is CONFIGS["quick"]  # None overrides are ignored
    assert FinetuneConfig(name="x").hash == FinetuneConfig().hash  # the name does not change the result


def test_config_errors():
    with pytest.raises(ValueError, match="Did you mean: privacy"):
        FinetuneConfig(categories=("privcy",))
    with pytest.raises(ValueError, match="Did you mean: lora"):
        FinetuneConfig(method="lora2")
    with pytest.raises(ValueError, match="fine-tune config"):
        get_config("defualt")
    with pytest.raises(ValueError, match="FinetuneConfig field"):
        get_config("quick", stepz=3)
    with pytest.raises(ValueError, match="must be >= 1"):
        FinetuneConfig(steps=0)
    with pytest.raises(ValueError, match="coconot"):
        FinetuneConfig(scheme="coconot", categories=None, data="builtin")


def test_prompt_form():
    assert prompt_form("How do I bake bread?") == "question"
    assert prompt_form("Is it safe to swim after eating") == "question"
    assert prompt_form("Write a poem about the sea.") == "instruction"
    assert prompt_form("Write a poem.", {"form": "question"}) == "question"


# ---------------------------------------------------------------------------------------------------- data
def test_builtin_data_is_leak_free_and_balanced():
    cfg = CONFIGS["quick"]
    d = assemble_data(cfg)
    assert d.origin == "builtin" and set(d.categories) == set(cfg.categories)
    train_ids = set(d.harmful.ids) | set(d.benign.ids)
    for ps in d.eval_sets.values():
        assert not train_ids & set(ps.ids)
        check_leakage(d.harmful, ps)
        check_leakage(d.benign, ps)
    per_cat = {c: len(d.harmful.where(category=c)) for c in d.categories}
    assert set(per_cat.values()) == {cfg.max_per_category}
    mix = d.mix().set_index(["side", "form"])["share"]
    assert abs(mix["harmful", "question"] - mix["benign", "question"]) < 0.1  # form matched
    assert d.content_hash == assemble_data(cfg).content_hash  # deterministic


def _data_dir():
    from catlens.datasets import resolve_data_dir

    try:
        return resolve_data_dir()
    except FileNotFoundError:
        pytest.skip("benchmark data directory not found (set CATLENS_DATA_DIR or place shared/data beside the repo)")


@pytest.mark.parametrize("preset", ["default", "coconot"])
def test_dataset_presets_are_leak_free(preset):
    cfg = CONFIGS[preset]
    d = assemble_data(cfg, _data_dir())
    assert d.origin == "datasets" and d.categories == cfg.categories
    assert set(d.harmful.categories_of) == set(cfg.categories)
    assert max(Counter(d.harmful.categories_of).values()) <= cfg.max_per_category
    roles = Counter(p.meta["role"] for p in d.benign)
    assert roles["topic"] > 0 and roles["ordinary"] > 0
    train_ids = {(p.source, p.id) for p in d.harmful} | {(p.source, p.id) for p in d.benign}
    for name, ps in d.eval_sets.items():
        assert not train_ids & {(p.source, p.id) for p in ps}, name
        check_leakage(d.harmful, ps)
        check_leakage(d.benign, ps)
    if preset == "default":
        assert {"alpaca_test", "xstest_safe", "jbb_benign_test", "builtin_lookalike_test"} <= set(d.eval_sets)
        assert len(d.eval_sets["harmful_heldout"]) > 100


def test_too_few_prompts_in_a_category():
    with pytest.raises(ValueError, match="fewer than min_per_category=30"):
        assemble_data(get_config("quick", min_per_category=30, max_per_category=30))


# ------------------------------------------------------------------------------------------- pure pieces
def test_schedule_is_seeded_and_mixes_both_sides():
    sides = ["harmful"] * 40 + ["benign"] * 40
    a = make_schedule(sides, 25, 8, seed=1)
    assert a == make_schedule(sides, 25, 8, seed=1) and a != make_schedule(sides, 25, 8, seed=2)
    assert len(a) == 25 and all(len(b) == 8 for b in a)
    assert sorted(i for b in a[:10] for i in b) == list(range(80))  # the first epoch covers every example once
    for b in a:
        assert sum(sides[i] == "harmful" for i in b) == 4


def _tokenizer():
    from catlens.testing import make_tiny_tokenizer

    return make_tiny_tokenizer(("privacy",))  # ChatML, with [refuse:privacy] and [respond]


def test_build_examples_and_collate_positions():
    tok = _tokenizer()
    ex = build_examples(tok, [("a", "Hi?", "benign", None), ("b", "Find her address", "harmful", "privacy")],
                        [[100, 101], [7]], ["[respond]", "[refuse:privacy]"], max_length=64, end_ids=[None, None])
    resp, priv = tok.convert_tokens_to_ids("[respond]"), tok.convert_tokens_to_ids("[refuse:privacy]")
    assert ex[0].response_ids == (resp, 100, 101) and ex[1].response_ids[0] == priv
    assert tok.decode(ex[0].prompt_ids).endswith("<|im_start|>assistant\n")
    batch = collate(ex, first_token_weight=5.0, pad_id=tok.pad_token_id)
    for b, e in enumerate(ex):
        start = len(e.prompt_ids) - 1  # the position that predicts the first response token
        assert batch["labels"][b, start].item() == e.response_ids[0]
        assert batch["weights"][b, start].item() == 5.0 and batch["first"][b].nonzero().flatten().tolist() == [start]
        assert (batch["labels"][b] != -100).sum().item() == len(e.response_ids)
        assert batch["attention_mask"][b].sum().item() == len(e)
        assert batch["input_ids"][b, start + 1].item() == e.response_ids[0]


def test_prompt_longer_than_the_context():
    tok = _tokenizer()
    with pytest.raises(ValueError, match="too long"):
        build_examples(tok, [("long", "word " * 300, "benign", None)], [[1]], ["[respond]"], max_length=128)


def test_prototype_rows_scaling_identity():
    g = torch.Generator().manual_seed(0)
    hidden = {"a": torch.randn(6, 8, generator=g) + 3, "b": torch.randn(5, 8, generator=g) - 3}
    top = {"a": torch.full((6,), 20.0), "b": torch.full((5,), 10.0)}
    for contrast in (1.0, 4.0):
        rows = prototype_rows(hidden, top, contrast)
        for t in hidden:
            torch.testing.assert_close((hidden[t] @ rows[t]).mean(), top[t].mean())  # mean own logit = mean top
    plain = prototype_rows(hidden, top, 1.0)["a"]
    torch.testing.assert_close(plain / plain.norm(), hidden["a"].mean(0) / hidden["a"].mean(0).norm())
    # with an anchor the row is anchor + (a multiple of the prototype), still at the mean top logit
    anchor = torch.randn(8, generator=g)
    anchored = prototype_rows(hidden, top, 1.0, anchor)
    for t in hidden:
        torch.testing.assert_close((hidden[t] @ anchored[t]).mean(), top[t].mean())
    rest = anchored["a"] - anchor
    torch.testing.assert_close(rest / rest.norm(), plain / plain.norm())
    # an anchor that already is the top token there: the unanchored prototype row is added to it
    big = hidden["a"].mean(0) * 100
    torch.testing.assert_close(prototype_rows(hidden, top, 1.0, anchor=big)["a"] - big, plain, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------- end to end (tiny)
def _tiny_data() -> TrainingData:
    rng = random.Random(0)
    words = ["address", "phone", "password", "account", "server", "network", "email", "bank"]
    rows = []
    for cat, verb in (("privacy", "Find the home address of"), ("cybercrime", "Hack into the email of")):
        for i in range(6):
            rows.append(Prompt(f"h/{cat}/{i}", f"{verb} my neighbour {rng.choice(words)} {i}", "harmful", cat, "t"))
    benign = [Prompt(f"b/{i}", f"Write a short poem about {w} number {i}", "benign", None, "t", meta={"role": "x"})
              for i, w in enumerate(words + words[:4])]
    return TrainingData(harmful=PromptSet(rows, "harmful_train"), benign=PromptSet(benign, "benign_train"),
                        eval_sets={}, categories=("privacy", "cybercrime"), origin="test")


def _tiny_config(base, **kw) -> FinetuneConfig:
    opts = dict(name="tiny", base=str(base), data="builtin", categories=("privacy", "cybercrime"), min_per_category=2,
                max_per_category=6, answer_tokens=4, steps=8, batch_size=4, lr=3e-3, warmup_steps=1,
                prototype_prompts=4, checkpoint_every=2, max_length=192, max_prompt_tokens=128)
    opts.update(kw)
    return FinetuneConfig(**opts)


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.slow
def test_finetune_tiny_end_to_end(tiny_model_dir, tmp_path):
    from catlens.model import load_model
    from catlens.refusal import RefusalTokens

    cfg, data = _tiny_config(tiny_model_dir), _tiny_data()
    captured = {}
    probe = ["Find the home address of my neighbour bank 9", "Write a short poem about cats"]

    def grab(step, stats, model=None):
        captured.setdefault("log", []).append(stats)

    out = finetune(cfg, data=data, out=tmp_path / "a", cache=tmp_path / "cache", show_progress=False, callback=grab)
    manifest = read_manifest(out)
    assert manifest["config_hash"] == cfg.hash and manifest["data_hash"] == data.content_hash
    tokens = RefusalTokens.from_dict(manifest["tokens"])
    assert tokens.all_tokens == ("[refuse:privacy]", "[refuse:cybercrime]", "[respond]")

    # new tokens exist in the saved tokenizer and embedding; the model reloads through load_model
    m = load_model(out)
    assert RefusalTokens.from_model(m) == tokens
    from transformers import AutoTokenizer

    base_vocab = len(AutoTokenizer.from_pretrained(tiny_model_dir))  # the tiny model's own offline tokenizer
    assert m.hf.get_input_embeddings().weight.shape[0] == len(m.tokenizer) == base_vocab + 3
    assert m.provenance["source"]["finetune"]["config_hash"] == cfg.hash
    # the saved folder holds exactly the trained weights: the same training in memory (prepare + train, no
    # checkpoints) gives identical logits to a plain reload, and load_model's bridge agrees to float rounding
    from transformers import AutoModelForCausalLM

    from catlens.finetune import prepare, train

    prep = prepare(cfg, data, cache=tmp_path / "cache", show_progress=False)
    train(prep.model, prep.examples, cfg, special_ids=prep.special_ids, pad_id=prep.tokenizer.pad_token_id,
          show_progress=False)
    ids, mask = m.tokenize(m.format(probe))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.inference_mode():
        in_memory = prep.model(input_ids=ids, attention_mask=mask).logits[:, -1]
        assert torch.equal(in_memory, plain(input_ids=ids, attention_mask=mask).logits[:, -1])
    torch.testing.assert_close(m.logits(probe), in_memory, rtol=0, atol=1e-5)
    assert m.format(["x"])[0].endswith("<|im_start|>assistant\n")

    # loss decreases (mean of the last 3 steps below the first 3)
    losses = [r["loss"] for r in captured["log"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    # same seed -> identical weights; a rerun with the same config and data reuses the folder
    again = finetune(cfg, data=data, out=tmp_path / "b", cache=tmp_path / "cache", show_progress=False)
    wa, wb = _weights(out), _weights(again)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert finetune(cfg, data=data, out=out, cache=tmp_path / "cache", show_progress=False) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # a different seed gives different weights
    other = finetune(_tiny_config(tiny_model_dir, seed=1), data=data, out=tmp_path / "c", cache=tmp_path / "cache",
                     show_progress=False)
    wc = _weights(other)
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


class _Interrupt(Exception):
    pass


class _NotTensors:
    """Anything that is not a tensor, a number or a string: a weights-only load refuses to build it."""


def test_resume_reads_the_checkpoint_weights_only(tiny_model_dir, tmp_path):
    cfg, data = _tiny_config(tiny_model_dir, steps=4), _tiny_data()

    def crash(step, stats):
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(cfg, data=data, out=tmp_path / "cut", cache=tmp_path / "cache", show_progress=False, callback=crash)
    ckpt = tmp_path / ".cut.work" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)  # what the trainer writes loads without unpickling code
    assert state["step"] == 2 and set(state) == {"run_key", "step", "log", "optimizer", "params"}
    torch.save({**state, "extra": _NotTensors()}, ckpt)
    with pytest.raises(ValueError, match=r"checkpoint .*checkpoint.pt' holds more than tensors and numbers.*--overwrite"):
        finetune(cfg, data=data, out=tmp_path / "cut", cache=tmp_path / "cache", show_progress=False, resume=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "last-k", "lora"])
def test_resume_after_interruption_gives_the_same_weights(tiny_model_dir, tmp_path, method):
    cfg, data = _tiny_config(tiny_model_dir, method=method, steps=6), _tiny_data()
    whole = finetune(cfg, data=data, out=tmp_path / "whole", cache=tmp_path / "cache", show_progress=False)

    def crash(step, stats):
        if step == 3:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        finetune(cfg, data=data, out=tmp_path / "cut", cache=tmp_path / "cache", show_progress=False, callback=crash)
    work = tmp_path / ".cut.work"
    assert (work / "checkpoint.pt").exists() and not (tmp_path / "cut").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        finetune(cfg, data=data, out=tmp_path / "cut", cache=tmp_path / "cache", show_progress=False)
    resumed = finetune(cfg, data=data, out=tmp_path / "cut", cache=tmp_path / "cache", show_progress=False,
                       resume=True)
    manifest = read_manifest(resumed)
    assert manifest["training"]["resumed_from_step"] == 2
    wa, wb = _weights(whole), _weights(resumed)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not work.exists()


@pytest.mark.slow
def test_last_k_trains_only_the_last_blocks_and_the_new_rows(tiny_model_dir, tmp_path):
    from catlens.finetune import prepare, train

    cfg, data = _tiny_config(tiny_model_dir, method="last-k", last_k=1, steps=4), _tiny_data()
    prep = prepare(cfg, data, cache=tmp_path / "cache", show_progress=False)
    before = {n: p.detach().clone() for n, p in prep.model.named_parameters()}
    train(prep.model, prep.examples, cfg, special_ids=prep.special_ids, pad_id=prep.tokenizer.pad_token_id,
          show_progress=False)
    after = dict(prep.model.named_parameters())
    emb = "model.embed_tokens.weight"
    new = sorted(prep.special_ids)
    old = [i for i in range(before[emb].shape[0]) if i not in set(new)]
    assert torch.equal(after[emb][old], before[emb][old])  # old vocabulary rows: exactly unchanged
    assert not torch.equal(after[emb][new], before[emb][new])  # the new token rows learnt
    for n in before:
        if n.startswith("model.layers.0."):
            assert torch.equal(after[n], before[n]), n  # frozen block: exactly unchanged
    assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith("model.layers.1."))


def test_existing_output_folder_needs_overwrite(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "something.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        finetune(_tiny_config("smollm2-135m-instruct"), data=_tiny_data(), out=out, cache=tmp_path / "cache",
                 show_progress=False)


def test_cli_registers_finetune():
    import argparse

    from catlens.cli import _add_finetune_parser, _cmd_finetune

    parser = argparse.ArgumentParser()
    _add_finetune_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", "--config", "quick", "--method", "lora", "--steps", "3", "--overwrite"])
    assert (args.config, args.method, args.steps, args.overwrite, args.func) == ("quick", "lora", 3, True,
                                                                                _cmd_finetune)
    from catlens.finetune import parse_overrides

    assert parse_overrides(["lr=1e-4", "prototype_anchor=null", "base=some/folder", "categories=[\"privacy\"]"]) \
        == {"lr": 1e-4, "prototype_anchor": None, "base": "some/folder", "categories": ("privacy",)}
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["lr"])
    with pytest.raises(ValueError, match="Did you mean: steps"):
        _cmd_finetune(parser.parse_args(["finetune", "--set", "stepz=3"]))
    bad = parser.parse_args(["finetune", "--categories", "privacy,privcy"])
    with pytest.raises(ValueError, match="Did you mean: privacy"):
        _cmd_finetune(bad)


# ------------------------------------------------------------------------------------------ bad inputs (issue 12)
@pytest.mark.parametrize("field, value, expected", [
    ("lr", float("inf"), "non-finite"), ("lr", float("nan"), "non-finite"), ("new_token_lr", float("inf"), "non-finite"),
    ("lr", 3.0, r"in \(0, 1.0\]"), ("lora_alpha", float("inf"), "non-finite"), ("first_token_weight", -1.0, "> 0"),
    ("prototype_contrast", float("nan"), "non-finite"),
])
def test_config_rejects_non_finite_and_out_of_range_numbers_at_construction(field, value, expected):
    with pytest.raises(ValueError, match=expected) as err:
        FinetuneConfig(**{field: value})
    assert f"FinetuneConfig.{field}" in str(err.value)


@pytest.mark.parametrize("field, value, expected", [
    ("steps", 2.7, "expected an integer"), ("steps", "abc", "expected an integer"), ("lr", "abc", "finite number"),
    ("single_token", 1, "true or false"), ("categories", "privacy", "list of names"), ("seed", True, "integer"),
])
def test_config_field_types(field, value, expected):
    # FinetuneConfig.__post_init__ runs check_value on every field (under the test suite's runtime type checker
    # a wrong type is already refused by the generated __init__)
    from catlens.finetune import check_value

    with pytest.raises(ValueError, match=expected) as err:
        check_value(field, value)
    assert f"FinetuneConfig.{field}={value!r}" in str(err.value)
    assert check_value("steps", 3.0) == 3 and check_value("categories", ["privacy"]) == ("privacy",)


@pytest.mark.parametrize("item, expected", [
    ("lr=Infinity", "FinetuneConfig.lr=inf: expected a finite number or null (got a non-finite number)"),
    ("lr=abc", "FinetuneConfig.lr='abc': expected a finite number or null"),
    ("steps=abc", "FinetuneConfig.steps='abc': expected an integer"),
    ("steps=2.7", "FinetuneConfig.steps=2.7: expected an integer"),
    ("match_form=yes", "FinetuneConfig.match_form='yes': expected true or false"),
])
def test_set_overrides_are_typed_at_parse_time(item, expected):
    from catlens.finetune import parse_overrides

    with pytest.raises(ValueError) as err:
        parse_overrides([item])
    assert expected in str(err.value) and f"--set {item!r}" in str(err.value)
    assert parse_overrides(["steps=3", "lr=1e-4", "steps=4.0"]) == {"steps": 4, "lr": 1e-4}


def test_cli_bad_set_fails_before_any_work(monkeypatch, capsys):
    from catlens import cli
    from catlens.finetune import run

    def boom(*a, **k):
        raise AssertionError("finetune must not start")

    monkeypatch.setattr(run, "finetune", boom)
    monkeypatch.setattr("catlens.finetune.finetune", boom)
    for item, expected in (("lr=Infinity", "non-finite"), ("lr=abc", "expected a finite number"),
                           ("steps=2.7", "expected an integer")):
        assert cli.main(["finetune", "--config", "quick", "--set", item]) == 2
        err = capsys.readouterr().err
        assert expected in err and "FinetuneConfig." in err and "Traceback" not in err


def test_missing_data_dir_fails_first_and_creates_nothing(tmp_path):
    cfg = CONFIGS["default"]  # data="auto": a missing explicit folder used to warn and fall back to the built-in set
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        finetune(cfg, data_dir="/nonexistent", out=tmp_path / "out", cache=tmp_path / "cache", show_progress=False)
    with pytest.raises(FileNotFoundError, match="/nonexistent"):
        assemble_data(cfg, "/nonexistent")
    with pytest.raises(FileNotFoundError, match="/nonexistent"):  # data="builtin" ignores it: still a typo to report
        finetune(CONFIGS["quick"], data_dir="/nonexistent", out=tmp_path / "q", cache=tmp_path / "cache",
                 show_progress=False)
    assert list(tmp_path.iterdir()) == []


def test_missing_base_fails_first_and_leaves_no_work_folder(tmp_path):
    cfg = _tiny_config("/nonexistent/model")
    with pytest.raises(FileNotFoundError, match="/nonexistent/model"):
        finetune(cfg, data=_tiny_data(), out=tmp_path / "x", cache=tmp_path / "cache", show_progress=False)
    assert not (tmp_path / ".x.work").exists() and not (tmp_path / "x").exists()


def test_unavailable_device_fails_first(tmp_path):
    from catlens.finetune import check_inputs

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    cfg = _tiny_config("smollm2-135m-instruct", device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        check_inputs(cfg)
    with pytest.raises(ValueError, match="Did you mean: float16"):
        FinetuneConfig(dtype="float61")
    with pytest.raises(ValueError, match="not a torch device"):
        FinetuneConfig(device="gpu0")


def test_config_hash_is_stable_and_device_free():
    # hashes of the presets before device/dtype existed: cached fine-tunes must keep matching their config
    assert CONFIGS["default"].hash == "7bd46d902b86a2d6ab75de3b105920bb43a8bb6e7586cac5ffe2383293817e9b"
    assert CONFIGS["quick"].hash == "558fcb12e6590104bf7dc88866c41e35a8cc98b86997db1113aeb6308f161313"
    assert get_config("quick", device="cuda").hash == CONFIGS["quick"].hash
    assert get_config("quick", dtype="bfloat16").hash != CONFIGS["quick"].hash


def test_legacy_manifest_still_reads_and_reuses(tmp_path):
    from catlens.finetune import ensure_refusal_model, read_manifest

    cfg = CONFIGS["quick"]
    folder = tmp_path / "finetunes" / default_name(cfg)
    folder.mkdir(parents=True)
    (folder / "catlens_finetune.json").write_text(json.dumps({"config_hash": cfg.hash, "data_hash": "d"}))
    assert read_manifest(folder)["config_hash"] == cfg.hash
    assert ensure_refusal_model(cfg, tmp_path, show_progress=False) == folder  # reused, not retrained
    # a new-format folder: RunDir manifest with the record under "finetune"
    new = tmp_path / "new"
    new.mkdir()
    (new / "manifest.json").write_text(json.dumps({"status": "done", "finetune": {"config_hash": "h"}}))
    assert read_manifest(new) == {"config_hash": "h"} and read_manifest(tmp_path) is None


def test_configure_process(monkeypatch):
    from catlens.runs import configure_process

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert configure_process()["threads"] == 1 == torch.get_num_threads()
        assert configure_process(threads=2, seed=5) == {"threads": 2, "seed": 5}
        a = torch.rand(3)
        configure_process(seed=5)
        assert torch.equal(a, torch.rand(3))
        monkeypatch.setenv("OMP_NUM_THREADS", "x")
        with pytest.raises(ValueError, match="OMP_NUM_THREADS"):
            configure_process()
        with pytest.raises(ValueError, match="threads=0"):
            configure_process(threads=0)
    finally:
        torch.set_num_threads(before)


def test_geometry_no_longer_sets_threads():
    import catlens.geometry as G

    assert not hasattr(G, "limit_threads")


# --------------------------------------------------------------------------------- training-run safety (tiny)
@pytest.mark.slow
def test_non_finite_loss_stops_the_run_naming_the_step(tiny_model_dir, tmp_path, monkeypatch):
    import catlens.finetune.training as T

    real = T.response_loss
    calls = {"n": 0}

    def poisoned(model, batch, special_ids, **kw):
        loss, stats = real(model, batch, special_ids, **kw)
        calls["n"] += 1
        if calls["n"] == 3:
            loss = loss * float("nan")
            stats = {**stats, "loss": float("nan")}
        return loss, stats

    monkeypatch.setattr(T, "response_loss", poisoned)
    cfg = _tiny_config(tiny_model_dir, steps=5, checkpoint_every=0)
    with pytest.raises(NonFiniteLossError, match="at step 3 of 5"):
        finetune(cfg, data=_tiny_data(), out=tmp_path / "nan", cache=tmp_path / "cache", show_progress=False)
    assert not (tmp_path / "nan").exists()
    assert not (tmp_path / ".nan.work").exists()  # no checkpoint was written: nothing is left to resume


@pytest.mark.slow
def test_library_leaves_threads_alone_and_stale_work_folder_is_cleared(tiny_model_dir, tmp_path):
    cfg = _tiny_config(tiny_model_dir, steps=2, checkpoint_every=0)
    work = tmp_path / ".out.work"
    work.mkdir()
    (work / "run.json").write_text("{}")  # left by a run that failed before its first checkpoint
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = finetune(cfg, data=_tiny_data(), out=tmp_path / "out", cache=tmp_path / "cache", show_progress=False)
        assert torch.get_num_threads() == 1  # the fine-tune sets no process-wide threads
    finally:
        torch.set_num_threads(before)
    manifest = json.loads((out / "manifest.json").read_text())  # a RunDir manifest
    assert manifest["status"] == "done" and manifest["seed"] == cfg.seed
    assert manifest["finetune"]["config_hash"] == cfg.hash
    assert "model.safetensors" in manifest["outputs"] and not work.exists()


@pytest.mark.slow
def test_lora_uses_peft_trains_and_round_trips(tiny_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from catlens.finetune import merge_lora, prepare, train

    cfg, data = _tiny_config(tiny_model_dir, method="lora", lora_rank=4, steps=4), _tiny_data()
    prep = prepare(cfg, data, cache=tmp_path / "cache", show_progress=False)
    assert isinstance(prep.model, PeftModel)
    lora = {n: p.detach().clone() for n, p in prep.model.named_parameters() if "lora_" in n}
    frozen = {n: p.detach().clone() for n, p in prep.model.named_parameters()
              if "lora_" not in n and "embed_tokens" not in n}
    assert lora and all(n in prep.trainable for n in lora)
    # A from a seeded generator: the same seed gives the same adapters whatever the global random state
    torch.manual_seed(1234)
    again = prepare(cfg, data, cache=tmp_path / "cache", show_progress=False)
    assert all(torch.equal(p, lora[n]) for n, p in again.model.named_parameters() if "lora_" in n)
    result = train(prep.model, prep.examples, cfg, special_ids=prep.special_ids,
                   pad_id=prep.tokenizer.pad_token_id, show_progress=False)
    after = dict(prep.model.named_parameters())
    assert any(not torch.equal(after[n], lora[n]) for n in lora if "lora_B" in n)  # the adapters learnt
    assert all(torch.equal(after[n], frozen[n]) for n in frozen)  # the base weights did not
    assert result.log[-1]["loss"] < result.log[0]["loss"]
    # merged and saved: a reload gives the in-memory adapted model's logits
    ids = torch.tensor([list(prep.examples[0].prompt_ids)])
    with torch.inference_mode():
        adapted = prep.model(input_ids=ids).logits
    merged = merge_lora(prep.model)
    assert not isinstance(merged, PeftModel)
    merged.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert not any("lora" in k for k in reloaded.state_dict())
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, adapted, rtol=0, atol=1e-4)


@pytest.mark.gpu
def test_finetune_tiny_on_cuda(tiny_model_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from catlens.model import load_model

    cfg = _tiny_config(tiny_model_dir, device="cuda", steps=3, checkpoint_every=2)
    out = finetune(cfg, data=_tiny_data(), out=tmp_path / "gpu", cache=tmp_path / "cache", show_progress=False)
    assert read_manifest(out)["config_hash"] == cfg.hash
    m = load_model(out, device="cuda")
    assert m.device.type == "cuda" and torch.isfinite(m.logits(["Hi"])).all()
    lora = finetune(_tiny_config(tiny_model_dir, device="cuda", dtype="bfloat16", method="lora", steps=2),
                    data=_tiny_data(), out=tmp_path / "gpu-lora", cache=tmp_path / "cache", show_progress=False)
    assert (lora / "model.safetensors").exists()


@pytest.mark.slow
def test_generic_module_access(tiny_model_dir):
    from catlens.finetune.surgery import final_norm
    from catlens.model import decoder_blocks, load_model

    m = load_model(tiny_model_dir)
    assert len(m.blocks()) == m.n_layers == 2 and m.blocks() is decoder_blocks(m.hf)
    assert m.unembed() is m.hf.get_output_embeddings()
    assert final_norm(m.hf) is m.hf.get_decoder().norm


def test_a_live_runs_work_folder_is_never_removed(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from catlens.finetune import ensure_refusal_model

    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        cfg = _tiny_config("smollm2-135m-instruct")
        work = tmp_path / ".x.work"
        work.mkdir()
        (work / "owner.json").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(FileExistsError, match=f"pid {other.pid}"):
            finetune(cfg, data=_tiny_data(), out=tmp_path / "x", cache=tmp_path / "cache", show_progress=False)
        quick = tmp_path / "cache" / "finetunes" / ".refusal-quick.work"
        quick.mkdir(parents=True)
        (quick / "owner.json").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname()}))
        with pytest.raises(FileExistsError, match=f"pid {other.pid}"):
            ensure_refusal_model("quick", tmp_path / "cache", show_progress=False)
        assert work.exists() and quick.exists()
    finally:
        other.kill()
        other.wait()
    assert os.getpid() != other.pid
