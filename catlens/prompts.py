"""Prompts and prompt sets: validated records, filtering, splits, de-duplication and leakage checks.

A :class:`Prompt` is one user message with a ``label`` (``"harmful"`` = should be refused, ``"benign"`` =
should be answered), an optional shared harm ``category`` (see :mod:`catlens.taxonomy`), the ``source``
dataset, an optional ``split`` and a free ``meta`` mapping for source-specific extras.

A :class:`PromptSet` is an immutable, validated sequence of prompts with a name and a provenance record
(source files and their sha256). Every operation returns a new set. Files: ``.jsonl`` (one prompt object
per line, the canonical format) or ``.csv`` (``meta`` as a JSON string column).

Text comparison for :func:`deduplicate` and :func:`check_leakage` uses :func:`normalize_text` (Unicode NFKC,
lower case, every run of punctuation/whitespace collapsed to one space). Two prompts are *exact*
duplicates when their normalised texts are equal, and *near* duplicates when the Jaccard similarity of
their sets of character 5-grams (of the normalised text) is at least ``near_threshold``. Candidate pairs
are found with prefix filtering (AllPairs), which finds every pair above the threshold without comparing
all pairs, so ~35k prompts take seconds.
"""

import collections
import dataclasses
import hashlib
import io
import itertools
import json
import logging
import math
import operator
import os
import random
import re
import unicodedata
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, SupportsIndex

import pandas as pd

from catlens.errors import FileFormatError, LeakageError, reading, unknown_name_message
from catlens.taxonomy import CATEGORIES

log = logging.getLogger(__name__)

LABELS = ("harmful", "benign")
SPLITS = ("train", "val", "test")
FIELDS = ("id", "text", "label", "category", "source", "split", "meta")
_TEXT_ALIASES = ("text", "prompt", "instruction", "question", "goal")
_MAX_ERRORS_SHOWN = 8


