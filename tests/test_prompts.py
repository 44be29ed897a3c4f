"""Prompt / PromptSet: validation, files, filtering, splits, de-duplication, leakage, the built-in set."""

import collections
import itertools
import json
import random
import re

import pandas as pd
import pytest

from catlens.datasets import load_prompts
from catlens.errors import LeakageError
from catlens.prompts import (
    LABELS,
    SPLITS,
    Prompt,
    PromptSet,
    _near_pairs,
    check_leakage,
    concat,
    deduplicate,
    jaccard,
    normalize_text,
    shingles,
    split_prompts,
)
from catlens.taxonomy import CATEGORIES

BUILTIN_CATEGORIES = (
    "hate_harassment", "violence_terrorism", "self_harm", "weapons_drugs", "cybercrime",
    "fraud_financial_crime", "privacy", "misinformation",
)


def P(i: int, text: str | None = None, label: str = "benign", category: str | None = None,
      split: str | None = None, **meta: object) -> Prompt:
    return Prompt(id=f"t/{i:03d}", text=text or f"prompt number {i} about topic {i * 7919 % 1000}",
                  label=label, category=category, source="test", split=split, meta=meta)


def toy_set(n_per_cat: int = 20, cats: tuple[str | None, ...] = ("cybercrime", "privacy", None)) -> PromptSet:
    recs = []
    for c_i, cat in enumerate(cats):
        for k in range(n_per_cat):
            i = c_i * 1000 + k
            recs.append(P(i, label="harmful" if cat else "benign", category=cat, kind="x" if k % 2 else "y"))
    return PromptSet(recs, name="toy")


# ------------------------------------------------------------------------------------------ validation
def test_empty_text_names_row() -> None:
    with pytest.raises(ValueError, match=r"row 1 \(id='t/001'\): text '  ' is empty"):
        PromptSet([P(0), P(1, text="  ")])


def test_unknown_category_did_you_mean() -> None:
    with pytest.raises(ValueError) as e:
        PromptSet([P(0), P(1), P(2, category="cybercrim")])
    msg = str(e.value)
    assert "row 2 (id='t/002')" in msg and "'cybercrim'" in msg
    assert "Did you mean: cybercrime?" in msg
    assert "categories=[...]" in msg  # how to fix


def test_duplicate_ids_name_both_rows() -> None:
    with pytest.raises(ValueError, match=r"row 2 \(id='t/000'\): duplicate id, already used by row 0"):
        PromptSet([P(0), P(1), P(0, text="another text")])


def test_bad_label_and_split_name_row() -> None:
    msg = r"row 0 \(id='t/000'\): Unknown label 'harmfull'\. Did you mean: harmful\?"
    with pytest.raises(ValueError, match=msg):
        PromptSet([P(0, label="harmfull")])
    with pytest.raises(ValueError, match=r"row 0 .*Unknown split 'training'"):
        PromptSet([P(0, split="training")])


def test_several_errors_reported_together() -> None:
    with pytest.raises(ValueError) as e:
        PromptSet([P(0, label="x"), P(1, text=" \n"), P(2, category="nope")])
    assert all(f"row {i}" in str(e.value) for i in range(3))


def test_user_categories_allowed() -> None:
    ps = PromptSet([P(0, category="my_cat")], categories=["my_cat"])
    assert ps.categories == ("my_cat",)
    with pytest.raises(ValueError, match="my_cat"):
        PromptSet([P(0, category="my_cat")])


def test_mapping_rows_and_missing_fields() -> None:
    ps = PromptSet([{"prompt": "hi there", "label": "benign", "extra": 3}], name="m")
    assert ps[0].text == "hi there" and ps[0].id == "m/00000" and ps[0].meta == {"extra": 3}
    with pytest.raises(ValueError, match="row 0: missing 'label'"):
        PromptSet([{"text": "hi"}])
    with pytest.raises(ValueError, match="no prompt text field"):
        PromptSet([{"label": "benign"}])


