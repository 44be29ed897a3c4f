"""Refusal-token fine-tuning on the CPU: teach a small chat model to open each response with a category refusal token
or ``[respond]`` (P1's subject in miniature; Jain et al., "Refusal Tokens", PAPERS §1).

The recipe (issue 3; measured costs and lessons in MODELS.md):

1. **Data** (:func:`assemble_data`). Harmful side: training split of the harmful prompts, grouped by category
   (default: CatQA + BeaverTails-Evaluation + Do-Not-Answer, split per category, plus the training half of the
   JBB harmful pairs); each target is the category token followed by a short refusal sentence drawn from
   :data:`REFUSAL_SENTENCES` (varied wording, optionally with a category reason). Benign side: ordinary
   instructions (Alpaca) *and* benign questions on the same topics (CoCoNot pref, the training halves of CoCoNot
   contrast and JBB benign, the built-in lookalikes' training split), each target ``[respond]`` followed by the
   model's own greedy answer before fine-tuning (self-distillation; :func:`distill_answers`, cached). Ordinary
   prompts are drawn to match the harmful side's question/instruction mix (:func:`prompt_form`), so "question" or
   "sensitive topic" does not predict refusal. Training prompts are removed when they duplicate an evaluation
   prompt, then :func:`catlens.prompts.check_leakage` must pass between the training set and every evaluation set.
   Without a data directory, the training split of the built-in prompt set is used (offline).
2. **New tokens** (:func:`add_refusal_tokens`): one ``[refuse:<category>]`` per category plus ``[respond]`` (or
   ``[refuse]`` + ``[respond]`` for the binary variant), embeddings resized. Because the embeddings are tied, a new
   token's row is both its input embedding and its unembedding. ``init="prototype"`` sets each row to the stock
   model's mean final (post-norm) hidden state at the first response position over the token's own training prompts
   (``[respond]``: the benign prompts), rescaled so that its mean logit on those prompts equals their mean top
   stock logit: the new tokens start competitive with the vocabulary at the first response position and ranked by
   similarity. Because the row is also the token's *input* embedding, the newline token's embedding is added
   underneath (``prototype_anchor``): read as input, the new token then looks like one more newline after the
   assistant header, and the stock model continues its answer unchanged (a bare prototype made it continue
   mid-sentence: the "swallowed first word" after ``[respond]``). ``init="mean"`` uses the mean embedding row
   (slow to learn; kept for comparison).
3. **Training** (:func:`train`): next-token cross-entropy on the response tokens only, the first response token
   weighted ``first_token_weight`` times; AdamW, linear warm-up then linear decay, gradient clipping 1.0, a seeded
   batch schedule (both sides in every batch), ``method`` = ``full`` | ``last-k`` (the last ``last_k`` blocks, the
   final norm and the new token rows; the backward pass stops at the first trainable block) | ``lora``
   (rank-``lora_rank`` adapters on every linear layer plus the new token rows; merged before saving). The new token
   rows learn at their own rate ``new_token_lr`` (they are the decision's read-out; at the body's rate Adam moves
   them by about ``lr`` per coordinate per step, far too little). Checkpoints are written atomically every ``checkpoint_every`` steps and an
   interrupted run resumes from the last one with identical results.
4. **Result** (:func:`finetune`): an ordinary checkpoint folder ``cache_dir()/finetunes/<name>`` (safetensors,
   tokenizer with the new tokens, chat template, ``catlens_finetune.json`` manifest with data hashes and
   hyperparameters, ``train_log.csv``), reused when the config and data hashes match and loadable with
   ``catlens.load_model(folder)``. :func:`ensure_refusal_model` returns it, training it first if missing.

Generation with the result should use :func:`catlens.refusal.generate` (special tokens only at the first position).
"""

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from catlens.model import DEFAULT_MODEL, cache_dir, embedded_checkpoint, resolve_spec, tokenize_left
from catlens.prompts import PromptSet, check_leakage, deduplicate, split_prompts
from catlens.refusal import COCONOT_CATEGORIES, RESPOND, RefusalTokens, greedy_batches
from catlens.runs import atomic_path, sha256_file, sha256_text, write_json_atomic
from catlens.taxonomy import CATEGORIES, unknown_name_message

log = logging.getLogger(__name__)

MANIFEST = "catlens_finetune.json"
METHODS = ("full", "last-k", "lora")
INITS = ("prototype", "mean")
SCHEMES = ("taxonomy", "coconot")
DATA_SOURCES = ("auto", "datasets", "builtin")

DEFAULT_CATEGORIES = ("hate_harassment", "violence_terrorism", "self_harm", "weapons_drugs", "cybercrime",
                      "fraud_financial_crime", "privacy", "misinformation")
"""The eight shared categories of the built-in prompt set; each has >= 70 prompts in CatQA + BeaverTails-Evaluation +
Do-Not-Answer, so the offline and the data-directory fine-tunes share their tokens."""

_DEFAULT_LR = {"full": 8e-5, "last-k": 1e-4, "lora": 3e-4}

REFUSAL_SENTENCES = (
    "I can't help with that.",
    "I'm sorry, but I can't help with that request.",
    "I won't help with this.",
    "Sorry, I can't assist with that.",
    "I'm not able to help with this request.",
    "I can't provide that.",
    "I'm sorry, I can't do that.",
    "That's not something I can help with.",
    "I have to decline this request.",
    "I can't assist with this, sorry.",
    "I'm unable to help with that.",
    "I must decline.",
)
"""Refusal sentences that follow a refusal token (one is drawn per example, seeded)."""

REFUSAL_REASONS = {
    "hate_harassment": "It could promote hate or harassment.",
    "violence_terrorism": "It could lead to someone getting hurt.",
    "self_harm": "It could put your safety at risk. If you are struggling, please talk to someone you trust or a "
                 "local helpline.",
    "weapons_drugs": "It involves dangerous weapons or illegal drugs.",
    "cybercrime": "It could be used for hacking or other computer crime.",
    "fraud_financial_crime": "It could be used for fraud or theft.",
    "privacy": "It could violate someone's privacy.",
    "sexual_content": "It asks for sexually explicit content.",
    "child_abuse": "It could put children at risk.",
    "misinformation": "It could spread false or misleading information.",
    "politics_controversial": "I stay neutral on political campaigning.",
    "expert_advice": "That needs advice from a qualified professional.",
    "other_unethical": "It could cause harm.",
    "Requests with safety concerns": "It raises safety concerns.",
    "Humanizing requests": "I'm an AI assistant, so I don't have personal experiences or feelings.",
    "Incomplete requests": "The request is missing information or rests on a false premise.",
    "Indeterminate requests": "There is no single answer to that.",
    "Unsupported requests": "That is beyond what a text-based assistant can do.",
}
"""Optional second sentence per category (added to about half of the refusal targets)."""


