"""The main job's resolved configuration: one frozen dataclass tree, read from TOML or YAML plus ``--set`` overrides.

    >>> from catlens.config import Config, parse_sets, resolve
    >>> cfg = resolve(sets=["data.per_category=10", "run.seed=3"])
    >>> cfg.run.seed, cfg.data.per_category, cfg.finetune.config
    (3, 10, 'default')
    >>> resolve(sets=["run.quick=true"]).finetune.config
    'quick'
    >>> resolve(sets=["eval.batch_sise=8"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    catlens.errors.ConfigError: --set 'eval.batch_sise=8': Unknown config key 'eval.batch_sise'. Did you mean: eval.batch_size, geometry.batch_size? Allowed: ...

Layers, lowest first: the dataclass defaults; the quick defaults (:data:`QUICK_DEFAULTS`) when ``run.quick`` is true
anywhere above; the config file (``.toml`` read with :mod:`tomllib`, ``.yaml``/``.yml`` with PyYAML); the
command-line shorthands of ``analyses/main.py`` (``--quick``, ``--out``, ...) and the ``--set key.sub=value`` items,
in the order given. Every value is checked against its field's type where it enters (a bad key gets a did-you-mean
listing the valid keys, a bad value names the expected type), so a typo fails before any model is loaded.

Keys are ``section.field``; a stage's ``args`` table (and ``finetune.overrides``) takes sub-keys:
``--set p1.args.layers=10-20``, ``--set finetune.overrides.steps=60``. The tree here keeps any sub-key of ``args``;
``analyses/main.py`` checks each stage's table against its script's options (:mod:`catlens.stages`, the ``checks``
of :func:`resolve`) and the fine-tune overrides are checked here. On the command line a value is read as JSON
when it parses (``10``, ``1e-4``, ``true``, ``null``, ``["a", "b"]``), else as text; a text field takes the text as
given. Optional fields (``str | None``, ...) default to ``None``, which a TOML file writes by leaving the key out
(``--set model.spec=null`` resets one). :func:`to_toml` writes the resolved tree back (the run folder's
``config.toml``), and reading that file gives the same tree.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catlens._typecheck import check_field_type, is_mapping_type, split_optional
from catlens.errors import ConfigError, FileFormatError, unknown_name_message
from catlens.stages import SIZES, FinetuneEvalOptions, GeometryOptions, config_args

CONFIG_SUFFIXES = (".toml", ".yaml", ".yml")
DTYPE_NAMES = ("float32", "bfloat16", "float16", "auto")
"""Weight dtypes (the names of :data:`catlens.model.DTYPES`, kept here so reading a config needs no torch), and
``auto`` (:func:`catlens.model.resolve_dtype`: bfloat16 where the device has it natively, else float32)."""


def _frozen_map(value: Mapping[str, Any] | None = None) -> Mapping[str, Any]:
    return types.MappingProxyType(dict(value or {}))


def _no_args() -> Mapping[str, Any]:
    return _frozen_map()


# ============================================================================================== the tree
@dataclass(frozen=True)
class ModelSection:
    """Which models, where they run."""

    spec: str | None = None
    """The tuned model: embedded name, checkpoint folder or hub id. ``None``: train, or reuse from the model cache,
    the fine-tune of ``[finetune]``. Given, the fine-tune stage is skipped and this model is studied."""
    other_model: str | None = None
    """The stock partner for model diffing (geometry) and transfer (p1, p2). ``None``: the fine-tune's base model
    (read from the fine-tune's manifest when ``spec`` is a catlens fine-tune; none for any other ``spec``)."""
    device: str = "cpu"
    """Device for every model (``cpu``, ``cuda``, ``cuda:1``); a clear error when it is absent."""
    dtype: str = "auto"
    """Weight dtype of the analysed models: ``float32``, ``bfloat16``, ``float16`` or ``auto`` (bfloat16 where the
    device computes it natively, e.g. a CPU with AVX512-BF16 or a recent GPU, else float32; resolved once when the job
    starts and saved as the concrete dtype). The fine-tune always trains in float32."""
    cache_dir: str | None = None
    """Model cache (converted models, fine-tunes). ``None``: ``$CATLENS_CACHE``, else ``~/.cache/catlens``."""


@dataclass(frozen=True)
class DataSection:
    """Which prompts, how many."""

    data_dir: str | None = None
    """Benchmark files. ``None``: ``$CATLENS_DATA_DIR``, else ``../shared/data`` (the built-in prompts offline)."""
    per_set: int = FinetuneEvalOptions.per_set
    """eval: at most this many prompts per benign set (scored and generated) and per extra harmful set (scored)."""
    per_category: int = FinetuneEvalOptions.per_category
    """eval: held-out harmful prompts generated per category (all are scored)."""
    prompts: str = "builtin"
    """geometry: the prompt set (``builtin``, a dataset name or a .jsonl/.csv file)."""
    prompts_per_group: int | None = None
    """geometry: at most this many prompts per (label, category, split) of ``prompts`` (seeded sample); ``None``:
    all."""


@dataclass(frozen=True)
class RunSection:
    """Where the job writes, and the process settings."""

    out: str = "runs/main"
    """The run folder (each stage writes a subfolder)."""
    seed: int = 0
    """Global seed, set once by the job and passed to every stage."""
    threads: int | None = None
    """torch/BLAS threads. ``None``: ``$OMP_NUM_THREADS``, else the libraries' default."""
    quick: bool = False
    """The few-minute variant: applies :data:`QUICK_DEFAULTS` under the file, and passes ``--quick`` to p1, p2 and
    specificity."""
    stock: bool = False
    """No fine-tune: study the stock model (``model.other_model``, else the fine-tune's base)."""
    png: bool = True
    """Also write PNG figures (needs Chromium); HTML is always written."""


@dataclass(frozen=True)
class FinetuneStage:
    """The refusal-token fine-tune (``catlens.finetune.ensure_refusal_model``; cached and reused)."""

    enabled: bool = True
    config: str = "default"
    """Preset of ``catlens.finetune.CONFIGS`` (``default``, ``quick``, ``coconot``)."""
    overrides: Mapping[str, Any] = field(default_factory=_no_args)
    """``FinetuneConfig`` fields replaced in the preset (as ``catlens finetune --set``), e.g. ``steps = 60``."""


@dataclass(frozen=True)
class EvalStage:
    """``analyses/finetune_eval.py`` on the tuned model (caps: ``data.per_set``, ``data.per_category``)."""

    enabled: bool = True
    batch_size: int = FinetuneEvalOptions.batch_size
    max_new_tokens: int = FinetuneEvalOptions.max_new_tokens
    ungated: int = FinetuneEvalOptions.ungated
    """Prompts generated without the gate to measure repeated special tokens."""
    args: Mapping[str, Any] = field(default_factory=_no_args)
    """Further options of the script (``{"per-set": 10}`` -> ``--per-set 10``; ``true`` -> a bare flag)."""


@dataclass(frozen=True)
class GeometryStage:
    """``analyses/geometry.py`` on the tuned model, the stock model as the model-diffing partner."""

    enabled: bool = True
    layers: str = "all"
    """``all`` or e.g. ``0-5,10``."""
    tsne_layers: str = "auto"
    """``auto`` (four layers), ``none`` or e.g. ``5,15``."""
    cv_folds: int = GeometryOptions.cv_folds
    directions: tuple[str, ...] = ()
    """Direction sets (``()``: every set the script knows)."""
    batch_size: int = GeometryOptions.batch_size
    args: Mapping[str, Any] = field(default_factory=_no_args)
    """Further options of the script (e.g. ``{"whiten-method": "pca"}``)."""


@dataclass(frozen=True)
class ScriptStage:
    """A stage run in the main job's process as ``module.run(options, models)`` of its script: ``options`` is the
    script's typed options (``catlens.stages.STAGE_OPTIONS``) with ``args`` over what the job passes."""

    enabled: bool = True
    args: Mapping[str, Any] = field(default_factory=_no_args)
    """Options of the script, read as its command line reads them: ``{"layers": "10-20", "coeffs": [0.1, 0.2],
    "gate": true}`` is ``--layers 10-20 --coeffs 0.1,0.2 --gate`` (``false``/``null`` leave the option out)."""


@dataclass(frozen=True)
class FiguresStage:
    """Every ``figures/fig_*.py`` on the stage folder it reads."""

    enabled: bool = True


@dataclass(frozen=True)
class ReportStage:
    """``report.html`` from the saved tables (rebuilt every time)."""

    enabled: bool = True


DEMO_ARGS: dict[str, dict[str, Any]] = {name: config_args(SIZES[name]["demo"]) for name in ("p1", "p2", "specificity")}
"""The main job's sizes for the three steering analyses: a reduced grid and capped sets so that ``make demo`` runs
every stage in minutes. The scripts' own defaults are the full protocol (``docs/RESULTS.md``); set a key to
``false``/``null`` to fall back to the script's default (``--set p1.args.test-cap=null``)."""


def _demo(name: str) -> Any:
    return lambda: ScriptStage(args=_frozen_map(DEMO_ARGS[name]))


@dataclass(frozen=True)
class Config:
    """The whole job (``analyses/main.py``)."""

    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    run: RunSection = field(default_factory=RunSection)
    finetune: FinetuneStage = field(default_factory=FinetuneStage)
    eval: EvalStage = field(default_factory=EvalStage)
    geometry: GeometryStage = field(default_factory=GeometryStage)
    p1: ScriptStage = field(default_factory=_demo("p1"))
    """``analyses/p1_steering.py``: categorical steering, gating, low-rank combination, transfer."""
    p2: ScriptStage = field(default_factory=_demo("p2"))
    """``analyses/p2_steering.py``: unsupervised, pruned and guided category vectors."""
    specificity: ScriptStage = field(default_factory=_demo("specificity"))
    """``analyses/specificity.py``: does steering along category i move category j?"""
    figures: FiguresStage = field(default_factory=FiguresStage)
    report: ReportStage = field(default_factory=ReportStage)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts (tuples as lists, ``None`` kept): JSON-ready, and :func:`from_dict` gives it back."""
        return _to_plain(self)

    @property
    def hash(self) -> str:
        from catlens.runs import sha256_text

        return sha256_text(json.dumps(self.to_dict(), sort_keys=True))

    def section(self, name: str) -> Any:
        if name not in SECTIONS:
            raise ConfigError(unknown_name_message("config section", name, SECTIONS))
        return getattr(self, name)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


SECTIONS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Config))
_DEFAULT = Config()
QUICK_ARGS: dict[str, dict[str, Any]] = {name: config_args(SIZES[name]["quick"]) for name in DEMO_ARGS}
"""The ``--quick`` job's sizes for the steering analyses: one layer, one setting per side, a handful of prompts per
set (a smoke run of every step, not a measurement; the scripts also get ``--quick``)."""
_EVAL_QUICK = SIZES["eval"]["quick"]
QUICK_DEFAULTS: dict[str, dict[str, Any]] = {
    "finetune": {"config": "quick"},
    "data": {"per_category": _EVAL_QUICK["per_category"], "per_set": _EVAL_QUICK["per_set"], "prompts_per_group": 3},
    "eval": {"max_new_tokens": _EVAL_QUICK["max_new_tokens"], "ungated": _EVAL_QUICK["ungated"],
             "args": {"gen-per-set": _EVAL_QUICK["gen_per_set"]}},
    "geometry": {"tsne_layers": SIZES["geometry"]["quick"]["tsne_layers"],
                 "cv_folds": SIZES["geometry"]["quick"]["cv_folds"]},
    **{name: {"args": {**{k: None for k in DEMO_ARGS[name]}, **QUICK_ARGS[name]}} for name in DEMO_ARGS}}
"""What ``run.quick = true`` changes, applied under the config file and the overrides (which win): the quick
fine-tune, a few prompts per set for the evaluation and the geometry (still every layer), and the steering analyses
at :data:`QUICK_ARGS` (the demo sizes unset): the whole job in about 5 minutes from an empty model cache."""
_MAP_FIELDS = ("args", "overrides")


def _section_types(section: str) -> dict[str, Any]:
    cls = typing.get_type_hints(Config)[section]
    return typing.get_type_hints(cls)


def valid_keys() -> list[str]:
    """Every ``section.field`` key (a map field shown as ``section.args.<name>``)."""
    keys = []
    for s in SECTIONS:
        for name in _section_types(s):
            keys.append(f"{s}.{name}.<name>" if name in _MAP_FIELDS else f"{s}.{name}")
    return keys


def _leaf_keys() -> list[str]:
    return [f"{s}.{name}" for s in SECTIONS for name in _section_types(s)]


# =========================================================================================== typed values
def _from_text(text: str, tp: Any) -> Any:
    """A command-line value for a field of type ``tp``: text fields take the text (a quoted JSON string is
    unquoted); everything else is read as JSON when it parses (``null``/``none`` mean None), else kept as text."""
    optional, base = split_optional(tp)
    stripped = text.strip()
    if optional and stripped.lower() in ("null", "none"):
        return None
    if base is str:
        if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"':
            try:
                return json.loads(stripped)
            except json.JSONDecodeError:
                return text
        return text
    if base is bool and stripped.lower() in ("true", "false"):
        return stripped.lower() == "true"
    if typing.get_origin(base) is tuple and not stripped.startswith("["):
        return [p.strip() for p in stripped.split(",") if p.strip()]
    try:
        return json.loads(stripped)
    except json.JSONDecodeError:
        if stripped.lower().lstrip("+-") in ("inf", "infinity", "nan"):
            return float(stripped)
        return text


def check_value(key: str, value: Any, tp: Any) -> Any:
    """``value`` converted to ``tp`` (ints stay ints, an int is accepted for a float, a list becomes a tuple, a
    table becomes a read-only mapping), or a :class:`ConfigError` naming ``key``, the value and the expected type."""
    value = check_field_type(value, tp, where=f"config key {key}", error=ConfigError,
                             tuple_hint=f" (e.g. --set '{key}=[\"a\", \"b\"]' or {key}=a,b)",
                             mapping_hint=f" (e.g. [{key}] in the file, or --set {key}.<name>=<value>)")
    if value is not None and is_mapping_type(split_optional(tp)[1]):
        return _frozen_map({k: _plain_value(f"{key}.{k}", v) for k, v in value.items()})
    return value


def _plain_value(key: str, value: Any) -> Any:
    """A value inside an ``args`` table: a scalar, a list of scalars or a nested table (finite numbers only)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"config key {key}={value!r}: expected a finite number.")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_value(key, v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain_value(f"{key}.{k}", v) for k, v in value.items()}
    raise ConfigError(f"config key {key}={value!r}: expected a string, number, true/false, a list or a table.")