def test_meta_is_copied_and_prompt_hashable() -> None:
    meta = {"a": 1}
    p = Prompt("x", "t", "benign", None, "s", meta=meta)
    meta["a"] = 2
    assert p.meta == {"a": 1}
    assert p == Prompt("x", "t", "benign", None, "s", meta={"a": 1}) and p != p.replace(meta={})
    assert len({p, Prompt("x", "t", "benign", None, "s", meta={"a": 1}), p.replace(id="y")}) == 2


# ------------------------------------------------------------------------------------------ sequence API
def test_sequence_api_and_repr() -> None:
    ps = toy_set(4)
    assert len(ps) == 12 and ps[0].id == "t/000"
    assert isinstance(ps[1:3], PromptSet) and ps[1:3].ids == ps.ids[1:3]
    assert ps[[5, 0]].ids == [ps.ids[5], ps.ids[0]]
    assert ps.categories == ("cybercrime", "privacy")
    assert ps.categories_of[-1] is None
    assert ps.labels.count("harmful") == 8
    r = repr(ps)
    assert "'toy'" in r and "n=12" in r and "harmful=8" in r and "benign=4" in r and "cybercrime" in r
    assert ps.get("t/001") is ps[1]
    with pytest.raises(KeyError, match="t/0001"):
        ps.get("t/0001")


def test_where_filters() -> None:
    ps = toy_set(6)
    assert set(ps.where(label="benign").categories_of) == {None}
    assert len(ps.where(category="privacy")) == 6
    assert len(ps.where(category=["privacy", "cybercrime"])) == 12
    assert len(ps.where(category=[None])) == 6
    assert len(ps.where(kind="x")) == 9
    assert len(ps.where(category="privacy", kind="x")) == 3
    assert len(ps.where(category="self_harm")) == 0  # valid name, not present
    assert len(ps.where(source="test")) == 18 and len(ps.where(source="other")) == 0
    with pytest.raises(ValueError, match="Did you mean: harmful"):
        ps.where(label="harmfull")
    with pytest.raises(ValueError, match="Did you mean: privacy"):
        ps.where(category="privacyy")
    with pytest.raises(ValueError, match="Unknown meta key 'kin'. Did you mean: kind"):
        ps.where(kin="x")
    assert "where(" in ps.where(label="benign").provenance["operations"][-1]


def test_concat_sample_with_split() -> None:
    a, b = toy_set(3, ("privacy",)), PromptSet([P(500)], name="b")
    c = concat(a, b)
    assert c.ids == a.ids + b.ids and c.provenance["parts"][1]["name"] == "b"
    with pytest.raises(ValueError, match="duplicate id"):
        PromptSet.concat(a, a)
    ps = toy_set(10)
    assert ps.sample(7, seed=1) == ps.sample(7, seed=1)
    assert ps.sample(7, seed=1) != ps.sample(7, seed=2)
    assert ps.sample(7, seed=1).ids == sorted(ps.sample(7, seed=1).ids, key=ps.ids.index)
    with pytest.raises(ValueError, match="n must be in"):
        ps.sample(100)
    assert set(ps.with_split("test").splits) == {"test"}
    assert ps.with_split({ps.ids[0]: "val"}).splits[:2] == ["val", None]


