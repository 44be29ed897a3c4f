"""The README's "P1 in twenty lines" runs as written, through ``cl.`` alone, on a tiny refusal-token model.

The block is executed unchanged: ``cl.load_model("refusal-default")`` finds the tiny model because ``$CATLENS_CACHE``
points at a folder whose ``finetunes/refusal-default`` is a :mod:`catlens.testing` model with the eight default
refusal tokens. Also the three conveniences the block relies on: a cached model loads by name,
``Intervention.from_directions`` and ``fit_gate`` on activation stores.
"""

import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def p1_block() -> str:
    text = README.read_text()
    section = text.split("## P1 in twenty lines", 1)
    assert len(section) == 2, "README has no '## P1 in twenty lines' section"
    found = re.search(r"<!-- p1 -->\s*```python\n(.*?)```", section[1], flags=re.S)
    assert found, "the 'P1 in twenty lines' section has no <!-- p1 --> python block"
    return found.group(1)


def test_the_block_is_at_most_twenty_lines_through_cl_alone():
    import catlens as cl

    block = p1_block()
    assert len(block.rstrip("\n").splitlines()) <= 20
    imports = [line.strip() for line in block.splitlines() if re.match(r"\s*(import|from)\s", line)]
    assert imports == ["import catlens as cl"]
    used = set(re.findall(r"\bcl\.(\w+)", block))
    assert used and used <= set(cl.__all__), sorted(used - set(cl.__all__))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A model cache whose default fine-tune is a tiny random Llama with the eight default refusal tokens."""
    from catlens.finetune.config import DEFAULT_CATEGORIES
    from catlens.testing import make_tiny_model_dir

    root = tmp_path_factory.mktemp("cache")
    make_tiny_model_dir(root / "finetunes" / "refusal-default", categories=DEFAULT_CATEGORIES)
    return root


PER_GROUP = 3
"""The test's one substitution: built-in prompts capped at this many per (split, label, category), so the block
runs in seconds; every category stays on both sides of every split."""


@pytest.fixture(scope="module")
def ran(cache):
    """The README block's namespace and what it printed."""
    import contextlib
    import io
    from collections import Counter

    import catlens as cl

    load = cl.load_prompts

    def load_small(spec, **kwargs):
        seen: Counter = Counter()

        def keep(p) -> bool:
            seen[p.split, p.label, p.category] += 1
            return seen[p.split, p.label, p.category] <= PER_GROUP

        return load(spec, **kwargs).filter(keep, f"at most {PER_GROUP} per split, label and category")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATLENS_CACHE", str(cache))
        mp.setattr(cl, "load_prompts", load_small)
        namespace: dict = {}
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(p1_block(), str(README), "exec"), namespace)  # noqa: S102 - the README is ours
    return namespace, printed.getvalue()


def test_the_block_loads_the_cached_fine_tune_by_name(ran, cache):
    ns, _ = ran
    model = ns["model"]
    assert model.name == "refusal-default" and model.d_model == 64
    source = model.provenance["source"]
    assert source["spec"] == "refusal-default"
    assert Path(source["folder"]) == (cache / "finetunes" / "refusal-default").resolve()


def test_the_block_prints_refusal_and_over_refusal_per_category(ran):
    ns, printed = ran
    test, rates, judged = ns["test"], ns["rates"], ns["judged"]
    assert len(judged) == len(test) and "refused_full_answer" in judged.columns
    frame = test.to_frame()
    frame["category"] = frame.category.astype(object).where(frame.category.notna(), "(none)")
    for label, metric in (("harmful", "refusal rate"), ("benign", "over-refusal rate")):
        side = rates[rates.metric == metric]
        groups = side[side.row == "group"].set_index("category").n.to_dict()
        assert groups == frame[frame.label == label].category.value_counts().to_dict()
        pooled = side[side.row == "pooled"].iloc[0]
        refused = judged[judged.label == label].refused_full_answer
        assert (pooled.n, pooled.k) == (len(refused), int(refused.sum()))
        assert (side.row == "macro").sum() == 1
    assert set(rates.metric) == {"refusal rate", "over-refusal rate"}
    shown = rates[["metric", "row", "category", "n", "rate", "ci_low", "ci_high"]].to_string(index=False)
    assert shown in printed


