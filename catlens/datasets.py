"""Loaders for the benchmark files in the shared data directory, one per dataset, reading the original format.

Each dataset is a :class:`DatasetSpec` in :data:`DATASETS`: its files (relative to the data directory),
labels, license, Hugging Face id, the expected row count and the sha256 of its files as recorded in the
folder's ``SOURCE.md``, and two functions: ``read`` (files -> one raw DataFrame with the source's own
columns) and ``build`` (raw DataFrame -> prompts). ``from_hub=True`` swaps ``read`` for a Hugging Face
download where an adapter exists, so both paths share the same ``build``.

Categories are mapped onto the shared taxonomy with :mod:`catlens.taxonomy`; every prompt keeps the source's
own labels in ``meta["source_category"]`` / ``meta["source_subcategory"]``. Splits: ``harmbench`` (file
test/val) and the ``rd_*`` sets (Arditi et al. splits) carry one; everything else has ``split=None``.

Data directory: the ``data_dir`` argument, else ``$CATLENS_DATA_DIR``, else ``<repo>/../shared/data`` when it
exists (``<repo>`` = the folder holding the ``catlens`` package).
"""

import importlib
import json
import logging
import math
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from catlens.errors import FileFormatError, reading, unknown_name_message
from catlens.prompts import Prompt, PromptSet
from catlens.taxonomy import category_mapper, load_taxonomy

log = logging.getLogger(__name__)

ENV_VAR = "CATLENS_DATA_DIR"


class Mapper:
    """Callable ``(source, source_category, source_subcategory=None) -> category | None`` over one taxonomy
    table, which also knows which ``(source, source_category)`` labels the table lists."""

    def __init__(self, table: pd.DataFrame | None = None) -> None:
        table = load_taxonomy() if table is None else table
        self._map = category_mapper(table)
        pairs = zip(table["source"], table["source_category"])
        self._keys = {(str(s).strip(), str(c).strip()) for s, c in pairs}

    def __call__(self, source: str, source_category: Any, source_subcategory: Any = None) -> str | None:
        cat = None if source_category is None else _str(source_category)
        sub = None if source_subcategory is None else _str(source_subcategory)
        return self._map(source, cat, sub)

    def knows(self, source: str, source_category: str) -> bool:
        return (source, source_category.strip()) in self._keys


# ------------------------------------------------------------------------------------------- data dir
def _default_data_dir() -> Path:
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``data_dir`` > ``$CATLENS_DATA_DIR`` > ``<repo>/../shared/data``; raises with instructions if none."""
    if data_dir is not None:
        path, origin = Path(data_dir), "data_dir argument"
    elif os.environ.get(ENV_VAR):
        path, origin = Path(os.environ[ENV_VAR]), f"${ENV_VAR}"
    else:
        path, origin = _default_data_dir(), "default <repo>/../shared/data"
    if not path.is_dir():
        raise FileNotFoundError(
            f"Benchmark data directory not found: {str(path)!r} (from the {origin}). Pass data_dir=..., or "
            f"set the environment variable {ENV_VAR} to the folder holding xstest/, catqa/, harmbench/, ... "
            f"(the shared/data folder). Without data, use load_prompts('builtin')."
        )
    return path


# ------------------------------------------------------------------------------------------- spec types
@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the Hugging Face hub and how its columns map onto the local file's columns.

    The ids, configs, splits and column names follow the dataset cards; they could not be checked here
    (no hub access), so a mismatch surfaces as a clear "no column(s) ..." error from the builder.
    """

    id: str
    config: str | None = None
    split: str | None = None
    rename: Mapping[str, str] = field(default_factory=dict)
    """hub column -> local column name."""
    filter_empty: str | None = None
    """Keep only rows where this column is empty (Alpaca: instructions without input)."""


