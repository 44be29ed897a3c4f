"""Typed stage options (catlens/stages.py): each analysis script's parser is exactly its options dataclass, a config
``args`` table is checked into that dataclass (did-you-mean, types, choices), and the stage sizes table is what the
main job and the scripts use. No model is loaded (the scripts are imported, not run)."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from _scripts import load_script
from catlens.errors import ConfigError
from catlens.stages import (
    SCRIPT_OPTIONS,
    SIZES,
    STAGE_OPTIONS,
    FinetuneEvalOptions,
    GeometryOptions,
    P1Options,
    P2Options,
    SpecificityOptions,
    build_parser,
    config_args,
    flag_of,
    from_mapping,
    from_namespace,
    parser_spec,
    to_argv,
)

ENTRY = {"p1_steering": "parse_args", "p2_steering": "parse_args", "specificity": "main", "geometry": "parse_args",
         "steer_sweep": "main", "finetune_eval": "parse_args"}
"""The function of each script that builds its parser and parses the command line."""


def _script(stem: str):
    return load_script(stem, name=f"_catlens_stages_{stem}")


class _Parsed(Exception):
    def __init__(self, parser, argv):
        self.parser, self.argv = parser, argv


def script_parser(stem: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser the script really builds: its entry point is called and stopped at ``parse_args`` (no work)."""
    module = _script(stem)

    def stop(self, args=None, namespace=None):
        raise _Parsed(self, args)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", stop)
    with pytest.raises(_Parsed) as caught:
        getattr(module, ENTRY[stem])(["--model", "m", "--out", "o"])
    monkeypatch.undo()
    return caught.value.parser


# ============================================================================================ no drift
@pytest.mark.parametrize("stem", sorted(ENTRY))
def test_each_scripts_parser_is_exactly_its_options_dataclass(stem, monkeypatch):
    """Names, flags and aliases, types, defaults, choices, required, help: a script that adds, drops or changes an
    option without its dataclass fails here."""
    real = parser_spec(script_parser(stem, monkeypatch))
    ours = parser_spec(build_parser(SCRIPT_OPTIONS[stem]))
    assert list(real) == list(ours)  # same options, same order
    for dest in real:
        assert real[dest] == ours[dest], dest


def test_p1_quick_sizes_are_the_table_s():
    """p1_steering's own --quick branch sets exactly SIZES['p1']['script_quick']."""
    p1 = _script("p1_steering")
    plain = vars(p1.parse_args(["--model", "m", "--out", "o"]))
    quick = vars(p1.parse_args(["--model", "m", "--out", "o", "--quick"]))
    changed = {k: v for k, v in quick.items() if plain.get(k) != v and k not in ("quick", "scope_list")}
    assert changed == SIZES["p1"]["script_quick"]


def _range_cases(cls):
    """(field, value, inside) at and just outside each declared range of ``cls``."""
    import typing

    for f in dataclasses.fields(cls):
        lo, hi, below = (f.metadata.get(k) for k in ("minimum", "maximum", "below"))
        tp = typing.get_type_hints(cls)[f.name]
        step = 1 if int in (tp, *typing.get_args(tp)) else 0.01
        cases = []
        if lo is not None:
            cases += [(lo, True), (lo - step, False)]
        if hi is not None:
            cases += [(hi, True), (hi + step, False)]
        if below is not None:
            cases += [(round(below - step, 6), True), (below, False)]
        for value, inside in cases:
            yield f, value, inside


@pytest.mark.parametrize("stem", ["p1_steering", "p2_steering", "specificity"])
def test_the_declared_ranges_are_the_ranges_the_script_accepts(stem):
    """Each range declared on an option (checked on the config before any work) is the script's own: its command
    line rejects the value just outside and (p1, p2: parsing is free of work) accepts the bound, and so does
    from_mapping. Specificity checks after parsing inside main, so only its rejections are run here."""
    module = _script(stem)
    cls = SCRIPT_OPTIONS[stem]
    n = 0
    for f, value, inside in _range_cases(cls):
        argv = ["--model", "m", "--out", "o", flag_of(f.name), str(value)]
        n += 1
        if inside:
            from_mapping(cls, {f.name: value}, model="m", out="o")
            if stem != "specificity":
                getattr(module, ENTRY[stem])(argv)
        else:
            with pytest.raises(ConfigError, match="must be"):
                from_mapping(cls, {f.name: value}, model="m", out="o")
            with pytest.raises((SystemExit, ValueError)):
                getattr(module, ENTRY[stem])(argv)
    assert n >= 8


