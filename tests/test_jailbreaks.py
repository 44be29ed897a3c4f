"""Jailbreak templates: wrapping keeps labels, categories and splits, gives unique ids, contains the original text,
is deterministic, and rejects bad input. No model."""

import pytest

from catlens.datasets import load_hardbenign
from catlens.jailbreaks import TEMPLATES, JailbreakTemplate, wrap_jailbreaks
from catlens.prompts import PromptSet


@pytest.fixture(scope="module")
def ps() -> PromptSet:
    return load_hardbenign()


def test_every_harmful_prompt_in_every_template(ps):
    w = wrap_jailbreaks(ps)
    harmful = ps.where(label="harmful")
    assert len(TEMPLATES) >= 4 and len(w) == len(harmful) * len(TEMPLATES)
    assert w.name == "hardbenign+jailbreaks"
    by_id = {p.id: p for p in harmful}
    for q in w:
        orig = by_id[q.meta["original_id"]]
        t = TEMPLATES[q.meta["template"]]
        assert q.id == f"{orig.id}+{t.name}" and q.source == f"hardbenign+{t.name}"
        assert (q.label, q.category, q.split) == (orig.label, orig.category, orig.split)
        assert orig.text in q.text and q.text == t.text.replace("{prompt}", orig.text) and q.text != orig.text
        assert {k: v for k, v in q.meta.items() if k not in ("template", "original_id")} == orig.meta
    assert len(set(w.ids)) == len(w) and not set(w.ids) & set(ps.ids)
    assert [(q.meta["original_id"], q.meta["template"]) for q in w] == [
        (p.id, name) for p in harmful for name in TEMPLATES]  # prompt by prompt, template by template
    assert all(p.label == "harmful" for p in w)  # benign prompts are not wrapped


def test_templates_are_distinct_and_deterministic(ps):
    texts = [t.render("PROMPT") for t in TEMPLATES.values()]
    assert len(set(texts)) == len(texts) and all(t.count("PROMPT") == 1 for t in texts)
    assert wrap_jailbreaks(ps).content_hash == wrap_jailbreaks(ps).content_hash
    one = wrap_jailbreaks(ps, ["hypothetical"])
    assert {p.source for p in one} == {"hardbenign+hypothetical"}
    assert {p.meta["template"] for p in one} == {"hypothetical"} and len(one) == len(ps.where(label="harmful"))


def test_custom_template_and_braces_in_prompts():
    ps = PromptSet([{"id": "x/1", "text": "Use {this} and {prompt} literally.", "label": "harmful", "source": "x"},
                    {"id": "x/2", "text": "A benign one.", "label": "benign", "source": "x"}])
    mine = JailbreakTemplate("mine", "<<{prompt}>>")
    w = wrap_jailbreaks(ps, [mine, "role_play"])
    assert w.ids == ["x/1+mine", "x/1+role_play"]
    assert w[0].text == "<<Use {this} and {prompt} literally.>>"


def test_bad_input():
    ps = PromptSet([{"id": "x/1", "text": "Hello there.", "label": "benign", "source": "x"}])
    with pytest.raises(ValueError, match="no harmful prompts"):
        wrap_jailbreaks(ps)
    harmful = PromptSet([{"id": "x/1", "text": "Bad.", "label": "harmful", "source": "x"}])
    with pytest.raises(ValueError, match="Did you mean: role_play"):
        wrap_jailbreaks(harmful, ["roleplay"])
    with pytest.raises(ValueError, match="more than once"):
        wrap_jailbreaks(harmful, ["role_play", "role_play"])
    with pytest.raises(ValueError, match="already wrapped"):
        wrap_jailbreaks(wrap_jailbreaks(harmful, ["role_play"]))
    with pytest.raises(ValueError, match="exactly once"):
        JailbreakTemplate("twice", "{prompt} {prompt}")
    with pytest.raises(ValueError, match="snake_case"):
        JailbreakTemplate("has space", "{prompt}")