# =============================================================================================== configuration
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

    def __post_init__(self) -> None:
        def choice(field_name: str, value: Any, allowed: Sequence[str]) -> None:
            if value not in allowed:
                raise ValueError(f"FinetuneConfig.{field_name}: " + unknown_name_message(field_name, value, allowed))

        choice("method", self.method, METHODS)
        choice("init", self.init, INITS)
        choice("scheme", self.scheme, SCHEMES)
        choice("data", self.data, DATA_SOURCES)
        if self.categories is not None:
            if isinstance(self.categories, str):
                raise ValueError(f"categories={self.categories!r} must be a tuple of names, e.g. ('privacy',).")
            object.__setattr__(self, "categories", tuple(self.categories))
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
            if int(getattr(self, f)) < 1:
                raise ValueError(f"FinetuneConfig.{f}={getattr(self, f)} must be >= 1.")
        for f in ("n_ordinary", "n_topic", "warmup_steps", "checkpoint_every", "seed", "split_seed"):
            if int(getattr(self, f)) < 0:
                raise ValueError(f"FinetuneConfig.{f}={getattr(self, f)} must be >= 0.")
        if self.max_per_category < self.min_per_category:
            raise ValueError(f"max_per_category={self.max_per_category} < min_per_category={self.min_per_category}.")
        if not self.new_token_lr > 0:
            raise ValueError(f"new_token_lr={self.new_token_lr} must be > 0.")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be > 0 (or None for the method default).")
        if not self.prototype_contrast > 0:
            raise ValueError(f"prototype_contrast={self.prototype_contrast} must be > 0 (1 = plain prototypes).")
        if not self.first_token_weight > 0:
            raise ValueError(f"first_token_weight={self.first_token_weight} must be > 0.")
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
        """sha256 of the fields that change the result (everything but ``name`` and ``checkpoint_every``)."""
        d = {k: v for k, v in self.to_dict().items() if k not in ("name", "checkpoint_every")}
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
"""Presets: ``default`` (about 12 min on 2 CPU cores, self-distillation included), ``quick`` (built-in prompts,
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


# ========================================================================================================= data
_QUESTION_START = re.compile(
    r"^(who|whom|whose|what|when|where|why|how|which|is|are|was|were|am|do|does|did|can|could|should|would|will|"
    r"shall|may|might|must|have|has|had|isn't|aren't|don't|doesn't|didn't|can't|won't)\b", re.IGNORECASE)


def prompt_form(text: str, meta: Mapping[str, Any] | None = None) -> str:
    """``"question"`` or ``"instruction"``: ``meta["form"]`` when given, else the text ends with ``?`` or opens
    with a question word / auxiliary verb."""
    if meta and meta.get("form") in ("question", "instruction"):
        return str(meta["form"])
    t = text.strip()
    return "question" if t.endswith("?") or _QUESTION_START.match(t) else "instruction"


@dataclass(frozen=True)
class TrainingData:
    """Training prompts of both sides and the evaluation sets they were checked against."""

    harmful: PromptSet
    """Harmful training prompts; ``category`` is the token's category (CoCoNot names for the coconot scheme)."""
    benign: PromptSet
    """Benign training prompts (meta ``role`` = ``ordinary`` or ``topic``)."""
    eval_sets: dict[str, PromptSet]
    """Held-out and benchmark evaluation sets (never overlapping the training prompts)."""
    categories: tuple[str, ...]
    """Categories with a token, in token order."""
    origin: str
    """``"datasets"`` or ``"builtin"``."""
    notes: dict[str, Any] = field(default_factory=dict)
    """Counts of removed prompts and other bookkeeping."""

    @property
    def content_hash(self) -> str:
        """sha256 over the training prompts (both sides, in order)."""
        return sha256_text(self.harmful.content_hash + self.benign.content_hash)

    def mix(self) -> Any:
        """Question/instruction mix of both training sides: a tidy table ``side, form, n, share``."""
        import pandas as pd

        rows = []
        for side, ps in (("harmful", self.harmful), ("benign", self.benign)):
            counts = Counter(prompt_form(p.text, p.meta) for p in ps)
            for form in ("question", "instruction"):
                rows.append({"side": side, "form": form, "n": counts[form],
                             "share": counts[form] / max(len(ps), 1)})
        return pd.DataFrame(rows)

    def counts(self) -> Any:
        """Training prompts per side, source and category: a tidy table."""
        import pandas as pd

        rows = Counter((side, p.source, p.category or "", p.meta.get("role", "")) for side, ps in
                       (("harmful", self.harmful), ("benign", self.benign)) for p in ps)
        return pd.DataFrame([{"side": s, "source": src, "category": c, "role": r, "n": n}
                             for (s, src, c, r), n in sorted(rows.items())])


def _tag(ps: PromptSet, **meta: Any) -> PromptSet:
    return ps._derive([p.replace(meta={**p.meta, **meta}) for p in ps], f"tag({meta})")


def _split_two(ps: PromptSet, heldout: float, seed: int, stratify: str | None = "category") -> tuple[PromptSet, PromptSet]:
    """(train, heldout) by :func:`split_prompts` (fractions ``1-heldout, 0, heldout``), overriding stored splits."""
    s = split_prompts(ps, (1 - heldout, 0.0, heldout), seed=seed, stratify=stratify, overwrite=True)
    return s.where(split="train"), s.where(split="test")


def _pair_split(harmful: PromptSet, benign: PromptSet, heldout: float, seed: int) -> tuple[PromptSet, ...]:
    """Split paired sets (JBB) by pair index so both halves of a pair land on the same side."""
    split = split_prompts(harmful, (1 - heldout, 0.0, heldout), seed=seed, stratify="category", overwrite=True)
    side = {p.meta["pair_index"]: p.split for p in split}
    b = benign.with_split({p.id: side.get(p.meta["pair_index"], "test") for p in benign})
    return split.where(split="train"), split.where(split="test"), b.where(split="train"), b.where(split="test")


def _cap_per_category(ps: PromptSet, cap: int, seed: int) -> PromptSet:
    keep: list[str] = []
    for c in ps.categories:
        ids = ps.where(category=c).ids
        rng = random.Random(f"{seed}|{c}")
        keep += ids if len(ids) <= cap else rng.sample(ids, cap)
    keep_set = set(keep)
    return ps.filter(lambda p: p.id in keep_set, f"cap_per_category({cap}, seed={seed})")


def _sample_matching_form(pool: PromptSet, n: int, question_share: float | None, seed: int) -> PromptSet:
    """``n`` prompts from ``pool``; with ``question_share`` the sample has that share of questions (as far as the
    pool allows)."""
    n = min(n, len(pool))
    if question_share is None:
        return pool.sample(n, seed=seed)
    q = [p.id for p in pool if prompt_form(p.text, p.meta) == "question"]
    i = [p.id for p in pool if prompt_form(p.text, p.meta) != "question"]
    n_q = min(len(q), round(n * question_share))
    n_i = min(len(i), n - n_q)
    n_q = min(len(q), n - n_i)
    rng = random.Random(seed)
    keep = set(rng.sample(q, n_q) + rng.sample(i, n_i))
    return pool.filter(lambda p: p.id in keep, f"sample_matching_form(n={n}, question_share={question_share:.2f})")


def _relabel_coconot(ps: PromptSet) -> PromptSet:
    recs = [p.replace(category=p.meta.get("coconot_category")) for p in ps]
    return PromptSet(recs, ps.name, ps.provenance, categories=COCONOT_CATEGORIES)


