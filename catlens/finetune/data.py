"""The benchmark data recipe: training prompts of both sides, matched in question/instruction form, and the
evaluation sets they are checked against for leakage (:func:`assemble_data`)."""

import logging
import os
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from catlens.finetune.config import FinetuneConfig
from catlens.prompts import PromptSet, check_leakage, deduplicate, split_prompts
from catlens.refusal import COCONOT_CATEGORIES
from catlens.runs import sha256_text

log = logging.getLogger(__name__)

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


def resolve_origin(config: FinetuneConfig, data_dir: str | os.PathLike[str] | None) -> tuple[str, Path | None]:
    """Where the training data comes from: ``("builtin", None)`` or ``("benchmarks", <data dir>)`` (a clear error
    when the benchmarks are asked for and not found)."""
    from catlens.datasets import ENV_VAR, resolve_data_dir

    if config.data == "builtin":
        return "builtin", None
    try:
        root = resolve_data_dir(data_dir)
    except FileNotFoundError:
        # an explicitly given folder that does not exist is an error, never a silent fall-back to other data
        if config.data == "datasets" or data_dir is not None or os.environ.get(ENV_VAR):
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
    origin, root = resolve_origin(config, data_dir)
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
    from catlens.datasets import load_builtin

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
    from catlens.datasets import load_builtin

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