@dataclass(frozen=True)
class DatasetSpec:
    """One benchmark dataset: where its files are, what it contains and how to turn it into prompts."""

    name: str
    paths: tuple[str, ...]
    """Files relative to the data directory."""
    labels: tuple[str, ...]
    """Labels that occur: ``("harmful",)``, ``("benign",)`` or both."""
    license: str
    hub_id: str | None
    """Canonical Hugging Face dataset id (for citation; ``hub`` says whether it can be downloaded)."""
    read: Callable[[list[Path]], pd.DataFrame]
    build: Callable[..., list[Prompt]]
    """``build(df, mapper, name, **options) -> list[Prompt]``."""
    description: str
    expected_n: int | None = None
    """Rows with default options, from the folder's SOURCE.md."""
    sha256: Mapping[str, str] = field(default_factory=dict)
    """Path -> sha256 as recorded in SOURCE.md (missing entries are not checked)."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """Loader options and their defaults (e.g. HarmBench ``include_copyright=False``)."""
    hub: HubSource | None = None

    def load(self, data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> PromptSet:
        """Same as ``load_dataset(self.name, data_dir, **kwargs)``."""
        return load_dataset(self.name, data_dir, **kwargs)

    @property
    def loader(self) -> Callable[..., PromptSet]:
        """``loader(data_dir=None, *, from_hub=False, taxonomy=None, **options) -> PromptSet``."""
        return self.load


# ------------------------------------------------------------------------------------------- readers
_FILE_FIX = ("Restore it from the release listed in SOURCE.md of its folder, or point data_dir / $CATLENS_DATA_DIR "
             "(catlens --data-dir) at an intact copy of shared/data.")


def _csv_file(path: Path) -> pd.DataFrame:
    with reading(path, "dataset file", _FILE_FIX):
        return pd.read_csv(path, dtype=str, keep_default_na=False)


def _json_file(path: Path) -> Any:
    with reading(path, "dataset file", _FILE_FIX), open(path, encoding="utf-8") as f:
        return json.loads(f.read())


def _records(value: Any, path: Path) -> pd.DataFrame:
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        got = type(value).__name__ if not isinstance(value, list) else "a list holding non-objects"
        raise FileFormatError(f"dataset file {str(path)!r} should hold a JSON list of objects (one per prompt), "
                              f"got {got}. {_FILE_FIX}")
    return pd.DataFrame(value)


def _read_csv(paths: list[Path]) -> pd.DataFrame:
    return _csv_file(paths[0])


def _read_json(paths: list[Path]) -> pd.DataFrame:
    return _records(_json_file(paths[0]), paths[0])


def _read_jsonl(paths: list[Path]) -> pd.DataFrame:
    rows = []
    with reading(paths[0], "dataset file", _FILE_FIX), open(paths[0], encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FileFormatError(f"dataset file {str(paths[0])!r}, line {lineno}: not valid JSON ({e.msg}, "
                                      f"column {e.colno}); the file is truncated or corrupt. {_FILE_FIX}") from None
    return _records(rows, paths[0])


def _read_catqa(paths: list[Path]) -> pd.DataFrame:
    nested = _json_file(paths[0])
    if not isinstance(nested, dict) or not all(isinstance(subs, dict) for subs in nested.values()):
        raise FileFormatError(
            f"dataset file {str(paths[0])!r} should hold a JSON object {{category: {{subcategory: [questions]}}}}, "
            f"got {type(nested).__name__ if not isinstance(nested, dict) else 'an object with non-object values'}. "
            f"{_FILE_FIX}")
    rows = [
        {"Category": c, "Subcategory": s, "Question": q}
        for c, subs in nested.items() for s, qs in subs.items() for q in qs
    ]
    return pd.DataFrame(rows)


def _read_harmbench(paths: list[Path]) -> pd.DataFrame:
    frames = []
    for path in paths:
        df = _csv_file(path)
        df["_file_split"] = "val" if path.stem.endswith("_val") else "test"
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


# ------------------------------------------------------------------------------------------- builders
def _require(df: pd.DataFrame, columns: list[str], name: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(
            f"{name}: the data has no column(s) {missing}; columns are {list(df.columns)}. The file (or hub "
            f"revision) does not match the expected format; check SOURCE.md in the dataset folder."
        )


def _str(v: Any) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _prompt(
    name: str, key: Any, text: Any, label: str, category: str | None, *, split: str | None = None,
    source_category: Any = None, source_subcategory: Any = None, **meta: Any,
) -> Prompt:
    m: dict[str, Any] = {}
    if source_category is not None:
        m["source_category"] = _str(source_category)
    if source_subcategory is not None:
        m["source_subcategory"] = _str(source_subcategory)
    m.update({k: v for k, v in meta.items() if v is not None})
    return Prompt(id=f"{name}/{key}", text=_str(text), label=label, category=category, source=name,
                  split=split, meta=m)


def _build_xstest(df: pd.DataFrame, mapper: Mapper, name: str) -> list[Prompt]:
    _require(df, ["prompt", "type", "label"], name)
    out = []
    for i, r in enumerate(df.to_dict("records")):
        raw_label = _str(r["label"]).strip()
        if raw_label not in ("safe", "unsafe"):
            raise ValueError(f"{name} row {i}: label {raw_label!r} is not 'safe' or 'unsafe'.")
        focus = _str(r.get("focus")).strip()
        key = f"{int(r['id']):03d}" if _str(r.get("id")).strip().isdigit() else f"{i:03d}"
        out.append(_prompt(
            name, key, r["prompt"], "benign" if raw_label == "safe" else "harmful",
            mapper("xstest", r["type"], focus), source_category=r["type"], source_subcategory=focus,
            type=_str(r["type"]), focus=focus, note=_str(r.get("note")).strip(),
        ))
    return out


def _build_catqa(df: pd.DataFrame, mapper: Mapper, name: str) -> list[Prompt]:
    _require(df, ["Category", "Subcategory", "Question"], name)
    out = []
    for i, (c, s, q) in enumerate(zip(df["Category"], df["Subcategory"], df["Question"])):
        sub = _str(s).strip().rstrip(":").strip()
        out.append(_prompt(name, f"{i:04d}", q, "harmful", mapper("catqa", c, sub),
                           source_category=c, source_subcategory=sub))
    return out


def _build_beavertails(df: pd.DataFrame, mapper: Mapper, name: str) -> list[Prompt]:
    _require(df, ["prompt", "category"], name)
    out = []
    for i, r in enumerate(df.to_dict("records")):
        out.append(_prompt(name, f"{i:03d}", r["prompt"], "harmful", mapper("beavertails", r["category"]),
                           source_category=r["category"], category_id=_str(r.get("category_id")) or None))
    return out


def _build_do_not_answer(df: pd.DataFrame, mapper: Mapper, name: str) -> list[Prompt]:
    _require(df, ["id", "risk_area", "types_of_harm", "specific_harms", "question"], name)
    out = []
    for r in df.to_dict("records"):
        specific = _str(r["specific_harms"]).split(":", 1)[0].strip()
        area = _str(r["risk_area"])
        out.append(_prompt(
            name, f"{int(r['id']):03d}", r["question"], "harmful",
            mapper("do_not_answer", r["types_of_harm"], specific),
            source_category=r["types_of_harm"], source_subcategory=specific, risk_area=area,
            human_chatbot=area.startswith("Human-Chatbot"),
        ))
    return out


def _build_harmbench(
    df: pd.DataFrame, mapper: Mapper, name: str, *, include_copyright: bool = False,
    include_contextual: bool = True,
) -> list[Prompt]:
    _require(df, ["Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID"], name)
    out = []
    for r in df.to_dict("records"):
        functional = _str(r["FunctionalCategory"])
        if functional == "copyright" and not include_copyright:
            continue
        if functional == "contextual" and not include_contextual:
            continue
        context = _str(r.get("ContextString")).strip()
        # HarmBench's DirectRequest format for contextual behaviours.
        text = f"{context}\n\n---\n\n{r['Behavior']}" if context else r["Behavior"]
        out.append(_prompt(
            name, r["BehaviorID"], text, "harmful", mapper("harmbench", r["SemanticCategory"]),
            split=r.get("_file_split") or None, source_category=r["SemanticCategory"],
            functional_category=functional, behavior=_str(r["Behavior"]), tags=_str(r.get("Tags")),
        ))
    return out


def _build_advbench(df: pd.DataFrame, mapper: Mapper, name: str) -> list[Prompt]:
    _require(df, ["goal"], name)
    return [_prompt(name, f"{i:03d}", g, "harmful", None) for i, g in enumerate(df["goal"])]


def _jbb_index(r: Mapping[str, Any], i: int) -> int:
    for key in ("index", "unnamed: 0"):
        v = _str(r.get(key)).strip()
        if v.isdigit():
            return int(v)
    return i


def _build_jbb(df: pd.DataFrame, mapper: Mapper, name: str, label: str) -> list[Prompt]:
    df = df.rename(columns=str.lower)
    _require(df, ["goal", "behavior", "category"], name)
    out = []
    for i, r in enumerate(df.to_dict("records")):
        idx = _jbb_index(r, i)
        extra: dict[str, Any] = {"behavior": _str(r["behavior"]), "origin": _str(r.get("source")) or None,
                                 "pair_index": idx}
        if label == "benign":
            extra["pair_id"] = f"jbb_harmful/{idx:03d}"
        else:
            extra["pair_id"] = f"jbb_benign/{idx:03d}"
        out.append(_prompt(name, f"{idx:03d}", r["goal"], label, mapper("jbb", r["category"]),
                           source_category=r["category"], **extra))
    return out


def _build_strongreject(df: pd.DataFrame, mapper: Mapper, name: str) -> list[Prompt]:
    _require(df, ["category", "forbidden_prompt"], name)
    out = []
    for i, r in enumerate(df.to_dict("records")):
        out.append(_prompt(name, f"{i:03d}", r["forbidden_prompt"], "harmful",
                           mapper("strongreject", r["category"]), source_category=r["category"],
                           origin=_str(r.get("source")) or None))
    return out


def _build_sst(df: pd.DataFrame, mapper: Mapper, name: str) -> list[Prompt]:
    _require(df, ["id", "harm_area", "category", "prompts_final"], name)
    out = []
    for r in df.to_dict("records"):
        out.append(_prompt(name, _str(r["id"]), r["prompts_final"], "harmful",
                           mapper("simple_safety_tests", r["harm_area"]), source_category=r["harm_area"],
                           prompt_type=_str(r["category"])))
    return out


def _build_coconot(df: pd.DataFrame, mapper: Mapper, name: str, label: str) -> list[Prompt]:
    _require(df, ["id", "category", "subcategory", "prompt"], name)
    out = []
    for r in df.to_dict("records"):
        out.append(_prompt(
            name, _str(r["id"]), r["prompt"], label, mapper("coconot", r["category"], r["subcategory"]),
            source_category=r["category"], source_subcategory=r["subcategory"],
            coconot_category=_str(r["category"]), coconot_subcategory=_str(r["subcategory"]),
        ))
    return out


def _build_instructions(df: pd.DataFrame, mapper: Mapper, name: str, label: str,
                        split: str | None = None) -> list[Prompt]:
    """AlpacaEval / Alpaca / refusal_direction splits: ``instruction`` (+ optional ``category``/``dataset``).

    The refusal_direction harmful splits mix three taxonomies (JBB, HarmBench, StrongREJECT); their label
    strings are disjoint, so the taxonomy is recognised from the label. This loop is the hot path for the
    31k Alpaca pool, hence no per-row helper calls.
    """
    _require(df, ["instruction"], name)
    width = len(str(max(len(df) - 1, 0)))
    n = len(df)
    texts = df["instruction"].tolist()
    raw_cats = df["category"].tolist() if "category" in df.columns else [None] * n
    groups = df["dataset"].tolist() if "dataset" in df.columns else [None] * n
    resolved: dict[str, tuple[str | None, str | None]] = {}
    for raw in set(raw_cats):
        if isinstance(raw, str):
            src = next((s for s in ("jbb", "harmbench", "strongreject") if mapper.knows(s, raw)), None)
            resolved[raw] = (mapper(src, raw) if src else None, src)
    out = []
    for i, (text, raw, group) in enumerate(zip(texts, raw_cats, groups)):
        meta: dict[str, Any] = {}
        category = None
        if isinstance(raw, str):
            category, src = resolved[raw]
            meta["source_category"] = raw
            if src is not None:
                meta["source_taxonomy"] = src
        if isinstance(group, str) and group:
            meta["dataset"] = group
        out.append(Prompt(id=f"{name}/{i:0{width}d}", text="" if text is None else str(text), label=label,
                          category=category, source=name, split=split, meta=meta))
    return out


# ------------------------------------------------------------------------------------------- registry
_NC = "non-commercial"
_COCONOT_LICENSE = "ODC-BY (data) / MIT (repo)"
_RD = "refusal_direction"

# sha256 of each file as recorded in the folder's SOURCE.md (advbench records only a git blob id).
SOURCE_SHA256: dict[str, str] = {
    "xstest/xstest_prompts.csv": "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
    "catqa/catqa_english.json": "40efd4e205e26d6e840f30e6d8540f95f2777453af052319e42e74d10bd1992a",
    "beavertails_evaluation/BeaverTails-Evaluation.csv":
        "7d88f60b9cd104ca2df28613685d7dbbc0c7b372acf0c936e00666a23b8977bb",
    "do_not_answer/do_not_answer_en.csv": "06acfa39a06a1b33d1f264ce41b4f7a95812010c594fb733ae4717ee0a4544fc",
    "harmbench/harmbench_behaviors_text_test.csv":
        "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",
    "harmbench/harmbench_behaviors_text_val.csv":
        "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",
    "jbb_behaviors/harmful-behaviors.csv": "45e9a8923b28f547bb372fbaa9af7df8b38c818a80ae50c3bab97704197ff516",
    "jbb_behaviors/benign-behaviors.transcribed.csv":
        "c0958ac974fb6629527aeff6c81c88154a877190d07313ac377d36951fde5d3e",
    "strongreject/strongreject_dataset.csv":
        "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",
    "simple_safety_tests/SimpleSafetyTests - test cases.csv":
        "6d95a1301e0d0f3a3c4cf5392f4afff11ad6e3066f95d23aaa138d44aedf986c",
    "coconot/coconot_eval.jsonl": "df72466c477207f14a96c5940c3ef3b93b1b50c0d1e7ed7c5fb5dc6d6140c077",
    "coconot/coconot_contrast_eval.jsonl": "76dccec176743ed656279f2969c51abb68bda94e5fda8397e34ff5638e021d86",
    "coconot/coconot_pref.jsonl": "3b0cddcfb72218b8c32d7c11bfded00174f2f4a3c4edfbc862640fc63f43d9c2",
    "alpaca_eval/model_outputs_text_davinci_003.json":
        "af0bc112f08c88bf589bbfe6fc1036806d0a0f6fec9c4d5a4db860f5afe73b4b",
    f"{_RD}/processed/alpaca.json": "c4ce1bdc5c9b92caabcb171c27c7ec1e79832836bae10291d7c8ab8c6245f600",
    f"{_RD}/splits/harmful_train.json": "8f5c0eac0efd2a7f99084bbe8d0de2c465e31b1997184783c917969d9de9ece1",
    f"{_RD}/splits/harmful_val.json": "305f1d1e6dfa6c50a32d24a18ef815f42b5441eb83e6d7767d242107162fd9f4",
    f"{_RD}/splits/harmful_test.json": "5e12ae102c3791dee083a69ab6269a78e033411c629bc3f66f75d2fde196d9ef",
    f"{_RD}/splits/harmless_train.json": "86623b1f8a25aa35df153fc97a556dbcebb6a7c881538ae43ee479ca17f2e002",
    f"{_RD}/splits/harmless_val.json": "772010758e7d771ef4c7e5e4acdfd7598dcece1a6f383f20d382f640913a2a4d",
    f"{_RD}/splits/harmless_test.json": "1b5930ce5e855ada758b3116ce7c4aaea9b9d05f8cdd77b385511d4c84173b19",
}


def _bind(fn: Callable[..., list[Prompt]], **fixed: Any) -> Callable[..., list[Prompt]]:
    def build(df: pd.DataFrame, mapper: Mapper, name: str, **options: Any) -> list[Prompt]:
        return fn(df, mapper, name, **fixed, **options)

    return build


def _spec(
    name: str, paths: str | tuple[str, ...], labels: str | tuple[str, ...], license: str, hub_id: str | None,
    read: Callable[[list[Path]], pd.DataFrame], build: Callable[..., list[Prompt]], n: int, description: str,
    *, options: Mapping[str, Any] | None = None, hub: HubSource | None = None,
) -> DatasetSpec:
    paths = (paths,) if isinstance(paths, str) else paths
    labels = (labels,) if isinstance(labels, str) else labels
    sha = {p: SOURCE_SHA256[p] for p in paths if p in SOURCE_SHA256}
    return DatasetSpec(name, paths, labels, license, hub_id, read, build, description, n, sha,
                       dict(options or {}), hub)


_SPECS = [
    _spec("xstest", "xstest/xstest_prompts.csv", ("harmful", "benign"), "CC-BY-4.0", "walledai/XSTest",
          _read_csv, _build_xstest, 450,
          "XSTest v2: 250 safe over-refusal probes (benign) + 200 unsafe contrasts; meta type/focus/note.",
          hub=HubSource("walledai/XSTest", split="test")),
    _spec("catqa", "catqa/catqa_english.json", "harmful", "Apache-2.0", "declare-lab/CategoricalHarmfulQA",
          _read_catqa, _build_catqa, 550,
          "CatQA English: 550 harmful questions, 11 categories x 5 subcategories (7 repeated questions).",
          hub=HubSource("declare-lab/CategoricalHarmfulQA", split="en")),
    _spec("beavertails_eval", "beavertails_evaluation/BeaverTails-Evaluation.csv", "harmful",
          f"CC-BY-NC-4.0 ({_NC})", "PKU-Alignment/BeaverTails-Evaluation", _read_csv, _build_beavertails, 700,
          "BeaverTails-Evaluation: 700 harmful prompts, 14 categories x 50 (third-party CSV export).",
          hub=HubSource("PKU-Alignment/BeaverTails-Evaluation", split="test")),
    _spec("do_not_answer", "do_not_answer/do_not_answer_en.csv", "harmful", f"CC-BY-NC-SA-4.0 ({_NC})",
          "LibrAI/do-not-answer", _read_csv, _build_do_not_answer, 939,
          "Do-Not-Answer: 939 risky prompts (5 areas / 12 types / 61 harms); meta human_chatbot marks the "
          "Human-Chatbot Interaction types ('Treat Chatbot as a Human' has no category).",
          hub=HubSource("LibrAI/do-not-answer", split="train")),
    _spec("harmbench",
          ("harmbench/harmbench_behaviors_text_test.csv", "harmbench/harmbench_behaviors_text_val.csv"),
          "harmful", "MIT", "walledai/HarmBench", _read_harmbench, _build_harmbench, 300,
          "HarmBench text behaviors with the file's split (test 320 / val 80); copyright behaviours are "
          "left out unless include_copyright=True; contextual ones get their context prepended.",
          options={"include_copyright": False, "include_contextual": True}),
    _spec("advbench", "advbench/harmful_behaviors.csv", "harmful", "MIT", "walledai/AdvBench",
          _read_csv, _build_advbench, 520, "AdvBench harmful_behaviors: 520 harmful goals, no categories.",
          hub=HubSource("walledai/AdvBench", split="train", rename={"prompt": "goal"})),
    _spec("jbb_harmful", "jbb_behaviors/harmful-behaviors.csv", "harmful", "MIT",
          "JailbreakBench/JBB-Behaviors", _read_csv, _bind(_build_jbb, label="harmful"), 100,
          "JBB-Behaviors harmful: 100 prompts, 10 categories x 10; meta pair_id -> the jbb_benign row.",
          hub=HubSource("JailbreakBench/JBB-Behaviors", config="behaviors", split="harmful")),
    _spec("jbb_benign", "jbb_behaviors/benign-behaviors.transcribed.csv", "benign", "MIT",
          "JailbreakBench/JBB-Behaviors", _read_csv, _bind(_build_jbb, label="benign"), 100,
          "JBB-Behaviors benign (transcribed copy): 100 topic-matched prompts; meta pair_id -> jbb_harmful.",
          hub=HubSource("JailbreakBench/JBB-Behaviors", config="behaviors", split="benign")),
    _spec("strongreject", "strongreject/strongreject_dataset.csv", "harmful", "MIT", "walledai/StrongREJECT",
          _read_csv, _build_strongreject, 313,
          "StrongREJECT: 313 forbidden prompts, 6 categories; meta origin = the file's source column."),
    _spec("simple_safety_tests", "simple_safety_tests/SimpleSafetyTests - test cases.csv", "harmful",
          "CC-BY-4.0", "Bertievidgen/SimpleSafetyTests", _read_csv, _build_sst, 100,
          "SimpleSafetyTests: 100 harmful prompts, 5 harm areas x 20; meta prompt_type.",
          hub=HubSource("Bertievidgen/SimpleSafetyTests", split="test", rename={"prompt": "prompts_final"})),
    _spec("coconot_original", "coconot/coconot_eval.jsonl", "harmful", _COCONOT_LICENSE, "allenai/coconot",
          _read_jsonl, _bind(_build_coconot, label="harmful"), 1001,
          "CoCoNot original eval: 1,001 prompts that should not be fully complied with (label harmful = "
          "should refuse); only 'Requests with safety concerns' (395) are harmful in the usual sense; "
          "meta coconot_category / coconot_subcategory.",
          hub=HubSource("allenai/coconot", "original", "test")),
    _spec("coconot_contrast", "coconot/coconot_contrast_eval.jsonl", "benign", _COCONOT_LICENSE,
          "allenai/coconot", _read_jsonl, _bind(_build_coconot, label="benign"), 379,
          "CoCoNot contrast eval: 379 benign prompts that should be complied with (over-refusal).",
          hub=HubSource("allenai/coconot", "contrast", "test")),
    _spec("coconot_pref", "coconot/coconot_pref.jsonl", "benign", _COCONOT_LICENSE, "allenai/coconot",
          _read_jsonl, _bind(_build_coconot, label="benign"), 927,
          "CoCoNot pref: 927 benign contrast prompts (prompt field only).",
          hub=HubSource("allenai/coconot", "pref", "train")),
    _spec("alpaca_eval", "alpaca_eval/model_outputs_text_davinci_003.json", "benign", f"CC-BY-NC-4.0 ({_NC})",
          "tatsu-lab/alpaca_eval", _read_json, _bind(_build_instructions, label="benign"), 805,
          "AlpacaEval: 805 benign instructions (instruction field only); meta dataset.",
          hub=HubSource("tatsu-lab/alpaca_eval", config="alpaca_eval", split="eval")),
    _spec("alpaca", f"{_RD}/processed/alpaca.json", "benign", f"CC-BY-NC-4.0 ({_NC})", "tatsu-lab/alpaca",
          _read_json, _bind(_build_instructions, label="benign"), 31323,
          "Alpaca instructions without input (31,323): the refusal_direction benign pool.",
          hub=HubSource("tatsu-lab/alpaca", split="train", filter_empty="input")),
]

_RD_SPLITS = {  # refusal_direction/splits: rows and composition, from SOURCE.md
    "harmful_train": (260, "AdvBench 117 + MaliciousInstruct 88 + TDC2023 55, no categories"),
    "harmful_val": (39, "HarmBench val standard, HarmBench categories"),
    "harmful_test": (572, "JBB 100 + HarmBench test standard 159 + StrongREJECT 313, own categories each"),
    "harmless_train": (18793, "Alpaca"),
    "harmless_val": (6264, "Alpaca"),
    "harmless_test": (6266, "Alpaca"),
}
for _key, (_n, _what) in _RD_SPLITS.items():
    _label, _split = _key.split("_")
    _label = "harmful" if _label == "harmful" else "benign"
    _SPECS.append(_spec(
        f"rd_{_key}", f"{_RD}/splits/{_key}.json", _label, "Apache-2.0 (repo); sources keep their licenses",
        None, _read_json, _bind(_build_instructions, label=_label, split=_split), _n,
        f"Arditi et al. refusal_direction split {_key} ({_what}); split={_split!r}.",
    ))
del _key, _n, _what, _label, _split

DATASETS: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}
"""Dataset name -> :class:`DatasetSpec`."""

LEAKAGE_NOTES = {
    "rd_harmful_test": "shares prompts with rd_harmful_train (AdvBench/TDC overlap JBB/StrongREJECT); run "
    "catlens.prompts.check_leakage / deduplicate before reusing the splits.",
    "catqa": "7 questions occur twice (within one category); deduplicate before splitting.",
}


# ------------------------------------------------------------------------------------------- loading
def _spec_for(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(
            unknown_name_message("dataset", name, DATASETS, "See catlens.datasets.list_datasets().")
        )
    return DATASETS[name]


def _read_from_hub(spec: DatasetSpec) -> tuple[pd.DataFrame, dict[str, Any]]:
    if spec.hub is None:
        raise ValueError(
            f"Dataset {spec.name!r} has no Hugging Face adapter (hub id: {spec.hub_id or 'none'}). Load it "
            f"from the local files instead (from_hub=False, with data_dir or ${ENV_VAR}); the expected "
            f"files are {list(spec.paths)}."
        )
    try:
        hf = importlib.import_module("datasets")
    except ImportError as e:
        raise ImportError(
            f"from_hub=True needs the Hugging Face 'datasets' package, which is not installed ({e}). "
            f"Install it with `pip install datasets`, or load the local files (from_hub=False)."
        ) from None
    hub = spec.hub
    try:
        ds = hf.load_dataset(hub.id, hub.config, split=hub.split)
    except Exception as e:  # network, auth, missing config: all end the same way for the user
        raise ConnectionError(
            f"Could not load {hub.id!r} (config={hub.config!r}, split={hub.split!r}) from the Hugging Face "
            f"hub: {type(e).__name__}: {e}. Check network access, HF_HUB_OFFLINE and dataset access terms, "
            f"or load the local files (from_hub=False, with data_dir or ${ENV_VAR})."
        ) from e
    df = ds.to_pandas().rename(columns=dict(hub.rename))
    if hub.filter_empty:
        df = df[df[hub.filter_empty].fillna("").astype(str).str.strip() == ""].reset_index(drop=True)
    prov = {"hub_id": hub.id, "hub_config": hub.config, "hub_split": hub.split,
            "hub_fingerprint": getattr(ds, "_fingerprint", None)}
    return df, prov


_FILE_CACHE: dict[tuple[Any, ...], tuple[tuple[tuple[int, int], ...], pd.DataFrame, list[str]]] = {}


def _read_files(spec: DatasetSpec, paths: list[Path]) -> tuple[pd.DataFrame, list[str]]:
    """``spec.read(paths)`` and each file's sha256, read and parsed once per process: kept while every file keeps
    its size and modification time (an edited file is read again). The caller gets its own copy of the table."""
    from catlens.runs import sha256_file

    key = (spec.read, tuple(str(p.resolve()) for p in paths))
    stats = tuple((st.st_mtime_ns, st.st_size) for st in (p.stat() for p in paths))
    hit = _FILE_CACHE.get(key)
    if hit is None or hit[0] != stats:
        hit = (stats, spec.read(paths), [sha256_file(p) for p in paths])
        _FILE_CACHE[key] = hit
    return hit[1].copy(), list(hit[2])


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    from_hub: bool = False,
    taxonomy: pd.DataFrame | None = None,
    **options: Any,
) -> PromptSet:
    """Load one dataset of :data:`DATASETS` as a :class:`PromptSet`, categories mapped to the shared taxonomy.

    ``taxonomy`` overrides the mapping table (default: :func:`catlens.taxonomy.load_taxonomy`, which honours
    ``$CATLENS_TAXONOMY``). ``options`` are dataset-specific (see ``DATASETS[name].options``), e.g.
    ``load_dataset("harmbench", include_copyright=True)``.
    """
    spec = _spec_for(name)
    for key in options:
        if key not in spec.options:
            raise TypeError(
                f"load_dataset({name!r}): "
                + unknown_name_message("option", key, spec.options or {"<none>"},
                                       f"{name!r} takes {dict(spec.options) or 'no options'}.")
            )
    opts = {**spec.options, **options}
    prov: dict[str, Any] = {"name": name, "dataset": name, "sources": [name], "license": spec.license,
                            "hub_id": spec.hub_id, "options": opts}
    if from_hub:
        df, hub_prov = _read_from_hub(spec)
        prov.update(hub_prov)
        prov["files"] = []
    else:
        root = resolve_data_dir(data_dir)
        paths = [root / p for p in spec.paths]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Dataset {name!r}: file(s) {missing} not found in data directory {str(root)!r}. Check that "
                f"the data directory is the shared/data folder (holding {spec.paths[0].split('/')[0]}/)."
            )
        df, digests = _read_files(spec, paths)
        prov["data_dir"] = str(root)
        prov["files"] = [{"path": rel, "sha256": digest} for rel, digest in zip(spec.paths, digests)]
        for f in prov["files"]:
            want = spec.sha256.get(f["path"])
            if want and want != f["sha256"]:
                log.warning("%s: sha256 of %s is %s, SOURCE.md records %s; the file differs from the "
                            "documented release.", name, f["path"], f["sha256"], want)
    if name in LEAKAGE_NOTES:
        prov["note"] = LEAKAGE_NOTES[name]
    records = spec.build(df, Mapper(taxonomy), name, **opts)
    ps = PromptSet(records, name=name, provenance=prov)
    log.debug("Loaded %r", ps)
    return ps


def list_datasets(data_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """One row per dataset: ``name, n, labels, n_categories, path_exists, license, hub_id, description``.

    ``n`` and ``n_categories`` come from loading the local files (``None`` when they are absent). A data
    directory that was asked for (``data_dir`` or ``$CATLENS_DATA_DIR``) but does not exist raises
    ``FileNotFoundError``; only a missing default ``<repo>/../shared/data`` gives the catalogue without counts.
    """
    try:
        root: Path | None = resolve_data_dir(data_dir)
    except FileNotFoundError:
        if data_dir is not None or os.environ.get(ENV_VAR):
            raise
        root = None
    rows = []
    for spec in DATASETS.values():
        exists = root is not None and all((root / p).is_file() for p in spec.paths)
        n = n_cat = None
        if exists:
            try:
                ps = load_dataset(spec.name, root)
                n, n_cat = len(ps), len(ps.categories)
            except Exception as e:  # noqa: BLE001 -- listing must not die on one bad file; validate reports it
                log.warning("list_datasets: %s failed to load: %s", spec.name, e)
        rows.append({"name": spec.name, "n": n, "labels": ",".join(spec.labels), "n_categories": n_cat,
                     "path_exists": exists, "license": spec.license, "hub_id": spec.hub_id,
                     "description": spec.description})
    return pd.DataFrame(rows)


def validate_datasets(data_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Load every dataset and report ``ok``/``error``, counts and file hashes against SOURCE.md.

    Columns: ``name, ok, error, n, expected_n, n_harmful, n_benign, n_categorised, n_categories,
    sha256_ok, files`` (``files`` = ``"path=sha256"`` joined by ``;``). Raises only if the data directory
    itself is missing.
    """
    from catlens.runs import sha256_file

    root = resolve_data_dir(data_dir)
    rows = []
    for spec in DATASETS.values():
        row: dict[str, Any] = {"name": spec.name, "ok": False, "error": "", "n": None,
                               "expected_n": spec.expected_n, "n_harmful": None, "n_benign": None,
                               "n_categorised": None, "n_categories": None, "sha256_ok": None, "files": ""}
        hashes = {rel: sha256_file(root / rel) for rel in spec.paths if (root / rel).is_file()}
        row["files"] = ";".join(f"{rel}={h}" for rel, h in hashes.items())
        checked = [rel for rel in hashes if rel in spec.sha256]
        row["sha256_ok"] = all(hashes[rel] == spec.sha256[rel] for rel in checked) if checked else None
        try:
            ps = load_dataset(spec.name, root)
            labels = ps.labels
            row.update(n=len(ps), n_harmful=labels.count("harmful"), n_benign=labels.count("benign"),
                       n_categorised=sum(c is not None for c in ps.categories_of),
                       n_categories=len(ps.categories))
            problems = []
            if spec.expected_n is not None and len(ps) != spec.expected_n:
                problems.append(f"expected {spec.expected_n} rows, got {len(ps)}")
            if row["sha256_ok"] is False:
                problems.append("sha256 differs from SOURCE.md")
            row["ok"] = not problems
            row["error"] = "; ".join(problems)
        except Exception as e:  # noqa: BLE001 -- the report records every failure, whatever its type
            row["error"] = f"{type(e).__name__}: {e}"
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------- prompt sources
def _load_packaged(name: str, categories: Collection[str] | None) -> PromptSet:
    """A prompt file shipped in ``catlens/data`` (``<name>_prompts.jsonl``), with its path and sha256 as provenance."""
    from importlib import resources

    from catlens.runs import sha256_text

    rel = f"data/{name}_prompts.jsonl"
    text = resources.files("catlens").joinpath(rel).read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    prov = {"name": name, "sources": [name], "files": [{"path": f"catlens/{rel}", "sha256": sha256_text(text)}]}
    return PromptSet(rows, name=name, provenance=prov, categories=categories)