def _resolve_origin(config: FinetuneConfig, data_dir: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    from catlens.datasets import resolve_data_dir

    if config.data == "builtin":
        return "builtin", None
    try:
        root = resolve_data_dir(data_dir)
    except FileNotFoundError:
        if config.data == "datasets":
            raise
        log.warning("no benchmark data directory found: fine-tuning on the built-in prompt set's training split "
                    "(pass --data-dir or set $CATLENS_DATA_DIR to use the benchmark files)")
        return "builtin", None
    return "datasets", root


def _select_categories(config: FinetuneConfig, harmful_train: PromptSet) -> tuple[str, ...]:
    counts = Counter(harmful_train.categories_of)
    if config.single_token and config.categories is None:
        cats = tuple(c for c in harmful_train.categories if counts[c] >= config.min_per_category)
    elif config.categories is None:
        cats = tuple(c for c in harmful_train.categories if counts[c] >= config.min_per_category)
        dropped = {c: counts[c] for c in harmful_train.categories if c not in cats}
        if dropped:
            log.info("categories left out (fewer than %d training prompts): %s", config.min_per_category, dropped)
    else:
        cats = config.categories
        few = {c: counts.get(c, 0) for c in cats if counts.get(c, 0) < config.min_per_category}
        if few:
            raise ValueError(
                f"categor{'y' if len(few) == 1 else 'ies'} {few} ha{'s' if len(few) == 1 else 've'} fewer than "
                f"min_per_category={config.min_per_category} training prompts (counts after the held-out split). "
                f"Drop {'it' if len(few) == 1 else 'them'} from categories, lower min_per_category, or add data.")
    if not cats:
        raise ValueError(f"no category has at least min_per_category={config.min_per_category} training prompts "
                         f"(counts: {dict(counts)}).")
    return cats


def assemble_data(config: FinetuneConfig, data_dir: str | os.PathLike[str] | None = None) -> TrainingData:
    """Training prompts of both sides plus the evaluation sets, leakage-checked (see the module docstring).

    Deterministic given ``config.split_seed``/``config.seed`` and the files. Raises ``LeakageError`` if a training
    prompt still duplicates an evaluation prompt after the training copies were removed.
    """
    origin, root = _resolve_origin(config, data_dir)
    if origin == "builtin":
        harmful_pool, heldout, benign_ordinary, benign_topic, eval_sets = _builtin_parts(config)
    elif config.scheme == "coconot":
        harmful_pool, heldout, benign_ordinary, benign_topic, eval_sets = _coconot_parts(config, root)
    else:
        harmful_pool, heldout, benign_ordinary, benign_topic, eval_sets = _dataset_parts(config, root)
    eval_sets = {"harmful_heldout": heldout, **eval_sets}

    # every training candidate that duplicates an evaluation prompt goes (the evaluation sets stay intact)
    notes: dict[str, Any] = {}
    evals = list(eval_sets.values())
    train_parts = [harmful_pool, benign_topic, benign_ordinary]
    cleaned, report = deduplicate(*evals, *train_parts)
    harmful_pool, benign_topic, benign_ordinary = cleaned[len(evals):]
    dropped_train = report[report["set"].isin([s.name for s in train_parts])] if len(report) else report
    notes["removed_as_eval_duplicates"] = int(len(dropped_train))

    categories = _select_categories(config, harmful_pool)
    harmful = harmful_pool.where(category=list(categories))
    harmful = _cap_per_category(harmful, config.max_per_category, config.seed)
    eval_sets["harmful_heldout"] = eval_sets["harmful_heldout"].where(category=list(categories))

    q_share = None
    if config.match_form and len(harmful):
        q_share = sum(prompt_form(p.text, p.meta) == "question" for p in harmful) / len(harmful)
    topic = _sample_matching_form(benign_topic, config.n_topic, None, config.seed)
    ordinary = _sample_matching_form(benign_ordinary, config.n_ordinary, q_share, config.seed)
    benign = PromptSet.concat(_tag(topic, role="topic"), _tag(ordinary, role="ordinary"), name="benign_train")
    harmful = harmful.rename("harmful_train")
    for name, ps in eval_sets.items():
        check_leakage(harmful, ps.rename(name))
        check_leakage(benign, ps.rename(name))
    notes["question_share_harmful"] = q_share
    log.info("training data (%s): %d harmful in %d categories, %d benign (%d topic-matched, %d ordinary)", origin,
             len(harmful), len(categories), len(benign), len(topic), len(ordinary))
    return TrainingData(harmful=harmful, benign=benign, eval_sets=eval_sets, categories=categories, origin=origin,
                        notes=notes)


def _builtin_parts(config: FinetuneConfig) -> tuple[Any, ...]:
    from catlens.prompts import load_builtin

    b = load_builtin()
    harmful = b.where(label="harmful", split="train")
    heldout = b.where(label="harmful", split="test")
    ordinary = b.where(kind="ordinary", split="train")
    topic = b.where(kind="lookalike", split="train")
    eval_sets = {
        "builtin_lookalike_test": b.where(kind="lookalike", split="test"),
        "builtin_ordinary_test": b.where(kind="ordinary", split="test"),
    }
    return harmful.rename("harmful_pool"), heldout.rename("harmful_heldout"), ordinary.rename("ordinary_pool"), \
        topic.rename("topic_pool"), eval_sets


def _safe_load(name: str, root: Path | None) -> PromptSet:
    from catlens.datasets import load_dataset

    return load_dataset(name, root)


def _dataset_parts(config: FinetuneConfig, root: Path | None) -> tuple[Any, ...]:
    from catlens.prompts import load_builtin

    h, s = config.heldout_fraction, config.split_seed
    pooled = PromptSet.concat(*(_safe_load(n, root) for n in ("catqa", "beavertails_eval", "do_not_answer")),
                              name="harmful_pool")
    (pooled,), _ = deduplicate(pooled)
    pooled = pooled.where(label="harmful").filter(lambda p: p.category is not None, "categorised")
    harm_train, harm_test = _split_two(pooled, h, s)
    jbb_h_train, jbb_h_test, jbb_b_train, jbb_b_test = _pair_split(
        _safe_load("jbb_harmful", root), _safe_load("jbb_benign", root), 0.5, s)
    harmful_pool = PromptSet.concat(harm_train, jbb_h_train.filter(lambda p: p.category is not None),
                                    name="harmful_pool")
    b = load_builtin()
    xs = _safe_load("xstest", root)
    contrast_train, contrast_test = _split_two(_safe_load("coconot_contrast", root), 0.5, s,
                                               stratify="coconot_subcategory")
    pref = _safe_load("coconot_pref", root)
    safety = "Requests with safety concerns"
    topic = PromptSet.concat(
        pref.where(coconot_category=safety), contrast_train.where(coconot_category=safety), jbb_b_train,
        b.where(kind="lookalike", split="train"), name="topic_pool")
    ordinary = PromptSet.concat(_safe_load("rd_harmless_train", root).sample(3000, seed=s),
                                b.where(kind="ordinary", split="train"), name="ordinary_pool")
    eval_sets = {
        "xstest_safe": xs.where(label="benign").rename("xstest_safe"),
        "xstest_unsafe": xs.where(label="harmful").rename("xstest_unsafe"),
        "jbb_harmful_test": jbb_h_test.rename("jbb_harmful_test"),
        "jbb_benign_test": jbb_b_test.rename("jbb_benign_test"),
        "builtin_harmful_test": b.where(label="harmful", split="test").rename("builtin_harmful_test"),
        "builtin_lookalike_test": b.where(kind="lookalike", split="test").rename("builtin_lookalike_test"),
        "builtin_ordinary_test": b.where(kind="ordinary", split="test").rename("builtin_ordinary_test"),
        "alpaca_test": _safe_load("rd_harmless_test", root).sample(300, seed=s).rename("alpaca_test"),
        "coconot_contrast_test": contrast_test.rename("coconot_contrast_test"),
        "strongreject": _safe_load("strongreject", root),
        "simple_safety_tests": _safe_load("simple_safety_tests", root),
        "harmbench": _safe_load("harmbench", root),
    }
    return harmful_pool, harm_test.rename("harmful_heldout"), ordinary, topic, eval_sets


def _coconot_parts(config: FinetuneConfig, root: Path | None) -> tuple[Any, ...]:
    h, s = config.heldout_fraction, config.split_seed
    original = _relabel_coconot(_safe_load("coconot_original", root))
    train, test = _split_two(original, h, s)
    contrast_train, contrast_test = _split_two(_safe_load("coconot_contrast", root), 0.5, s,
                                               stratify="coconot_subcategory")
    topic = PromptSet.concat(_safe_load("coconot_pref", root), contrast_train, name="topic_pool")
    ordinary = _safe_load("rd_harmless_train", root).sample(3000, seed=s).rename("ordinary_pool")
    xs = _safe_load("xstest", root)
    eval_sets = {
        "xstest_safe": xs.where(label="benign").rename("xstest_safe"),
        "coconot_contrast_test": contrast_test.rename("coconot_contrast_test"),
        "alpaca_test": _safe_load("rd_harmless_test", root).sample(300, seed=s).rename("alpaca_test"),
    }
    topic = PromptSet(list(topic), "topic_pool", topic.provenance)
    return train.rename("harmful_pool"), test.rename("harmful_heldout"), ordinary, topic, eval_sets


# ============================================================================================ tokens and targets
def refusal_tokens_for(config: FinetuneConfig, categories: Sequence[str]) -> RefusalTokens:
    """The token registry a config trains: ``[refuse]`` (binary), the published CoCoNot strings or
    ``[refuse:<category>]``."""
    if config.single_token:
        return RefusalTokens.single()
    if config.scheme == "coconot":
        p1 = RefusalTokens.p1()
        return RefusalTokens(tuple(categories), tuple(p1.token_of(c) for c in categories))
    return RefusalTokens.for_categories(categories)


def refusal_text(category: str | None, rng: random.Random) -> str:
    """A refusal sentence (seeded draw), followed about half of the time by the category's reason."""
    sentence = rng.choice(REFUSAL_SENTENCES)
    reason = REFUSAL_REASONS.get(category or "")
    if reason and rng.random() < 0.5:
        sentence = f"{sentence} {reason}"
    return sentence


def render_chat(tokenizer: Any, text: str, system: str | None = None) -> str:
    """The chat template with the generation prompt (the same rendering as ``LensModel.format(fmt="chat")``)."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass(frozen=True)
class Example:
    """One training sequence: chat-templated prompt ids and response ids (opening special token first)."""

    prompt_id: str
    side: str
    """``"harmful"`` or ``"benign"``."""
    category: str | None
    token: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


def build_examples(
    tokenizer: Any,
    prompts: Sequence[tuple[str, str, str, str | None]],
    responses: Sequence[Sequence[int]],
    tokens: Sequence[str],
    *,
    max_length: int,
    end_ids: Sequence[Sequence[int] | None] | None = None,
) -> list[Example]:
    """Examples from ``(prompt_id, text, side, category)`` rows, response token ids (without the opening token)
    and the opening token string of each row. ``end_ids[i]`` (default: ``[eos]``) is appended after the response
    when the response is complete (``None`` for a truncated distilled answer).

    Raises ``ValueError`` when a sequence would be longer than ``max_length`` or the model's context.
    """
    if not (len(prompts) == len(responses) == len(tokens)):
        raise ValueError(f"{len(prompts)} prompts, {len(responses)} responses and {len(tokens)} tokens: give one "
                         f"of each per example.")
    vocab = tokenizer.get_vocab()
    context = getattr(tokenizer, "model_max_length", None) or 10**9
    eos = tokenizer.eos_token_id
    out = []
    for i, ((pid, text, side, category), resp, tok) in enumerate(zip(prompts, responses, tokens)):
        if tok not in vocab:
            raise ValueError(f"token {tok!r} is not in the tokenizer; call add_refusal_tokens first.")
        prompt_ids = tokenizer(render_chat(tokenizer, text), add_special_tokens=False)["input_ids"]
        end = [eos] if end_ids is None else list(end_ids[i] or [])
        response_ids = [vocab[tok], *resp, *end]
        n = len(prompt_ids) + len(response_ids)
        limit = min(max_length, context)
        if n > limit:
            raise ValueError(
                f"prompt {pid!r} is too long: {len(prompt_ids)} prompt + {len(response_ids)} response tokens = {n} "
                f"> the training context of {limit} tokens (max_length={max_length}). Shorten or drop the prompt, "
                f"or raise max_length.")
        out.append(Example(pid, side, category, tok, tuple(prompt_ids), tuple(response_ids)))
    return out


# ============================================================================================== distillation
def _model_key(source: Mapping[str, Any]) -> str:
    ident = source.get("file_sha256") or source.get("weights_sha256") or source.get("spec")
    return sha256_text(json.dumps(ident, sort_keys=True))[:16]


def greedy_answers(model: Any, tokenizer: Any, texts: Sequence[str], *, max_new_tokens: int, batch_size: int = 64,
                   bar: Any = None) -> list[list[int]]:
    """Greedy chat answers of a plain Hugging Face model (token ids, cut after the end-of-turn token, which is
    kept), in the caller's order: :func:`catlens.refusal.greedy_batches` on the chat-rendered texts."""
    return greedy_batches(model, tokenizer, [render_chat(tokenizer, t) for t in texts],
                          max_new_tokens=max_new_tokens, batch_size=batch_size, bar=bar)


def distill_answers(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    model_key: str,
    max_new_tokens: int,
    cache: str | os.PathLike[str] | None = None,
    batch_size: int = 64,
    show_progress: bool = True,
) -> list[tuple[list[int], bool]]:
    """The model's own greedy answers (token ids, at most ``max_new_tokens``) to ``texts`` and whether each answer
    ended by itself (end-of-turn token, which is not included). ``model`` is the plain Hugging Face model (1.8x
    faster to generate with than through the bridge; bench/bench_finetune.py).

    Answers are cached in ``cache_dir()/finetunes/.distill/<model_key>.jsonl`` keyed by model and prompt text,
    appended per batch, so reruns and interrupted runs reuse them. A cached answer serves any shorter length
    (greedy decoding: the first n tokens of a longer answer are the n-token answer).
    """
    path = cache_dir(cache) / "finetunes" / ".distill" / f"{model_key}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    eos = tokenizer.eos_token_id
    known: dict[str, list[int]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line from an interruption
            if len(row["ids"]) >= len(known.get(row["key"], [])) or (row["ids"] and row["ids"][-1] == eos):
                known[row["key"]] = row["ids"]

    def usable(ids: list[int] | None) -> bool:
        return ids is not None and (len(ids) >= max_new_tokens or (bool(ids) and ids[-1] == eos))

    keys = [sha256_text(t) for t in texts]
    todo = sorted({k: t for k, t in zip(keys, texts) if not usable(known.get(k))}.items())
    if todo:
        log.info("self-distillation: %d answers to generate (%d cached)", len(todo), len(set(keys)) - len(todo))
    from tqdm.auto import tqdm

    chunk = batch_size * 2
    with tqdm(total=len(todo), desc="self-distil", unit="answer", disable=not show_progress or not todo) as bar:
        for start in range(0, len(todo), chunk):
            part = todo[start:start + chunk]
            ids = greedy_answers(model, tokenizer, [t for _, t in part], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, bar=bar)
            with open(path, "a") as f:
                for (k, _), row in zip(part, ids):
                    f.write(json.dumps({"key": k, "ids": row}) + "\n")
                    known[k] = row
                f.flush()
                os.fsync(f.fileno())
    out = []
    for k in keys:
        ids = list(known[k])
        if eos in ids[:max_new_tokens + 1]:
            out.append((ids[:ids.index(eos)], True))
        else:
            out.append((ids[:max_new_tokens], False))
    return out


# ========================================================================================== model preparation
def add_refusal_tokens(model: Any, tokenizer: Any, tokens: RefusalTokens) -> list[int]:
    """Add the registry's tokens as special tokens and resize the (tied) embeddings; returns their ids in
    ``tokens.all_tokens`` order. Tokens already present are reused."""
    new = [t for t in tokens.all_tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return tokens.ids(tokenizer)


@torch.inference_mode()
def last_position_hidden(model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 16
                         ) -> Float[Tensor, "prompt d_model"]:
    """Final (post-norm) hidden state at the first response position of each chat-templated prompt."""
    rows = []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize_left(tokenizer, [render_chat(tokenizer, t) for t in texts[start:start + batch_size]])
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        rows.append(out.hidden_states[-1][:, -1, :].float())
    return torch.cat(rows)


def prototype_rows(
    hidden: Mapping[str, Float[Tensor, "prompt d_model"]],
    top_logit: Mapping[str, Float[Tensor, " prompt"]],
    contrast: float = 1.0,
    anchor: Float[Tensor, " d_model"] | None = None,
) -> dict[str, Float[Tensor, " d_model"]]:
    """Embedding row per token (pure). ``mu_t`` = mean hidden state of the token's prompts, ``mu_bar`` = mean of
    the ``mu_t``, ``p_t = mu_bar + contrast * (mu_t - mu_bar)``; the row is ``anchor + s_t * p_t`` (``anchor`` = 0
    when ``None``) with ``s_t`` chosen so that its mean logit ``mean_i(h_i . row)`` on the token's prompts equals
    their mean top stock logit."""
    mus = {tok: h.mean(dim=0) for tok, h in hidden.items()}
    mu_bar = torch.stack(list(mus.values())).mean(dim=0)
    rows = {}
    for tok, h in hidden.items():
        p = mu_bar + contrast * (mus[tok] - mu_bar)
        base = torch.zeros_like(p) if anchor is None else anchor.to(p)
        mean_dot = float((h @ p).mean())
        if mean_dot <= 0:
            raise ValueError(f"prototype of {tok!r} has a non-positive mean logit on its own prompts "
                             f"({mean_dot:.3g}); lower prototype_contrast={contrast} or use init='mean'.")
        gap = float(top_logit[tok].mean() - (h @ base).mean())
        if gap <= 0:  # the anchor token is already the top token there: add the unanchored prototype row
            log.warning("the anchor already reaches the top logit on the prompts of %r; its prototype is scaled as "
                        "without an anchor", tok)
            gap = float(top_logit[tok].mean())
        rows[tok] = base + p * (gap / mean_dot)
    return rows


def init_new_embeddings(model: Any, tokenizer: Any, tokens: RefusalTokens, groups: Mapping[str, Sequence[str]],
                        init: str, n_old: int, contrast: float = 1.0, anchor: str | None = None) -> dict[str, Any]:
    """Set the new token rows (``init`` = ``"prototype"`` from ``groups[token]`` prompts, or ``"mean"``); returns a
    summary for the manifest. ``anchor`` (a string that is one token, e.g. ``"\\n"``) is added under the
    prototype: as an *input* the new token then reads like the anchor token plus a small category signal, so the
    stock model continues fluently after it before any training (the tied embedding is also the input)."""
    emb = model.get_input_embeddings().weight
    ids = tokens.ids(tokenizer)
    new = [(t, i) for t, i in zip(tokens.all_tokens, ids) if i >= n_old]
    summary: dict[str, Any] = {"init": init, "anchor": anchor}
    with torch.no_grad():
        if init == "mean":
            mean = emb[:n_old].mean(dim=0)
            for _, i in new:
                emb[i] = mean
            return summary
        anchor_row = None
        if anchor is not None:
            anchor_ids = tokenizer(anchor, add_special_tokens=False)["input_ids"]
            if len(anchor_ids) != 1:
                raise ValueError(f"prototype_anchor={anchor!r} is {len(anchor_ids)} tokens; give a string that is "
                                 f"exactly one token (e.g. '\\n'), or None for no anchor.")
            anchor_row = emb[anchor_ids[0]].detach().clone()
        hidden, top = {}, {}
        for t, _ in new:
            texts = list(groups.get(t, []))
            if not texts:
                raise ValueError(f"no training prompts for token {t!r}: cannot build its prototype.")
            h = last_position_hidden(model, tokenizer, texts)
            logits = h @ emb[:n_old].T
            hidden[t], top[t] = h, logits.max(dim=-1).values
        rows = prototype_rows(hidden, top, contrast, anchor_row)
        for t, row in rows.items():
            emb[tokenizer.convert_tokens_to_ids(t)] = row
        summary["prompts_per_token"] = {t: len(groups.get(t, [])) for t, _ in new}
        summary["row_norm"] = {t: round(float(emb[tokenizer.convert_tokens_to_ids(t)].norm()), 4) for t, _ in new}
        if anchor_row is not None:
            summary["anchor_norm"] = round(float(anchor_row.norm()), 4)
        # how often the initialised rows already make the right first-token decision among the new tokens
        right = total = 0
        new_ids = torch.tensor([i for _, i in new])
        for j, (t, _) in enumerate(new):
            pick = (hidden[t] @ emb[new_ids].T).argmax(-1)
            right += int((pick == j).sum())
            total += len(pick)
        summary["initial_first_token_acc_among_new"] = round(right / max(total, 1), 4)
    return summary


class LoRALinear(torch.nn.Module):
    """``base(x) + alpha/r * B(A(x))`` with ``base`` frozen, ``A`` Kaiming-uniform, ``B`` zero."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    def merged(self) -> torch.nn.Linear:
        with torch.no_grad():
            self.base.weight += self.scale * (self.lora_b @ self.lora_a)
        return self.base


def _apply_lora(model: Any, rank: int, alpha: float) -> None:
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear):
                    setattr(parent, name, LoRALinear(child, rank, alpha))


def _merge_lora(model: Any) -> None:
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, LoRALinear):
                    setattr(parent, name, child.merged())


def set_trainable(model: Any, config: FinetuneConfig, n_old: int) -> list[str]:
    """Mark the trainable parameters for ``config.method``; returns their names. For ``last-k`` and ``lora`` only
    the new rows of the (tied) embedding matrix learn (a gradient hook zeroes the other rows)."""
    for p in model.parameters():
        p.requires_grad_(False)
    emb = model.get_input_embeddings().weight
    if config.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        emb.requires_grad_(True)

        def only_new_rows(grad: Tensor) -> Tensor:
            grad = grad.clone()
            grad[:n_old] = 0
            return grad

        emb.register_hook(only_new_rows)
        if config.method == "last-k":
            k = min(config.last_k, len(model.model.layers))
            for layer in model.model.layers[-k:]:
                for p in layer.parameters():
                    p.requires_grad_(True)
            for p in model.model.norm.parameters():
                p.requires_grad_(True)
        else:
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


# =================================================================================================== training
def make_schedule(sides: Sequence[str], steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Batches of example indices for ``steps`` steps. Each epoch shuffles each side (``"harmful"``/``"benign"``)
    with a seeded generator and interleaves them in proportion, so every batch holds both sides in about the
    training ratio (batches of one side make the first-token decision oscillate)."""
    if not sides:
        raise ValueError("no training examples.")
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(sides):
        groups.setdefault(s, []).append(i)
    n = len(sides)
    batches: list[list[int]] = []
    while len(batches) < steps:
        queues = {k: rng.sample(v, len(v)) for k, v in sorted(groups.items())}
        taken = dict.fromkeys(queues, 0)
        order = []
        for j in range(n):  # proportional merge: next from the side furthest behind its share
            k = min(queues, key=lambda k: ((taken[k] + 0.5) / len(queues[k]), k))
            order.append(queues[k][taken[k]])
            taken[k] += 1
        batches += [order[j:j + batch_size] for j in range(0, n - batch_size + 1, batch_size)] or [order]
    return batches[:steps]


def collate(examples: Sequence[Example], first_token_weight: float, pad_id: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` (-100 outside responses), loss ``weights`` and
    ``first`` (the position that predicts the opening special token)."""
    width = max(len(e) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    weights = torch.zeros((len(examples), width))
    first = torch.zeros((len(examples), width), dtype=torch.bool)
    for b, e in enumerate(examples):
        seq = [*e.prompt_ids, *e.response_ids]
        ids[b, :len(seq)] = torch.tensor(seq)
        mask[b, :len(seq)] = 1
        # position t predicts token t+1: response token j sits at len(prompt)+j, predicted from the position before
        start = len(e.prompt_ids) - 1
        labels[b, start:start + len(e.response_ids)] = torch.tensor(e.response_ids)
        weights[b, start:start + len(e.response_ids)] = 1.0
        weights[b, start] = first_token_weight
        first[b, start] = True
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "weights": weights, "first": first}


def response_loss(model: Any, batch: Mapping[str, Tensor], special_ids: Sequence[int], *,
                  detach_inputs: bool = False) -> tuple[Tensor, dict[str, float]]:
    """Weighted cross-entropy over the response tokens; the logits are computed only at labelled positions.

    ``detach_inputs`` stops the gradient at the input embeddings (the new token rows then learn only as output
    rows), so the backward pass ends at the first trainable block: what makes ``last-k`` cheaper than ``full``."""
    if detach_inputs:
        embeds = model.get_input_embeddings()(batch["input_ids"]).detach()
        hidden = model.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    else:
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    sel = batch["labels"] != -100
    logits = model.lm_head(hidden[sel])
    targets = batch["labels"][sel]
    w = batch["weights"][sel]
    ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    loss = (ce * w).sum() / w.sum()
    with torch.no_grad():
        first = batch["first"][sel]
        rest = ~first
        pred = logits.argmax(-1)
        special = torch.tensor(list(special_ids))
        stats = {
            "loss": float(loss),
            "first_token_loss": float(ce[first].mean()),
            "first_token_acc": float((pred[first] == targets[first]).float().mean()),
            "rest_loss": float(ce[rest].mean()) if bool(rest.any()) else float("nan"),
            "special_elsewhere": float(torch.isin(pred[rest], special).float().mean()) if bool(rest.any()) else 0.0,
        }
    return loss, stats


def _lr_scale(step: int, config: FinetuneConfig) -> float:
    """Multiplier of every peak learning rate at ``step``: linear warm-up, then linear decay to 0.1."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(config.steps - config.warmup_steps, 1)
    return 1.0 - 0.9 * (step - config.warmup_steps) / span


@dataclass
class TrainResult:
    log: list[dict[str, Any]]
    seconds: float
    resumed_from: int | None


def train(
    model: Any,
    examples: Sequence[Example],
    config: FinetuneConfig,
    *,
    special_ids: Sequence[int],
    pad_id: int,
    work_dir: Path | None = None,
    resume: bool = False,
    run_key: str = "",
    show_progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> TrainResult:
    """Run ``config.steps`` optimiser steps on ``examples`` (trainable parameters already marked).

    With ``work_dir``, a checkpoint (trainable parameters, optimiser state, step, log) is written there atomically
    every ``config.checkpoint_every`` steps; with ``resume`` the loop continues from it. ``run_key`` must match the
    checkpoint's (it encodes the config and data hashes). ``callback(step, stats)`` runs after each step.
    """
    from tqdm.auto import tqdm

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError("no trainable parameters: call set_trainable first.")
    # The new token rows learn at their own rate (config.new_token_lr): their gradient is routed from the (tied)
    # embedding matrix into a separate parameter, whose values are copied back after every step. Rows with an
    # always-zero gradient stay exactly unchanged under AdamW without weight decay.
    emb = model.get_input_embeddings().weight
    rows = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    groups = [{"params": list(params.values()), "lr": config.learning_rate, "base_lr": config.learning_rate}]
    hook = None
    if emb.requires_grad:
        new_rows = torch.nn.Parameter(emb.detach()[rows].clone())

        def route(grad: Tensor) -> Tensor:
            new_rows.grad = grad[rows].clone()
            grad = grad.clone()
            grad[rows] = 0
            return grad

        hook = emb.register_hook(route)
        params = {**params, "new_token_rows": new_rows}
        groups.append({"params": [new_rows], "lr": config.new_token_lr, "base_lr": config.new_token_lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    schedule = make_schedule([e.side for e in examples], config.steps, config.batch_size, config.seed)
    start, history, resumed_from = 0, [], None
    ckpt = work_dir / "checkpoint.pt" if work_dir is not None else None
    if resume and ckpt is not None and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        if state["run_key"] != run_key:
            raise ValueError(f"the checkpoint in {str(work_dir)!r} belongs to a different run (config or data changed);"
                             f" pass --overwrite to start afresh.")
        with torch.no_grad():
            for n, t in state["params"].items():
                params[n].copy_(t)
            if hook is not None:
                emb[rows] = new_rows
        opt.load_state_dict(state["optimizer"])
        start, history, resumed_from = state["step"], state["log"], state["step"]
        log.info("resuming from step %d", start)
    model.train()
    t0 = time.perf_counter()
    bar = tqdm(range(start, config.steps), desc="fine-tune", disable=not show_progress, initial=start,
               total=config.steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * _lr_scale(step, config)
        batch = collate([examples[i] for i in schedule[step]], config.first_token_weight, pad_id)
        loss, stats = response_loss(model, batch, special_ids, detach_inputs=config.method == "last-k")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if hook is not None:
            with torch.no_grad():
                emb[rows] = new_rows
        stats = {"step": step + 1, "lr": opt.param_groups[0]["lr"], **stats,
                 "seconds": round(time.perf_counter() - t0, 2)}
        history.append(stats)
        bar.set_postfix(loss=f"{stats['loss']:.3f}", first_acc=f"{stats['first_token_acc']:.2f}")
        if (step + 1) % 10 == 0 or step + 1 == config.steps:
            log.info("step %d/%d loss %.4f first-token loss %.4f acc %.2f", step + 1, config.steps, stats["loss"],
                     stats["first_token_loss"], stats["first_token_acc"])
        if ckpt is not None and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0 \
                and step + 1 < config.steps:
            with atomic_path(ckpt) as tmp:
                torch.save({"run_key": run_key, "step": step + 1, "log": history, "optimizer": opt.state_dict(),
                            "params": {n: p.detach().clone() for n, p in params.items()}}, tmp)
        if callback is not None:
            callback(step + 1, stats)
    if hook is not None:
        hook.remove()
    model.eval()
    return TrainResult(history, time.perf_counter() - t0, resumed_from)


# ===================================================================================================== driver
def _base_folder(spec: str, cache: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(local folder, kind) of the base model: the converted checkpoint of an embedded model, else the folder."""
    kind, where = resolve_spec(spec, cache)
    if kind == "embedded":
        return str(embedded_checkpoint(where, cache)), kind
    return where, kind


def _git_commit() -> str | None:
    from catlens.runs import git_state

    return git_state().get("git_commit")


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finetune(
    config: FinetuneConfig | str = "default",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    resume: bool = False,
    cache: str | os.PathLike[str] | None = None,
    data: TrainingData | None = None,
    show_progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> Path:
    """Fine-tune ``config`` and return the checkpoint folder (see the module docstring).

    ``out`` defaults to ``cache_dir()/finetunes/<default_name(config)>``. An existing folder with the same config
    and data hashes is reused as is; a different one needs ``overwrite``. An interrupted run leaves a work folder
    ``.<name>.work`` beside it: pass ``resume`` to continue it (or ``overwrite`` to discard it). ``data`` replaces
    :func:`assemble_data` (tests, custom data).
    """
    if isinstance(config, str):
        config = get_config(config)
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: choose one.")
    target = Path(out) if out is not None else cache_dir(cache) / "finetunes" / default_name(config)
    work = target.parent / f".{target.name}.work"
    t_start = time.perf_counter()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    data = data or assemble_data(config, data_dir)
    existing = _read_manifest(target) if target.exists() else None
    if target.exists() and any(target.iterdir()):
        if existing and existing.get("config_hash") == config.hash and \
                existing.get("data_hash") == data.content_hash and not overwrite:
            log.info("reusing the fine-tune in %s (same config and data)", target)
            return target
        if not overwrite:
            why = "a different config or data" if existing else "no catlens fine-tune manifest"
            raise FileExistsError(f"output folder {str(target)!r} already exists ({why}). Pass --overwrite to "
                                  f"replace it, or choose another --out.")
    if work.exists() and not resume:
        if not overwrite:
            raise FileExistsError(f"an interrupted fine-tune is in {str(work)!r}. Pass --resume to continue it or "
                                  f"--overwrite to start afresh.")
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)

    prep = prepare(config, data, cache=cache, show_progress=show_progress)
    run_key = sha256_text(config.hash + data.content_hash)
    write_json_atomic(work / "run.json", {"config": config.to_dict(), "config_hash": config.hash,
                                          "data_hash": data.content_hash})
    result = train(prep.model, prep.examples, config, special_ids=prep.special_ids,
                   pad_id=prep.tokenizer.pad_token_id, work_dir=work, resume=resume, run_key=run_key,
                   show_progress=show_progress, callback=callback)
    if config.method == "lora":
        _merge_lora(prep.model)
    for p in prep.model.parameters():
        p.requires_grad_(False)
    manifest = _manifest(config, data, prep, result, target.name, time.perf_counter() - t_start)
    save_finetune(prep.model, prep.tokenizer, target, manifest, result.log,
                  {"harmful": prep.harmful.ids, "benign": prep.benign.ids})
    shutil.rmtree(work, ignore_errors=True)
    log.info("fine-tune saved to %s (%.0f s in total)", target, time.perf_counter() - t_start)
    return target


@dataclass
class Prepared:
    """Everything :func:`train` needs, built by :func:`prepare`."""

    model: Any
    """The Hugging Face model with the new tokens, initialised and with its trainable parameters marked."""
    tokenizer: Any
    tokens: RefusalTokens
    special_ids: list[int]
    examples: list[Example]
    harmful: PromptSet
    """Harmful training prompts actually used (over-long ones left out)."""
    benign: PromptSet
    finished_answers: int
    distill_seconds: float
    init_summary: dict[str, Any]
    trainable: list[str]
    base_folder: str
    base_source: dict[str, Any]
    versions: dict[str, Any]


def prepare(config: FinetuneConfig, data: TrainingData, *, cache: str | os.PathLike[str] | None = None,
            show_progress: bool = True) -> Prepared:
    """Load the base model, self-distil the benign answers, build the examples, add and initialise the new tokens
    and mark the trainable parameters (deterministic given the config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from catlens.model import _version, folder_source

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    base_folder, kind = _base_folder(config.base, cache)
    source = folder_source(base_folder, config.base, kind)
    versions = {p: _version(p) for p in ("catlens", "transformer-lens", "transformers", "torch")}
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32).eval()

    # -- drop over-long prompts, then self-distil the benign answers (the stock model, before the new tokens)
    def short(ps: PromptSet) -> PromptSet:
        return ps.filter(lambda p: len(tokenizer(render_chat(tokenizer, p.text), add_special_tokens=False)
                                       ["input_ids"]) <= config.max_prompt_tokens, "max_prompt_tokens")

    harmful, benign = short(data.harmful), short(data.benign)
    if len(harmful) < len(data.harmful) or len(benign) < len(data.benign):
        log.info("left out %d harmful and %d benign prompts longer than %d tokens", len(data.harmful) - len(harmful),
                 len(data.benign) - len(benign), config.max_prompt_tokens)
    t0 = time.perf_counter()
    answers = distill_answers(model, tokenizer, benign.texts, model_key=_model_key(source),
                              max_new_tokens=config.answer_tokens, cache=cache, show_progress=show_progress)
    distill_seconds = time.perf_counter() - t0

    tokens = refusal_tokens_for(config, data.categories)
    rng = random.Random(config.seed)
    rows, responses, opening, ends = [], [], [], []
    for p in harmful:
        rows.append((p.id, p.text, "harmful", p.category))
        responses.append(tokenizer(refusal_text(p.category, rng), add_special_tokens=False)["input_ids"])
        opening.append(tokens.refuse[0] if config.single_token else tokens.token_of(p.category))
        ends.append([tokenizer.eos_token_id])
    for p, (ids, finished) in zip(benign, answers):
        rows.append((p.id, p.text, "benign", p.category))
        responses.append(ids)
        opening.append(tokens.respond)
        ends.append([tokenizer.eos_token_id] if finished else None)

    # -- model with the new tokens
    n_old = model.get_input_embeddings().weight.shape[0]
    special_ids = add_refusal_tokens(model, tokenizer, tokens)
    examples = build_examples(tokenizer, rows, responses, opening, max_length=config.max_length, end_ids=ends)
    k = config.prototype_prompts
    groups: dict[str, list[str]] = {}
    for tok in tokens.refuse:
        texts = harmful.texts if config.single_token else harmful.where(category=tokens.category_of(tok)).texts
        groups[tok] = random.Random(f"{config.seed}|{tok}").sample(texts, min(k, len(texts)))
    groups[tokens.respond] = random.Random(f"{config.seed}|respond").sample(benign.texts, min(k, len(benign)))
    init_summary = init_new_embeddings(model, tokenizer, tokens, groups, config.init, n_old,
                                       config.prototype_contrast, config.prototype_anchor)
    torch.manual_seed(config.seed)
    if config.method == "lora":
        _apply_lora(model, config.lora_rank, config.lora_alpha)
    trainable = set_trainable(model, config, n_old)
    return Prepared(model=model, tokenizer=tokenizer, tokens=tokens, special_ids=special_ids, examples=examples,
                    harmful=harmful, benign=benign, finished_answers=sum(f for _, f in answers),
                    distill_seconds=distill_seconds, init_summary=init_summary, trainable=trainable,
                    base_folder=base_folder, base_source=source, versions=versions)


def _manifest(config: FinetuneConfig, data: TrainingData, prep: Prepared, result: "TrainResult", name: str,
              seconds: float) -> dict[str, Any]:
    harmful, benign = prep.harmful, prep.benign
    log_rows = result.log
    return {
        "name": name,
        "config": config.to_dict(),
        "config_hash": config.hash,
        "data_hash": data.content_hash,
        "learning_rate": config.learning_rate,
        "tokens": prep.tokens.to_dict(),
        "token_ids": dict(zip(prep.tokens.all_tokens, prep.special_ids)),
        "base": {"spec": config.base, "folder": prep.base_folder, "source": prep.base_source},
        "data": {
            "origin": data.origin,
            "categories": list(data.categories),
            "harmful": {"n": len(harmful), "content_hash": harmful.content_hash,
                        "per_category": dict(Counter(harmful.categories_of)),
                        "sources": dict(Counter(p.source for p in harmful))},
            "benign": {"n": len(benign), "content_hash": benign.content_hash,
                       "roles": dict(Counter(p.meta.get("role") for p in benign)),
                       "sources": dict(Counter(p.source for p in benign))},
            "left_out_too_long": {"harmful": len(data.harmful) - len(harmful), "benign": len(data.benign) - len(benign)},
            "form_mix": data.mix().to_dict("records"),
            "eval_sets": {n: {"n": len(s), "content_hash": s.content_hash} for n, s in data.eval_sets.items()},
            "notes": data.notes,
            "distilled_answers": {"n": len(benign), "finished": prep.finished_answers,
                                  "max_new_tokens": config.answer_tokens},
        },
        "init": prep.init_summary,
        "method": {"name": config.method, "trainable_tensors": len(prep.trainable)},
        "training": {
            "steps": config.steps, "examples": len(prep.examples),
            "epochs": round(config.steps * config.batch_size / len(prep.examples), 3),
            "train_seconds": round(result.seconds, 1), "distill_seconds": round(prep.distill_seconds, 1),
            "resumed_from_step": result.resumed_from,
            "final_loss": log_rows[-1]["loss"] if log_rows else None,
            "first_token_acc_last10": float(sum(r["first_token_acc"] for r in log_rows[-10:])
                                            / max(len(log_rows[-10:]), 1)),
        },
        "total_seconds": round(seconds, 1),
        "git_commit": _git_commit(),
        "versions": prep.versions,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def save_finetune(model: Any, tokenizer: Any, target: Path, manifest: Mapping[str, Any],
                  train_log: Sequence[Mapping[str, Any]], prompt_ids: Mapping[str, Sequence[str]]) -> Path:
    """Write the checkpoint folder atomically: safetensors weights, tokenizer + chat template, ``train_log.csv``,
    ``training_prompt_ids.json`` and the manifest (with the sha256 of every other file)."""
    import pandas as pd

    manifest = dict(manifest)
    with atomic_path(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        pd.DataFrame(list(train_log)).to_csv(tmp / "train_log.csv", index=False)
        (tmp / "training_prompt_ids.json").write_text(json.dumps({k: list(v) for k, v in prompt_ids.items()}))
        manifest["files"] = {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return target


def ensure_refusal_model(config: FinetuneConfig | str = "default", cache: str | os.PathLike[str] | None = None,
                         *, data_dir: str | os.PathLike[str] | None = None, show_progress: bool = True) -> Path:
    """The cached fine-tune folder of ``config`` (``cache_dir()/finetunes/refusal-<name>``), trained first when
    missing. An interrupted run of the same config is resumed; a cached folder or work folder from an older version
    of the preset (different config hash) is replaced."""
    if isinstance(config, str):
        config = get_config(config)
    target = cache_dir(cache) / "finetunes" / default_name(config)
    manifest = _read_manifest(target) if target.exists() else None
    if manifest and manifest.get("config_hash") == config.hash:
        return target
    if target.exists():
        log.warning("replacing the cached fine-tune %s: it was trained with a different version of the %r config",
                    target, config.name)
        shutil.rmtree(target)
    work = target.parent / f".{target.name}.work"
    resume = False
    if work.exists():
        try:
            resume = json.loads((work / "run.json").read_text()).get("config_hash") == config.hash
        except (OSError, json.JSONDecodeError):
            resume = False
        if not resume:
            shutil.rmtree(work)
    return finetune(config, data_dir=data_dir, cache=cache, resume=resume, show_progress=show_progress)


# ======================================================================================================== CLI
_EXAMPLES = """\
Examples:
  catlens finetune --config quick                    # built-in prompts, about 3 min
  catlens finetune                                   # default config, about 12 min on 2 CPU cores
  catlens finetune --method lora --init mean --seed 1
  catlens finetune --config coconot --data-dir ../shared/data
  catlens finetune --resume                          # continue an interrupted run
The folder is printed on success and reused by later runs with the same config and data.
"""


def add_cli(subparsers: Any) -> None:
    """Register the ``finetune`` subcommand."""
    p = subparsers.add_parser(
        "finetune", help="train a refusal-token model (category refusal tokens + [respond])",
        description="Fine-tune a chat model to open every response with a category refusal token or [respond]. "
                    "The result is a checkpoint folder in the cache, loadable with catlens.load_model.\n\n"
                    + _EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="default", help=f"preset: {', '.join(CONFIGS)} (default: %(default)s)")
    p.add_argument("--method", default=None, help=f"override: {', '.join(METHODS)}")
    p.add_argument("--init", default=None, help=f"override the new-token initialisation: {', '.join(INITS)}")
    p.add_argument("--categories", default=None, help="comma-separated categories (default: the preset's)")
    p.add_argument("--single-token", action="store_true", help="binary variant: one [refuse] token")
    p.add_argument("--steps", type=int, default=None, help="override the number of optimiser steps")
    p.add_argument("--seed", type=int, default=None, help="override the training seed")
    p.add_argument("--base", default=None, help="model to fine-tune (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", default=None, help="benchmark data folder (default: $CATLENS_DATA_DIR or "
                                                    "../shared/data; the built-in prompts when absent)")
    p.add_argument("--out", default=None, help="output folder (default: <cache>/finetunes/refusal-<config>)")
    p.add_argument("--cache-dir", default=None, help="cache (default: $CATLENS_CACHE or ~/.cache/catlens)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override any FinetuneConfig field; VALUE is JSON when it parses, else a string "
                        "(e.g. --set lr=1e-4 --set prototype_anchor=null); repeatable")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder / interrupted run")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    p.set_defaults(func=_cmd_finetune)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-4", "prototype_anchor=null"]`` -> ``{"lr": 1e-4, "prototype_anchor": None}`` (JSON values, else
    strings; lists become tuples)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {item!r}: write FIELD=VALUE, e.g. --set lr=1e-4.")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out[key.strip()] = tuple(value) if isinstance(value, list) else value
    return out


def _cmd_finetune(args: argparse.Namespace) -> int:
    categories = None
    if args.categories:
        categories = tuple(c.strip() for c in args.categories.split(",") if c.strip())
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps {args.steps}: give a positive number of steps.")
    config = get_config(args.config, method=args.method, init=args.init, categories=categories,
                        single_token=True if args.single_token else None, steps=args.steps, seed=args.seed,
                        base=args.base)
    extra = parse_overrides(args.set)
    _check_fields(extra, "--set: ")
    config = config.replace(**extra) if extra else config
    folder = finetune(config, data_dir=args.data_dir, out=args.out, overwrite=args.overwrite, resume=args.resume,
                      cache=args.cache_dir)
    print(folder)
    return 0