def test_the_defaults_that_scripts_compute_from_their_constants_match():
    from catlens.recipes import geometry_tables as geo
    from catlens.recipes import p1, p2  # the scripts are pages over their recipes, which hold the constants
    from catlens.recipes import specificity as spec
    from catlens.recipes import steer_sweep as sweep

    assert P1Options.methods == ",".join(p1.METHODS)
    assert (P2Options.methods, P2Options.split_seed) == (",".join(p2.METHODS), p2.SPLIT_SEED)
    fields = {f.name: f for f in dataclasses.fields(P2Options)}
    assert fields["pairing"].metadata["choices"] == p2.PAIRINGS and fields["scale"].metadata["choices"] == p2.SCALES
    assert ", ".join(p2.SITES) in fields["sites"].metadata["help"]
    assert f"refused: {sorted(p2.SEEN_SPLIT_SEEDS)}" in fields["split_seed"].metadata["help"]
    assert (p2.DEFAULTS, p2.QUICK) == (SIZES["p2"]["full"], SIZES["p2"]["script_quick"])
    fields = {f.name: f for f in dataclasses.fields(SpecificityOptions)}
    assert ", ".join(spec.METHODS) in fields["method"].metadata["help"]
    assert ", ".join(spec.CORRECTIONS) in fields["correction"].metadata["help"]
    assert str(spec.AUTO_LAYER_FRACTIONS) in fields["layers"].metadata["help"]
    assert spec.QUICK == SIZES["specificity"]["script_quick"]
    assert SCRIPT_OPTIONS["steer_sweep"].methods == ",".join(sweep.METHODS)
    assert GeometryOptions.directions == ",".join(geo.DIRECTION_SETS)
    for f in dataclasses.fields(geo.Args):  # the checked Args and the command line agree on the plain defaults
        if f.name in {"out", "layers", "direction_splits", "directions", "pca_dims", "tsne_layers"}:
            continue
        assert getattr(GeometryOptions, f.name) == f.default, f.name


def test_main_job_section_defaults_are_the_eval_and_geometry_script_defaults():
    from catlens.config import QUICK_DEFAULTS, Config

    cfg = Config()
    assert (cfg.data.per_set, cfg.data.per_category) == (FinetuneEvalOptions.per_set, FinetuneEvalOptions.per_category)
    assert (cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.ungated) == (
        FinetuneEvalOptions.batch_size, FinetuneEvalOptions.max_new_tokens, FinetuneEvalOptions.ungated)
    assert (cfg.geometry.cv_folds, cfg.geometry.batch_size) == (GeometryOptions.cv_folds, GeometryOptions.batch_size)
    q = SIZES["eval"]["quick"]
    assert QUICK_DEFAULTS["data"]["per_set"] == q["per_set"] and QUICK_DEFAULTS["eval"]["args"] == {"gen-per-set": 8}