# ================================================================================================ building
def _unknown_key(key: str, fix: str = "") -> ConfigError:
    return ConfigError(unknown_name_message("config key", key, valid_keys(),
                                            fix or "Write section.field, e.g. --set eval.batch_size=8."))


def from_dict(raw: Mapping[str, Any], where: str = "", checks: Sequence[Callable[[Config], Any]] = ()) -> Config:
    """Build a :class:`Config` from nested dicts (a parsed file), checking every key and value; ``checks`` (e.g.
    :func:`catlens.stages.check_stage_args`) run on the built tree before the checks that import the fine-tune
    configuration (and with it torch), so a typo they catch fails at once."""
    cfg = _build(raw, where)
    for check in checks:
        check(cfg)
    _validate(cfg, f"{where}: " if where else "")
    return cfg


def _build(raw: Mapping[str, Any], where: str = "") -> Config:
    """Keys and types only (the checks that combine fields come after every layer is merged)."""
    prefix = f"{where}: " if where else ""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{prefix}expected a table of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}.")
    sections: dict[str, Any] = {}
    hints = typing.get_type_hints(Config)
    for name, body in raw.items():
        if name not in SECTIONS:
            raise ConfigError(prefix + unknown_name_message("config section", name, SECTIONS,
                                                            "Valid keys: " + ", ".join(valid_keys()) + "."))
        if not isinstance(body, Mapping):
            raise ConfigError(f"{prefix}[{name}] must be a table of fields, got {body!r}.")
        types_ = _section_types(name)
        default = getattr(_DEFAULT, name)
        kwargs = {}
        for k, v in body.items():
            if k not in types_:
                raise ConfigError(prefix + str(_unknown_key(f"{name}.{k}")))
            try:
                kwargs[k] = check_value(f"{name}.{k}", v, types_[k])
            except ConfigError as e:
                raise ConfigError(prefix + str(e)) from None
            if k in _MAP_FIELDS:  # a map given is merged over the default map (null/false removes a key's option)
                kwargs[k] = _frozen_map({**getattr(default, k), **kwargs[k]})
        sections[name] = dataclasses.replace(default, **kwargs)
    return Config(**sections)


