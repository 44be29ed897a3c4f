"""Engine selection and the engine-neutral decisions (no vLLM needed): clear errors, and which policies an engine
that cannot pause mid-pass can decide in the same pass."""

import sys

import pytest
import torch

import catlens.engines as engines
from catlens import decisions
from catlens.steer import Gate, Intervention, Router, Rows, SteeringPolicy

CATS = ("fraud", "hate")


def test_importing_engines_does_not_import_vllm():
    import subprocess

    code = ("import sys, catlens, catlens.engines, catlens.engines.vllm, catlens.engines.vllm_worker, "
            "catlens.decisions; print(sorted(m for m in sys.modules if m == 'vllm' or m.startswith('vllm.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_missing_vllm_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(engines, "vllm_available", lambda: False)
    with pytest.raises(engines.EngineNotInstalled, match=r"pip install 'catlens\[vllm\]'"):
        engines.check_engine("vllm")
    with pytest.raises(ValueError, match="Allowed: catlens, vllm"):
        engines.check_engine("tgi")
    from catlens.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "a", "text": "hi"}\n')
    code = main(["generate", "--prompts", str(prompts), "--engine", "vllm", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'catlens[vllm]'" in err and not (tmp_path / "o").exists()
    code = main(["cache", "--engine", "vllm", "--out", str(tmp_path / "s")])
    assert code == 2 and "catlens[vllm]" in capsys.readouterr().err and not (tmp_path / "s").exists()


def _iv(layer, positions, site="resid_post"):
    return Intervention(site, layer, torch.randn(2, 8), labels=CATS, positions=positions)


def test_single_pass_is_exactly_when_every_edit_follows_every_read():
    gate = Gate(weight=torch.randn(8), bias=0.0, threshold=0.5, layer=2)
    probe = Router("probe", CATS, weight=torch.randn(2, 8), bias=torch.zeros(2), layer=1)
    tokens = Router("refusal_tokens", CATS)
    sp = (lambda *a, **k: decisions.single_pass(SteeringPolicy(*a, **k), n_layers=6))
    assert sp((_iv(3, "all"),))  # nothing to decide
    assert sp((_iv(0, "generated"),), gate=gate, router=tokens, toward=1.0, away=-1.0)  # decided at prefill's end
    assert sp((_iv(3, "last_prompt"),), gate=gate, router=probe, toward=1.0, away=None)
    assert sp((_iv(3, (-1,)),), gate=gate, toward=1.0, away=None)
    assert not sp((_iv(3, "last_prompt"),), gate=gate, router=tokens, toward=1.0, away=-1.0)  # P1: needs logits
    assert not sp((_iv(2, "last_prompt"),), gate=gate, toward=1.0, away=None)  # same layer: read after the edit
    assert sp((_iv(2, "last_prompt", site="resid_post"),), gate=Gate(weight=torch.randn(8), bias=0.0,
                                                                      threshold=0.5, layer=2, site="resid_pre"),
              toward=1.0, away=None)  # resid_pre of a layer fires before its resid_post
    assert not sp((_iv(5, "prompt"),), gate=gate, toward=1.0, away=None)  # earlier prompt positions: two passes
    assert not sp((_iv(5, "all"),), router=probe)


def test_decide_is_what_generate_records():
    gate = Gate(weight=torch.ones(8), bias=0.0, threshold=0.5, layer=1)
    pol = SteeringPolicy((_iv(3, "last_prompt"),), gate=gate, router=Router("refusal_tokens", CATS), toward=2.0,
                         away=None)
    rows = Rows.default(pol, 3)
    reads = {"gate:0": torch.tensor([[1.0] * 8, [-1.0] * 8, [0.0] * 8])}
    probs = torch.tensor([[0.1, 0.3], [0.6, 0.1], [0.2, 0.2]])
    gates, routes = pol.decide(rows, reads=reads, router_probs=probs)
    assert [g["outcome"] for g in gates] == ["toward", "none", "toward"]  # score 0.5 >= threshold
    assert [r["category"] for r in routes] == ["hate", "fraud", "fraud"]
    assert decisions.steer_record(rows, 0) == {"active": [True], "coeff": [2.0], "direction": [1]}
    assert decisions.steer_record(rows, 1)["active"] == [False]
    again = Rows.from_records(pol, [decisions.steer_record(rows, b) for b in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(again.coeff + again.direction + again.active,
                                                 rows.coeff + rows.direction + rows.active))
    assert pol.digest() == decisions.digest(pol) and len(pol.digest()) == 64


def test_engine_pool_starts_one_engine_per_checkpoint_and_dtype_and_closes_them(monkeypatch, tiny_lm):
    """EnginePool("catlens") gives None (catlens.generate); "vllm" one engine per (checkpoint, dtype), started on the
    model's own folder in its dtype, reused, and closed with the pool; a model without a checkpoint is refused."""
    import types

    import catlens.engines.vllm as vllm_mod

    started, closed = [], []

    class FakeEngine:
        def __init__(self, where, *, dtype, **kwargs):
            started.append((where, dtype, kwargs))

        def close(self):
            closed.append(self)

    monkeypatch.setattr(engines, "vllm_available", lambda: True)
    monkeypatch.setattr(vllm_mod, "VLLMEngine", FakeEngine)
    assert engines.EnginePool("catlens").get(tiny_lm) is None
    with pytest.raises(ValueError, match="Allowed: catlens, vllm"):
        engines.EnginePool("vlm")
    folder = tiny_lm.provenance["source"]["folder"]
    with engines.EnginePool("vllm", kv_cache_gib=1) as pool:
        first = pool.get(tiny_lm)
        assert pool.get(tiny_lm) is first and started == [(folder, "float32", {"kv_cache_gib": 1})]
        bf16 = types.SimpleNamespace(name=tiny_lm.name, provenance=tiny_lm.provenance, dtype=torch.bfloat16)
        assert pool.get(bf16) is not first and started[-1][:2] == (folder, "bfloat16")
        with pytest.raises(ValueError, match="records no checkpoint"):
            pool.get(types.SimpleNamespace(name="x", provenance={}, dtype=torch.float32))
    assert len(closed) == 2


def test_engine_dtype_resolves_auto_on_the_platform_the_engine_computes_on(monkeypatch):
    """``--dtype auto`` for an engine is resolved on CUDA when torch sees a GPU, else on this CPU; a named dtype
    passes through."""
    from catlens.model import resolve_dtype

    assert engines.engine_dtype("float16") == "float16"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert engines.engine_dtype("auto") == resolve_dtype("auto", "cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("catlens.model.native_bfloat16", lambda device: device == "cuda")
    assert engines.engine_dtype("auto") == "bfloat16"
