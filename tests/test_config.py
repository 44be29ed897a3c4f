"""The main job's configuration (catlens/config.py): files, --set typing, round trips and the errors for bad keys
and values; the shorthand flags of the main job (catlens/pipeline.py, analyses/main.py)."""

import dataclasses
import importlib.util
import tomllib
from pathlib import Path

import pytest

from _scripts import load_main
from catlens.config import (
    SECTIONS,
    Config,
    args_to_argv,
    from_dict,
    parse_sets,
    resolve,
    to_toml,
    valid_keys,
)
from catlens.errors import ConfigError, FileFormatError
from catlens.pipeline import SHORTHANDS, resolve_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _rich() -> Config:
    """A config that differs from the defaults in every kind of field."""
    return resolve(sets=[
        "model.spec=runs/ft/a model", "model.other_model=stock", "model.device=cuda:1", "model.dtype=bfloat16",
        "model.cache_dir=/tmp/c", "data.data_dir=/data", "data.per_set=7", "data.per_category=3",
        "data.prompts_per_group=4", "run.out=runs/x", "run.seed=9", "run.threads=1", "run.png=false",
        "run.stock=true", "finetune.config=quick", "finetune.overrides.steps=60", "finetune.overrides.lr=0.0003",
        'finetune.overrides.categories=["privacy", "fraud_financial_crime"]',
        "eval.enabled=false", "eval.args.per-set=5", "geometry.layers=1-3", "geometry.tsne_layers=none",
        "geometry.directions=p1,p2_generic", "p1.args.coeffs=[0.1, 0.25]", "p1.args.gate=true",
        'p1.args.title=say "hi" \\ — ü', 'p1.args.nested={"a": 1, "b": [true, false]}', "p2.enabled=false"])


# ----------------------------------------------------------------------------------------------- shipped files
def test_default_file_is_the_builtin_default():
    assert resolve(CONFIGS / "default.toml") == Config()


def test_quick_file_is_the_quick_flag():
    q = resolve(CONFIGS / "quick.toml")
    assert q == resolve(sets=["run.quick=true", "run.out=runs/main-quick"])
    assert (q.run.quick, q.finetune.config, q.data.per_category, q.data.per_set) == (True, "quick", 5, 30)
    assert q.p1.args["layers"] == "21" and q.eval.args == {"gen-per-set": 8} and q.geometry.tsne_layers == "none"
    assert Config().finetune.config == "default" and Config().data.per_category == 20


def test_gpu_example_file():
    g = resolve(CONFIGS / "gpu-8b.toml")
    assert (g.model.device, g.model.dtype) == ("cuda", "bfloat16")
    assert g.model.spec and "8b" in g.model.spec.lower() and g.model.other_model


# -------------------------------------------------------------------------------------------------- round trips
def test_toml_round_trip(tmp_path):
    cfg = _rich()
    assert cfg != Config()
    text = to_toml(cfg, header="a header\nsecond line")
    assert from_dict(tomllib.loads(text)) == cfg
    (tmp_path / "c.toml").write_text(text)
    again = resolve(tmp_path / "c.toml")
    assert again == cfg and again.hash == cfg.hash
    assert to_toml(again) == to_toml(cfg)
    # unset optional fields are left out (they are the defaults) and read back as None
    plain = to_toml(Config())
    assert "# spec = (unset)" in plain and resolve(sets=["model.spec=null"]) == Config()


def test_yaml_round_trip(tmp_path):
    yaml = pytest.importorskip("yaml")
    cfg = _rich()
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg.to_dict(), allow_unicode=True))
    assert resolve(tmp_path / "c.yaml") == cfg
    (tmp_path / "d.yml").write_text("run:\n  seed: 4\nmodel:\n  spec: null\n")
    d = resolve(tmp_path / "d.yml")
    assert d.run.seed == 4 and d == Config().replace(run=dataclasses.replace(Config().run, seed=4))
    (tmp_path / "e.yaml").write_text("")  # an empty file is the defaults
    assert resolve(tmp_path / "e.yaml") == Config()