def _validate(cfg: Config, prefix: str = "") -> None:
    """Checks beyond the types: allowed names and ranges (the device is checked when the job starts)."""

    def fail(msg: str) -> None:
        raise ConfigError(prefix + msg)

    if cfg.model.dtype not in DTYPE_NAMES:
        fail("model.dtype: " + unknown_name_message("dtype", cfg.model.dtype, DTYPE_NAMES))
    for key, value, low in (("data.per_set", cfg.data.per_set, 1), ("data.per_category", cfg.data.per_category, 1),
                            ("data.prompts_per_group", cfg.data.prompts_per_group, 1),
                            ("run.threads", cfg.run.threads, 1), ("run.seed", cfg.run.seed, 0),
                            ("eval.batch_size", cfg.eval.batch_size, 1),
                            ("eval.max_new_tokens", cfg.eval.max_new_tokens, 1), ("eval.ungated", cfg.eval.ungated, 0),
                            ("geometry.cv_folds", cfg.geometry.cv_folds, 2),
                            ("geometry.batch_size", cfg.geometry.batch_size, 1)):
        if value is not None and value < low:
            fail(f"{key}={value} must be >= {low}.")
    if not cfg.run.out.strip():
        fail("run.out is empty: give the run folder, e.g. runs/main.")
    if cfg.finetune.enabled or cfg.finetune.overrides or cfg.finetune.config != "default":
        from catlens.finetune.config import CONFIGS, check_value as ft_check

        if cfg.finetune.config not in CONFIGS:
            fail("finetune.config: " + unknown_name_message("fine-tune preset", cfg.finetune.config, CONFIGS))
        for k, v in cfg.finetune.overrides.items():
            try:
                ft_check(k, v)
            except ValueError as e:
                fail(f"finetune.overrides.{k}: {e}")
    if not cfg.finetune.enabled and cfg.model.spec is None and not cfg.run.stock:
        fail("finetune.enabled=false needs a tuned model: set model.spec (a folder, hub id or embedded name), or "
             "run.stock=true to study the stock model.")


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(dict(out[k]), v)
        else:
            out[k] = v
    return out