# ------------------------------------------------------------------------------------------ files
def _tricky_set() -> PromptSet:
    return PromptSet(
        [
            P(0, text="  leading and trailing spaces  ", meta_nested={"a": [1, 2, {"b": None}]}),
            P(1, text='quotes " and , commas\nand a newline', label="harmful", category="privacy",
              split="val"),
            P(2, text="unicode: Ünïcödé — 日本語 🙂", split="test", number=1.5, flag=True),
            P(3, text="NaN", category=None),
        ],
        name="tricky",
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_save_load_round_trip_exact(tmp_path, suffix) -> None:
    ps = _tricky_set()
    path = ps.save(tmp_path / f"set{suffix}")
    back = PromptSet.load(path)
    assert back == ps
    assert back.content_hash == ps.content_hash
    assert back.provenance["files"][0]["sha256"]
    assert load_prompts(path) == ps


def test_frame_round_trip_and_columns() -> None:
    ps = _tricky_set()
    df = ps.to_frame()
    assert list(df.columns) == ["id", "text", "label", "category", "source", "split", "meta"]
    assert json.loads(df["meta"][2]) == {"number": 1.5, "flag": True}
    assert PromptSet.from_frame(df, name="x") == ps


def test_content_hash_is_order_sensitive() -> None:
    ps = toy_set(3)
    assert ps.content_hash == toy_set(3).content_hash
    assert ps.content_hash != ps[::-1].content_hash
    assert ps.content_hash != ps.with_split("train").content_hash


def test_load_user_jsonl_defaults_and_errors(tmp_path) -> None:
    f = tmp_path / "mine.jsonl"
    f.write_text(json.dumps({"text": "a", "label": "benign", "topic": "x"}) + "\n\n"
                 + json.dumps({"text": "b", "label": "harmful", "category": "privacy"}) + "\n")
    ps = load_prompts(f)
    assert ps.ids == ["mine/00000", "mine/00001"] and ps[0].meta == {"topic": "x"} and ps[0].source == "mine"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a", "label": "benign"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        load_prompts(bad)
    with pytest.raises(ValueError, match="Did you mean: builtin"):
        load_prompts("builtn")
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------ splits
def test_split_determinism_and_seed() -> None:
    ps = toy_set(40)
    a, b = split_prompts(ps, seed=3), split_prompts(ps, seed=3)
    assert a.splits == b.splits and None not in a.splits
    assert a.splits != split_prompts(ps, seed=4).splits
    shuffled = ps[random.Random(0).sample(range(len(ps)), len(ps))]
    by_id = dict(zip(a.ids, a.splits))
    assert all(by_id[p.id] == p.split for p in split_prompts(shuffled, seed=3))  # order-independent


@pytest.mark.parametrize("fractions", [(0.7, 0.15, 0.15), (0.6, 0.2, 0.2), (0.5, 0.5, 0.0)])
def test_split_stratification_within_one(fractions) -> None:
    ps = toy_set(37, ("cybercrime", "privacy", "self_harm", None))
    out = split_prompts(ps, fractions=fractions, seed=0)
    for cat in ("cybercrime", "privacy", "self_harm", None):
        sub = [p.split for p in out if p.category == cat]
        for name, f in zip(SPLITS, fractions):
            assert abs(sub.count(name) - f * len(sub)) <= 1, (cat, name, sub.count(name))


def test_split_keeps_existing_unless_overwrite() -> None:
    ps = toy_set(10)
    fixed = ps.with_split({ps.ids[0]: "test", ps.ids[1]: "test"})
    out = split_prompts(fixed, seed=0)
    assert out[0].split == "test" and out[1].split == "test"
    over = split_prompts(fixed, seed=0, overwrite=True)
    assert over.splits == split_prompts(ps, seed=0).splits


def test_split_multi_key_and_errors() -> None:
    ps = toy_set(20)
    out = split_prompts(ps, (0.5, 0.25, 0.25), seed=0, stratify=["category", "kind"])
    for _, grp in itertools.groupby(sorted(out, key=lambda p: (str(p.category), p.meta["kind"])),
                                              key=lambda p: (str(p.category), p.meta["kind"])):
        splits = [p.split for p in grp]
        assert splits.count("train") == 5 and splits.count("val") in (2, 3)
    with pytest.raises(ValueError, match="summing to 1"):
        split_prompts(ps, (0.5, 0.2, 0.2))
    with pytest.raises(ValueError, match="Did you mean: kind"):
        split_prompts(ps, stratify="kinds")


# ------------------------------------------------------------------------------------------ dedup / leakage
LONG = "Explain in detail how the water cycle moves moisture from oceans to clouds and back to rivers."


def test_normalize_and_shingles() -> None:
    assert normalize_text("  Hello,   WORLD!!  ") == "hello world"
    assert normalize_text("Ünï—cödé") == "ünï cödé"
    assert shingles("abc") == frozenset({"abc"})
    assert shingles("Hello!") == frozenset({"hello"})
    s = shingles("abcdefg")
    assert s == frozenset({"abcde", "bcdef", "cdefg"})
    assert jaccard(s, s) == 1.0


def test_near_pairs_matches_brute_force() -> None:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta",
             "eta", "theta", "iota", "kappa", "lambda", "mu"]
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 14))) for _ in range(60)]
    texts = base + [t + " " + rng.choice(words) for t in base[:20]] + [t[:-3] for t in base[20:30]]
    sh = [shingles(t) for t in texts]
    for thr in (0.5, 0.8, 0.9):
        fast = {(i, j) for i, j, _ in _near_pairs(sh, None, thr)}
        brute = {(i, j) for i, j in itertools.combinations(range(len(sh)), 2) if jaccard(sh[i], sh[j]) >= thr}
        assert fast == brute and brute
        left, right = sh[:50], sh[50:]
        fast_x = {(i, j) for i, j, _ in _near_pairs(left, right, thr)}
        brute_x = {(i, j) for i in range(50) for j in range(len(right)) if jaccard(left[i], right[j]) >= thr}
        assert fast_x == brute_x