def test_tree_is_frozen():
    cfg = _rich()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.seed = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.p1.args["gate"] = False  # type: ignore[index]
    assert set(SECTIONS) >= {"model", "data", "run", "finetune", "eval", "geometry", "p1", "p2", "specificity"}
    for name in ("finetune", "eval", "geometry", "p1", "p2", "specificity", "figures", "report"):
        assert getattr(cfg, name).__dataclass_fields__["enabled"].default is True


def test_optional_fields_default_to_none():
    """The TOML writer leaves None out; that round-trips only because every optional field defaults to None."""
    import typing

    for section in SECTIONS:
        cls = type(getattr(Config(), section))
        for f in dataclasses.fields(cls):
            if type(None) in typing.get_args(typing.get_type_hints(cls)[f.name]):
                assert f.default is None, f"{section}.{f.name}"


# ------------------------------------------------------------------------------------------------ --set typing
@pytest.mark.parametrize("item, key, expected", [
    ("run.seed=3", "run.seed", 3),
    ("run.threads=null", "run.threads", None),
    ("run.png=false", "run.png", False),
    ("run.png=True", "run.png", True),
    ("model.spec=123", "model.spec", "123"),  # a text field keeps the text
    ('model.spec="quoted"', "model.spec", "quoted"),
    ("model.spec=none", "model.spec", None),
    ("run.out=runs/a=b", "run.out", "runs/a=b"),  # only the first '=' splits
    ("data.per_set=4.0", "data.per_set", 4),  # an integral number is an integer
    ("geometry.directions=p1, p2_generic", "geometry.directions", ("p1", "p2_generic")),
    ('geometry.directions=["p1"]', "geometry.directions", ("p1",)),
    ("geometry.directions=[]", "geometry.directions", ()),
    ("p1.args.layers=10-20", "p1.args", {"layers": "10-20"}),
    ("p1.args.coeff=0.25", "p1.args", {"coeff": 0.25}),
    ("p1.args.gate=true", "p1.args", {"gate": True}),
    ("p1.args.coeffs=[0.1, 0.2]", "p1.args", {"coeffs": [0.1, 0.2]}),
    ("finetune.overrides.steps=60", "finetune.overrides", {"steps": 60}),
    ("finetune.overrides.prototype_anchor=null", "finetune.overrides", {"prototype_anchor": None}),
])
def test_set_values_are_typed_by_field(item, key, expected):
    cfg = resolve(sets=[item])
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    if hasattr(value, "items"):  # a map merges over its default (the demo sizes of p1.args)
        from catlens.config import DEMO_ARGS

        expected = {**DEMO_ARGS.get(section, {}), **expected} if name == "args" else expected
    assert (dict(value) if hasattr(value, "items") else value) == expected
    assert type(dict(value) if hasattr(value, "items") else value) is type(expected)


def test_parse_sets_pairs():
    assert parse_sets(["run.seed=3", "p1.args.gate=true", "model.spec=a=b"]) == [
        ("run.seed", 3), ("p1.args.gate", True), ("model.spec", "a=b")]


def test_later_layers_win(tmp_path):
    (tmp_path / "c.toml").write_text("[run]\nseed = 1\nout = 'from-file'\n[p1.args]\na = 1\nb = 2\n")
    cfg = resolve(tmp_path / "c.toml", sets=["run.seed=3", "run.seed=4", "p1.args.b=5"],
                  shorthands=[("run.seed", 2), ("run.out", "flag")])
    assert (cfg.run.seed, cfg.run.out) == (4, "flag")
    from catlens.config import DEMO_ARGS

    demo = DEMO_ARGS["p1"]
    assert dict(cfg.p1.args) == {**demo, "a": 1, "b": 5}  # a sub-key merges into the file's table
    # a table replaces the file's table; the defaults stay under it
    assert dict(resolve(tmp_path / "c.toml", sets=['p1.args={"c": 1}']).p1.args) == {**demo, "c": 1}
    # quick defaults sit under the file: an explicit preset in the file stays
    (tmp_path / "q.toml").write_text("[run]\nquick = true\n[finetune]\nconfig = 'default'\n")
    q = resolve(tmp_path / "q.toml")
    assert (q.finetune.config, q.data.per_category) == ("default", 5)


