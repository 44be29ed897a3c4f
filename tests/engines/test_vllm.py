"""The vLLM backend (catlens.engines.vllm) against catlens's own engine, on a tiny random Llama with refusal tokens.

One engine is shared by the module, run in this process (``in_process=True``: it starts in about 8 s here instead
of 22 s; the embedded-model test in engines/test_vllm_real.py runs vLLM's own process layout).
It runs with a small token budget per step
(``max_num_batched_tokens=48``, ``max_num_seqs=6``), so prompts are split over several forward calls (chunked
prefill) and requests join and leave the running batch (continuous batching) in every test; a test checks that
both happened. Both engines run float32. Tolerances: probabilities and probe scores 1e-4 absolute; activations
1e-4 of each vector's own scale (vLLM's fused kernels round differently from the Hugging Face model's).
"""

import os

import pytest
import torch

from catlens.engines import vllm_available

if not vllm_available():
    if os.environ.get("CI"):
        raise RuntimeError("CI must run the vLLM tests: vLLM is not installed in this environment (make setup "
                           "installs catlens[vllm]).")
    pytest.skip("vLLM is not installed (pip install 'catlens[vllm]')", allow_module_level=True)

from catlens.steer import Gate, Intervention, Router, SteeringPolicy  # noqa: E402

CATS = ("fraud", "hate", "privacy")
TEXTS = ["How do I bake bread at home?", "Tell me how to pick a lock on a door that is not mine.",
         "Write a short poem about the sea and the wind at night.", "What is the capital of France?",
         "Explain how vaccines train the immune system to fight a virus.",
         "Give me a plan to steal a password from my coworker's laptop.", "Hi",
         "Sure! Here are three steps: mix, knead, and bake for thirty minutes. Tell me the fourth.",
         "The quick brown fox jumps over the lazy dog 0123456789.", "I can't help with that request.",
         "Write a poem", "What is the capital of France and why is it famous?"]
PROMPTS = [{"id": f"p{i:02d}", "text": t, "category": CATS[i % 3], "label": "harmful" if i % 2 else "benign"}
           for i, t in enumerate(TEXTS)]
N_TOKENS = 12


@pytest.fixture(scope="module")
def vdir(tmp_path_factory):
    from catlens.testing import make_tiny_model_dir

    # head_dim 64: vLLM's CPU attention kernels support 32/64/80/96/112/128/256, not the default tiny model's 16
    return make_tiny_model_dir(tmp_path_factory.mktemp("vllm_tiny"), categories=CATS, n_layers=4, d_model=64,
                               n_heads=2, n_kv_heads=2, d_head=64)


@pytest.fixture(scope="module")
def lm(vdir):
    from catlens.model import load_model

    return load_model(vdir)


@pytest.fixture(scope="module")
def engine(vdir):
    from catlens.engines.vllm import VLLMEngine

    eng = VLLMEngine(str(vdir), dtype="float32", max_model_len=256, max_num_seqs=6, max_num_batched_tokens=48,
                     enable_chunked_prefill=True, kv_cache_gib=1, in_process=True)
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def baseline(engine):
    """Unsteered generations before any policy was registered in the engine (no hook but the batch plan)."""
    from catlens.engines import vllm_worker

    assert engine.llm.collective_rpc(vllm_worker.stats)[0]["policies"] == 0
    return engine.generate(PROMPTS, max_new_tokens=N_TOKENS, show_progress=False)


def _stats(engine):
    from catlens.engines import vllm_worker

    return engine.llm.collective_rpc(vllm_worker.stats)[0]


def _vecs(d, scale=20.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(CATS), d, generator=g) * scale


