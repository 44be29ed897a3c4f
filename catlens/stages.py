"""Typed stage options: one frozen dataclass per analysis script, whose fields are exactly the script's command-line
options (name, type, default, help), and the machinery that turns such a dataclass into the script's argparse
parser and a config's ``args`` table into a checked instance of it.

One source of truth: each script builds its parser with :func:`build_parser` from its dataclass here, and
``analyses/main.py`` checks every stage's ``args`` table with :func:`check_stage_args` when the job's configuration is
resolved, before any work, so ``--set p1.args.layerz=3`` fails at once with a did-you-mean:

    >>> from catlens.stages import P1Options, from_mapping
    >>> from_mapping(P1Options, {"layers": "18,21", "train-cap": 150}, model="m", out="o").train_cap
    150
    >>> from_mapping(P1Options, {"layerz": 3}, where="p1.args", model="m", out="o")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    catlens.errors.ConfigError: p1.args: Unknown option 'layerz' of analyses/p1_steering.py. Did you mean: layers? ...
    >>> build_parser(P1Options).parse_args(["--model", "m", "--out", "o", "--gate-c", "0.5"]).gate_c
    0.5

A field is declared with :func:`option` (its help, aliases, choices); a field without a default is a required option.
Types: ``str``, ``int``, ``float``, ``pathlib.Path`` (each optionally ``| None``), ``bool`` (a ``store_true`` flag,
default ``False``) and ``tuple[str, ...]`` (a repeatable option, ``action="append"``).

A value of an ``args`` table is read as the script's command line would read it
(:func:`catlens.config.args_to_argv`): ``null``/``false`` leave the option out (the script's default), ``true`` is a
bare flag (only for a flag), a list is joined with commas (a text option), anything else is written as text and
converted as the script's parser converts it; so a table that passes here is one the script accepts.

Stage sizes (:data:`SIZES`) live here too: the demo sizes of the main job, its ``--quick`` sizes and the scripts' own
``--quick`` caps, in one table that ``catlens.config`` and the scripts read. The full sizes (the papers' protocol) are
the dataclasses' defaults.

Importing this module touches no disk, network or device (stdlib only).
"""

# ruff: noqa: RUF009 - option() is this module's dataclasses.field (a field specifier, evaluated once)
from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from catlens.engines import ENGINES
from catlens.errors import ConfigError, unknown_name_message

_MISSING = dataclasses.MISSING


# ========================================================================================= declaring options
Bound = int | float
"""A range bound (spelled out: the tests' runtime type check takes `float` as floats only)."""


def option(default: Any = _MISSING, help: str | None = None, *, aliases: tuple[str, ...] = (),
           choices: tuple[Any, ...] | None = None, metavar: str | None = None, minimum: Bound | None = None,
           maximum: Bound | None = None, below: Bound | None = None) -> Any:
    """A dataclass field that is a command-line option: ``--<name-with-dashes>`` (plus ``aliases``, e.g.
    ``("--layer",)``); no ``default`` makes it a required option. ``minimum``/``maximum`` (inclusive) and ``below``
    (exclusive) are the range the script accepts: checked on a config's ``args`` table (:func:`check_value`), while
    the script checks its own command line after parsing (``tests/test_stages.py`` holds the two to the same range)."""
    meta = {"help": help, "aliases": tuple(aliases), "choices": None if choices is None else tuple(choices),
            "metavar": metavar, "minimum": minimum, "maximum": maximum, "below": below}
    if default is _MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag_of(name: str) -> str:
    """``gate_layers`` -> ``--gate-layers``."""
    return "--" + name.replace("_", "-")


def _types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _split(tp: Any) -> tuple[bool, Any]:
    args = typing.get_args(tp)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return True, rest[0]
    return False, tp


def _is_tuple(tp: Any) -> bool:
    return typing.get_origin(tp) is tuple


def _kind(tp: Any) -> str:
    names = {int: "an integer", float: "a number", str: "text", Path: "a path", bool: "true or false"}
    optional, base = _split(tp)
    if _is_tuple(base):
        return "text (repeatable option)"
    return names.get(base, str(base)) + (" or null" if optional else "")


def _check_declaration(cls: type) -> None:
    for f in dataclasses.fields(cls):
        tp = _types(cls)[f.name]
        _, base = _split(tp)
        if base not in (str, int, float, bool, Path) and not _is_tuple(base):
            raise TypeError(f"{cls.__name__}.{f.name}: option type {tp!r} is not supported (str, int, float, bool, "
                            f"Path, optionally | None, or tuple[str, ...]).")
        if base is bool and f.default is not False:
            raise TypeError(f"{cls.__name__}.{f.name}: a flag must default to False (a store_true option).")