def test_deduplicate_exact_near_and_distinct() -> None:
    a = PromptSet([P(0, LONG), P(1, "What is the capital of France?"), P(2, "how do I bake bread")], name="a")
    b = PromptSet([
        P(10, "WHAT is the capital of france"),                 # exact after normalisation
        P(11, LONG.replace("clouds", "the clouds")),          # near (Jaccard 0.905)
        P(12, "What is the capital of Spain?"),                 # distinct (short texts differ a lot)
        P(13, "How do I bake sourdough bread at home?"),        # distinct
        P(14, "what is the capital of spain!!"),                # exact duplicate within b
    ], name="b")
    (ca, cb), report = deduplicate(a, b)
    assert ca == a
    assert cb.ids == ["t/012", "t/013"]
    rows = {r.id: r for r in report.itertuples()}
    assert rows["t/010"].reason == "exact" and rows["t/010"].kept_id == "t/001"
    assert rows["t/010"].kept_set == "a"
    assert rows["t/011"].reason == "near" and 0.9 <= rows["t/011"].similarity < 1
    assert rows["t/014"].reason == "exact" and rows["t/014"].kept_id == "t/012"
    assert len(report) == 3
    (_, cb2), report2 = deduplicate(a, b, near_threshold=None)
    assert "t/011" in cb2.ids and set(report2.reason) == {"exact"}
    (single,), rep = deduplicate(PromptSet([P(0, "x y z"), P(1, "X, Y, Z.")]))
    assert single.ids == ["t/000"] and list(rep.id) == ["t/001"]


def test_deduplicate_empty_report_has_columns() -> None:
    (c,), rep = deduplicate(toy_set(3))
    assert len(c) == 9 and len(rep) == 0 and "kept_id" in rep.columns