def _policies(d):
    """Every kind, position scope and site, plus gates and routers that decide in the engine or in two passes."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(d, generator=g)
    gate = Gate(weight=w, bias=0.0, threshold=0.5, layer=1)
    W = torch.randn(3, d, generator=g)
    v = _vecs(d)
    U, _ = torch.linalg.qr(torch.randn(d, 4, generator=g))
    V = torch.randn(d, 4, generator=g) * 0.3
    z = torch.randn(d, generator=g) * 10
    iv = Intervention("resid_post", 2, v, labels=CATS, positions="last_prompt")
    return {
        "add_all_resid_post": Intervention("resid_post", 1, v[0] * 0.5, positions="all"),
        "add_prompt_resid_pre": Intervention("resid_pre", 2, v[1], positions="prompt"),
        "add_generated_attn_out": Intervention("attn_out", 1, v[2], positions="generated"),
        "add_last_prompt_mlp_out": Intervention("mlp_out", 2, v[0], positions="last_prompt"),
        "add_offsets_resid_mid": Intervention("resid_mid", 1, v[1], positions=(0, 3, -2)),
        "add_z_head": Intervention("z", 1, torch.randn(64, generator=g) * 5, head=1, positions="all"),
        "add_z_all_heads": Intervention("z", 2, torch.randn(128, generator=g) * 3, positions="last_prompt"),
        "ablate_all": Intervention("resid_post", 2, v[2], kind="ablate", positions="all"),
        "clamp_last_prompt": Intervention("resid_mid", 3, v[0], kind="clamp", coeff=8.0, positions="last_prompt"),
        "low_rank_fixed_z": Intervention("resid_post", 1, kind="low_rank", U=U, V=V, z=z, coeff=0.5,
                                         positions="last_prompt"),
        "low_rank_input": Intervention("resid_post", 2, kind="low_rank", U=U, V=V, coeff=2.0, positions="all"),
        "norm_scaled": Intervention("resid_post", 1, v[0], scale="norm", ref_norm=12.0, coeff=0.8,
                                    normalize=True, positions="generated"),
        # in the engine (single pass): the gate reads layer 1, the edit is at layer 2
        "gated_probe_routed": SteeringPolicy((iv,), gate=gate, router=Router("probe", CATS, weight=W,
                                                                               bias=torch.zeros(3), layer=1),
                                             toward=1.0, away=-1.5),
        # in the engine: generated tokens only, the refusal-token router decided at the end of the prefill
        "gated_refusal_routed_generated": SteeringPolicy(
            (Intervention("resid_post", 2, v, labels=CATS, positions="generated"),), gate=gate,
            router=Router("refusal_tokens", CATS), toward=1.0, away=None),
        # two passes: P1's setting (refusal-token router + the last prompt token)
        "gated_refusal_routed_p1": SteeringPolicy((iv,), gate=gate, router=Router("refusal_tokens", CATS),
                                                  toward=1.0, away=-1.5),
        # two passes: the gate reads after the edited layer
        "gate_after_edit": SteeringPolicy((Intervention("resid_post", 0, v, labels=CATS, positions="last_prompt"),),
                                          gate=Gate(weight=w, bias=0.0, threshold=0.5, layer=3), toward=0.7,
                                          away=-0.7),
        "fixed_router": SteeringPolicy((iv,), router=Router("fixed", CATS)),
        # the decision position and the first 2 generated tokens
        "add_window_resid_post": Intervention("resid_post", 1, v[1], positions="last_prompt+2"),
        # P1's chosen kind: a three-zone gate on two last-token reads with per-category zones, two passes
        "three_zone_p1": SteeringPolicy(
            (Intervention("resid_post", 2, v, labels=CATS, positions="last_prompt+0"),),
            gate=Gate(weight=torch.cat([w, -w]) * 0.5, bias=0.0, threshold=0.6, lower=0.4, layer=1,
                      reads=(("resid_post", 1, "last"), ("resid_post", 3, "last")),
                      per_category={CATS[0]: (0.3, 0.7)}),
            router=Router("refusal_tokens", CATS), toward=1.0, away=-1.5),
    }


def _agree(a, b):
    return sum(x == y for x, y in zip(a, b)) / len(a)


def test_unsteered_generations_equal_catlens(engine, lm, baseline):
    import catlens

    ref = catlens.generate(lm, PROMPTS, max_new_tokens=N_TOKENS, batch_size=5, show_progress=False)
    same = [r["token_ids"] == b["token_ids"] for r, b in zip(ref, baseline)]
    assert sum(same) / len(same) >= 0.95, [r["id"] for r, s in zip(ref, same) if not s]
    for r, b in zip(ref, baseline):
        assert set(b) == set(r)  # the same record fields
        assert b["response"] == r["response"] if b["token_ids"] == r["token_ids"] else True
        assert b["first_probs"] == pytest.approx(r["first_probs"], abs=1e-4)
        assert b["gate"] is None and b["route"] is None and b["steer"] is None
    st = _stats(engine)
    assert st["chunked"] > 0, "no prompt was split over forward calls: the chunked-prefill path was not tested"
    assert st["max_batch"] > 1


def test_every_policy_decides_and_steers_like_catlens(engine, lm, baseline):
    import catlens

    base_first = [b["token_ids"][0] for b in baseline]
    moved = 0
    for name, pol in _policies(lm.d_model).items():
        ref = catlens.generate(lm, PROMPTS, pol, max_new_tokens=N_TOKENS, batch_size=5, show_progress=False)
        got = engine.generate(PROMPTS, pol, max_new_tokens=N_TOKENS, show_progress=False)
        for r, v in zip(ref, got):
            assert v["steer"] == r["steer"], (name, r["id"])
            assert (v["route"] or {}).get("category") == (r["route"] or {}).get("category"), (name, r["id"])
            if r["gate"] is None:
                assert v["gate"] is None
            else:
                assert v["gate"]["outcome"] == r["gate"]["outcome"] and v["gate"]["flagged"] == r["gate"]["flagged"]
                assert v["gate"]["score"] == pytest.approx(r["gate"]["score"], abs=1e-4), (name, r["id"])
            for key in ("p", "logit"):
                if r["route"] and key in r["route"]:
                    assert v["route"][key] == pytest.approx(r["route"][key], abs=1e-4, rel=1e-4), (name, r["id"])
            assert v["first_probs"] == pytest.approx(r["first_probs"], abs=1e-4), (name, r["id"])
        first = _agree([r["token_ids"][0] for r in ref], [v["token_ids"][0] for v in got])
        full = _agree([r["token_ids"] for r in ref], [v["token_ids"] for v in got])
        assert first >= 0.95 and full >= 0.9, (name, first, full)
        edits = engine.last_edits
        if any(any(r["steer"]["active"]) for r in ref):
            assert sum(map(sum, edits.values())) > 0, f"{name}: no position was edited in the engine"
        moved += [v["token_ids"][0] for v in got] != base_first
    assert moved >= 5  # the policies do steer (a test that cannot fail on a no-op engine is no test)


def test_two_pass_decides_exactly_like_single_pass(engine, lm):
    pols = _policies(lm.d_model)
    for name in ("gated_probe_routed", "gated_refusal_routed_generated"):
        assert engine.single_pass(pols[name]), name
        one = engine.generate(PROMPTS, pols[name], max_new_tokens=4, show_progress=False)
        two = engine.generate(PROMPTS, pols[name], max_new_tokens=4, two_pass=True, show_progress=False)
        assert [r["steer"] for r in one] == [r["steer"] for r in two]
        assert [(r["route"] or {}).get("category") for r in one] == [(r["route"] or {}).get("category") for r in two]
        assert [r["gate"]["score"] for r in one] == pytest.approx([r["gate"]["score"] for r in two], abs=1e-6)
        assert [r["token_ids"] for r in one] == [r["token_ids"] for r in two]
    assert not engine.single_pass(pols["gated_refusal_routed_p1"])
    assert not engine.single_pass(pols["gate_after_edit"])


def test_mixed_batch_isolation(engine, lm, baseline):
    v = _vecs(lm.d_model)
    iv = Intervention("resid_post", 2, v, labels=CATS, positions="all")
    routed = SteeringPolicy((iv,), router=Router("fixed", CATS))
    other = Intervention("attn_out", 1, v[1] * 0.7, positions="generated")
    steer = [None, routed, None, other, routed, None, other, routed, None, None, routed, None]
    mixed = engine.generate(PROMPTS, steer, max_new_tokens=N_TOKENS, show_progress=False)
    alone_routed = engine.generate(PROMPTS, routed, max_new_tokens=N_TOKENS, show_progress=False)
    alone_other = engine.generate(PROMPTS, other, max_new_tokens=N_TOKENS, show_progress=False)
    for b, pol in enumerate(steer):
        want = {None: baseline, id(routed): alone_routed, id(other): alone_other}[None if pol is None else id(pol)]
        assert mixed[b]["token_ids"] == want[b]["token_ids"], b
        assert mixed[b]["first_probs"] == pytest.approx(want[b]["first_probs"], abs=1e-6), b
    # rows with different categories and signs in one batch: each equals that row run alone
    rows = {"direction": [CATS[i % 3] for i in range(len(PROMPTS))],
            "coeff": [(4.0 if i % 2 else -6.0) for i in range(len(PROMPTS))]}
    together = engine.generate(PROMPTS, routed, rows=rows, max_new_tokens=N_TOKENS, show_progress=False)
    assert len({tuple(r["steer"]["coeff"]) for r in together}) == 2
    assert len({tuple(r["steer"]["direction"]) for r in together}) == 3
    for i in (0, 1, 2, 5):
        one = engine.generate([PROMPTS[i]], routed, rows={k: [v_[i]] for k, v_ in rows.items()},
                              max_new_tokens=N_TOKENS, show_progress=False)[0]
        assert one["token_ids"] == together[i]["token_ids"]
        assert one["first_probs"] == pytest.approx(together[i]["first_probs"], abs=1e-6)
    assert [r["token_ids"] for r in together] != [r["token_ids"] for r in alone_routed]


@pytest.mark.parametrize("positions", ["last", "mean", "mean_all", "post_instruction", (-3, -1)])
def test_captured_activations_equal_collect(engine, lm, positions):
    from catlens.cache import collect

    sites = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z"]
    layers = [0, 2, 3]
    ref = collect(lm, [p["text"] for p in PROMPTS], sites, layers, positions, batch_size=5, show_progress=False)
    got = collect(lm, [p["text"] for p in PROMPTS], sites, layers, positions, batch_size=5, show_progress=False,
                  engine=engine)
    for s in sites:
        a, b = got.get_all(s), ref.get_all(s)
        assert a.shape == b.shape, s
        scale = b.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-4, msg=lambda m: f"{s}: {m}")


def test_collect_shuts_down_the_engine_it_starts_and_leaves_a_given_one_running(engine, lm, monkeypatch):
    """collect(engine="vllm") starts an engine on the model's own checkpoint and dtype for the call and closes it,
    after a store and after an error alike; a running engine passed in is used and left running. The engine
    "started" here is a stand-in that records its arguments and its close() and computes with the module's engine
    (a second engine would cost its start-up); that close() ends vLLM's engine-core processes is checked on the
    embedded model in engines/test_vllm_real.py."""
    import catlens.engines.vllm as vmod
    from catlens.cache import collect

    started = []

    class Started:
        def __init__(self, spec, **kwargs):
            self.spec, self.kwargs, self.closed = spec, kwargs, False
            started.append(self)

        def __getattr__(self, name):
            return getattr(engine, name)

        def close(self):
            self.closed = True

    monkeypatch.setattr(vmod, "VLLMEngine", Started)
    texts = [p["text"] for p in PROMPTS[:4]]
    kw = {"sites": ["resid_post"], "layers": [1, 3], "positions": "last", "show_progress": False}
    got = collect(lm, texts, engine="vllm", **kw)
    assert len(started) == 1 and started[0].closed
    assert started[0].spec == lm.provenance["source"]["folder"] and started[0].kwargs == {"dtype": "float32"}
    given = collect(lm, texts, engine=engine, **kw)  # the module's running engine: used, not shut down
    assert engine.llm is not None and engine.generate(PROMPTS[:1], max_new_tokens=1, show_progress=False)
    ref = collect(lm, texts, **kw)  # catlens's own engine
    for store in (got, given):
        a, b = store.get_all("resid_post"), ref.get_all("resid_post")
        scale = b.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="sites is empty"):  # fails after the engine started: still shut down
        collect(lm, texts, engine="vllm", sites=[], show_progress=False)
    assert len(started) == 2 and started[1].closed


def test_bad_input_fails_before_any_request(engine, lm):
    before = _stats(engine)["forwards"]
    v = _vecs(lm.d_model)
    with pytest.raises(ValueError, match="out of range"):
        engine.generate(PROMPTS, Intervention("resid_post", 9, v[0]), show_progress=False)
    with pytest.raises(ValueError, match="width"):
        engine.generate(PROMPTS, Intervention("resid_post", 1, torch.ones(576)), show_progress=False)
    made_elsewhere = SteeringPolicy((Intervention("resid_post", 1, v[0]),),
                                    model={"name": "SmolLM2-135M-Instruct", "weights_sha256": "ab" * 32})
    with pytest.raises(ValueError, match="was made on model"):
        engine.generate(PROMPTS, made_elsewhere, show_progress=False)
    bad = Intervention("resid_post", 1, v[0])
    object.__setattr__(bad, "site", type(bad.site)("pattern"))  # a site no engine can steer
    with pytest.raises(ValueError, match="vLLM backend applies edits at"):
        engine.generate(PROMPTS, bad, show_progress=False)
    with pytest.raises(ValueError, match="one policy .or Intervention, or None. per prompt"):
        engine.generate(PROMPTS, [None], show_progress=False)
    with pytest.raises(ValueError, match="router kind 'fixed' needs each prompt's category"):
        engine.generate([{"id": "x", "text": "hi", "category": "cooking"}],
                        SteeringPolicy((Intervention("resid_post", 2, v, labels=CATS),), router=Router("fixed", CATS)),
                        show_progress=False)
    assert _stats(engine)["forwards"] == before  # nothing reached the engine


def test_out_folder_and_records_match_catlens_format(engine, lm, tmp_path):
    import json

    import catlens

    pol = _policies(lm.d_model)["gated_refusal_routed_p1"]
    got = engine.generate(PROMPTS[:5], pol, max_new_tokens=6, out=tmp_path / "v", show_progress=False)
    ref = catlens.generate(lm, PROMPTS[:5], pol, max_new_tokens=6, out=tmp_path / "c", show_progress=False)
    lines = [json.loads(x) for x in (tmp_path / "v" / "generations.jsonl").read_text().splitlines()]
    assert [set(x) for x in lines] == [set(json.loads(y)) for y in
                                       (tmp_path / "c" / "generations.jsonl").read_text().splitlines()]
    assert [x["id"] for x in lines] == [r["id"] for r in ref]
    again = engine.generate(PROMPTS[:5], pol, max_new_tokens=6, out=tmp_path / "v", show_progress=False)
    assert [r["token_ids"] for r in again] == [r["token_ids"] for r in got]  # read back, not regenerated
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert manifest["config"]["engine"] == "vllm"


def test_cli_generate_and_cache_write_what_the_default_engine_writes(engine, vdir, tmp_path, monkeypatch, capsys):
    import json

    import catlens.engines.vllm as vmod
    from catlens.cli import main

    monkeypatch.setattr(vmod, "VLLMEngine", lambda *a, **k: engine)  # the module's engine (no second start)
    prompts = tmp_path / "p.jsonl"
    taxonomy = {"fraud": "fraud_financial_crime", "hate": "hate_harassment", "privacy": "privacy"}  # file names
    prompts.write_text("".join(json.dumps({**p, "category": taxonomy[p["category"]]}) + "\n" for p in PROMPTS))
    pol = _policies(64)["gated_refusal_routed_p1"]
    pol.save(tmp_path / "pol")
    base = ["generate", "--model", str(vdir), "--prompts", str(prompts), "--policy", str(tmp_path / "pol"),
            "--max-new-tokens", "6"]
    assert main([*base, "--out", str(tmp_path / "c")]) == 0
    assert main([*base, "--engine", "vllm", "--out", str(tmp_path / "v")]) == 0
    capsys.readouterr()
    c = [json.loads(x) for x in (tmp_path / "c" / "responses.jsonl").read_text().splitlines()]
    v = [json.loads(x) for x in (tmp_path / "v" / "responses.jsonl").read_text().splitlines()]
    assert [set(x) for x in v] == [set(x) for x in c]
    assert _agree([x["refused"] for x in v], [x["refused"] for x in c]) >= 0.95
    assert (tmp_path / "v" / "rates.csv").read_text().splitlines()[0] == \
        (tmp_path / "c" / "rates.csv").read_text().splitlines()[0]
    cache = ["cache", "--model", str(vdir), "--prompts", str(prompts), "--sites", "resid_post,attn_out",
             "--layers", "1,3", "--positions", "-2,-1"]
    assert main([*cache, "--out", str(tmp_path / "sc")]) == 0
    assert main([*cache, "--engine", "vllm", "--out", str(tmp_path / "sv")]) == 0
    from catlens.cache import ActivationStore

    a, b = ActivationStore.load(tmp_path / "sv"), ActivationStore.load(tmp_path / "sc")
    assert a.meta["model_identity"]["engine"].startswith("vllm")
    for site in ("resid_post", "attn_out"):
        x, y = a.get_all(site), b.get_all(site)
        scale = y.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
        torch.testing.assert_close(x / scale, y / scale, rtol=0, atol=1e-4)


@pytest.mark.parametrize("mode", ["auto", "free"])
def test_special_tokens_only_at_the_first_position_like_catlens(engine, lm, mode):
    import catlens

    # the tied embedding of [refuse:fraud], added at every position of the last layer, makes it the greedy token
    tid = lm.token_id("[refuse:fraud]")
    push = lm.hf.get_input_embeddings().weight[tid].detach().float() * 60
    pol = Intervention("resid_post", 3, push, positions="all")
    ref = catlens.generate(lm, PROMPTS[:6], pol, max_new_tokens=6, special_tokens=mode, show_progress=False)
    got = engine.generate(PROMPTS[:6], pol, max_new_tokens=6, special_tokens=mode, show_progress=False)
    assert [r["token_ids"] for r in got] == [r["token_ids"] for r in ref]
    assert all(r["token_ids"][0] == tid for r in got)
    later = sum(t == tid for r in got for t in r["token_ids"][1:])
    assert (later == 0) if mode == "auto" else (later > 0)  # banned after the first position unless "free"


@pytest.mark.parametrize("kwargs, message", [({"kv_cache_gib": 0}, "whole GiB as an int"),
                                             ({"in_process": True, "tensor_parallel_size": 2}, "must be 1")])
def test_bad_engine_options_fail_before_the_engine_starts(vdir, kwargs, message):
    from catlens.engines.vllm import VLLMEngine

    with pytest.raises(ValueError, match=message):
        VLLMEngine(str(vdir), **kwargs)


def test_generate_and_judge_on_the_engine_judges_what_catlens_generate_answers(engine, lm, tmp_path):
    """P1's answers step (catlens.answers.generate_and_judge) with ``engine=``: the same rows, verdicts and tokens as
    on catlens's own loop (float32, tiny model), into the same kind of resumable folder."""
    from catlens.answers import generate_and_judge

    pol = _policies(lm.d_model)["gated_probe_routed"]
    ref = generate_and_judge(lm, PROMPTS, pol, tmp_path / "catlens", max_new_tokens=N_TOKENS, batch_size=5)
    got = generate_and_judge(lm, PROMPTS, pol, tmp_path / "vllm", max_new_tokens=N_TOKENS, engine=engine)
    assert list(got.id) == list(ref.id) and list(got.columns) == list(ref.columns)
    same = [a == b for a, b in zip(got.token_ids, ref.token_ids)]
    assert sum(same) / len(same) >= 0.9
    for col in [c for c in ref.columns if c.startswith("refused_")]:
        assert (got[col][same] == ref[col][same]).all(), col
    assert list(got.gate_flagged) == list(ref.gate_flagged)
    assert (tmp_path / "vllm" / "generations.jsonl").exists()
