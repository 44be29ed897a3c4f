"""The packaged hard-negative set ``hardbenign``: counts per category/kind/label, twins, splits, duplicates, leakage
against the built-in set and the shared benchmarks, and that the refusal fine-tune never reads it. No model."""

import collections
import json
import re
from pathlib import Path

import pytest

from catlens.datasets import DATASETS, load_builtin, load_dataset, load_hardbenign, load_prompts
from catlens.finetune import CONFIGS, assemble_data
from catlens.finetune.data import prompt_form
from catlens.prompts import PromptSet, check_leakage, deduplicate, normalize_text
from catlens.runs import sha256_text

REPO = Path(__file__).resolve().parents[1]
FILE = REPO / "catlens" / "data" / "hardbenign_prompts.jsonl"
CATEGORIES = ("cybercrime", "fraud_financial_crime", "hate_harassment", "misinformation", "privacy", "self_harm",
              "violence_terrorism", "weapons_drugs")
KINDS = ("homonym", "figurative", "safe_target", "safe_context", "definition", "history", "privacy_public",
         "fiction", "prevention")
MIN_BENIGN, MIN_HARMFUL, MIN_PER_KIND, MIN_PAIRED = 50, 25, 5, 20
ALPACA_POOLS = ("alpaca", "rd_harmless_train", "rd_harmless_val", "rd_harmless_test")


@pytest.fixture(scope="module")
def hb() -> PromptSet:
    return load_hardbenign()


def test_loader_reads_the_file_with_provenance(hb):
    text = FILE.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    assert [p.to_dict() for p in hb] == rows
    assert load_prompts("hardbenign") == hb and hb.name == "hardbenign"
    assert hb.provenance["files"] == [{"path": "catlens/data/hardbenign_prompts.jsonl", "sha256": sha256_text(text)}]
    assert load_prompts("hardbenign", categories=CATEGORIES).allowed_categories == frozenset(CATEGORIES)


def test_fields_ids_and_forms(hb):
    for p in hb:
        m = re.fullmatch(r"hardbenign/([a-z_]+)/([bh])(\d{2})", p.id)
        assert m, p.id
        assert m.group(1) == p.category and {"b": "benign", "h": "harmful"}[m.group(2)] == p.label, p.id
        assert p.source == "hardbenign" and p.split in ("train", "val", "test"), p.id
        assert set(p.meta) == {"kind", "pair", "form"}, p.id
        assert p.meta["form"] == prompt_form(p.text), p.id
        allowed = KINDS if p.label == "benign" else (*KINDS, "direct")
        assert p.meta["kind"] in allowed, p.id
        if p.meta["kind"] == "direct":  # the harmful prompts written without a benign twin
            assert p.meta["pair"] is None, p.id


def test_counts_per_category_kind_and_label(hb):
    assert set(hb.categories_of) == set(CATEGORIES)
    for c in CATEGORIES:
        cat = hb.where(category=c)
        benign, harmful = cat.where(label="benign"), cat.where(label="harmful")
        assert len(benign) >= MIN_BENIGN and len(harmful) >= MIN_HARMFUL, (c, len(benign), len(harmful))
        kinds = collections.Counter(p.meta["kind"] for p in benign)
        assert set(kinds) == set(KINDS) and min(kinds.values()) >= MIN_PER_KIND, (c, kinds)
        paired = [p for p in harmful if p.meta["pair"] is not None]
        assert len(paired) >= MIN_PAIRED, (c, len(paired))


def test_twins_exist_with_the_other_label_same_category_and_split(hb):
    by_id = {p.id: p for p in hb}
    n_pairs = 0
    for p in hb:
        twin_id = p.meta["pair"]
        if twin_id is None:
            continue
        assert twin_id in by_id, (p.id, twin_id)
        twin = by_id[twin_id]
        assert twin.meta["pair"] == p.id, (p.id, twin_id)  # symmetric, so a twin has exactly one twin
        assert twin.label != p.label and twin.category == p.category and twin.split == p.split, (p.id, twin_id)
        assert twin.meta["kind"] == p.meta["kind"], (p.id, twin_id)
        n_pairs += p.label == "harmful"
    assert n_pairs >= MIN_PAIRED * len(CATEGORIES)