def test_leakage_raises_on_planted_leak_and_passes_clean() -> None:
    train = PromptSet([P(0, LONG), P(1, "Tell me a joke about cats."), P(2, "Plan a trip to Rome.")],
                      name="train")
    clean = PromptSet([P(10, "Tell me a joke about dogs and their owners."), P(11, "What is 2 + 2?")],
                      name="test")
    report = check_leakage(train, clean)
    assert report.ok and report.n_test == 2 and len(report.pairs) == 0
    planted = PromptSet([P(12, "tell me a JOKE about cats"), P(13, LONG.replace("clouds", "the clouds"))])
    leaky = PromptSet.concat(clean, planted, name="test")
    with pytest.raises(LeakageError) as e:
        check_leakage(train, leaky)
    msg = str(e.value)
    assert "2 of 4 prompts in 'test' also occur in 'train'" in msg
    assert "'t/012'" in msg and "'t/001'" in msg and "exact" in msg and "near" in msg
    assert set(e.value.pairs["test_id"]) == {"t/012", "t/013"}
    assert isinstance(e.value, ValueError)
    soft = check_leakage(train, leaky, raise_on_leak=False)
    assert not soft.ok and list(soft.pairs["reason"]) == ["exact", "near"]
    exact_only = check_leakage(train, leaky, near_threshold=None, raise_on_leak=False)
    assert exact_only.pairs["reason"].tolist() == ["exact"]


# ------------------------------------------------------------------------------------------ built-in set
@pytest.fixture(scope="module")
def builtin() -> PromptSet:
    return load_prompts("builtin")


def test_builtin_counts(builtin) -> None:
    kinds = collections.Counter((p.category, p.meta["kind"]) for p in builtin)
    for cat in BUILTIN_CATEGORIES:
        assert kinds[(cat, "harmful")] >= 30 and kinds[(cat, "lookalike")] >= 30
    assert kinds[(None, "ordinary")] >= 150
    assert set(builtin.categories) >= set(BUILTIN_CATEGORIES)
    for p in builtin:
        assert p.label == ("harmful" if p.meta["kind"] == "harmful" else "benign")
        assert (p.category is None) == (p.meta["kind"] == "ordinary")
        assert p.source == "builtin" and p.split in SPLITS
        assert re.fullmatch(r"builtin/(ordinary/\d{3}|[a-z_]+/[hl]\d{2})", p.id)


def test_builtin_forms_balanced(builtin) -> None:
    for p in builtin:
        assert p.meta["form"] == ("question" if p.text.rstrip().endswith("?") else "instruction"), p.id
    groups = collections.defaultdict(collections.Counter)
    for p in builtin:
        groups[(p.category, p.meta["kind"])][p.meta["form"]] += 1
    for key, c in groups.items():
        assert abs(c["question"] - c["instruction"]) <= 1, (key, c)


def test_builtin_splits_are_stratified(builtin) -> None:
    groups = collections.defaultdict(list)
    for p in builtin:
        groups[(p.category, p.meta["kind"])].append(p.split)
    for key, splits in groups.items():
        n = len(splits)
        for name, f in zip(SPLITS, (0.6, 0.2, 0.2)):
            assert abs(splits.count(name) - f * n) <= 1, (key, name)


def test_builtin_has_no_internal_duplicates(builtin) -> None:
    (clean,), report = deduplicate(builtin, near_threshold=0.9)
    assert len(report) == 0 and clean == builtin
    (_,), strict = deduplicate(builtin, near_threshold=0.7)
    assert len(strict) == 0, strict[["id", "kept_id"]].to_string()


def test_builtin_no_leak_between_its_splits(builtin) -> None:
    train = builtin.where(split="train")
    for split in ("val", "test"):
        assert check_leakage(train, builtin.where(split=split), near_threshold=0.8).ok


def test_labels_and_categories_constants() -> None:
    assert LABELS == ("harmful", "benign") and SPLITS == ("train", "val", "test")
    assert set(BUILTIN_CATEGORIES) <= set(CATEGORIES)
    assert isinstance(toy_set(2).to_frame(), pd.DataFrame)