# ============================================================================================= the parser
def add_options(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """Add one option per field of the options dataclass ``cls`` to ``parser`` (in field order) and return it."""
    _check_declaration(cls)
    hints = _types(cls)
    for f in dataclasses.fields(cls):
        _, base = _split(hints[f.name])
        meta = f.metadata
        kwargs: dict[str, Any] = {"dest": f.name}
        if meta.get("help") is not None:
            kwargs["help"] = meta["help"]
        if meta.get("metavar") is not None:
            kwargs["metavar"] = meta["metavar"]
        if base is bool:
            kwargs["action"] = "store_true"
        elif _is_tuple(base):
            kwargs["action"] = "append"
            kwargs["default"] = list(f.default)
        else:
            if f.default is _MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = f.default
            if base is not str:
                kwargs["type"] = base
            if meta.get("choices") is not None:
                kwargs["choices"] = list(meta["choices"])
        parser.add_argument(flag_of(f.name), *meta.get("aliases", ()), **kwargs)
    return parser


def build_parser(cls: type, description: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of a script whose options are the fields of ``cls`` (``description``: the script's
    docstring, shown verbatim)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    return add_options(p, cls)


def from_namespace(cls: type, ns: argparse.Namespace) -> Any:
    """The options instance of a parsed namespace (extra attributes of the namespace are ignored)."""
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}
    hints = _types(cls)
    for name, v in values.items():
        if isinstance(v, list) and _is_tuple(_split(hints[name])[1]):
            values[name] = tuple(v)
    return cls(**values)


def to_argv(obj: Any, *, changed_only: bool = True) -> list[str]:
    """The command line that parses back to ``obj`` (``build_parser(type(obj)).parse_args(to_argv(obj))`` gives
    ``obj``'s values); ``changed_only`` leaves out options at their default (required ones are always written)."""
    argv: list[str] = []
    hints = _types(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if changed_only and f.default is not _MISSING and v == f.default:
            continue
        _, base = _split(hints[f.name])
        if base is bool:
            argv += [flag_of(f.name)] if v else []
        elif _is_tuple(base):
            for item in v:
                argv += [flag_of(f.name), str(item)]
        elif v is not None:
            argv += [flag_of(f.name), str(v)]
    return argv


def parser_spec(parser: argparse.ArgumentParser) -> dict[str, dict[str, Any]]:
    """What defines each option of a parser (flags, action, type, default, choices, required, help, metavar), keyed
    by ``dest``: two parsers with equal specs accept the same command lines the same way (``--help`` left out)."""
    out = {}
    for a in parser._actions:  # argparse exposes its options only here
        if isinstance(a, argparse._HelpAction):
            continue
        out[a.dest] = {"flags": tuple(a.option_strings), "action": type(a).__name__, "nargs": a.nargs,
                       "const": a.const, "type": getattr(a.type, "__name__", a.type), "default": a.default,
                       "choices": None if a.choices is None else list(a.choices), "required": a.required,
                       "help": a.help, "metavar": a.metavar}
    return out


# ======================================================================================= checking a mapping
def option_names(cls: type) -> list[str]:
    """The option names of ``cls`` as a config ``args`` table spells them (``gate-layers``), aliases included."""
    names = []
    for f in dataclasses.fields(cls):
        names.append(f.name.replace("_", "-"))
        names += [a.lstrip("-") for a in f.metadata.get("aliases", ())]
    return names


def _field_of(cls: type) -> dict[str, str]:
    """Every spelling of every option (dashes or underscores, aliases) -> field name."""
    out = {}
    for f in dataclasses.fields(cls):
        for spelling in (f.name, *(a.lstrip("-") for a in f.metadata.get("aliases", ()))):
            out[spelling.replace("-", "_")] = f.name
    return out


def _script_of(cls: type) -> str:
    return getattr(cls, "SCRIPT", cls.__name__)


def check_value(cls: type, name: str, value: Any, where: str = "") -> Any:
    """``value`` of an ``args`` table for option ``name`` of ``cls``, converted as the script's parser converts the
    text that ``analyses/main.py`` passes (see the module docstring); ``_MISSING`` when it leaves the option out."""
    f = next(x for x in dataclasses.fields(cls) if x.name == name)
    _, base = _split(_types(cls)[name])
    key = f"{where}.{name.replace('_', '-')}" if where else name.replace("_", "-")
    script = _script_of(cls)
    default = "(required)" if f.default is _MISSING else repr(f.default)
    fix = (f"Fix: give {_kind(_types(cls)[name])}, e.g. --set {key}=<value>, or {key}=null for the script's default "
           f"{default} (python {script} --help lists its options).")

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{key}={value!r}: {why} ({flag_of(name)} of {script} takes {_kind(_types(cls)[name])}). "
                           f"{fix}")

    if base is bool:
        if value is None or value is False:
            return False
        if value is True:
            return True
        raise bad("expected true or false")
    if value is None or value is False:
        return _MISSING
    if value is True:
        raise bad("true would pass the option without its value")
    if isinstance(value, Mapping):
        raise bad("a table is not a value of this option")
    if _is_tuple(base):
        if isinstance(value, (list, tuple)):
            raise bad("give one value (the job passes this option once)")
        return (str(value),)
    if isinstance(value, (list, tuple)):
        if base is not str:
            raise bad("a list is passed joined with commas, which this option cannot read")
        text = ",".join(str(x) for x in value)
    else:
        text = str(value)
    try:
        converted = text if base is str else base(text)
    except (TypeError, ValueError):
        raise bad("cannot be read") from None
    choices = f.metadata.get("choices")
    if choices is not None and converted not in choices:
        raise ConfigError(f"{key}: " + unknown_name_message(f"value of {flag_of(name)}", converted, choices))
    why = out_of_range(f, converted)
    if why:
        raise bad(why)
    return converted


def out_of_range(f: dataclasses.Field, value: Any) -> str:
    """Why ``value`` is outside the range of option field ``f`` ("must be >= 1"), or ``""``."""
    if value is None or isinstance(value, (str, Path)):
        return ""
    lo, hi, below = f.metadata.get("minimum"), f.metadata.get("maximum"), f.metadata.get("below")
    if lo is not None and value < lo:
        return f"must be >= {lo}"
    if hi is not None and value > hi:
        return f"must be <= {hi}"
    if below is not None and value >= below:
        return f"must be < {below}"
    return ""


def from_mapping(cls: type, args: Mapping[str, Any], *, where: str = "", **given: Any) -> Any:
    """The options instance of ``cls`` for a config ``args`` table (keys with dashes or underscores, or an alias;
    values as :func:`check_value` reads them) over ``given`` values (e.g. the ``model`` and ``out`` the job passes);
    a :class:`ConfigError` naming the key, what is allowed and the fix for an unknown key or a bad value."""
    spellings = _field_of(cls)
    prefix = f"{where}: " if where else ""
    values: dict[str, Any] = {}
    for name, value in given.items():  # the values the caller passes itself, converted like the table's
        if name not in spellings.values():
            raise TypeError(f"{cls.__name__} has no option {name!r}")
        converted = check_value(cls, name, value, where)
        if converted is not _MISSING:
            values[name] = converted
    seen: dict[str, str] = {}
    for raw_key, value in args.items():
        key = str(raw_key).lstrip("-")
        name = spellings.get(key.replace("-", "_"))
        if name is None:
            raise ConfigError(prefix + _unknown(cls, key))
        if name in seen:
            dashed = name.replace("_", "-")
            raise ConfigError(f"{prefix}{seen[name]!r} and {key!r} name the same option {flag_of(name)}; keep one "
                              f"spelling, {dashed!r} (as the job's default sizes write it: --set "
                              f"{where + '.' if where else ''}{dashed}=<value>).")
        seen[name] = key
        converted = check_value(cls, name, value, where)
        if converted is not _MISSING:
            values[name] = converted
    missing = [f.name for f in dataclasses.fields(cls) if f.default is _MISSING and f.name not in values]
    if missing:
        raise ConfigError(f"{prefix}{', '.join(flag_of(m) for m in missing)} of {_script_of(cls)} is required and "
                          f"not given.")
    return cls(**values)


def _unknown(cls: type, key: str) -> str:
    msg = unknown_name_message("option", key, option_names(cls),
                               f"Fix the key: the options of python {_script_of(cls)} --help, without the leading "
                               f"--.")
    return msg.replace(f"Unknown option {key!r}.", f"Unknown option {key!r} of {_script_of(cls)}.", 1)


def config_args(options: Mapping[str, Any]) -> dict[str, Any]:
    """Option values keyed by field name as a config ``args`` table spells them (``gate_layers`` ->
    ``gate-layers``), in the same order."""
    return {k.replace("_", "-"): v for k, v in options.items()}


# ============================================================================================ stage sizes
SIZES: dict[str, dict[str, dict[str, Any]]] = {
    "p1": {
        "demo": {"layers": "18,21", "gate_layers": "9,15,21,27", "methods": "one_vs_benign", "toward": "0.1,0.2",
                 "away": "0.2,0.6", "scopes": "last_prompt+0,last_prompt+4,last_prompt", "train_cap": 150,
                 "val_cap": 20, "test_cap": 40, "test_gen_cap": 12, "val_gen_n": 32, "gen_n": 32, "gen_tokens": 64,
                 "jailbreak_n": 16, "candidates": 1, "zone_grid": 31, "lowrank_steps": 30, "reverse_n": 40},
        "quick": {"layers": "21", "gate_layers": "15,21", "methods": "one_vs_benign", "toward": "0.2", "away": "0.4",
                  "scopes": "last_prompt+0", "train_cap": 40, "val_cap": 8, "test_cap": 6, "test_gen_cap": 3,
                  "val_gen_n": 8, "gen_n": 6, "gen_tokens": 10, "jailbreak_n": 4, "candidates": 1, "zone_grid": 11,
                  "lowrank_steps": 6, "reverse_n": 6},
        "script_quick": {"layers": "18,21", "gate_layers": "15,21", "methods": "one_vs_benign", "toward": "0.1,0.2",
                         "away": "0.2,0.6", "scopes": "last_prompt+0,last_prompt", "train_cap": 120, "val_cap": 20,
                         "val_gen_n": 16, "gen_n": 24, "gen_tokens": 16, "candidates": 1, "lowrank_steps": 20,
                         "reverse_n": 24, "test_cap": 20, "test_gen_cap": 6, "jailbreak_n": 8, "zone_grid": 21},
    },
    "p2": {
        "full": {"per_category": 32, "n_alpaca": 800, "n_benign": 150, "max_new_tokens": 32, "coeffs": "0.5,1"},
        "demo": {"per_category": 12, "n_alpaca": 60, "n_benign": 8, "methods": "unsupervised,pruned", "coeffs": "4",
                 "layer_sets": "13,15,19,23,29", "max_new_tokens": 16},
        "quick": {"per_category": 6, "n_alpaca": 12, "n_benign": 4, "methods": "unsupervised", "coeffs": "4",
                  "layer_sets": "15", "max_new_tokens": 10},
        "script_quick": {"per_category": 6, "n_alpaca": 30, "n_benign": 6, "max_new_tokens": 12, "coeffs": "1"},
    },
    "specificity": {
        "demo": {"quick": True},
        "quick": {"quick": True},
        "script_quick": {"eval_per_cell": 10, "train_harmful_per_category": 24, "train_benign": 64, "n_boot": 200,
                         "n_random": 2, "n_perm": 2},
    },
    "eval": {"quick": {"per_category": 5, "per_set": 30, "max_new_tokens": 16, "ungated": 8, "gen_per_set": 8}},
    "geometry": {"quick": {"tsne_layers": "none", "cv_folds": 3}},
}
"""Every stage size in one table, per stage (``eval``, ``geometry``, ``p1``, ``p2``, ``specificity``; keys are the
stage's option names):

- ``demo``: the main job's sizes (``catlens.config.DEMO_ARGS``, the ``args`` defaults of ``make demo``): a reduced grid
  and capped sets so that every stage runs in minutes;
- ``quick``: the main job's ``run.quick`` sizes (``catlens.config.QUICK_ARGS``/``QUICK_DEFAULTS``; the scripts also get
  ``--quick``): a smoke run of every step, not a measurement;
- ``script_quick``: what a script's own ``--quick`` sets (options given explicitly win; specificity's are caps of
  its prompt sets and draws, not options);
- ``full``: p2's full sizes for the options whose default (``None``) depends on ``--quick``.

Every other full size (the papers' protocol, ``docs/RESULTS.md``) is the default of the stage's options dataclass.
The main job's evaluation and geometry sizes that are fields of its config sections (``data.per_set``,
``eval.ungated``, ``geometry.cv_folds``, ...) take their defaults from :class:`FinetuneEvalOptions` and
:class:`GeometryOptions`, and their ``run.quick`` values from ``quick`` here (``data.prompts_per_group``, the job's
own sampling of the geometry prompts, stays in ``catlens.config.QUICK_DEFAULTS``)."""


# ======================================================================================= the stages' options
_DTYPE_CHOICES = ("float32", "float16", "bfloat16", "auto")
_DEVICE_HELP = "torch device for the model: cpu, cuda, cuda:1 (default cpu)"
_DTYPE_HELP = ("model weights' dtype (default float32; bfloat16 for 8B models on a GPU; auto: bfloat16 where the "
               "device has it natively, else float32)")
"""``--device``/``--dtype`` as :func:`catlens.model.add_model_options` spells them."""


@dataclass(frozen=True, kw_only=True)
class P1Options:
    """``analyses/p1_steering.py``: categorical steering, gating, low-rank combination, transfer (P1)."""

    SCRIPT: ClassVar[str] = "analyses/p1_steering.py"
    model: str = option(help="the refusal-token fine-tune (folder or spec)")
    stock_model: str = option("smollm2-135m-instruct",
                              help="same-architecture model for the transfer study ('none' skips it)")
    out: str = option()
    data_dir: str | None = option(None)
    layers: str = option("12,15,18,21,24", help="steering layers (directions fitted at each)")
    sweep_layers: str | None = option(None, help="the subset of --layers the sweep steers at (default: all of them; "
                                                 "directions are fitted at every --layers)")
    gate_layers: str = option("9,15,21,27", help="layers the gate may read (chosen on val, apart from the steering "
                                                 "layer)")
    gate_c: float = option(0.1, help="inverse L2 strength of the gate's logistic probe")
    methods: str = option("one_vs_benign,p1_mean_difference,one_vs_rest")
    toward: str = option("0.1,0.2,0.4", help="coefficients toward refusal (fractions of the norm)")
    away: str = option("0.2,0.4,0.6,1.0", help="magnitudes away from refusal (applied negatively)")
    scopes: str = option("last_prompt+0,last_prompt+4,last_prompt",
                         help="positions scopes tried for each candidate: the decision position only, it and the "
                              "first K generated tokens, or every generated token too (P1)")
    min_refusal_low: float = option(0.90, help="the zones' constraint on val: Wilson lower bound of pooled harmful "
                                               "refusal", minimum=0, maximum=1)
    target_refusal: float = option(0.90, minimum=0, maximum=1,
                                   help="candidates on generated val answers: harmful refusal at least this")
    zone_grid: int = option(41, help="gate-score quantiles per threshold axis", minimum=3)
    judge: str = option("full_answer", help="the headline's judge (reads the whole answer)")
    top_k: str = option("proportional", help="P1's top-K sparsity for p1_mean_difference: 'proportional' (P1's "
                        "share, 200 of 4096 dims = 28 of 576; catlens.directions.p1_top_k), 'absolute' (P1's count, "
                        "200), an integer, or 0 for every dimension")
    read_context: str = option("chat", choices=("chat", "raw"),
                               help="where p1_mean_difference reads the category / [respond] token: 'chat' (in the "
                                    "chat template, catlens) or 'raw' (raw prompt + ' [category]', no template, as "
                                    "P1's code does; catlens.refusal.token_read_format)")
    p1_gate_centring: str = option("consistent", choices=("consistent", "p1_as_run"),
                                   help="P1's own gate: 'consistent' scores centred activations as it was trained; "
                                        "'p1_as_run' runs it uncentred, as P1's code does (catlens.probes.fit_gate; "
                                        "PAPERS.md 2.7)")
    whiten_dtype: str = option("float64", choices=("float64", "float32"),
                               help="precision of the low-rank basis's ZCA whitening: float64 (catlens) or float32 "
                                    "(P1's code; catlens.geometry.fit_whitener)")
    train_cap: int = option(500, help="train prompts per side (seeded sample)", minimum=1)
    val_cap: int = option(100, help="val prompts per benchmark half", minimum=1)
    test_cap: int | None = option(None, help="test prompts per dataset, seeded (demo and smoke runs; default: all)")
    test_gen_cap: int | None = option(None, help="test prompts per dataset generated in full (default: every test "
                                                 "prompt)", minimum=1)
    val_gen_n: int = option(96, help="val prompts per side generated in full for choosing", minimum=1)
    gen_n: int = option(96, help="test prompts per side for the transfer studies", minimum=1)
    gen_tokens: int = option(64, minimum=1)
    jailbreak_n: int = option(100, minimum=0,
                              help="harmful test prompts wrapped in each jailbreak template (0 skips it)")
    candidates: int = option(3, help="best first-position settings generated in full on val (unsteered, all "
                                     "toward, all away at every scope), whose zones are then swept on the judged "
                                     "answers", minimum=1)
    ppl_guard: float = option(0.10)
    batch_size: int = option(32, minimum=1)
    engine: str = option("catlens", choices=ENGINES,
                         help="what generates the full answers (val, test, jailbreaks, transfer): catlens's own "
                              "loop, or vLLM (pip install 'catlens[vllm]'), one engine per model in the model's "
                              "dtype; activations, first-position passes and training stay on catlens's")
    lowrank_steps: int = option(120, help="low-rank training steps (0 skips it)")
    reverse_n: int = option(150, help="prompts per side (train, val and test each) for the reverse transfer, stock "
                                      "-> tuned (0 skips it)", minimum=0)
    quick: bool = option(False, help="small caps and grid (minutes)")
    seed: int = option(0)
    threads: int | None = option(None)
    overwrite: bool = option(False)
    device: str = option("cpu", help=_DEVICE_HELP)
    dtype: str = option("float32", help=_DTYPE_HELP, choices=_DTYPE_CHOICES)


_P2_FULL, _P2_QUICK = SIZES["p2"]["full"], SIZES["p2"]["script_quick"]


@dataclass(frozen=True, kw_only=True)
class P2Options:
    """``analyses/p2_steering.py``: unsupervised, pruned and guided category steering (P2). The sizes left at
    ``None`` take :data:`SIZES` ``["p2"]["full"]``, or ``["script_quick"]`` with ``--quick``."""

    SCRIPT: ClassVar[str] = "analyses/p2_steering.py"
    model: str = option(help="model spec: a name (smollm2-135m-instruct) or a folder")
    out: str = option(help="run folder")
    data_dir: str | None = option(None, help="benchmark data folder (default: $CATLENS_DATA_DIR or "
                                             "<repo>/../shared/data)")
    prompts: str | None = option(None, help="one prompt file (.jsonl/.csv) instead of the benchmark data: harmful "
                                            "prompts with categories, benign ones with a category (look-alikes) or "
                                            "without (generic)")
    categories: str | None = option(None, help="comma-separated taxonomy categories (default: those with harmful "
                                               "prompts and benign look-alikes)")
    per_category: int | None = option(None, minimum=1,
                                      help=f"harmful prompts per category before the split (default "
                                           f"{_P2_FULL['per_category']}, --quick {_P2_QUICK['per_category']})")
    n_alpaca: int | None = option(None, minimum=1,
                                  help=f"Alpaca sample size before the split (default {_P2_FULL['n_alpaca']})")
    n_benign: int | None = option(None, help=f"benign prompts in each of val and test (a seeded sample of the "
                                             f"split's benign prompts; default {_P2_FULL['n_benign']}, --quick "
                                             f"{_P2_QUICK['n_benign']})", minimum=1)
    fractions: str = option("0.5,0.2,0.3", help="train,val,test fractions")
    exclude_ids: str = option("auto", help="'auto' (the model folder's training_prompt_ids.json), 'none', or a "
                                           "training_prompt_ids.json file")
    methods: str = option("unsupervised,pruned,guided")
    sites: str = option("attn_out", help="activation sites (attn_out, resid_post, resid_mid, resid_pre, mlp_out)")
    reductions: str = option("mean", help="token reductions of the prompt: mean, last")
    safe: str = option("generic", help="safe side: generic, matched (comma-separated for both)")
    layer_sets: str = option("auto", help="'auto' or sets like '15;13,15,19,23,29'")
    coeffs: str | None = option(None, help=f"steering coefficients m (default {_P2_FULL['coeffs']})")
    quantiles: str = option("0.5", help="pruning quantiles, each in (0, 1)")
    pairing: str = option("truncate", help="pairing of safe and unsafe rows for pruning",
                          choices=("truncate", "random"))
    scale: str = option("raw", help="raw: m * omega (P2); norm: m x the site's typical norm along the unit vector",
                        choices=("raw", "norm"))
    positions: str = option("all", help="steered positions: all (prompt and generated), generated")
    route: str = option("label", help="harmful prompts: label (own category) or probe (router)")
    judge: str = option("substring", help="primary judge: substring or refusal_token")
    guided_min: int = option(3, help="answered training prompts a category needs for its guided vector (else its "
                                     "unsupervised one)", minimum=1)
    help_tol: float = option(0.10, minimum=0, below=1,
                             help="allowed relative drop of the share of benign prompts answered")
    ppl_guard: float = option(0.10, help="coherence guard: a setting is admissible only if its benign answers' "
                                         "perplexity ratio to the unsteered answers is <= 1 + guard", minimum=0)
    select_by: str = option("method,site", help="columns whose every combination gets its own chosen setting")
    max_new_tokens: int | None = option(None, help=f"default {_P2_FULL['max_new_tokens']}, --quick "
                                                   f"{_P2_QUICK['max_new_tokens']}", minimum=1)
    batch_size: int = option(32, minimum=1)
    quick: bool = option(False, help="small caps and grid for a smoke run")
    seed: int = option(0, help="sampling and pairing seed")
    split_seed: int = option(1, help="train/val/test split seed (default 1; seeds whose test split was already "
                                     "looked at are refused: [0])")
    reuse_seen_split: bool = option(False, help="allow a split seed whose test split was already looked at "
                                                "(recorded in the manifest)")
    threads: int | None = option(None)
    device: str = option("cpu", help=_DEVICE_HELP)
    dtype: str = option("float32", help=_DTYPE_HELP, choices=_DTYPE_CHOICES)
    overwrite: bool = option(False)
    no_progress: bool = option(False)


@dataclass(frozen=True, kw_only=True)
class SpecificityOptions:
    """``analyses/specificity.py``: does steering along category i move category j?"""

    SCRIPT: ClassVar[str] = "analyses/specificity.py"
    model: str = option(help="model spec (the refusal-tuned folder)")
    out: str = option(help="run folder")
    policy: str | None = option(None, help="a P1 policy folder: its site, positions, method, and its layer and scale "
                                           "as the first candidates of the grid")
    layers: str = option("auto", aliases=("--layer",),
                         help="candidate steering layers, comma-separated, or 'auto' (two: the policy's layer and "
                              "another, or the layers at (0.5, 0.7) of the depth); chosen on the selection split")
    scales: str = option("auto", aliases=("--scale",),
                         help="candidate toward/away magnitudes, fractions of the residual norm, comma-separated, or "
                              "'auto' (two: the policy's scale and twice it, else 0.1,0.2); chosen on the selection "
                              "split")
    method: str | None = option(None, help="direction constructor: one_vs_benign, one_vs_rest, p1_mean_difference "
                                           "(default: the policy's, else one_vs_benign)")
    prompts: str | None = option(None, help="a .jsonl/.csv prompt file with train, val (selection) and test "
                                            "(measurement) splits, instead of the built-in + benchmark prompts")
    data_dir: str | None = option(None, help="benchmark data folder (default: $CATLENS_DATA_DIR or shared/data)")
    finetune_config: str | None = option(None, help="fine-tune preset whose training/held-out prompts are used "
                                                    "(default: the model's own, else 'default')")
    categories: str | None = option(None, help="comma-separated steering categories (default: all with training "
                                               "prompts)")
    n_random: int = option(3, help="random control directions", minimum=0)
    n_perm: int = option(3, help="label permutations (directions fitted on shuffled category labels)", minimum=0)
    correction: str = option("fdr_bh", help="multiple-testing correction across the cells: fdr_bh, holm")
    n_boot: int = option(2000, help="bootstrap draws", minimum=1)
    batch_size: int = option(32, minimum=1)
    quick: bool = option(False, help=f"a smoke run: caps {SIZES['specificity']['script_quick']}")
    seed: int = option(0)
    threads: int | None = option(None)
    device: str = option("cpu", help=_DEVICE_HELP)
    dtype: str = option("float32", help=_DTYPE_HELP, choices=_DTYPE_CHOICES)
    overwrite: bool = option(False)
    no_progress: bool = option(False)


@dataclass(frozen=True, kw_only=True)
class GeometryOptions:
    """``analyses/geometry.py``'s command line (the script checks it into its ``Args``)."""

    SCRIPT: ClassVar[str] = "analyses/geometry.py"
    out: Path = option()
    model: str = option("smollm2-135m-instruct")
    prompts: str = option("builtin")
    other_model: str | None = option(None)
    acts: Path | None = option(None)
    other_acts: Path | None = option(None)
    device: str = option("cpu", help="cpu, cuda, cuda:1, ...")
    dtype: str = option("float32", help="float32, bfloat16 or float16")
    cache_dir: str | None = option(None, help="model cache (default: $CATLENS_CACHE or ~/.cache/catlens)")
    site: str = option("resid_post")
    layers: str = option("all", help="'all' or e.g. '0-5,10'")
    positions: str = option("last")
    fmt: str = option("chat")
    batch_size: int = option(16)
    harmful_label: str = option("harmful")
    direction_splits: str = option("train", help="comma-separated splits, or 'all'")
    directions: str = option("one_vs_benign,one_vs_rest,one_vs_benign_orth,p1,p2_generic,p2_matched,p2_pruned")
    whiten_method: str = option("zca", choices=("zca", "pca"))
    whiten_eps: float = option(1e-4)
    whiten_shrinkage: str | None = option(None, help="ledoit_wolf or a float in [0, 1]")
    restrict_to_span: bool = option(False)
    cv_folds: int = option(5)
    pca_dims: str = option("32", help="int, or 'none' for the full-dimension probe")
    tsne_layers: str | None = option(None, help="'none', 'auto' (default) or e.g. '5,15,25'")
    projection_subset: str = option("harmful", choices=("harmful", "all"))
    spectrum_top: int = option(100)
    threads: int | None = option(None)
    seed: int = option(0)
    overwrite: bool = option(False)


@dataclass(frozen=True, kw_only=True)
class SteerSweepOptions:
    """``analyses/steer_sweep.py``: a gated steering sweep on a prompt set's train and val splits."""

    SCRIPT: ClassVar[str] = "analyses/steer_sweep.py"
    model: str = option(help="model spec (the refusal-tuned folder for P1)")
    prompts: str = option("builtin", help="a prompt set with train and val splits")
    layers: str = option("16,20,24")
    methods: str = option("one_vs_benign,one_vs_rest")
    toward: str = option("0.05,0.1,0.2", help="coefficients for rows the gate flags (fractions of the residual norm "
                                              "with --scale norm)")
    away: str = option("0.05,0.1,0.2", help="magnitudes for the other rows (applied negatively)")
    scale: str = option("norm", choices=("norm", "raw"))
    positions: str = option("last_prompt")
    max_new_tokens: int = option(16)
    batch_size: int = option(32)
    ppl_guard: float = option(0.10)
    target_fpr: float | None = option(None, help="gate threshold for this over-refusal rate instead of Youden's J")
    n_per_split: int | None = option(None, help="subsample train and val (seeded; smoke runs)")
    seed: int = option(0)
    threads: int | None = option(None)
    out: str = option()
    overwrite: bool = option(False)


@dataclass(frozen=True, kw_only=True)
class FinetuneEvalOptions:
    """``analyses/finetune_eval.py``: the refusal-token fine-tune's evaluation (the main job's ``eval`` stage)."""

    SCRIPT: ClassVar[str] = "analyses/finetune_eval.py"
    config: str = option("default", help="fine-tune preset whose data split is evaluated")
    set: tuple[str, ...] = option((), metavar="FIELD=VALUE",
                                  help="override a field of the --config preset, as `catlens finetune --set` "
                                       "(repeatable)")
    model: str | None = option(None, help="fine-tune folder (default: the cached one of --config)")
    data_dir: str | None = option(None)
    cache_dir: str | None = option(None)
    device: str = option("cpu", help="device of both models (cpu, cuda, cuda:1, ...)")
    dtype: str = option("float32", help="weight dtype of both models (float32, bfloat16, float16)")
    out: str = option("runs/finetune_eval")
    threads: int | None = option(None, help="torch threads (default: $OMP_NUM_THREADS, else torch's)")
    overwrite: bool = option(False)
    per_category: int = option(20, help="held-out harmful prompts per category that are generated in full (all are "
                                        "scored)")
    per_set: int = option(250, help="prompts per benign set and per other harmful set that are scored (both "
                                    "decisions)")
    gen_per_set: int = option(40, help="prompts per benign set whose answers are generated in full (text measures, "
                                       "examples)")
    batch_size: int = option(32, help="generation batch size")
    max_new_tokens: int = option(40)
    ungated: int = option(64, help="prompts generated without the gate to measure repeated special tokens")
    seed: int = option(0)


STAGE_OPTIONS: dict[str, type] = {"eval": FinetuneEvalOptions, "geometry": GeometryOptions, "p1": P1Options,
                                  "p2": P2Options, "specificity": SpecificityOptions}
"""The options dataclass of each script stage of the main job (``analyses/main.py``), by stage name."""
SCRIPT_OPTIONS: dict[str, type] = {"finetune_eval": FinetuneEvalOptions, "geometry": GeometryOptions,
                                   "p1_steering": P1Options, "p2_steering": P2Options,
                                   "specificity": SpecificityOptions, "steer_sweep": SteerSweepOptions}
"""The options dataclass of each ``analyses/<name>.py`` script."""


def check_stage_args(config: Any) -> dict[str, Any]:
    """Every script stage's ``args`` table of a resolved ``catlens.config.Config`` checked into its options
    dataclass (the ``model`` and ``out`` the job passes filled with the run's), before any work: the instances by
    stage name, or the first :class:`ConfigError` (``<stage>.args: Unknown option ...``)."""
    out = {}
    for name, cls in STAGE_OPTIONS.items():
        section = config.section(name)
        given = {f.name: _PLACEHOLDER[f.name](config, name) for f in dataclasses.fields(cls)
                 if f.default is _MISSING}
        out[name] = from_mapping(cls, section.args, where=f"{name}.args", **given)
    return out


_PLACEHOLDER = {"model": lambda cfg, name: cfg.model.spec or "(the tuned model)",
                "out": lambda cfg, name: str(Path(cfg.run.out) / name)}
"""The values of required options that the main job passes itself (not from ``args``)."""
