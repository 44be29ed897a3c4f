"""Fine-tune configuration: :class:`FinetuneConfig`, the presets :data:`CONFIGS`, and the conversion of
command-line overrides (``--set FIELD=VALUE``) into typed field values."""

import dataclasses
import json
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from catlens._typecheck import check_field_type
from catlens.model import DEFAULT_MODEL, DTYPES
from catlens.refusal import COCONOT_CATEGORIES
from catlens.runs import sha256_text
from catlens.taxonomy import CATEGORIES, unknown_name_message

from catlens.finetune.targets import REFUSAL_REASONS, REFUSAL_SENTENCES

METHODS = ("full", "last-k", "lora")
INITS = ("prototype", "mean")
SCHEMES = ("taxonomy", "coconot")
DATA_SOURCES = ("auto", "datasets", "builtin")

DEFAULT_CATEGORIES = ("hate_harassment", "violence_terrorism", "self_harm", "weapons_drugs", "cybercrime",
                      "fraud_financial_crime", "privacy", "misinformation")
"""The eight shared categories of the built-in prompt set; each has >= 70 prompts in CatQA + BeaverTails-Evaluation +
Do-Not-Answer, so the offline and the data-directory fine-tunes share their tokens."""

_DEFAULT_LR = {"full": 8e-5, "last-k": 1e-4, "lora": 3e-4}
_MAX_LR = 1.0
"""Largest accepted learning rate (anything near it diverges; it catches typos like ``lr=3`` for ``3e-4``)."""

# =============================================================================================== configuration
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(FinetuneConfig)


def check_value(name: str, value: Any, *, from_text: bool = False) -> Any:
    """``value`` as the type of field ``name`` (ints stay ints, an int is accepted for a float, lists become
    tuples), or a ``ValueError`` that names the field, the value and the expected type. Floats must be finite.
    With ``from_text`` a string is first read as JSON (``"1e-4"``, ``"null"``, ``'["privacy"]'``); a string that
    is not JSON stays a string."""
    types = _field_types()
    if name not in types:
        raise ValueError(unknown_name_message("FinetuneConfig field", name, types))
    tp = types[name]
    if from_text and isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            try:  # JSON has no Infinity/NaN spellings beyond these; let float() read the rest (e.g. "inf")
                value = float(value) if value.strip().lower().lstrip("+-") in ("inf", "infinity", "nan") else value
            except ValueError:
                pass
    return check_field_type(value, tp, where=f"FinetuneConfig.{name}", error=ValueError,
                            tuple_name="a list of names",
                            tuple_hint=f", e.g. ('privacy',) (on the command line: --set '{name}=[\"privacy\"]')")