def test_main_shorthands_map_onto_keys():
    cfg = resolve_args(["--quick", "--no-png", "--device", "cuda", "--dtype", "float16", "--out", "o",
                             "--seed", "4", "--threads", "1", "--model", "m", "--other-model", "s", "--stock",
                             "--cache-dir", "c", "--data-dir", "d", "--set", "run.seed=5"])
    assert (cfg.run.quick, cfg.run.png, cfg.model.device, cfg.model.dtype, cfg.run.out, cfg.run.threads) == \
        (True, False, "cuda", "float16", "o", 1)
    assert (cfg.model.spec, cfg.model.other_model, cfg.run.stock, cfg.model.cache_dir, cfg.data.data_dir) == \
        ("m", "s", True, "c", "d")
    assert cfg.run.seed == 5  # --set comes after the shorthands
    assert resolve_args([]) == Config()
    assert set(SHORTHANDS.values()) <= {k for k in valid_keys()}


def test_args_to_argv():
    assert args_to_argv({"per_set": 10, "gate": True, "off": False, "none": None, "coeffs": [0.1, 0.2],
                         "--raw": "x"}) == ["--per-set", "10", "--gate", "--coeffs", "0.1,0.2", "--raw", "x"]


# --------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("item, needles", [
    ("eval.batch_sise=8", ["Unknown config key 'eval.batch_sise'", "Did you mean: eval.batch_size", "Allowed:",
                           "run.seed"]),
    ("evl.enabled=false", ["Unknown config key 'evl.enabled'", "Did you mean: eval.enabled"]),
    ("p1.enable=false", ["Did you mean: p1.enabled"]),
    ("seed=3", ["Unknown config key 'seed'", "run.seed"]),
    ("run.seed.x=1", ["run.seed has no sub-keys"]),
    ("run.seed", ["write section.field=value"]),
])
def test_bad_key_gets_did_you_mean(item, needles):
    with pytest.raises(ConfigError) as e:
        resolve(sets=[item])
    for n in needles:
        assert n in str(e.value), str(e.value)
    assert repr(item) in str(e.value)  # the message names what was given


@pytest.mark.parametrize("item, needles", [
    ("run.seed=abc", ["run.seed='abc'", "expected an integer"]),
    ("run.seed=2.5", ["expected an integer"]),
    ("run.seed=true", ["expected an integer"]),
    ("run.png=maybe", ["run.png='maybe'", "expected true or false"]),
    ("run.threads=x", ["expected an integer or null"]),
    ("run.threads=0", ["run.threads=0 must be >= 1"]),
    ("data.per_set=[1]", ["expected an integer"]),
    ("p1.args={", []),
    ("p1.args=3", ["expected a table of options"]),
    ("p1.args.x=inf", ["expected a finite number"]),
    ("model.dtype=float61", ["Unknown dtype 'float61'", "float32"]),
    ("finetune.config=defualt", ["Unknown fine-tune preset 'defualt'", "Did you mean: default"]),
    ("finetune.overrides.stepz=3", ["finetune.overrides.stepz", "Did you mean: steps"]),
    ("finetune.overrides.steps=abc", ["finetune.overrides.steps", "expected an integer"]),
])
def test_bad_value_says_the_expected_type(item, needles):
    with pytest.raises(ConfigError) as e:
        resolve(sets=[item])
    for n in needles:
        assert n in str(e.value), str(e.value)