# ======================================================================================= parser <-> dataclass
def test_build_parser_round_trips_an_instance_through_its_command_line():
    """An instance with every kind of field away from its default -> to_argv -> parse -> the same instance."""
    for cls, changes in (
        (P1Options, {"model": "m", "out": "o", "layers": "3", "gate_c": 0.5, "test_cap": 7, "quick": True,
                     "dtype": "bfloat16", "sweep_layers": "3"}),
        (GeometryOptions, {"out": Path("x/y"), "acts": Path("a.pt"), "restrict_to_span": True, "whiten_eps": 0.01}),
        (FinetuneEvalOptions, {"set": ("steps=3", "lr=0.1"), "per_set": 9, "model": "m"}),
        (SpecificityOptions, {"model": "m", "out": "o", "layers": "2,3", "n_boot": 5, "no_progress": True}),
    ):
        required = {f.name: "r" for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        obj = cls(**{**required, **changes})
        back = from_namespace(cls, build_parser(cls).parse_args(to_argv(obj)))
        assert back == obj


def test_an_alias_parses_to_the_same_option():
    parser = build_parser(SpecificityOptions)
    a = parser.parse_args(["--model", "m", "--out", "o", "--layer", "4", "--scale", "0.2"])
    assert (a.layers, a.scales) == ("4", "0.2")


def test_an_option_type_the_machinery_cannot_pass_is_refused_when_the_parser_is_built():
    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Bad:
        xs: list = dataclasses.field(default_factory=list)

    with pytest.raises(TypeError, match="Bad.xs: option type"):
        build_parser(Bad)


# =========================================================================================== args tables
def test_an_args_table_becomes_the_typed_dataclass():
    opts = from_mapping(P1Options, {"layers": 21, "gate-layers": [15, 21], "train_cap": 150, "gate-c": 1,
                                    "test-cap": None, "reverse-n": False, "quick": True}, model="m", out="o")
    assert isinstance(opts, P1Options)
    assert (opts.layers, opts.gate_layers, opts.train_cap, opts.gate_c, opts.quick) == ("21", "15,21", 150, 1.0,
                                                                                       True)
    assert (opts.test_cap, opts.reverse_n) == (P1Options.test_cap, P1Options.reverse_n)  # null/false: the default
    assert from_mapping(SpecificityOptions, {"layer": 3}, model="m", out="o").layers == "3"  # an alias


@pytest.mark.parametrize("stage, args, needles", [
    ("p1", {"layerz": 3}, ["p1.args: Unknown option 'layerz' of analyses/p1_steering.py", "Did you mean: layers",
                           "gate-layers", "python analyses/p1_steering.py --help"]),
    ("p1", {"train-cap": "many"}, ["p1.args.train-cap='many'", "cannot be read", "--train-cap", "an integer",
                                   "null for the script's default 500"]),
    ("p1", {"train-cap": 1.5}, ["p1.args.train-cap=1.5", "an integer"]),
    ("p1", {"gate-c": "strong"}, ["p1.args.gate-c='strong'", "a number"]),
    ("p1", {"layers": True}, ["p1.args.layers=True", "without its value"]),
    ("p1", {"quick": "yes"}, ["p1.args.quick='yes'", "expected true or false"]),
    ("p1", {"train-cap": [1, 2]}, ["a list is passed joined with commas"]),
    ("p1", {"layers": {"a": 1}}, ["a table is not a value"]),
    ("p1", {"gate-layers": "9", "gate_layers": "15"}, ["'gate-layers' and 'gate_layers' name the same option"]),
    ("p2", {"pairing": "randm"}, ["p2.args.pairing: Unknown value of --pairing 'randm'", "Did you mean: random?"]),
    ("p1", {"dtype": "fp8"}, ["Unknown value of --dtype 'fp8'", "Allowed: auto, bfloat16, float16, float32"]),
    ("eval", {"gen-per-sett": 3}, ["eval.args: Unknown option 'gen-per-sett'", "Did you mean: gen-per-set"]),
    ("geometry", {"whiten-method": "svd"}, ["geometry.args.whiten-method: Unknown value of --whiten-method 'svd'"]),
])
def test_a_bad_args_table_says_what_was_given_what_is_allowed_and_the_fix(stage, args, needles):
    with pytest.raises(ConfigError) as e:
        from_mapping(STAGE_OPTIONS[stage], args, where=f"{stage}.args", model="m", out="o")
    for needle in needles:
        assert needle in str(e.value)


def test_a_required_option_left_out_is_named():
    with pytest.raises(ConfigError, match="--model of analyses/p1_steering.py is required"):
        from_mapping(P1Options, {}, out="o")


@pytest.mark.parametrize("stage, preset", [(s, p) for s, presets in SIZES.items() for p in presets
                                           if (s, p) != ("specificity", "script_quick")])
def test_every_size_in_the_table_is_an_option_value_its_script_accepts(stage, preset):
    """(specificity's script_quick are caps of its prompt sets, not options)"""
    cls = STAGE_OPTIONS[stage]
    opts = from_mapping(cls, config_args(SIZES[stage][preset]), model="m", out="o")
    for key, value in SIZES[stage][preset].items():
        assert getattr(opts, key) == (str(value) if isinstance(getattr(cls, key), str) else value), key


def test_the_main_job_s_demo_and_quick_args_are_the_table_s():
    from catlens.config import DEMO_ARGS, QUICK_ARGS

    for name in ("p1", "p2", "specificity"):
        assert DEMO_ARGS[name] == config_args(SIZES[name]["demo"])
        assert QUICK_ARGS[name] == config_args(SIZES[name]["quick"])
    assert DEMO_ARGS["p1"]["test-cap"] == 40 and list(DEMO_ARGS["p1"])[:2] == ["layers", "gate-layers"]