# ------------------------------------------------------------------- check_leakage equals the all-pairs definition
def _reference_leakage(train: PromptSet, test: PromptSet, thr: float | None) -> list[tuple]:
    """check_leakage by its definition, comparing every pair: per test prompt an exact match (the first train
    prompt with the same normalised text) or else its most similar train prompt with 5-gram Jaccard >= thr (the
    first of equally similar ones)."""
    rows = []
    tr_norm = [normalize_text(t) for t in train.texts]
    tr_sh = [shingles(t) for t in train.texts]
    for j, p in enumerate(test):
        norm = normalize_text(p.text)
        if norm in tr_norm:
            rows.append((p.id, train[tr_norm.index(norm)].id, "exact", 1.0))
            continue
        if thr is None:
            continue
        d = shingles(p.text)
        best = None
        for i, a in enumerate(tr_sh):
            sim = jaccard(a, d)
            if sim >= thr - 1e-12 and (best is None or sim > best[1]):
                best = (i, sim)
        if best is not None:
            rows.append((p.id, train[best[0]].id, "near", best[1]))
    return rows


def _as_rows(report) -> list[tuple]:
    return list(report.pairs[["test_id", "train_id", "reason", "similarity"]].itertuples(index=False, name=None))


def _planted_sets() -> tuple[PromptSet, PromptSet]:
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(2, 16))) for _ in range(120)]
    train = base[:80] + [base[0], base[1].upper() + "!", "ab", "???", "x", "..."]  # exact duplicates, tiny texts
    train += [LONG.replace("detail", "detaix"), LONG.replace("clouds", "cloudx")]  # equally near LONG (a tie)
    test = base[60:120] + [t + " " + rng.choice(words) for t in base[:30]] + [t[:-2] for t in base[30:50]]
    test += ["AB", "!!", "x", "y", base[1] + "?", base[0], LONG, LONG.replace("water", "salt water")]
    return (PromptSet([P(i, t) for i, t in enumerate(train)], name="train"),
            PromptSet([P(500 + j, t) for j, t in enumerate(test)], name="test"))


def test_check_leakage_equals_the_all_pairs_reference_on_planted_duplicates() -> None:
    train, test = _planted_sets()
    shuffled = train[random.Random(1).sample(range(len(train)), len(train))]  # another order, another first
    for tr in (train, shuffled, train):  # the third call reuses the cached train index
        for thr in (0.5, 0.8, 0.9, 1.0, None):
            want = _reference_leakage(tr, test, thr)
            assert _as_rows(check_leakage(tr, test, thr, raise_on_leak=False)) == want, thr
            assert {r[2] for r in want} == ({"exact"} if thr is None else {"exact", "near"}), thr
    # the tie: two train prompts exactly as similar to LONG; the first one is reported
    sims = [jaccard(shingles(t), shingles(LONG)) for t in train.texts[-2:]]
    assert sims[0] == sims[1] >= 0.8
    leak = check_leakage(train, test, 0.8, raise_on_leak=False).pairs.set_index("test_text")
    assert leak.loc[LONG, "train_id"] == train[len(train) - 2].id


def test_check_leakage_equals_the_all_pairs_reference_on_the_packaged_sets() -> None:
    b, hb = load_prompts("builtin"), load_prompts("hardbenign")
    found = 0
    for train, test in [(b.where(split="train"), b.where(split="test")),
                        (hb.where(split="train"), hb.where(split="val"))]:
        for thr in (0.3, 0.8):
            want = _reference_leakage(train, test, thr)
            assert _as_rows(check_leakage(train, test, thr, raise_on_leak=False)) == want, thr
            found += len(want)
    assert found  # at the low threshold the check has something to find


def test_check_leakage_error_message_is_unchanged() -> None:
    train, test = _planted_sets()
    with pytest.raises(LeakageError) as e:
        check_leakage(train, test)
    want = _reference_leakage(train, test, 0.8)
    first = want[0]
    assert str(e.value).startswith(f"{len(want)} of {len(test)} prompts in 'test' also occur in 'train':\n  "
                                   f"test {first[0]!r} «")
    assert f"\n  ... and {len(want) - 10} more\nRemove them from one side" in str(e.value)