def test_bad_files_are_named(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[geometry]\ncv_fold = 3\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*Unknown config key 'geometry.cv_fold'.*Did you mean: "
                                          r"geometry.cv_folds"):
        resolve(bad)
    bad.write_text("[run]\nseed = '3'\n")
    with pytest.raises(ConfigError, match=r"bad.toml.*run.seed='3': expected an integer"):
        resolve(bad)
    bad.write_text("[runn]\nseed = 3\n")
    with pytest.raises(ConfigError, match=r"Unknown config section 'runn'. Did you mean: run\?"):
        resolve(bad)
    bad.write_text("[run\nseed = 3\n")
    with pytest.raises(FileFormatError, match=r"bad.toml' is not valid TOML"):
        resolve(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(tmp_path / "missing.toml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"unknown format '.json'"):
        resolve(tmp_path / "c.json")
    if importlib.util.find_spec("yaml") is not None:
        (tmp_path / "l.yaml").write_text("- a\n- b\n")
        with pytest.raises(FileFormatError, match="must hold a table of sections"):
            resolve(tmp_path / "l.yaml")
    with pytest.raises(ConfigError, match="finetune.enabled=false needs a tuned model"):
        resolve(sets=["finetune.enabled=false"])
    # a check that combines fields runs after every layer: the file alone may lack what a flag supplies
    (tmp_path / "nf.toml").write_text("[finetune]\nenabled = false\n")
    assert resolve(tmp_path / "nf.toml", shorthands=[("model.spec", "some/folder")]).model.spec == "some/folder"


def test_main_cli_exits_2_with_the_message(capsys, tmp_path):
    main = load_main()
    assert main.cli(["--set", "eval.batch_sise=8", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Did you mean: eval.batch_size" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # nothing was created


def test_absent_cuda_is_a_clear_error_before_any_work(capsys, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    main = load_main()
    assert main.cli(["--device", "cuda", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "device='cuda' is not available" in err and "cpu" in err
    assert not (tmp_path / "r").exists()


def test_shared_field_type_check_serves_both_configs():
    # catlens._typecheck.check_field_type is the one type check behind catlens.config.check_value and
    # catlens.finetune.config.check_value; they differ only in the error type, the message prefix and the hints.
    from catlens._typecheck import check_field_type, type_name
    from catlens.finetune import check_value as ft_check

    assert check_field_type(3.0, int, where="a") == 3 and type(check_field_type(3, float, where="a")) is float
    assert check_field_type(["x"], tuple[str, ...] | None, where="a") == ("x",)
    assert check_field_type(None, int | None, where="a") is None
    assert type_name(tuple[str, ...] | None, tuple_name="a list of names") == "a list of names or null"

    class Custom(Exception):
        pass

    with pytest.raises(Custom, match=r"^pre\.k='x': expected a list of strings, e\.g\. this\.$"):
        check_field_type("x", tuple[str, ...], where="pre.k", error=Custom, tuple_hint=", e.g. this")
    with pytest.raises(Custom, match=r"^pre\.k=\[1\]: expected a table of options \(a table\)\.$"):
        check_field_type([1], dict[str, int], where="pre.k", error=Custom, mapping_hint=" (a table)")
    with pytest.raises(Custom, match=r"expected a finite number or null \(got a non-finite number\)\.$"):
        check_field_type(float("inf"), float | None, where="pre.k", error=Custom)
    # the two callers: same check, their own error type and hints
    with pytest.raises(ConfigError, match=r"config key geometry\.directions='a': expected a list of strings \(e\.g\."):
        from_dict({"geometry": {"directions": "a"}})
    with pytest.raises(ValueError, match=r"FinetuneConfig\.categories='a': expected a list of names or null, e\.g\."):
        ft_check("categories", "a")


def test_demo_sizes_are_defaults_merged_under_overrides_and_replaced_by_quick():
    """The steering stages' demo sizes are the defaults; a --set changes one key and keeps the rest; null removes
    one option; run.quick replaces them by the quick sizes (no demo key left over)."""
    from catlens.config import DEMO_ARGS, QUICK_ARGS, args_to_argv, resolve

    cfg = resolve()
    for name, args in DEMO_ARGS.items():
        assert dict(cfg.section(name).args) == args
    changed = resolve(sets=['p1.args.layers="20"', "p1.args.test-cap=null"])
    assert changed.p1.args["layers"] == "20" and changed.p1.args["val-cap"] == DEMO_ARGS["p1"]["val-cap"]
    argv = args_to_argv(changed.p1.args)
    assert "--test-cap" not in argv and argv[argv.index("--layers") + 1] == "20"
    quick = resolve(sets=["run.quick=true"])
    for name in DEMO_ARGS:
        assert args_to_argv(quick.section(name).args) == args_to_argv(QUICK_ARGS[name])
    assert resolve(CONFIGS / "quick.toml").p1.args == quick.p1.args
