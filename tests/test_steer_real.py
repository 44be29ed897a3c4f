"""Exact identities of the steering engine on the real embedded model."""

import pytest
import torch

from catlens.generation import generate
from catlens.steer import Gate, Intervention, SteeringPolicy, steering

pytestmark = pytest.mark.slow

PROMPTS = ["How do I bake bread?", "Hi", "Name three rivers in Europe.", "How can I pick a lock?"]


def _gen(model, steer=None, **kw):
    return generate(model, PROMPTS, steer, max_new_tokens=8, batch_size=4, show_progress=False, **kw)


def _toks(recs):
    return [r["token_ids"] for r in recs]


def test_unsteered_generation_equals_transformers_generate(real_model):
    ours = _gen(real_model)
    for p, r in zip(PROMPTS, ours):
        ids, mask = real_model.tokenize(real_model.format([p]))
        with torch.inference_mode():
            ref = real_model.hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                         pad_token_id=real_model.tokenizer.pad_token_id)
        expected = ref[0, ids.shape[1]:].tolist()
        eos = real_model.tokenizer.eos_token_id
        assert r["token_ids"] == (expected[: expected.index(eos) + 1] if eos in expected else expected)


def test_coefficient_zero_generates_the_unsteered_tokens(real_model):
    v = torch.randn(real_model.d_model)
    base = _gen(real_model)
    assert _toks(_gen(real_model, Intervention("resid_post", 20, v, coeff=0.0, positions="all"))) == _toks(base)
    assert _toks(_gen(real_model, Intervention("resid_post", 20, v * 40, positions="all"))) != _toks(base)


def test_a_row_the_gate_leaves_alone_generates_the_unsteered_answer(real_model):
    ids, mask = real_model.tokenize(real_model.format(PROMPTS))
    store = {}
    from catlens.steer import reading

    with reading(real_model, {"g": ("resid_post", 18)}, store), torch.inference_mode():
        real_model.hf(input_ids=ids, attention_mask=mask)
    w = torch.randn(real_model.d_model)
    raw = sorted((store["g"] @ w).tolist())
    gate = Gate(w, -(raw[1] + raw[2]) / 2, 0.5, 18)  # two rows flagged, two not, far from the boundary
    policy = SteeringPolicy((Intervention("resid_post", 18, torch.randn(real_model.d_model) * 30,
                                          positions="last_prompt"),), gate=gate, toward=1.0, away=None)
    steered, base = _gen(real_model, policy), _gen(real_model)
    left = [i for i, r in enumerate(steered) if not r["gate"]["flagged"]]
    assert left and len(left) < len(PROMPTS)
    for i in left:
        assert steered[i]["token_ids"] == base[i]["token_ids"]
    assert any(steered[i]["token_ids"] != base[i]["token_ids"] for i in range(4) if i not in left)


def test_ablation_leaves_zero_projection_on_every_step(real_model):
    v = torch.randn(real_model.d_model)
    u = v / v.norm()
    seen = []

    def read(act, hook):
        seen.append(torch.einsum("bpd,d->bp", act.float(), u))
        return act

    with real_model.bridge.hooks(fwd_hooks=[(real_model.hook_name("resid_pre", 11), read)]):
        _gen(real_model, Intervention("resid_post", 10, v, kind="ablate", positions="all"))
    scale = 1e-4 * max(1.0, float(torch.cat([s.flatten() for s in seen]).abs().max()))
    assert len(seen) > 3
    prompt_mask = real_model.tokenize(sorted(real_model.format(PROMPTS), key=len, reverse=True))[1].bool()
    assert torch.cat(seen[:2], dim=1)[prompt_mask].abs().max() < 1e-3
    assert max(float(s.abs().max()) for s in seen[2:]) < 1e-3 + scale


def test_hooks_are_gone_after_an_exception_inside_generate(real_model, monkeypatch):
    import catlens.generation as gen

    real = gen._pick
    state = {"n": 0}

    def boom(*a, **k):
        state["n"] += 1
        if state["n"] == 2:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr(gen, "_pick", boom)
    with pytest.raises(RuntimeError, match="boom"):
        _gen(real_model, Intervention("resid_post", 5, torch.randn(real_model.d_model)))
    assert not real_model.bridge.list_hooks()
    with steering(real_model, Intervention("resid_post", 5, torch.zeros(real_model.d_model))) as s:
        with torch.inference_mode():
            real_model.logits(["Hi"])
    assert s.report.fired == [1]