def load_builtin(*, categories: Collection[str] | None = None) -> PromptSet:
    """The packaged prompt set ``catlens/data/builtin_prompts.jsonl`` (written for catlens, with splits)."""
    return _load_packaged("builtin", categories)


def load_hardbenign(*, categories: Collection[str] | None = None) -> PromptSet:
    """The packaged hard-negative set ``catlens/data/hardbenign_prompts.jsonl`` (written for catlens, with splits).

    Eight categories, each with 54 benign prompts that look harmful (``meta["kind"]``: ``homonym``,
    ``figurative``, ``safe_target``, ``safe_context``, ``definition``, ``history``, ``privacy_public``,
    ``fiction``, ``prevention``; six each) and 26-28 harmful prompts in the same words (the kind of their benign
    twin, or ``direct`` for the few without one). ``meta["pair"]`` is the id of the twin (or ``None``);
    ``meta["form"]`` is ``question`` or ``instruction``. Splits (train/val/test about 40/30/30) are stored in
    the file and assigned per pair, so twins always share a split. The refusal fine-tune never reads this set;
    it trains and calibrates the gate (train, val) and is a test set of its own (test). See docs/PROMPTS.md.
    """
    return _load_packaged("hardbenign", categories)


PACKAGED: dict[str, Callable[..., PromptSet]] = {"builtin": load_builtin, "hardbenign": load_hardbenign}
"""Prompt sets shipped inside catlens: name -> loader (``loader(categories=None) -> PromptSet``)."""


def load_prompts(
    spec: str | os.PathLike[str],
    *,
    data_dir: str | os.PathLike[str] | None = None,
    categories: Collection[str] | None = None,
) -> PromptSet:
    """Load prompts from a packaged set (``"builtin"``, ``"hardbenign"``; :data:`PACKAGED`), a dataset name
    (:data:`DATASETS`) or a file path.

    Files: ``.jsonl`` (objects with ``text`` and ``label``; optional ``id, category, source, split, meta``;
    other keys go into ``meta``) or ``.csv`` with the same columns. A file without prompts is an error.

    >>> load_prompts("builtin").name
    'builtin'
    """
    s = str(spec)
    if s in PACKAGED:
        return PACKAGED[s](categories=categories)
    if s in DATASETS:
        ps = load_dataset(s, data_dir=data_dir)
        return ps if categories is None else ps.with_categories(categories)
    path = Path(s)
    if path.suffix in (".jsonl", ".csv"):
        return PromptSet.load(path, categories=categories)
    raise ValueError(
        unknown_name_message(
            "prompt source", s, [*PACKAGED, *DATASETS],
            "Give 'builtin' or 'hardbenign', a dataset name, or a path to a .jsonl/.csv prompt file.",
        )
    )