def test_the_gate_and_the_router_decided_each_row(ran):
    """Every record carries its gate and route; the gate's score is the probe on that prompt's own activation, its
    outcome sets the row's coefficient, and the route picks the row's direction."""
    import catlens as cl

    ns, _ = ran
    model, test, records, policy, dirs, L = (ns[k] for k in ("model", "test", "records", "policy", "dirs", "L"))
    assert len(records) == len(test)
    acts = cl.collect(model, test, layers=[L], show_progress=False)
    by_id = dict(zip(acts.index.id, policy.gate.score(acts.at("resid_post", L)).tolist()))
    scores = []
    for r in records:
        gate, route, steer = r["gate"], r["route"], r["steer"]
        assert gate is not None and route is not None, r["id"]
        assert gate["score"] == pytest.approx(by_id[r["id"]], abs=1e-4)
        assert gate["outcome"] == ("toward" if gate["score"] >= policy.gate.threshold else "away")
        assert steer["active"] == [True]
        assert steer["coeff"][0] == pytest.approx(0.1 if gate["outcome"] == "toward" else -0.1)
        assert route["kind"] == "refusal_tokens" and route["category"] in dirs.categories
        assert steer["direction"] == [dirs.categories.index(route["category"])]
        scores.append(gate["score"])
    assert len(set(scores)) > 1  # one score per prompt, not one per batch


# ------------------------------------------------------------------------------------ the conveniences
def test_a_cached_model_resolves_by_name(tmp_path):
    from catlens.model import cached_model, resolve_spec

    folder = tmp_path / "finetunes" / "refusal-quick"
    folder.mkdir(parents=True)
    assert cached_model("refusal-quick", tmp_path) is None  # no config.json: not a checkpoint
    (folder / "config.json").write_text("{}")
    assert resolve_spec("refusal-quick", tmp_path) == ("folder", str(folder.resolve()))
    assert cached_model("../finetunes/refusal-quick", tmp_path) is None
    with pytest.raises(ValueError, match=r"Did you mean: refusal-quick\?.*catlens finetune"):
        resolve_spec("refusal-quik", tmp_path)


def _directions():
    from catlens.directions import Directions

    g = torch.Generator().manual_seed(0)
    return Directions(torch.randn(3, 2, 8, generator=g), ("a", "b", "c"), (1, 3),
                      ref_norm=torch.tensor([2.0, 5.0]))


def test_intervention_from_directions_takes_the_layers_vectors_and_reference_norm():
    from catlens.steer import Intervention, from_directions

    d = _directions()
    iv = Intervention.from_directions(d, 3, scale="norm", positions="last_prompt+0")
    assert iv.layer == 3 and iv.labels == ("a", "b", "c") and iv.ref_norm == 5.0 and iv.scale_factor == 5.0
    assert torch.equal(iv.vectors, d.at(3)) and iv.positions == "last_prompt+0"
    assert iv.same_as(from_directions(d, [3], scale="norm", positions="last_prompt+0")[0])
    assert Intervention.from_directions(d, 1, categories=["c"]).labels == ("c",)
    with pytest.raises(ValueError, match="with_ref_norm"):
        Intervention.from_directions(replace(d, ref_norm=None), 1, scale="norm")
    with pytest.raises(KeyError, match="layer 2"):
        Intervention.from_directions(d, 2)
    with pytest.raises(TypeError, match="layer"):
        Intervention.from_directions(d, [1, 3])


def _store(n: int, seed: int):
    from catlens.cache import ActivationStore

    g = torch.Generator().manual_seed(seed)
    label = ["harmful" if i % 3 else "benign" for i in range(n)]
    x = torch.randn(n, 1, 2, 16, generator=g) + torch.tensor([1.0 if lab == "harmful" else -1.0 for lab in label]
                                                             ).view(n, 1, 1, 1)
    return ActivationStore({"resid_post": x}, pd.DataFrame({"id": [f"p{i}" for i in range(n)], "label": label}),
                           (4, 7), ("last",))


def test_fit_gate_on_stores_equals_fit_gate_on_tensors():
    from catlens.probes import fit_gate

    train, val = _store(30, 0), _store(18, 1)

    def split(store):
        return store.where(label="harmful").at("resid_post", 7), store.where(label="benign").at("resid_post", 7)

    a = fit_gate(train, layer=7, val=val)
    b = fit_gate(*split(train), layer=7, val=split(val))
    assert torch.equal(a.weight, b.weight) and (a.bias, a.threshold, a.layer) == (b.bias, b.threshold, 7)
    assert torch.equal(a.mean, b.mean)
    assert not torch.equal(fit_gate(train, layer=4, val=val).weight, a.weight)  # the layer asked for is read
    with pytest.raises(ValueError, match="not layer=5"):
        fit_gate(train, layer=5, val=val)
    with pytest.raises(ValueError, match="do not pass benign"):
        fit_gate(train, split(train)[1], layer=7)
    with pytest.raises(ValueError, match="needs benign"):
        fit_gate(split(train)[0], layer=7)