def read_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The nested dict of a ``.toml`` or ``.yaml``/``.yml`` config file (a clear error naming the file when it
    cannot be read)."""
    p = Path(path).expanduser()
    if p.suffix not in CONFIG_SUFFIXES:
        raise ConfigError(f"config file {str(path)!r}: unknown format {p.suffix or '(no suffix)'!r}; give a "
                          f"{', '.join(CONFIG_SUFFIXES)} file (see configs/default.toml).")
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist; give a file such as "
                                f"configs/default.toml or configs/quick.toml.")
    try:
        text = p.read_text()
    except UnicodeDecodeError:
        raise FileFormatError(f"config file {str(path)!r} is not UTF-8 text.") from None
    if p.suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise FileFormatError(f"config file {str(path)!r} is not valid TOML: {e}.") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ConfigError(f"config file {str(path)!r} is YAML, and PyYAML is not installed: pip install pyyaml, "
                              f"or write the config as TOML.") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise FileFormatError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}.") from None
        data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise FileFormatError(f"config file {str(path)!r} must hold a table of sections "
                              f"({', '.join(SECTIONS)}), not {type(data).__name__}.")
    return dict(data)


def parse_sets(items: Sequence[str]) -> list[tuple[str, Any]]:
    """``["eval.batch_size=8", "p1.args.layers=10-20"]`` -> ``[(("eval", "batch_size"), 8), ...]`` as
    ``(dotted key, typed value)`` pairs, each key checked and each value converted to its field's type now."""
    out = []
    for item in items:
        key, sep, text = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write section.field=value, e.g. --set eval.batch_size=8.")
        try:
            out.append((key, _typed_override(key, text)))
        except ConfigError as e:
            raise ConfigError(f"--set {item!r}: {e}") from None
    return out


