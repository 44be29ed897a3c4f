"""Steering engine on the tiny random model (seconds): positions from the batch context, pads never edited, cache
and no cache steer the same tokens, batched equals unbatched per row, per-row parameters, gate and router
decisions, sites and several layers, policy files, resumable generation, bad inputs."""

import json

import pytest
import torch

from catlens.generation import generate
from catlens.steer import (
    BatchContext,
    Gate,
    Intervention,
    Router,
    SteeringPolicy,
    from_directions,
    request_vectors,
    steering,
    with_coeff,
)

PROMPTS = ["How do I bake bread?", "Tell me how to pick a lock on a door.", "Write a poem",
           "What is the capital of France and why is it famous?", "Explain vaccines."]
N = 10  # new tokens


def _gen(model, steer=None, prompts=PROMPTS, **kw):
    kw.setdefault("max_new_tokens", N)
    kw.setdefault("show_progress", False)
    return generate(model, prompts, steer, **kw)


def _toks(records):
    return [r["token_ids"] for r in records]


def _vec(model, seed=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.d_model, generator=g) * scale


# ------------------------------------------------------------------------------------------ positions
def test_position_masks_from_the_batch_context():
    # two rows, padded prompt length 4: row 0 has 4 real tokens, row 1 has 2 (two pads on the left)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    ctx = BatchContext(mask, prompt_len=4, offset=0)
    sel = {p: ctx.position_mask(p, 6).int().tolist() for p in ("all", "prompt", "generated", "last_prompt")}
    assert sel["all"] == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert sel["prompt"] == [[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]
    assert sel["generated"] == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]]
    assert sel["last_prompt"] == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert ctx.position_mask((-2,), 6).int().tolist() == [[0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    # offset 0 = the row's first real token; offsets outside a short row select nothing (never a pad)
    assert ctx.position_mask((0,), 6).int().tolist() == [[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0]]
    assert ctx.position_mask((-3,), 6).int().tolist() == [[0, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]]
    # a decode call (one position at absolute index 5) selects the same positions as the full call did
    step = BatchContext(mask, prompt_len=4, offset=5)
    for p in ("all", "prompt", "generated", "last_prompt"):
        assert step.position_mask(p, 1).int().tolist() == [[row[5]] for row in sel[p]]


@pytest.mark.parametrize("positions", ["all", "prompt", "generated", "last_prompt", (-1,), (-3, 0)])
def test_cache_and_no_cache_steer_the_same_positions_and_tokens(tiny_lm, positions):
    iv = Intervention("resid_post", 1, _vec(tiny_lm), positions=positions)
    t1, t2 = [], []
    cached = _gen(tiny_lm, iv, trace=t1, batch_size=5)
    uncached = _gen(tiny_lm, iv, trace=t2, batch_size=5, use_cache=False)
    assert _toks(cached) == _toks(uncached)
    assert set(t1) == set(t2) and t1  # the same (row, absolute position) pairs were edited
    assert len(t1) == len(set(t1))  # with a cache, each position is edited once
    assert _toks(cached) != _toks(_gen(tiny_lm, batch_size=5))  # and steering changed something


def test_pads_are_never_edited_and_every_generated_token_is(tiny_lm):
    iv = Intervention("resid_post", 2, _vec(tiny_lm), positions="all")
    trace = []
    recs = _gen(tiny_lm, iv, trace=trace, batch_size=5)
    ids, mask = tiny_lm.tokenize(tiny_lm.format(PROMPTS))  # generation sorts by length; recompute per row below
    edited = {}
    for _, b, p in trace:
        edited.setdefault(b, set()).add(p)
    lengths = sorted((len(ids_) for ids_ in [tiny_lm.tokenizer(t, add_special_tokens=False)["input_ids"]
                                             for t in tiny_lm.format(PROMPTS)]), reverse=True)
    T = max(lengths)
    by_len = sorted(recs, key=lambda r: -len(tiny_lm.format([r["prompt"]])[0]))
    for b, (n, rec) in enumerate(zip(lengths, by_len)):
        start = T - n
        expected = set(range(start, T + rec["n_new_tokens"] - 1))  # the last new token is never fed back
        assert edited[b] == expected


def test_batched_equals_unbatched_per_row_with_per_row_coefficients(tiny_lm):
    iv = Intervention("resid_post", 1, torch.stack([_vec(tiny_lm, 1), _vec(tiny_lm, 2)]), labels=("a", "b"),
                      positions="last_prompt")
    rows = {"coeff": [0.0, 1.0, 2.0, -1.5, 0.5], "direction": ["a", "b", "a", "b", "b"]}
    together = _gen(tiny_lm, iv, rows=rows, batch_size=5)
    alone = [_gen(tiny_lm, iv, prompts=[p], rows={k: [v[i]] for k, v in rows.items()})[0]
             for i, p in enumerate(PROMPTS)]
    assert _toks(together) == _toks(alone)
    assert [r["steer"]["direction"][0] for r in together] == [0, 1, 0, 1, 1]
    base = _gen(tiny_lm, batch_size=5)
    assert together[0]["token_ids"] == base[0]["token_ids"]  # the coefficient-0 row is the unsteered answer
    assert together[2]["token_ids"] != base[2]["token_ids"]


def test_coefficient_zero_and_inactive_rows_equal_the_baseline_exactly(tiny_lm):
    base = _gen(tiny_lm, batch_size=5)
    zero = _gen(tiny_lm, Intervention("resid_post", 1, _vec(tiny_lm), coeff=0.0), batch_size=5)
    assert _toks(zero) == _toks(base)
    off = _gen(tiny_lm, Intervention("attn_out", 0, _vec(tiny_lm, scale=30)), batch_size=5,
               rows={"active": [False, True, False, True, False]})
    for i in (0, 2, 4):
        assert off[i]["token_ids"] == base[i]["token_ids"]
    assert any(off[i]["token_ids"] != base[i]["token_ids"] for i in (1, 3))


def test_sites_heads_and_several_layers(tiny_lm):
    d_z = tiny_lm.n_heads * tiny_lm.d_head
    ivs = [Intervention("attn_out", 0, _vec(tiny_lm, 3)), Intervention("attn_out", 2, _vec(tiny_lm, 4)),
           Intervention("z", 1, torch.randn(d_z) * 3), Intervention("z", 3, torch.randn(tiny_lm.d_head) * 3, head=1),
           Intervention("mlp_out", 1, _vec(tiny_lm, 5)), Intervention("resid_pre", 3, _vec(tiny_lm, 6)),
           Intervention("resid_mid", 2, _vec(tiny_lm, 7))]
    trace = []
    cached = _gen(tiny_lm, ivs, trace=trace, batch_size=5)
    assert {i for i, _, _ in trace} == set(range(len(ivs)))  # every intervention edited positions
    assert _toks(cached) == _toks(_gen(tiny_lm, ivs, batch_size=5, use_cache=False))
    with steering(tiny_lm, ivs[2:4]) as s:  # per-head edit: only head 1's slice changes
        pass_ids, mask = tiny_lm.tokenize(tiny_lm.format(PROMPTS[:2]))
        with torch.inference_mode():
            tiny_lm.hf(input_ids=pass_ids, attention_mask=mask)
    assert s.report.fired == [1, 1]


def test_ablation_leaves_zero_projection_at_every_step(tiny_lm):
    v = _vec(tiny_lm)
    u = v / v.norm()
    seen = []

    def read(act, hook):
        seen.append(torch.einsum("bpd,d->bp", act.float(), u))
        return act

    iv = Intervention("resid_post", 1, v, kind="ablate", positions="all")
    with tiny_lm.bridge.hooks(fwd_hooks=[(tiny_lm.hook_name("resid_pre", 2), read)]):
        recs = _gen(tiny_lm, iv, batch_size=5)
    rendered = tiny_lm.format(PROMPTS)
    ids, mask = tiny_lm.tokenize(sorted(rendered, key=len, reverse=True))  # generate's batch order
    assert len(seen) == 2 + max(r["n_new_tokens"] for r in recs) - 1  # two prompt calls, then one per step
    prompt_part = torch.cat(seen[:2], dim=1)
    assert prompt_part[mask.bool()].abs().max() < 1e-4
    assert max(float(s.abs().max()) for s in seen[2:]) < 1e-4


def test_clamp_sets_projection_and_low_rank_identities(tiny_lm):
    v = _vec(tiny_lm)
    u = v / v.norm()
    x = torch.randn(2, 3, tiny_lm.d_model)
    mask = torch.ones(2, 3, dtype=torch.bool)
    c = torch.tensor([2.0, -1.0])
    iv = Intervention("resid_post", 0, v, kind="clamp")
    out = iv.edit(x, mask, c, torch.zeros(2, dtype=torch.long), iv.vectors, None, None, None)
    torch.testing.assert_close(out @ u, c[:, None].expand(2, 3), rtol=0, atol=1e-5)
    U, V, z = torch.randn(tiny_lm.d_model, 3), torch.randn(tiny_lm.d_model, 3), torch.randn(tiny_lm.d_model)
    lr = Intervention("resid_post", 1, kind="low_rank", U=U, V=V, z=z, positions="last_prompt")
    add = Intervention("resid_post", 1, U @ (V.T @ z), positions="last_prompt")
    assert _toks(_gen(tiny_lm, lr)) == _toks(_gen(tiny_lm, add))
    cond = Intervention("resid_post", 1, kind="low_rank", U=U * 0.1, V=V * 0.1, positions="all")  # z = activation
    out = cond.edit(x, mask, torch.ones(2), torch.zeros(2, dtype=torch.long), None, cond.U, cond.V, None)
    torch.testing.assert_close(out, x + (x @ cond.V) @ cond.U.T)


def test_norm_scaled_coefficient_equals_raw(tiny_lm):
    v = _vec(tiny_lm, scale=1.0)
    raw = Intervention("resid_post", 1, v, coeff=0.15 * 40.0)
    norm = Intervention("resid_post", 1, v, coeff=0.15, scale="norm", ref_norm=40.0)
    assert _toks(_gen(tiny_lm, raw)) == _toks(_gen(tiny_lm, norm))


# ------------------------------------------------------------------------------------- gate and router
def _gate_and_reads(model, layer=1):
    w = _vec(model, 11, 1.0)
    store = {}
    from catlens.steer import reading

    ids, mask = model.tokenize(model.format(PROMPTS))
    with reading(model, {"g": ("resid_post", layer)}, store), torch.inference_mode():
        logits = model.hf(input_ids=ids, attention_mask=mask).logits[:, -1].float()
    scores = (store["g"] @ w).tolist()
    mid = (sorted(scores)[1] + sorted(scores)[2]) / 2
    threshold = float(torch.sigmoid(torch.tensor(mid)))  # 3 rows flagged, 2 not (no row at the boundary)
    return Gate(weight=w, bias=0.0, threshold=threshold, layer=layer), scores, logits


def test_gate_decides_in_the_prefill_and_unflagged_rows_equal_baseline(tiny_lm):
    gate, scores, _ = _gate_and_reads(tiny_lm)
    iv = Intervention("resid_post", 2, _vec(tiny_lm, scale=20), positions="last_prompt")
    policy = SteeringPolicy((iv,), gate=gate, toward=1.0, away=None)
    recs = _gen(tiny_lm, policy, batch_size=5)
    base = _gen(tiny_lm, batch_size=5)
    for r, s, b in zip(recs, scores, base):
        flagged = torch.sigmoid(torch.tensor(s)) >= gate.threshold
        assert r["gate"]["flagged"] == bool(flagged)
        assert r["gate"]["score"] == pytest.approx(float(torch.sigmoid(torch.tensor(s))), abs=1e-5)
        assert r["steer"]["active"] == [bool(flagged)]
        if not flagged:
            assert r["token_ids"] == b["token_ids"] and r["gate"]["outcome"] == "none"
    assert sum(r["gate"]["flagged"] for r in recs) == 3
    assert any(r["token_ids"] != b["token_ids"] for r, b in zip(recs, base) if r["gate"]["flagged"])
    # toward/away with signs: the away rows get the away coefficient
    signed = _gen(tiny_lm, SteeringPolicy((iv,), gate=gate, toward=1.0, away=-2.0), batch_size=5)
    assert [r["steer"]["coeff"][0] for r in signed] == [1.0 if r["gate"]["flagged"] else -2.0 for r in signed]


def test_router_from_refusal_tokens_and_from_a_probe(tiny_lm):
    cats = ("fraud", "hate", "privacy")
    vecs = torch.stack([_vec(tiny_lm, s) for s in (1, 2, 3)])
    iv = Intervention("resid_post", 1, vecs, labels=cats, positions="last_prompt")
    recs = _gen(tiny_lm, SteeringPolicy((iv,), router=Router("refusal_tokens", cats)), batch_size=5)
    base = _gen(tiny_lm, batch_size=5)
    for r, b in zip(recs, base):  # the router reads the unsteered first-position probabilities
        probs = {c: b["first_probs"][f"[refuse:{c}]"] for c in cats}
        assert r["route"]["category"] == max(probs, key=probs.get)
        assert r["steer"]["direction"] == [cats.index(r["route"]["category"])]
    # a probe router planted to pick by the sign of one coordinate
    W = torch.zeros(3, tiny_lm.d_model)
    W[0, 0], W[1, 0] = 1.0, -1.0
    W[2, 1] = 1e-3
    probe = Router("probe", cats, weight=W, bias=torch.zeros(3), layer=1)
    routed = _gen(tiny_lm, SteeringPolicy((iv,), router=probe), batch_size=5)
    _, _, _ = _gate_and_reads(tiny_lm)
    from catlens.steer import reading

    store = {}
    ids, mask = tiny_lm.tokenize(tiny_lm.format(PROMPTS))
    with reading(tiny_lm, {"r": ("resid_post", 1)}, store), torch.inference_mode():
        tiny_lm.hf(input_ids=ids, attention_mask=mask)
    expect = [cats[int(i)] for i in (store["r"] @ W.T).argmax(1)]
    assert [r["route"]["category"] for r in routed] == expect
    fixed = _gen(tiny_lm, SteeringPolicy((iv,), router=Router("fixed", cats)),
                 prompts=[{"id": str(i), "text": p, "category": cats[i % 3]} for i, p in enumerate(PROMPTS)])
    assert [r["route"]["category"] for r in fixed] == [cats[i % 3] for i in range(5)]


def test_gated_and_routed_generation_is_batch_invariant(tiny_lm):
    gate, _, _ = _gate_and_reads(tiny_lm)
    cats = ("fraud", "hate", "privacy")
    iv = Intervention("resid_post", 2, torch.stack([_vec(tiny_lm, s, 10) for s in (1, 2, 3)]), labels=cats,
                      positions="last_prompt")
    policy = SteeringPolicy((iv,), gate=gate, router=Router("refusal_tokens", cats), toward=1.0, away=-1.0)
    together = _gen(tiny_lm, policy, batch_size=5)
    alone = [_gen(tiny_lm, policy, prompts=[p])[0] for p in PROMPTS]
    assert _toks(together) == _toks(alone)
    assert [r["route"] for r in together] == [r["route"] for r in alone] or all(
        a["route"]["category"] == b["route"]["category"] for a, b in zip(together, alone))
    assert _toks(_gen(tiny_lm, policy, batch_size=5, use_cache=False)) == _toks(together)


# --------------------------------------------------------------------------------------- hooks, files
def test_hooks_are_removed_after_an_exception_inside_generate(tiny_lm, monkeypatch):
    import catlens.generation as gen

    calls = {"n": 0}
    real = gen._pick

    def boom(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "_pick", boom)
    with pytest.raises(KeyboardInterrupt):
        _gen(tiny_lm, Intervention("resid_post", 1, _vec(tiny_lm)))
    assert not tiny_lm.bridge.list_hooks()
    with pytest.raises(RuntimeError, match="never fired"):
        with steering(tiny_lm, Intervention("resid_post", 1, _vec(tiny_lm))):
            pass
    assert not tiny_lm.bridge.list_hooks()


def test_policy_round_trip_and_tamper_detection(tiny_lm, tmp_path):
    gate, _, _ = _gate_and_reads(tiny_lm)
    cats = ("fraud", "hate", "privacy")
    W = torch.randn(3, tiny_lm.d_model)
    policy = SteeringPolicy(
        (Intervention("resid_post", 2, torch.randn(3, tiny_lm.d_model), labels=cats, positions="last_prompt",
                      scale="norm", ref_norm=12.5, coeff=0.2),
         Intervention("attn_out", 1, kind="low_rank", U=torch.randn(tiny_lm.d_model, 2),
                      V=torch.randn(tiny_lm.d_model, 2), positions=(-2, -1))),
        gate=gate, router=Router("probe", cats, weight=W, bias=torch.zeros(3), layer=3), toward=0.2, away=-0.3,
        name="p", meta={"chosen_on": "val"})
    path = policy.save(tmp_path / "pol")
    loaded = SteeringPolicy.load(path)
    assert loaded.same_as(policy)
    assert _toks(_gen(tiny_lm, loaded)) == _toks(_gen(tiny_lm, policy))
    assert _toks(_gen(tiny_lm, str(path))) == _toks(_gen(tiny_lm, policy))  # a folder path is a policy too
    with pytest.raises(FileExistsError, match="overwrite"):
        policy.save(path)
    raw = bytearray((path / "tensors.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (path / "tensors.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="checksum"):
        SteeringPolicy.load(path)


def test_policy_made_on_another_model_is_refused(tiny_lm, tmp_path):
    from catlens.steer import model_fingerprint

    fp = model_fingerprint(tiny_lm) | {"name": "other-model", "weights_sha256": "0" * 64}
    policy = SteeringPolicy((Intervention("resid_post", 1, _vec(tiny_lm)),), model=fp)
    with pytest.raises(ValueError, match="allow_transfer"):
        _gen(tiny_lm, policy)
    assert _toks(_gen(tiny_lm, policy, allow_transfer=True)) == _toks(_gen(tiny_lm, policy.__class__(
        policy.interventions)))


def _interrupted(model, iv, out, monkeypatch):
    """A batch-2 generation into ``out`` interrupted at its second batch (the first batch's records are kept)."""
    import catlens.generation as gen

    real = gen._generate_batch
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gen, "_generate_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        _gen(model, iv, batch_size=2, out=out)
    monkeypatch.setattr(gen, "_generate_batch", real)


def test_generation_resumes_to_the_same_file(tiny_lm, tmp_path, monkeypatch):
    import catlens.generation as gen

    iv = Intervention("resid_post", 1, _vec(tiny_lm), positions="last_prompt")
    whole = _gen(tiny_lm, iv, batch_size=2, out=tmp_path / "a")
    _interrupted(tiny_lm, iv, tmp_path / "b", monkeypatch)
    assert len((tmp_path / "b" / "generations.partial.jsonl").read_text().splitlines()) == 2
    again = _gen(tiny_lm, iv, batch_size=2, out=tmp_path / "b")
    assert (tmp_path / "a" / "generations.jsonl").read_bytes() == (tmp_path / "b" / "generations.jsonl").read_bytes()
    assert _toks(again) == _toks(whole)
    lines = [json.loads(x) for x in (tmp_path / "a" / "generations.jsonl").read_text().splitlines()]
    assert [r["id"] for r in lines] == [r["id"] for r in whole]
    with pytest.raises(FileExistsError, match="other settings"):
        _gen(tiny_lm, iv, batch_size=2, out=tmp_path / "a", max_new_tokens=3)
    # a finished folder is read back, never generated again
    monkeypatch.setattr(gen, "_generate_batch", lambda *a, **k: pytest.fail("a finished generation ran again"))
    assert _toks(_gen(tiny_lm, iv, batch_size=2, out=tmp_path / "a")) == _toks(whole)


def test_an_interrupted_folder_from_before_the_dtype_was_recorded_resumes(tiny_lm, tmp_path, monkeypatch, caplog):
    """A folder whose config lacks the model's dtype and device (made before they were recorded) resumes as the
    caller's, with a warning, and finishes with the same file as an uninterrupted run; a folder recording another
    dtype is refused."""
    import catlens.generation as gen

    iv = Intervention("resid_post", 1, _vec(tiny_lm), positions="last_prompt")
    _gen(tiny_lm, iv, batch_size=2, out=tmp_path / "a")
    _interrupted(tiny_lm, iv, tmp_path / "b", monkeypatch)
    real = gen._generate_batch
    manifest = tmp_path / "b" / "manifest.json"
    m = json.loads(manifest.read_text())
    assert m["config"]["dtype"] == str(tiny_lm.dtype) and m["config"]["device"] == str(tiny_lm.device)
    other = {**m, "config": {**m["config"], "dtype": "torch.bfloat16"}}
    manifest.write_text(json.dumps(other))
    with pytest.raises(FileExistsError, match="dtype differ"):
        _gen(tiny_lm, iv, batch_size=2, out=tmp_path / "b")
    old = {**m, "config": {k: v for k, v in m["config"].items() if k not in ("dtype", "device")}}
    manifest.write_text(json.dumps(old))
    done = len((tmp_path / "b" / "generations.partial.jsonl").read_text().splitlines())
    generated = []
    monkeypatch.setattr(gen, "_generate_batch", lambda model, batch, *a, **k: generated.append(len(batch))
                        or real(model, batch, *a, **k))
    with caplog.at_level("WARNING", logger="catlens.generation"):
        _gen(tiny_lm, iv, batch_size=2, out=tmp_path / "b")
    assert "before catlens recorded the model's dtype and device" in caplog.text
    assert (tmp_path / "a" / "generations.jsonl").read_bytes() == (tmp_path / "b" / "generations.jsonl").read_bytes()
    assert done == 2 and sum(generated) == len(PROMPTS) - done  # only the prompts the interruption left


def test_sampling_is_seeded_per_prompt(tiny_lm):
    items = [{"id": f"p{i}", "text": t} for i, t in enumerate(PROMPTS)]  # the seed follows the prompt id
    a = _gen(tiny_lm, prompts=items, sample=True, seed=3, batch_size=5)
    b = [_gen(tiny_lm, prompts=[it], sample=True, seed=3)[0] for it in items]
    c = _gen(tiny_lm, prompts=items, sample=True, seed=4, batch_size=5)
    assert _toks(a) == _toks(b)
    assert _toks(a) != _toks(c)


def test_from_directions_and_request_vectors(tiny_lm):
    from catlens.directions import Directions

    vecs = torch.randn(3, 2, tiny_lm.d_model)
    d = Directions(vecs, ("fraud", "hate", "privacy"), (1, 2), site="resid_post")
    ivs = from_directions(d, [2], coeff=2.0, positions="last_prompt")
    assert ivs[0].labels == ("fraud", "hate", "privacy") and torch.equal(ivs[0].vectors, vecs[:, 1])
    policy = SteeringPolicy(tuple(ivs), router=Router("refusal_tokens", ("fraud", "hate", "privacy")))
    recs = _gen(tiny_lm, policy, batch_size=5)
    compiled = request_vectors(policy, [r["steer"] for r in recs])
    for r, c in zip(recs, compiled):
        k = r["steer"]["direction"][0]
        torch.testing.assert_close(torch.tensor(c["interventions"][0]["vector"]), 2.0 * vecs[k, 1])
    assert with_coeff(policy, 0.5).interventions[0].coeff == 0.5


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("make, exc, match", [
    (lambda d: Intervention("resid_post", 1, torch.ones(d), kind="multiply"), ValueError, "Allowed: ablate"),
    (lambda d: Intervention("resid_pots", 1, torch.ones(d)), ValueError, "Did you mean: resid_post"),
    (lambda d: Intervention("resid_post", 1, torch.ones(d), positions="first"), ValueError, "last_prompt"),
    (lambda d: Intervention("resid_post", 1, torch.ones(d), positions="last"), ValueError, "renamed"),
    (lambda d: Intervention("resid_post", 1, torch.ones(d), coeff=float("nan")), ValueError, "not finite"),
    (lambda d: Intervention("resid_post", 1, torch.ones(d), coeff=float("inf")), ValueError, "not finite"),
    (lambda d: Intervention("resid_post", 1, torch.ones(d), coeff="2"), TypeError, "coeff"),
    (lambda d: Intervention("resid_post", 1, torch.zeros(d), kind="ablate"), ValueError, "non-zero"),
    (lambda d: Intervention("resid_post", 1, torch.tensor([1.0, float("nan")])), ValueError, "NaN"),
    (lambda d: Intervention("resid_post", 1, torch.ones(d), scale="norm"), ValueError, "ref_norm"),
    (lambda d: Intervention("resid_post", 1, torch.ones(2, d), labels=("a",)), ValueError, "one label"),
    (lambda d: Intervention("pattern", 1, torch.ones(d)), ValueError, "cannot be steered"),
    (lambda d: Intervention("resid_post", 1, torch.ones(d), head=0), ValueError, "only meaningful"),
    (lambda d: Intervention("resid_post", 1, kind="low_rank", U=torch.ones(d, 2)), ValueError, "U and V"),
    (lambda d: Gate(torch.ones(d), 0.0, 1.5, 1), ValueError, "threshold"),
    (lambda d: Router("probes", ("a",)), ValueError, "Did you mean: probe"),
    (lambda d: SteeringPolicy((Intervention("resid_post", 1, torch.ones(d)),), toward=1.0), ValueError, "need a gate"),
    (lambda d: SteeringPolicy((Intervention("resid_post", 1, torch.ones(2, d), labels=("a", "b")),),
                              router=Router("refusal_tokens", ("a", "c"))), ValueError, r"\['c'\]"),
])
def test_bad_specs(tiny_lm, make, exc, match):
    with pytest.raises(exc, match=match):
        make(tiny_lm.d_model)


def test_bad_inputs_against_the_model(tiny_lm, tmp_path):
    d = tiny_lm.d_model
    with pytest.raises(ValueError, match="width 4"):
        _gen(tiny_lm, Intervention("resid_post", 1, torch.ones(4)), out=tmp_path / "x")
    with pytest.raises(ValueError, match="out of range"):
        _gen(tiny_lm, Intervention("resid_post", 99, torch.ones(d)), out=tmp_path / "x")
    with pytest.raises(ValueError, match="width 7"):
        _gen(tiny_lm, SteeringPolicy((Intervention("resid_post", 1, torch.ones(d)),),
                                     gate=Gate(torch.ones(7), 0.0, 0.5, 1), toward=1.0), out=tmp_path / "x")
    iv = Intervention("resid_post", 1, torch.ones(2, d), labels=("fraud", "hate"))
    with pytest.raises(ValueError, match="Did you mean: fraud"):
        _gen(tiny_lm, iv, rows={"direction": ["frud"] * 5}, out=tmp_path / "x")
    with pytest.raises(ValueError, match="one per prompt"):
        _gen(tiny_lm, iv, rows={"coeff": [1.0]}, out=tmp_path / "x")
    with pytest.raises(ValueError, match="empty"):
        _gen(tiny_lm, prompts=["ok", "  "], out=tmp_path / "x")
    with pytest.raises(ValueError, match="no prompts"):
        _gen(tiny_lm, prompts=[], out=tmp_path / "x")
    with pytest.raises(ValueError, match="max_new_tokens"):
        _gen(tiny_lm, max_new_tokens=0, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()  # nothing written for bad input