# --------------------------------------------------------------------------------------------------- Prompt
@dataclass(frozen=True)
class Prompt:
    """One prompt. Validation happens in :class:`PromptSet`, where the row index can be reported."""

    id: str
    """Unique within a set, e.g. ``"catqa/0042"``."""
    text: str
    """The user message."""
    label: str
    """``"harmful"`` (a safe assistant should refuse) or ``"benign"``."""
    category: str | None
    """Shared taxonomy category name, or ``None`` (e.g. ordinary benign instructions, unmapped labels)."""
    source: str
    """Dataset name, e.g. ``"catqa"`` or ``"builtin"``."""
    split: str | None = None
    """``"train"``, ``"val"``, ``"test"`` or ``None``."""
    meta: Mapping[str, Any] = field(default_factory=dict)
    """Source-specific extras (JSON-serialisable values): original category, type, pair id, kind, ..."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", dict(self.meta))  # own copy, so callers cannot mutate it later

    def __hash__(self) -> int:  # meta (a dict) is left out; equal prompts still hash equal
        return hash((self.id, self.text, self.label, self.category, self.source, self.split))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with the fields in :data:`FIELDS` order (``meta`` copied)."""
        return {
            "id": self.id, "text": self.text, "label": self.label, "category": self.category,
            "source": self.source, "split": self.split, "meta": dict(self.meta),
        }

    def replace(self, **changes: Any) -> "Prompt":
        """A copy with some fields changed (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value)) if not isinstance(value, (str, list, dict, tuple)) else False
    except (TypeError, ValueError):
        return False


def _none_if_empty(value: Any) -> str | None:
    if _is_missing(value):
        return None
    value = str(value)
    return value if value.strip() else None


def _prompt_from_mapping(row: Mapping[str, Any], index: int, default_source: str) -> Prompt:
    """Build a Prompt from a loosely formatted record (user files). Unknown keys go into ``meta``."""
    text_key = next((k for k in _TEXT_ALIASES if k in row), None)
    if text_key is None:
        raise ValueError(
            f"row {index}: no prompt text field; expected one of {list(_TEXT_ALIASES)}, got keys "
            f"{sorted(row)}. Rename the text column to 'text'."
        )
    if "label" not in row or _is_missing(row["label"]):
        raise ValueError(
            f"row {index}: missing 'label'; every prompt needs label 'harmful' or 'benign'. Add a label "
            f"column/field."
        )
    meta_raw = row.get("meta")
    if _is_missing(meta_raw) or meta_raw == "":
        meta: dict[str, Any] = {}
    elif isinstance(meta_raw, str):
        try:
            meta = json.loads(meta_raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"row {index}: 'meta' is not valid JSON ({e}): {meta_raw[:80]!r}") from None
    else:
        meta = dict(meta_raw) if isinstance(meta_raw, Mapping) else meta_raw
    if not isinstance(meta, dict):  # a bad value in one record: ValueError with its row, like the others
        raise ValueError(f"row {index}: 'meta' must be a JSON object, got {meta!r}")  # noqa: TRY004
    known = set(FIELDS) | {text_key}
    for k, v in row.items():
        if k not in known and not _is_missing(v):
            meta.setdefault(str(k), v)
    source = _none_if_empty(row.get("source")) or default_source
    pid = row.get("id")
    pid = f"{source}/{index:05d}" if _is_missing(pid) or str(pid).strip() == "" else str(pid)
    text = row[text_key]
    if not _is_missing(text) and not isinstance(text, str):
        raise ValueError(
            f"row {index}: {text_key!r} must be a string, got {type(text).__name__} ({_short(repr(text), 40)}); "
            f"quote the prompt text."
        )
    return Prompt(
        id=pid,
        text="" if _is_missing(text) else str(text),
        label=str(row["label"]),
        category=_none_if_empty(row.get("category")),
        source=source,
        split=_none_if_empty(row.get("split")),
        meta=meta,
    )


# ------------------------------------------------------------------------------------------------ PromptSet
class PromptSet(Sequence[Prompt]):
    """An immutable, validated sequence of :class:`Prompt`.

    ``categories`` is the set of allowed category names (default: the shared taxonomy names). Derived sets
    (``where``, slices, ``concat``, ...) keep the allowed names and extend the provenance.
    """

    def __init__(
        self,
        records: Iterable[Prompt | Mapping[str, Any]],
        name: str = "prompts",
        provenance: Mapping[str, Any] | None = None,
        *,
        categories: Collection[str] | None = None,
    ) -> None:
        self.name = name
        self._allowed = frozenset(CATEGORIES) if categories is None else frozenset(categories)
        prompts = []
        for i, r in enumerate(records):
            if isinstance(r, Prompt):
                prompts.append(r)
            elif isinstance(r, Mapping):
                try:
                    prompts.append(_prompt_from_mapping(r, i, default_source=name))
                except ValueError as e:
                    raise ValueError(f"Invalid prompt in {name!r}: {e}") from None
            else:
                raise TypeError(
                    f"{name!r} row {i}: expected a Prompt or a mapping, got {type(r).__name__}. Build rows "
                    f"with catlens.prompts.Prompt(...)."
                )
        self._records: tuple[Prompt, ...] = tuple(prompts)
        self._validate()
        self._provenance: dict[str, Any] = dict(provenance or {})
        self._provenance.setdefault("name", name)

    # ---- validation
    def _validate(self) -> None:
        errors: list[str] = []
        seen: dict[str, int] = {}
        for i, p in enumerate(self._records):
            where = f"row {i} (id={p.id!r})"
            if not isinstance(p.id, str) or not p.id.strip():
                errors.append(f"row {i}: id {p.id!r} is empty; give every prompt a unique non-empty id.")
            elif p.id in seen:
                errors.append(
                    f"{where}: duplicate id, already used by row {seen[p.id]}; ids must be unique within a "
                    f"set (rename one, or drop the duplicate)."
                )
            else:
                seen[p.id] = i
            if not isinstance(p.text, str):
                errors.append(
                    f"{where}: text must be a string, got {type(p.text).__name__} ({_short(repr(p.text), 40)}); "
                    f"give the prompt as text."
                )
            elif not p.text.strip():
                errors.append(
                    f"{where}: text {p.text!r} is empty or whitespace; fill in the prompt or remove the row."
                )
            if p.label not in LABELS:
                errors.append(f"{where}: " + unknown_name_message("label", p.label, LABELS))
            if p.split is not None and p.split not in SPLITS:
                errors.append(
                    f"{where}: " + unknown_name_message("split", p.split, SPLITS, "Use None for 'no split'.")
                )
            if p.category is not None and p.category not in self._allowed:
                errors.append(
                    f"{where}: "
                    + unknown_name_message(
                        "category", p.category, self._allowed,
                        "Fix the name, map it with catlens.taxonomy, or pass categories=[...] to allow "
                        "your own category names.",
                    )
                )
            if not isinstance(p.source, str) or not p.source.strip():
                errors.append(f"{where}: source {p.source!r} is empty; name the dataset it came from.")
            if len(errors) > _MAX_ERRORS_SHOWN:
                break
        if errors:
            shown = "\n  ".join(errors[:_MAX_ERRORS_SHOWN])
            more = "\n  ..." if len(errors) > _MAX_ERRORS_SHOWN else ""
            raise ValueError(f"Invalid prompts in {self.name!r}:\n  {shown}{more}")

    # ---- sequence protocol
    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self._records)

    def __getitem__(  # type: ignore[override]
        self, index: SupportsIndex | slice | Sequence[SupportsIndex]
    ) -> "Prompt | PromptSet":
        """``ps[i]`` -> Prompt; ``ps[a:b]`` or ``ps[[i, j, ...]]`` -> PromptSet."""
        if isinstance(index, SupportsIndex) and not isinstance(index, (str, bytes)):
            return self._records[operator.index(index)]
        if isinstance(index, slice):
            return self._derive(self._records[index], f"[{index.start}:{index.stop}:{index.step}]")
        idx = [operator.index(i) for i in index]
        return self._derive([self._records[i] for i in idx], f"select({len(idx)} rows)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PromptSet) and self._records == other._records

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        counts = collections.Counter(self.labels)
        lab = ", ".join(f"{k}={counts[k]}" for k in LABELS if counts[k])
        cats = self.categories
        cat_s = ", ".join(cats) if len(cats) <= 6 else ", ".join(cats[:6]) + f", ... ({len(cats)})"
        return f"PromptSet({self.name!r}, n={len(self)}, {lab or 'empty'}, categories=[{cat_s}])"

    # ---- columns
    @property
    def records(self) -> tuple[Prompt, ...]:
        return self._records

    @property
    def texts(self) -> list[str]:
        return [p.text for p in self._records]

    @property
    def ids(self) -> list[str]:
        return [p.id for p in self._records]

    @property
    def labels(self) -> list[str]:
        return [p.label for p in self._records]

    @property
    def categories_of(self) -> list[str | None]:
        """Category of each prompt, in order (``None`` where uncategorised)."""
        return [p.category for p in self._records]

    @property
    def splits(self) -> list[str | None]:
        return [p.split for p in self._records]

    @property
    def categories(self) -> tuple[str, ...]:
        """Sorted distinct non-None categories present."""
        return tuple(sorted({p.category for p in self._records if p.category is not None}))

    @property
    def allowed_categories(self) -> frozenset[str]:
        return self._allowed

    @property
    def provenance(self) -> dict[str, Any]:
        """Sources, files read (path + sha256) and the operations that produced this set (a copy)."""
        return json.loads(json.dumps(self._provenance, default=str))

    @property
    def content_hash(self) -> str:
        """sha256 over the records in order (fields and meta, canonical JSON)."""
        h = hashlib.sha256()
        dumps = json.dumps
        for p in self._records:  # the fields of p.to_dict(), written out (no call per prompt)
            row = {"id": p.id, "text": p.text, "label": p.label, "category": p.category, "source": p.source,
                   "split": p.split, "meta": p.meta}
            h.update(dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
            h.update(b"\n")
        return h.hexdigest()

    def get(self, prompt_id: str) -> Prompt:
        """The prompt with this id (``KeyError`` with did-you-mean otherwise)."""
        for p in self._records:
            if p.id == prompt_id:
                return p
        raise KeyError(unknown_name_message(f"prompt id in {self.name!r}", prompt_id, self.ids[:2000]))

    # ---- derivation
    def _derive(self, records: Iterable[Prompt], operation: str, name: str | None = None) -> "PromptSet":
        prov = self.provenance
        prov["operations"] = [*prov.get("operations", []), operation]
        return PromptSet(records, name=name or self.name, provenance=prov, categories=self._allowed)

    def rename(self, name: str) -> "PromptSet":
        return self._derive(self._records, f"rename({name!r})", name=name)

    def filter(self, predicate: Callable[[Prompt], bool], description: str = "filter") -> "PromptSet":
        """Prompts for which ``predicate(prompt)`` is true."""
        return self._derive([p for p in self._records if predicate(p)], description)

    def where(
        self,
        *,
        label: Any = None,
        category: Any = None,
        split: Any = None,
        source: Any = None,
        **meta: Any,
    ) -> "PromptSet":
        """Prompts matching every given condition. Each argument is a value or a collection of values.

        ``None`` means "no condition"; to select prompts *without* a category (or split) pass a collection
        containing ``None``, e.g. ``where(category=[None])``. Meta keys are matched against ``prompt.meta``
        (a prompt without the key never matches; ``key=None`` matches a stored ``None``). Unknown labels,
        splits, category names or meta keys raise ``ValueError`` with the allowed values.
        """
        conditions: list[tuple[str, frozenset[Any], bool]] = []

        def wanted(name: str, value: Any, allowed: Collection[Any] | None, is_meta: bool = False) -> None:
            if value is None:
                return
            values = [value] if isinstance(value, str) or not isinstance(value, Collection) else list(value)
            if allowed is not None:
                for v in values:
                    if v is not None and v not in allowed:
                        raise ValueError(f"where({name}=...): " + unknown_name_message(name, v, allowed))
            conditions.append((name, frozenset(values), is_meta))

        wanted("label", label, LABELS)
        wanted("category", category, self._allowed)
        wanted("split", split, SPLITS)
        wanted("source", source, None)
        meta_keys = {k for p in self._records for k in p.meta}
        for key, value in meta.items():
            if self._records and key not in meta_keys:
                raise ValueError(
                    f"where({key}=...): " + unknown_name_message("meta key", key, meta_keys or {"<none>"})
                )
            if value is None:
                value = [None]
            wanted(key, value, None, is_meta=True)

        missing = object()

        def keep(p: Prompt) -> bool:
            for name, values, is_meta in conditions:
                v = p.meta.get(name, missing) if is_meta else getattr(p, name)
                if v is missing or v not in values:
                    return False
            return True

        desc = ", ".join(
            f"{k}={v!r}" for k, v in [("label", label), ("category", category), ("split", split),
                                      ("source", source), *meta.items()] if v is not None
        )
        return self.filter(keep, f"where({desc})")

    def sample(self, n: int, seed: int = 0) -> "PromptSet":
        """``n`` prompts drawn without replacement (seeded), kept in their original order."""
        if not 0 <= n <= len(self):
            raise ValueError(
                f"sample(n={n}) from {self.name!r} with {len(self)} prompts; n must be in [0, {len(self)}]."
            )
        idx = sorted(random.Random(seed).sample(range(len(self)), n))
        return self._derive([self._records[i] for i in idx], f"sample(n={n}, seed={seed})")

    def with_split(self, split: str | None | Mapping[str, str | None]) -> "PromptSet":
        """Set every prompt's split to ``split``, or per id from a mapping ``{id: split}`` (rest kept)."""
        if isinstance(split, Mapping):
            unknown = set(split) - set(self.ids)
            if unknown:
                raise ValueError(
                    f"with_split: {len(unknown)} ids are not in {self.name!r}, e.g. {sorted(unknown)[:3]}."
                )
            recs = [p.replace(split=split[p.id]) if p.id in split else p for p in self._records]
            return self._derive(recs, f"with_split({len(split)} ids)")
        return self._derive([p.replace(split=split) for p in self._records], f"with_split({split!r})")

    def with_categories(self, categories: Collection[str]) -> "PromptSet":
        """The same prompts with a different allowed-category set (validated)."""
        return PromptSet(self._records, self.name, self._provenance, categories=categories)

    @classmethod
    def concat(cls, *sets: "PromptSet", name: str | None = None) -> "PromptSet":
        """One set holding all prompts of ``sets`` in order (ids must stay unique)."""
        if not sets:
            raise ValueError("concat() needs at least one PromptSet.")
        name = name or "+".join(s.name for s in sets)
        files: list[Any] = []
        sources: list[str] = []
        for s in sets:
            prov = s.provenance
            for f in prov.get("files", []):
                if f not in files:
                    files.append(f)
            for src in prov.get("sources", [s.name]):
                if src not in sources:
                    sources.append(src)
        prov = {
            "name": name, "sources": sources, "files": files,
            "parts": [{"name": s.name, "n": len(s), "content_hash": s.content_hash} for s in sets],
        }
        allowed = frozenset().union(*(s.allowed_categories for s in sets))
        return cls([p for s in sets for p in s], name=name, provenance=prov, categories=allowed)

    # ---- tables and files
    def to_frame(self) -> pd.DataFrame:
        """Columns ``id, text, label, category, source, split, meta`` (meta as a JSON string)."""
        rows = [
            {**{k: v for k, v in p.to_dict().items() if k != "meta"},
             "meta": json.dumps(dict(p.meta), sort_keys=True, ensure_ascii=False)}
            for p in self._records
        ]
        df = pd.DataFrame(rows, columns=list(FIELDS))
        return df.astype(object)

    @classmethod
    def from_frame(
        cls,
        df: pd.DataFrame,
        name: str = "prompts",
        provenance: Mapping[str, Any] | None = None,
        *,
        categories: Collection[str] | None = None,
    ) -> "PromptSet":
        """Inverse of :meth:`to_frame`. Needs ``text`` and ``label``; extra columns go into ``meta``."""
        records = df.to_dict("records")
        return cls(records, name=name, provenance=provenance, categories=categories)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``.jsonl`` (one prompt per line, canonical) or ``.csv``; atomic. Returns the path."""
        from catlens.runs import write_text_atomic

        path = Path(path)
        if path.suffix == ".jsonl":
            text = "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in self._records)
        elif path.suffix == ".csv":
            buf = io.StringIO()
            self.to_frame().to_csv(buf, index=False)
            text = buf.getvalue()
        else:
            raise ValueError(f"save({str(path)!r}): unsupported suffix {path.suffix!r}; use .jsonl or .csv.")
        write_text_atomic(path, text)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        name: str | None = None,
        *,
        categories: Collection[str] | None = None,
    ) -> "PromptSet":
        """Read a ``.jsonl`` or ``.csv`` prompt file (see :func:`load_prompts`)."""
        from catlens.runs import sha256_file

        path = Path(path)
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "does not exist"
            raise FileNotFoundError(f"Prompt file {str(path)!r} {what}; give the path of a .jsonl or .csv file.")
        if path.suffix not in (".jsonl", ".csv"):
            raise ValueError(f"Prompt file {str(path)!r}: unsupported suffix {path.suffix!r}; use .jsonl/.csv.")
        name = name or path.stem
        prov = {"name": name, "sources": [name], "files": [{"path": str(path), "sha256": sha256_file(path)}]}
        example = '{"text": "How do I bake bread?", "label": "benign"}'
        fix = (f"Give one JSON object per line, e.g. {example}." if path.suffix == ".jsonl"
               else "Give a header row with at least the columns text,label and one row per prompt.")
        with reading(path, "prompt file", fix):
            text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"Prompt file {str(path)!r} holds no prompts (it is empty or blank). {fix}")
        if path.suffix == ".jsonl":
            rows = []
            for lineno, line in enumerate(text.split("\n"), start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FileFormatError(f"{path}:{lineno}: not valid JSON ({e}). {fix}") from None
                if not isinstance(row, dict):
                    raise FileFormatError(f"Prompt file {str(path)!r}, line {lineno}: expected a JSON object, got "
                                          f"{type(row).__name__} {_short(json.dumps(row), 40)}. {fix}")
                rows.append(row)
            return cls(rows, name=name, provenance=prov, categories=categories)
        with reading(path, "prompt file", fix):
            df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        if df.empty:
            raise ValueError(f"Prompt file {str(path)!r} holds no prompts (a header row only). {fix}")
        return cls.from_frame(df, name=name, provenance=prov, categories=categories)


def concat(*sets: PromptSet, name: str | None = None) -> PromptSet:
    """Function form of :meth:`PromptSet.concat`."""
    return PromptSet.concat(*sets, name=name)


# ------------------------------------------------------------------------------------------------ splits
def _stratum_value(p: Prompt, key: str) -> Any:
    if key in FIELDS and key != "meta":
        return getattr(p, key)
    return p.meta.get(key)


def _allocate(n: int, fractions: Sequence[float]) -> list[int]:
    """Largest-remainder allocation of ``n`` items to fractions (ties go to the earlier split)."""
    raw = [n * f for f in fractions]
    counts = [math.floor(r) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def split_prompts(
    ps: PromptSet,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    stratify: str | Sequence[str] | None = "category",
    *,
    overwrite: bool = False,
) -> PromptSet:
    """Assign ``train``/``val``/``test`` splits, stratified and seeded; returns a new set in the same order.

    ``stratify`` names one or more fields (``category``, ``label``, ``source``) or meta keys; ``None`` in a
    stratum value is its own stratum. Within each stratum the counts follow ``fractions`` by largest
    remainder (each split within one prompt of its exact share). The assignment depends only on ``seed``,
    the stratum and the ids in it, not on the input order. Prompts whose split is already set keep it
    unless ``overwrite=True``.
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != len(SPLITS) or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(
            f"fractions={fractions} must be {len(SPLITS)} non-negative numbers for {SPLITS} summing to 1, "
            f"e.g. (0.7, 0.15, 0.15)."
        )
    keys = [] if stratify is None else [stratify] if isinstance(stratify, str) else list(stratify)
    meta_keys = {k for p in ps for k in p.meta}
    for k in keys:
        if not (k in FIELDS and k != "meta") and k not in meta_keys:
            raise ValueError(
                "split_prompts(stratify=...): "
                + unknown_name_message("stratify key", k, ["category", "label", "source", *meta_keys])
            )
    strata: dict[str, list[Prompt]] = collections.defaultdict(list)
    for p in ps:
        if p.split is None or overwrite:
            strata[json.dumps([_stratum_value(p, k) for k in keys], default=str)].append(p)
    assigned: dict[str, str] = {}
    for stratum, members in strata.items():
        members = sorted(members, key=lambda p: p.id)
        digest = hashlib.sha256(f"{seed}|{stratum}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(members)
        start = 0
        for split_name, count in zip(SPLITS, _allocate(len(members), fractions)):
            for p in members[start : start + count]:
                assigned[p.id] = split_name
            start += count
    recs = [p.replace(split=assigned[p.id]) if p.id in assigned else p for p in ps]
    return ps._derive(recs, f"split_prompts(fractions={fractions}, seed={seed}, stratify={keys})")


# ------------------------------------------------------------------------------------ duplicates, leakage
_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize_text(text: str) -> str:
    """NFKC, lower case, runs of punctuation/whitespace -> one space, stripped."""
    return _normalize_all([text])[0]


def shingles(text: str, k: int = 5) -> frozenset[str]:
    """Character ``k``-grams of the normalised text (the whole text if shorter than ``k``)."""
    return _shingles_all([normalize_text(text)], k)[0]


def _normalize_all(texts: Iterable[str]) -> list[str]:
    """``[normalize_text(t) for t in texts]``, written out: one call for many texts (the one definition of the
    normalisation)."""
    sub, nfkc = _NON_WORD.sub, unicodedata.normalize
    return [sub(" ", nfkc("NFKC", t).lower()).strip() for t in texts]


def _shingles_all(normalized: Iterable[str], k: int = 5) -> list[frozenset[str]]:
    """``[shingles(t) for t in texts]`` from the normalised texts, written out: one call for many texts."""
    out = []
    for t in normalized:
        n = len(t)
        out.append(frozenset([t]) if n <= k else frozenset(map(t.__getitem__, map(slice, range(n - k + 1),
                                                                                    range(k, n + 1)))))
    return out


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _prefix_len(n: int, threshold: float) -> int:
    """How many of a document's ``n`` tokens (in the global order) its prefix holds: ``n - ceil(t*n) + 1``. Two
    documents with Jaccard >= t share at least ``ceil(t*n)`` tokens, so their prefixes intersect."""
    return n - math.ceil(threshold * n - 1e-9) + 1


def _matches(index: Mapping[Any, Sequence[int]], docs: Sequence[Any], probe: Iterable[Any], query: frozenset,
             threshold: float, n: int | None = None) -> Iterator[tuple[int, float]]:
    """``(i, jaccard)`` for every ``docs[i]`` listed in ``index`` under a token of ``probe`` (the query's prefix)
    whose Jaccard similarity to ``query`` (a token set of size ``n``, default ``len(query)``) is >= ``threshold``;
    each document once, in the order met. A pair whose sizes alone rule the threshold out is skipped uncounted.
    The prefix filter's probe, shared by :func:`_near_pairs` and :class:`_TrainIndex`."""
    n = len(query) if n is None else n
    seen: set[int] = set()
    for tok in probe:
        for i in index.get(tok, ()):
            if i in seen:
                continue
            seen.add(i)
            x = docs[i]
            small, large = (len(x), n) if len(x) <= n else (n, len(x))
            if small < threshold * large - 1e-9:
                continue
            inter = len(query.intersection(x))
            union = len(x) + n - inter
            sim = inter / union if union else 1.0  # jaccard(x, query)
            if sim >= threshold - 1e-12:
                yield i, sim


def _near_pairs(
    left: Sequence[frozenset[str]],
    right: Sequence[frozenset[str]] | None,
    threshold: float,
) -> list[tuple[int, int, float]]:
    """All pairs with Jaccard >= threshold: ``(i, j, sim)`` with i<j in ``left`` (self-join, ``right=None``)
    or i in ``left``, j in ``right``. Prefix filtering: if J(x, y) >= t then x and y share at least
    ceil(t*|x|) tokens, so their prefixes of length |x| - ceil(t*|x|) + 1 under one global token order
    (rarest first) intersect."""
    # One call per prompt at most (no helper per token or per candidate pair): a per-call wrapper (e.g. the test
    # suite's runtime type checks) would otherwise cost more than the work itself.
    docs = list(left) + (list(right) if right is not None else [])
    freq = collections.Counter(itertools.chain.from_iterable(docs))
    # Rarest first; the stable sort breaks ties by first appearance, so the order is deterministic.
    rank = {tok: r for r, tok in enumerate(sorted(freq, key=freq.__getitem__))}.__getitem__
    prefixes = []
    for d in docs:
        ranks = sorted(map(rank, d))
        prefixes.append(ranks[: _prefix_len(len(ranks), threshold)])
    index: dict[int, list[int]] = collections.defaultdict(list)
    pairs: list[tuple[int, int, float]] = []
    self_join = right is None
    if not self_join:
        for i in range(len(left)):
            for tok in prefixes[i]:
                index[tok].append(i)
    queries = left if self_join else right
    offset = 0 if self_join else len(left)
    for j, d in enumerate(queries):  # type: ignore[arg-type]
        pre = prefixes[offset + j]
        pairs.extend((i, j, sim) for i, sim in _matches(index, left, pre, d, threshold))
        if self_join:
            for tok in pre:
                index[tok].append(j)
    return pairs


class _TrainIndex:
    """The train side of :func:`check_leakage`, built once and reused for every test set checked against it.

    ``first_by_norm`` maps each normalised text to its first row. For near duplicates each train prompt's
    5-grams become integer ranks under one global order (rarest in the train set first); a test prompt's 5-grams
    that no train prompt has come before all of them in that order (they can never be shared, and any fixed
    total order makes prefix filtering complete, see :func:`_near_pairs`). So the index depends on the train
    texts only, and one index serves every test set and threshold.
    """

    def __init__(self, texts: Sequence[str]) -> None:
        norms = _normalize_all(texts)
        self.first_by_norm: dict[str, int] = {}
        for i, t in enumerate(norms):
            self.first_by_norm.setdefault(t, i)
        sh = _shingles_all(norms)
        freq = collections.Counter(itertools.chain.from_iterable(sh))
        self.rank: dict[str, int] = {tok: r for r, tok in enumerate(sorted(freq, key=freq.__getitem__))}
        rank = self.rank.__getitem__
        self.docs: list[tuple[int, ...]] = [tuple(sorted(map(rank, d))) for d in sh]  # sorted ranks per prompt
        self._postings: dict[float, dict[int, list[int]]] = {}

    def postings(self, threshold: float) -> dict[int, list[int]]:
        """Rank -> train rows (ascending) whose prefix for ``threshold`` holds that rank."""
        index = self._postings.get(threshold)
        if index is None:
            index = collections.defaultdict(list)
            for i, d in enumerate(self.docs):
                for r in d[: _prefix_len(len(d), threshold)]:
                    index[r].append(i)
            self._postings[threshold] = index = dict(index)
        return index

    def near(self, normalized: Sequence[str], threshold: float) -> dict[int, tuple[int, float]]:
        """Test row -> (train row, similarity) of its most similar train prompt with Jaccard >= ``threshold``
        (test texts given normalised); among equally similar train prompts the first."""
        index = self.postings(threshold)
        docs, rank = self.docs, self.rank
        best: dict[int, tuple[int, float]] = {}
        for j, d in enumerate(_shingles_all(normalized)):
            n = len(d)
            known = sorted(rank[tok] for tok in d if tok in rank)
            n_prefix = _prefix_len(n, threshold) - (n - len(known))  # unknown 5-grams come first
            if n_prefix <= 0:
                continue
            found: tuple[int, float] | None = None
            for i, sim in _matches(index, docs, known[:n_prefix], frozenset(known), threshold, n):
                if found is None or (sim, -i) > (found[1], -found[0]):
                    found = (i, sim)
            if found is not None:
                best[j] = found
        return best


_TRAIN_INDEXES: "collections.OrderedDict[tuple[str, ...], _TrainIndex]" = collections.OrderedDict()
_TRAIN_INDEXES_MAX = 4
_TRAIN_INDEX_MAX_TEXTS = 50_000
"""Larger train sets get an index per call, not kept (it would hold on to ~100 MB)."""


def _train_index(texts: Sequence[str]) -> _TrainIndex:
    """The :class:`_TrainIndex` of these texts, from a small cache keyed by the texts themselves (so it can never
    be stale): :func:`check_leakage` of one train set against many test sets builds it once."""
    key = tuple(texts)
    index = _TRAIN_INDEXES.get(key)
    if index is None:
        index = _TrainIndex(key)
        if len(key) > _TRAIN_INDEX_MAX_TEXTS:
            return index
        _TRAIN_INDEXES[key] = index
        while len(_TRAIN_INDEXES) > _TRAIN_INDEXES_MAX:
            _TRAIN_INDEXES.popitem(last=False)
    else:
        _TRAIN_INDEXES.move_to_end(key)
    return index


class DedupResult(NamedTuple):
    """``sets``: the cleaned sets, in the order given; ``report``: one row per dropped prompt."""

    sets: tuple[PromptSet, ...]
    report: pd.DataFrame


_DEDUP_COLUMNS = [
    "set", "id", "text", "label", "reason", "similarity", "kept_set", "kept_id", "kept_text", "kept_label",
]


def deduplicate(*sets: PromptSet, near_threshold: float | None = 0.9) -> DedupResult:
    """Remove exact and near duplicates within and across ``sets``; the first occurrence wins.

    Order of precedence: earlier sets first, then row order, so ``deduplicate(train, test)`` keeps the
    training copy and drops the test copy. Exact = equal :func:`normalize_text`; near = character 5-gram
    Jaccard >= ``near_threshold`` (``None`` turns near-duplicate removal off). A prompt is dropped only for
    a *kept* earlier prompt (no chains through dropped ones).
    """
    if not sets:
        raise ValueError("deduplicate() needs at least one PromptSet.")
    if near_threshold is not None and not 0 < near_threshold <= 1:
        raise ValueError(f"near_threshold={near_threshold} must be in (0, 1], or None for exact only.")
    flat = [(si, p) for si, s in enumerate(sets) for p in s]
    dropped: dict[int, tuple[int, str, float]] = {}  # flat index -> (kept flat index, reason, similarity)
    first_by_norm: dict[str, int] = {}
    reps: list[int] = []
    norms = _normalize_all(p.text for _, p in flat)
    for k, norm in enumerate(norms):
        if norm in first_by_norm:
            dropped[k] = (first_by_norm[norm], "exact", 1.0)
        else:
            first_by_norm[norm] = k
            reps.append(k)
    if near_threshold is not None and len(reps) > 1:
        sh = _shingles_all(norms[k] for k in reps)
        by_j: dict[int, list[tuple[int, float]]] = collections.defaultdict(list)
        for i, j, sim in _near_pairs(sh, None, near_threshold):
            by_j[j].append((i, sim))
        kept_rep = [True] * len(reps)
        for j in range(len(reps)):
            cands = [(sim, i) for i, sim in by_j.get(j, ()) if kept_rep[i]]
            if cands:
                sim, i = max(cands, key=lambda c: (c[0], -c[1]))
                kept_rep[j] = False
                dropped[reps[j]] = (reps[i], "near", sim)
    rows = []
    for k in sorted(dropped):
        kept, reason, sim = dropped[k]
        si, p = flat[k]
        ki, kp = flat[kept]
        if p.label != kp.label:
            log.warning("Duplicate with conflicting labels: %r (%s) ~ %r (%s)",
                        p.id, p.label, kp.id, kp.label)
        rows.append({
            "set": sets[si].name, "id": p.id, "text": p.text, "label": p.label, "reason": reason,
            "similarity": sim, "kept_set": sets[ki].name, "kept_id": kp.id, "kept_text": kp.text,
            "kept_label": kp.label,
        })
    report = pd.DataFrame(rows, columns=_DEDUP_COLUMNS)
    cleaned = []
    offset = 0
    for s in sets:
        keep = [p for k, p in enumerate(s) if offset + k not in dropped]
        n_drop = len(s) - len(keep)
        offset += len(s)
        cleaned.append(s._derive(keep, f"deduplicate(near_threshold={near_threshold}, dropped={n_drop})"))
    if rows:
        log.info("deduplicate: dropped %d prompts (%s)", len(rows),
                 dict(collections.Counter(report["reason"])))
    return DedupResult(tuple(cleaned), report)


@dataclass(frozen=True)
class LeakageReport:
    n_train: int
    n_test: int
    near_threshold: float | None
    pairs: pd.DataFrame
    """Columns ``test_id, test_text, train_id, train_text, reason, similarity`` (empty when clean)."""

    @property
    def ok(self) -> bool:
        return len(self.pairs) == 0


def _short(text: str, n: int = 70) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def check_leakage(
    train: PromptSet,
    test: PromptSet,
    near_threshold: float | None = 0.8,
    *,
    raise_on_leak: bool = True,
) -> LeakageReport:
    """Raise :class:`LeakageError` if any ``test`` prompt is an exact/near duplicate of a ``train`` prompt.

    Same measures as :func:`deduplicate`. The default threshold is lower than deduplicate's 0.9 because a
    leak check should err on the sensitive side: swapping one word in a ~100-character prompt gives a
    character 5-gram Jaccard of about 0.85-0.9. With ``raise_on_leak=False`` the report is returned either
    way. Each leaking test prompt is reported once: against the first train prompt with the same normalised text,
    else against its most similar train prompt (the first of equally similar ones). The train side's index is
    kept for the next call (a small cache keyed by the train texts), so checking one train set against many test
    sets indexes it once.
    """
    index = _train_index(train.texts)
    test_norm = _normalize_all(test.texts)
    rows = []
    exact_test: set[int] = set()
    for j, t in enumerate(test_norm):
        i = index.first_by_norm.get(t)
        if i is not None:
            exact_test.add(j)
            rows.append((j, i, "exact", 1.0))
    if near_threshold is not None:
        best = index.near(test_norm, near_threshold)
        rows += [(j, i, "near", sim) for j, (i, sim) in best.items() if j not in exact_test]
    rows.sort()
    pairs = pd.DataFrame(
        [
            {"test_id": test[j].id, "test_text": test[j].text, "train_id": train[i].id,
             "train_text": train[i].text, "reason": reason, "similarity": sim}
            for j, i, reason, sim in rows
        ],
        columns=["test_id", "test_text", "train_id", "train_text", "reason", "similarity"],
    )
    report = LeakageReport(len(train), len(test), near_threshold, pairs)
    if rows and raise_on_leak:
        lines = [
            f"test {r.test_id!r} «{_short(r.test_text)}» ~ train {r.train_id!r} «{_short(r.train_text)}» "
            f"({r.reason}, {r.similarity:.2f})"
            for r in pairs.head(10).itertuples()
        ]
        more = f"\n  ... and {len(rows) - 10} more" if len(rows) > 10 else ""
        raise LeakageError(
            f"{len(rows)} of {len(test)} prompts in {test.name!r} also occur in {train.name!r}:\n  "
            + "\n  ".join(lines) + more
            + f"\nRemove them from one side, e.g. deduplicate({train.name!r}, {test.name!r}) keeps the train "
            f"copy and drops the test copy.",
            pairs,
        )
    return report