def _typed_override(key: str, text: Any) -> Any:
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise _unknown_key(key)
    types_ = _section_types(parts[0])
    name = parts[1]
    if name not in types_:
        raise _unknown_key(key)
    tp = types_[name]
    if len(parts) == 2:
        return check_value(key, _from_text(text, tp) if isinstance(text, str) else text, tp)
    if name not in _MAP_FIELDS:
        raise _unknown_key(key, f"{parts[0]}.{name} has no sub-keys; write --set {parts[0]}.{name}=<value>.")
    if any(not p for p in parts[2:]):
        raise _unknown_key(key)
    value = _from_text(text, Any) if isinstance(text, str) else text
    return _plain_value(key, value)


def _apply(raw: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    parts = key.split(".")
    nested: Any = value
    for p in reversed(parts[1:]):
        nested = {p: nested}
    top = {parts[0]: nested}
    if len(parts) == 2 and parts[1] in _MAP_FIELDS:  # a whole table replaces the table
        merged = dict(raw)
        merged[parts[0]] = {**dict(merged.get(parts[0], {})), parts[1]: dict(value)}
        return merged
    return _deep_merge(raw, top)


def resolve(file: str | os.PathLike[str] | None = None, sets: Sequence[str] = (),
            shorthands: Sequence[tuple[str, Any]] = (), checks: Sequence[Callable[[Config], Any]] = ()) -> Config:
    """The resolved :class:`Config`: defaults, quick defaults (when ``run.quick``), ``file``, then ``shorthands``
    (``(key, value)`` pairs from command-line flags, already typed) and ``sets`` (``--set`` items), later winning;
    ``checks`` as for :func:`from_dict`."""
    raw: dict[str, Any] = {}
    where = ""
    if file is not None:
        raw = read_file(file)
        where = f"config file {str(file)!r}"
        _build(raw, where)  # every key and value of the file checked, naming the file
    pairs = [(k, _checked_shorthand(k, v)) for k, v in shorthands] + parse_sets(sets)
    for key, value in pairs:
        raw = _apply(raw, key, value)
    quick = bool(raw.get("run", {}).get("quick", False)) if isinstance(raw.get("run"), Mapping) else False
    if quick:
        raw = _deep_merge({s: dict(v) for s, v in QUICK_DEFAULTS.items()}, raw)
    return from_dict(raw, checks=checks)


def _checked_shorthand(key: str, value: Any) -> Any:
    try:
        return _typed_override(key, value)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


# ================================================================================================= writing
def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(k: str) -> str:
    return k if _BARE_KEY.match(k) else json.dumps(k)


def _toml_value(v: Any, key: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        if any(x is None for x in v):
            raise ConfigError(f"{key}: a list with a null cannot be written as TOML.")
        return "[" + ", ".join(_toml_value(x, key) for x in v) + "]"
    if isinstance(v, Mapping):
        items = [f"{_toml_key(str(k))} = {_toml_value(x, key)}" for k, x in v.items() if x is not None]
        return "{" + ", ".join(items) + "}"
    raise ConfigError(f"{key}={v!r} cannot be written as TOML.")


def to_toml(cfg: Config, header: str = "") -> str:
    """The config as TOML text (``None`` fields left out: they are the defaults); ``tomllib`` reads it back to the
    same tree."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section, body in cfg.to_dict().items():
        if lines:
            lines.append("")
        lines.append(f"[{section}]")
        tables = []
        for k, v in body.items():
            if v is None:
                lines.append(f"# {k} = (unset)")
            elif isinstance(v, Mapping):
                tables.append((k, v))
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v, f'{section}.{k}')}")
        for k, table in tables:
            lines.append(f"[{section}.{_toml_key(k)}]")
            for kk, vv in table.items():
                if vv is not None:
                    lines.append(f"{_toml_key(str(kk))} = {_toml_value(vv, f'{section}.{k}.{kk}')}")
    return "\n".join(lines) + "\n"


def load(path: str | os.PathLike[str]) -> Config:
    """A config file as a :class:`Config` (no overrides)."""
    return resolve(path)


def args_to_argv(args: Mapping[str, Any]) -> list[str]:
    """A stage's ``args`` table as command-line options: ``{"per_set": 10, "gate": True, "coeffs": [0.1, 0.2]}``
    -> ``["--per-set", "10", "--gate", "--coeffs", "0.1,0.2"]`` (``False``/``None`` leave the option out; a
    table is passed as JSON).

    >>> args_to_argv({"per_set": 10, "gate": True, "off": False, "coeffs": [0.1, 0.2]})
    ['--per-set', '10', '--gate', '--coeffs', '0.1,0.2']
    """
    argv: list[str] = []
    for k, v in args.items():
        flag = "--" + str(k).replace("_", "-").lstrip("-")
        if v is None or v is False:
            continue
        if v is True:
            argv.append(flag)
        elif isinstance(v, (list, tuple)):
            argv += [flag, ",".join(str(x) for x in v)]
        elif isinstance(v, Mapping):
            argv += [flag, json.dumps(dict(v))]
        else:
            argv += [flag, str(v)]
    return argv