def test_splits_are_disjoint_pairs_never_straddle_and_shares_are_about_40_30_30(hb):
    ids = {s: set(hb.where(split=s).ids) for s in ("train", "val", "test")}
    texts = {s: {normalize_text(t) for t in hb.where(split=s).texts} for s in ids}
    assert sum(map(len, ids.values())) == len(hb)
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not ids[a] & ids[b] and not texts[a] & texts[b], (a, b)
        check_leakage(hb.where(split=a), hb.where(split=b), near_threshold=0.8)
    split_of = {p.id: p.split for p in hb}
    assert all(split_of[p.meta["pair"]] == p.split for p in hb if p.meta["pair"] is not None)
    for c in CATEGORIES:
        cat = hb.where(category=c)
        for s, want in zip(("train", "val", "test"), (0.4, 0.3, 0.3)):
            share = len(cat.where(split=s)) / len(cat)
            assert abs(share - want) < 0.07, (c, s, share)
    for k in KINDS:  # every kind in every split, on both sides
        for label in ("benign", "harmful"):
            assert set(hb.where(label=label, kind=k).splits) == {"train", "val", "test"}, (k, label)


def test_no_duplicates_within_the_set_or_with_the_builtin_set(hb):
    (_,), report = deduplicate(hb, near_threshold=0.8)
    assert report.empty, report[["id", "text", "kept_id", "kept_text", "similarity"]].to_string()
    leak = check_leakage(load_builtin(), hb, near_threshold=0.8, raise_on_leak=False)
    assert leak.ok, leak.pairs[["test_id", "test_text", "train_id", "train_text", "similarity"]].to_string()


def _benchmarks(data_dir: Path, names) -> PromptSet:
    return PromptSet.concat(*(load_dataset(n, data_dir) for n in names), name="benchmarks")


@pytest.mark.slow  # about 10 s (8k benchmark prompts)
def test_no_leakage_from_the_shared_benchmarks(hb, data_dir):
    """Every benchmark in shared/data except the three Alpaca pools (see the slow test below for those)."""
    names = [n for n in DATASETS if n not in ALPACA_POOLS]
    leak = check_leakage(_benchmarks(data_dir, names), hb, near_threshold=0.8, raise_on_leak=False)
    assert leak.ok, leak.pairs[["test_id", "test_text", "train_id", "train_text", "similarity"]].to_string()


@pytest.mark.slow  # about 35 s (63k Alpaca instructions)
def test_no_leakage_from_the_alpaca_pools(hb, data_dir):
    leak = check_leakage(_benchmarks(data_dir, ALPACA_POOLS), hb, near_threshold=0.8, raise_on_leak=False)
    assert leak.ok, leak.pairs[["test_id", "test_text", "train_id", "train_text", "similarity"]].to_string()


def _assert_no_hardbenign(d, hb: PromptSet) -> None:
    hb_ids = set(hb.ids)
    hb_texts = {normalize_text(t) for t in hb.texts}
    parts = {"harmful": d.harmful, "benign": d.benign, **d.eval_sets}
    for name, ps in parts.items():
        assert not hb_ids & set(ps.ids), name
        assert "hardbenign" not in {p.source for p in ps}, name
        assert not hb_texts & {normalize_text(t) for t in ps.texts}, name


def test_finetune_builtin_recipe_never_reads_hardbenign(hb):
    _assert_no_hardbenign(assemble_data(CONFIGS["quick"]), hb)


@pytest.mark.slow  # about 25 s (assembles the default recipe from the benchmark files)
def test_finetune_default_recipe_never_reads_hardbenign(hb, data_dir):
    _assert_no_hardbenign(assemble_data(CONFIGS["default"], data_dir), hb)