def _check_device(device: str) -> None:
    import torch

    try:
        torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"FinetuneConfig.device={device!r} is not a torch device; use e.g. 'cpu', 'cuda', "
                         f"'cuda:1' or 'mps'.") from None


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-4", "prototype_anchor=null"]`` -> ``{"lr": 1e-4, "prototype_anchor": None}``: each value read as
    JSON when it parses (else a string) and converted to its field's type now, so a bad value fails at parse
    time with the field, the value and the expected type (:func:`check_value`)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. --set lr=1e-4.")
        try:
            out[key.strip()] = check_value(key.strip(), raw, from_text=True)
        except ValueError as err:
            raise ValueError(f"--set {item!r}: {err}") from None
    return out


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines a refusal-token fine-tune (presets: :data:`CONFIGS`)."""

    name: str = "default"
    """Preset name; the default output folder is ``refusal-<name>`` (``-<hash>`` added when fields differ)."""
    base: str = DEFAULT_MODEL
    """Model to fine-tune: embedded name, checkpoint folder or hub id."""
    data: str = "auto"
    """``"datasets"`` (benchmark files in the data directory), ``"builtin"`` (the packaged prompt set, offline) or
    ``"auto"`` (datasets when a data directory exists, else builtin)."""
    scheme: str = "taxonomy"
    """Category names: ``"taxonomy"`` (shared harm taxonomy, tokens ``[refuse:<category>]``) or ``"coconot"``
    (CoCoNot's five noncompliance categories with the published checkpoint's token strings, as in P1)."""
    categories: tuple[str, ...] | None = DEFAULT_CATEGORIES
    """Categories that get a token; ``None`` = every category with at least ``min_per_category`` training prompts."""
    single_token: bool = False
    """Binary variant: one ``[refuse]`` token for all harmful prompts (P1's binary-refusal baseline)."""
    heldout_fraction: float = 0.3
    """Share of each category's harmful prompts (and of the paired benign sets) held out for evaluation."""
    split_seed: int = 0
    """Seed of the train/held-out split (kept fixed when the training seed changes)."""
    min_per_category: int = 20
    """A category needs at least this many training prompts (fewer is an error for a requested category)."""
    max_per_category: int = 150
    """At most this many training prompts per category (seeded sample), to balance the categories."""
    n_ordinary: int = 200
    """Ordinary benign instructions (Alpaca; built-in ordinary prompts offline) in the training set."""
    n_topic: int = 350
    """Topic-matched benign prompts (CoCoNot pref/contrast, JBB benign, built-in lookalikes) in the training set."""
    match_form: bool = True
    """Draw the ordinary benign prompts so their question share matches the harmful side's."""
    answer_tokens: int = 24
    """Length of the self-distilled answers (greedy, stock model) that follow ``[respond]``."""
    max_prompt_tokens: int = 128
    """Training prompts longer than this (chat-templated tokens) are left out (the number is recorded)."""
    method: str = "full"
    """``"full"`` fine-tuning, ``"last-k"`` (last ``last_k`` blocks) or ``"lora"``."""
    last_k: int = 6
    """Blocks trained by ``method="last-k"``."""
    lora_rank: int = 16
    """Rank of the LoRA adapters (``method="lora"``)."""
    lora_alpha: float = 32.0
    """LoRA scale numerator (the update is ``alpha / rank * B A``)."""
    init: str = "prototype"
    """New token embedding initialisation: ``"prototype"`` or ``"mean"`` (module docstring)."""
    prototype_prompts: int = 32
    """Prompts per token averaged for the prototype initialisation."""
    prototype_contrast: float = 4.0
    """Prototype rows are ``mu_bar + contrast * (mu_t - mu_bar)`` (``mu_bar`` = mean of the token prototypes) before
    scaling: values above 1 amplify what tells the tokens apart (on the built-in training prompts the first-token
    decision before training was right for 51 % of prompts with 1, 71 % with 4)."""
    prototype_anchor: str | None = "\n"
    """One-token string whose embedding is added under each prototype row (``None``: no anchor). The embeddings are
    tied, so a new token's row is also its input embedding: a bare prototype (a final-layer direction) read as input
    makes the stock model continue mid-sentence (the "swallowed first word" after ``[respond]``); with the newline
    anchor the stock model continues exactly as without the token."""
    steps: int = 240
    """Optimiser steps."""
    batch_size: int = 8
    """Examples per step."""
    lr: float | None = None
    """Peak learning rate; ``None`` = method default (full 8e-5, last-k 1e-4, lora 3e-4)."""
    new_token_lr: float = 2e-3
    """Peak learning rate of the new token rows (same schedule). They are the refusal decision's read-out, and at
    the body's rate they barely move (Adam's step is about ``lr`` per coordinate)."""
    warmup_steps: int = 10
    """Linear warm-up steps; the rate then decays linearly to 10 % of the peak."""
    first_token_weight: float = 20.0
    """Loss weight of the first response token (the refusal decision) relative to the other response tokens."""
    max_length: int = 192
    """Longest training sequence (prompt + response tokens); longer examples are an error."""
    checkpoint_every: int = 25
    """Write a resumable checkpoint every this many steps (0 = never)."""
    seed: int = 0
    """Seed of the data order, refusal sentences, LoRA initialisation and ordinary-prompt sample."""
    device: str = "cpu"
    """Device to fine-tune on (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``); not part of the config hash."""
    dtype: str = "float32"
    """Weight dtype while training and in the saved checkpoint: ``float32``, ``bfloat16`` or ``float16``."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # types first: a wrong type must not surface later as a TypeError
            object.__setattr__(self, f.name, check_value(f.name, getattr(self, f.name)))

        def choice(field_name: str, value: Any, allowed: Sequence[str]) -> None:
            if value not in allowed:
                raise ValueError(f"FinetuneConfig.{field_name}: " + unknown_name_message(field_name, value, allowed))

        choice("method", self.method, METHODS)
        choice("init", self.init, INITS)
        choice("scheme", self.scheme, SCHEMES)
        choice("data", self.data, DATA_SOURCES)
        choice("dtype", self.dtype, tuple(DTYPES))
        _check_device(self.device)
        if self.categories is not None:
            allowed = CATEGORIES if self.scheme == "taxonomy" else COCONOT_CATEGORIES
            for c in self.categories:
                if c not in allowed:
                    raise ValueError("FinetuneConfig.categories: " + unknown_name_message(
                        f"{self.scheme} category", c, allowed))
            if len(set(self.categories)) != len(self.categories) or not self.categories:
                raise ValueError(f"categories={self.categories} must be non-empty and without repeats.")
        if self.scheme == "coconot" and self.data == "builtin":
            raise ValueError("scheme='coconot' needs the CoCoNot files (data='datasets' or 'auto'); the built-in "
                             "prompt set has no CoCoNot categories.")
        if not 0 < self.heldout_fraction < 1:
            raise ValueError(f"heldout_fraction={self.heldout_fraction} must be in (0, 1), e.g. 0.3.")
        positive = ("min_per_category", "max_per_category", "answer_tokens", "max_prompt_tokens", "steps",
                    "batch_size", "max_length", "prototype_prompts", "last_k", "lora_rank")
        for f in positive:
            if getattr(self, f) < 1:
                raise ValueError(f"FinetuneConfig.{f}={getattr(self, f)} must be >= 1.")
        for f in ("n_ordinary", "n_topic", "warmup_steps", "checkpoint_every", "seed", "split_seed"):
            if getattr(self, f) < 0:
                raise ValueError(f"FinetuneConfig.{f}={getattr(self, f)} must be >= 0.")
        if self.max_per_category < self.min_per_category:
            raise ValueError(f"max_per_category={self.max_per_category} < min_per_category={self.min_per_category}.")
        for f, top in (("lr", _MAX_LR), ("new_token_lr", _MAX_LR), ("prototype_contrast", None),
                       ("first_token_weight", None), ("lora_alpha", None)):
            value = getattr(self, f)
            if value is None:  # lr: the method default
                continue
            if not value > 0 or (top is not None and value > top):
                bound = f"in (0, {top}]" if top is not None else "> 0"
                raise ValueError(f"FinetuneConfig.{f}={value} must be {bound}"
                                 + (" (or None for the method default)." if f == "lr" else "."))
        if self.max_prompt_tokens + 2 > self.max_length:
            raise ValueError(f"max_prompt_tokens={self.max_prompt_tokens} leaves no room for a response within "
                             f"max_length={self.max_length}.")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else _DEFAULT_LR[self.method]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["categories"] = list(self.categories) if self.categories is not None else None
        return d

    @property
    def hash(self) -> str:
        """sha256 of the fields that change the result (everything but ``name``, ``checkpoint_every`` and
        ``device``; ``dtype`` only when it is not float32, so hashes of older fine-tunes stay valid)."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("name", "checkpoint_every", "device")}
        if d["dtype"] == "float32":
            del d["dtype"]
        d["learning_rate"] = self.learning_rate
        d["refusal_sentences"] = REFUSAL_SENTENCES
        d["refusal_reasons"] = REFUSAL_REASONS
        return sha256_text(json.dumps(d, sort_keys=True))

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)


CONFIGS: dict[str, FinetuneConfig] = {
    "default": FinetuneConfig(),
    "quick": FinetuneConfig(name="quick", data="builtin", n_ordinary=40, n_topic=60, max_per_category=12,
                            min_per_category=8, answer_tokens=24, method="last-k", last_k=10, steps=40,
                            prototype_prompts=12, checkpoint_every=10),
    "coconot": FinetuneConfig(name="coconot", scheme="coconot", categories=COCONOT_CATEGORIES, data="datasets"),
}
"""Presets: ``default`` (12-18 min on 2 CPU cores, self-distillation included), ``quick`` (built-in prompts,
under 3 min, for tests and demos; a weaker refuser) and ``coconot`` (CoCoNot's five categories with the published checkpoint's token strings, as in P1)."""


def _check_fields(overrides: Mapping[str, Any], where: str = "") -> None:
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    for k in overrides:
        if k not in fields:
            raise ValueError(where + unknown_name_message("FinetuneConfig field", k, fields))


def get_config(name: str = "default", **overrides: Any) -> FinetuneConfig:
    """A preset of :data:`CONFIGS` with some fields replaced (``None`` overrides are ignored)."""
    if name not in CONFIGS:
        raise ValueError(unknown_name_message("fine-tune config", name, CONFIGS))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    _check_fields(overrides)
    return CONFIGS[name].replace(**overrides) if overrides else CONFIGS[name]


def default_name(config: FinetuneConfig) -> str:
    """``refusal-<preset>`` for an unchanged preset, else ``refusal-<preset>-<first 8 hex of the config hash>``."""
    preset = CONFIGS.get(config.name)
    if preset is not None and preset.hash == config.hash:
        return f"refusal-{config.name}"
    return f"refusal-{config.name}-{config.hash[:8]}"

