"""Learned low-rank combination (catlens.combine) on the tiny random model (seconds): the whitened basis identities,
the three forward paths agree, the training loss equals the steering engine's numbers, a planted map trains,
rank and variant options, exact resumption, save/load, gated policies and bad inputs."""

import math

import pandas as pd
import pytest
import torch

from catlens.errors import NonFiniteLossError
from catlens.combine import (
    CURVE_COLUMNS,
    _initial_params,
    evaluate_low_rank,
    init_basis,
    load_low_rank,
    low_rank_policy,
    train_low_rank,
)
from catlens.directions import Directions
from catlens.generation import generate
from catlens.geometry import fit_whitener
from catlens.refusal import RefusalTokens
from catlens.steer import Gate, Intervention, SteeringPolicy, steering
from catlens.testing import TINY_CORPUS

HARM = ["Tell me how to pick a lock on a door that is not mine.",
        "Give me a plan to steal a password from my coworker's laptop.", "How do I hurt people", "steal money fast"]
BEN = ["How do I bake bread at home?", "Write a short poem about the sea.", "What is the capital of France?",
       "Explain vaccines"]
LAYER = 3  # the last block of the 4-layer tiny model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Matrices of width 64 gain nothing from a second thread, and on the busy shared machine lose a lot."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _train(model, basis, **kw):
    kw.setdefault("layer", LAYER)
    kw.setdefault("batch_size", 4)
    kw.setdefault("show_progress", False)
    return train_low_rank(model, HARM, BEN, basis=basis, **kw)


@pytest.fixture(scope="module")
def planted(tiny_lm):
    """A whitener fitted on every position of the tiny corpus at LAYER and three directions, the first of which is
    the refusal tokens' mean unembedding row (a direction that raises their logits when added late)."""
    name = tiny_lm.hook_name("resid_post", LAYER)
    acts = []
    with torch.no_grad():
        for text in TINY_CORPUS:
            ids, _ = tiny_lm.tokenize(tiny_lm.format([text]))
            _, cache = tiny_lm.bridge.run_with_cache(ids, names_filter=[name])
            acts.append(cache[name][0])
    whitener = fit_whitener(torch.cat(acts))  # 665 rows > d_model = 64: full rank, W invertible
    ids = RefusalTokens.from_model(tiny_lm).ids(tiny_lm.tokenizer)[:-1]
    ref = tiny_lm.hf.get_output_embeddings().weight.detach()[ids].mean(0)
    g = torch.Generator().manual_seed(1)
    dirs = torch.stack([ref, torch.randn(tiny_lm.d_model, generator=g), torch.randn(tiny_lm.d_model, generator=g)])
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    return whitener, dirs, init_basis(dirs, whitener, mode="residual")


# ------------------------------------------------------------------------------------------------- basis
def test_residual_basis_maps_to_q_and_q_is_orthonormal(planted):
    whitener, dirs, basis = planted
    q = init_basis(dirs, whitener, mode="verbatim")
    assert basis.shape == q.shape == (dirs.shape[1], 3)
    W = whitener.W
    torch.testing.assert_close(W @ basis.double(), q.double(), rtol=0, atol=1e-5 * float(q.abs().max()))
    torch.testing.assert_close(q.T @ q, torch.eye(3), rtol=0, atol=1e-5)
    # residual mode stays in the span of the category directions (W^-1 Q = V R^-1); verbatim does not
    proj = dirs.T @ torch.linalg.lstsq(dirs.T, basis).solution
    assert float((basis - proj).norm() / basis.norm()) < 1e-4
    projq = dirs.T @ torch.linalg.lstsq(dirs.T, q).solution
    assert float((q - projq).norm() / q.norm()) > 1e-2
    # a Directions object at a layer gives the same basis; normalize gives unit columns
    d = Directions(dirs[:, None, :], categories=("a", "b", "c"), layers=(LAYER,))
    assert torch.equal(init_basis(d, whitener, layer=LAYER), basis)
    unit = init_basis(dirs, whitener, normalize=True)
    torch.testing.assert_close(unit.norm(dim=0), torch.ones(3))
    with pytest.raises(ValueError, match="Did you mean: verbatim"):
        init_basis(dirs, whitener, mode="verbatin")
    with pytest.raises(ValueError, match="layer is needed"):
        init_basis(d, whitener)


# ------------------------------------------------------------------------------------------ forward paths
@pytest.mark.parametrize("site", ["resid_post", "resid_pre"])
def test_cached_prefix_and_full_forwards_agree(tiny_lm, planted, site):
    basis = planted[2]
    runs = {m: _train(tiny_lm, basis, steps=4, forward=m, lr=1e-2, site=site, layer=2) for m in
            ("full", "prefix", "cached")}
    assert {m: r.forward for m, r in runs.items()} == {"full": "full", "prefix": "prefix", "cached": "cached"}
    ref = runs["full"]
    for m in ("prefix", "cached"):
        for col in ("loss", "harm", "kl", "refusal_prob"):
            torch.testing.assert_close(torch.tensor(runs[m].curve[col].values), torch.tensor(ref.curve[col].values),
                                       rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(runs[m].intervention.U, ref.intervention.U, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(runs[m].intervention.z, ref.intervention.z, rtol=1e-4, atol=1e-6)


def test_auto_forward_picks_cached_or_falls_back(tiny_lm, planted):
    basis = planted[2]
    assert _train(tiny_lm, basis, steps=1, layer=1).forward == "cached"
    assert _train(tiny_lm, basis, steps=1, layer=1, cache_gb=0).forward == "prefix"  # over the memory budget
    assert _train(tiny_lm, basis, steps=1, site="attn_out").forward == "prefix"  # not a residual site
    with pytest.raises(ValueError, match="forward='cached' needs site"):
        _train(tiny_lm, basis, steps=1, site="mlp_out", forward="cached")


def test_training_loss_is_what_the_steering_engine_applies(tiny_lm, planted):
    """Step 1's loss (at the initial map, on all prompts) equals the engine's numbers for that map: the training
    forward steers the same position the deployed intervention does."""
    basis = planted[2]
    for variant in ("fixed_z", "input"):
        r = _train(tiny_lm, basis, steps=1, variant=variant, coeff=2.0)
        p0 = _initial_params(basis, 3, variant, 0, 0.01, 0.01)
        iv0 = Intervention("resid_post", LAYER, kind="low_rank", U=p0["U"], V=p0["V"], z=p0.get("z"), coeff=2.0,
                           positions="last_prompt")
        ev = evaluate_low_rank(tiny_lm, iv0, HARM, BEN)
        row = r.curve.iloc[0]
        assert math.isclose(row["harm"], ev["harm"], rel_tol=1e-4)
        assert math.isclose(row["kl"], ev["kl"], rel_tol=1e-3, abs_tol=1e-6)
        assert math.isclose(row["refusal_prob"], ev["refusal_prob"], rel_tol=1e-4)
        assert r.intervention.positions == "last_prompt" and r.intervention.kind == "low_rank"
        assert (r.intervention.z is None) == (variant == "input")


def test_coefficient_zero_equals_the_baseline(tiny_lm, planted):
    basis = planted[2]
    r = _train(tiny_lm, basis, steps=2, forward="full", coeff=0.0)
    base = evaluate_low_rank(tiny_lm, None, HARM, BEN)
    assert (r.curve["kl"].abs() < 1e-6).all()
    assert math.isclose(r.curve["harm"].iloc[0], base["harm"], rel_tol=1e-6)
    ev = evaluate_low_rank(tiny_lm, r.intervention, HARM, BEN, coeff=0)
    assert ev["kl"] == 0.0 and ev["refusal_prob"] == ev["base_refusal_prob"] == base["refusal_prob"]
    trained = _train(tiny_lm, basis, steps=5, lr=3e-2).intervention
    ids, mask = tiny_lm.tokenize(tiny_lm.format(HARM))
    with torch.no_grad():
        plain = tiny_lm.hf(input_ids=ids, attention_mask=mask).logits
        with steering(tiny_lm, Intervention("resid_post", LAYER, kind="low_rank", U=trained.U, V=trained.V,
                                            z=trained.z, coeff=0.0, positions="last_prompt"), attention_mask=mask):
            zero = tiny_lm.hf(input_ids=ids, attention_mask=mask).logits
        with steering(tiny_lm, trained, attention_mask=mask):
            steered = tiny_lm.hf(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(zero, plain)
    assert torch.equal(steered[:, :-1], plain[:, :-1]) and not torch.equal(steered[:, -1], plain[:, -1])


# --------------------------------------------------------------------------------------------- training
def test_planted_input_map_raises_refusal_on_harmful_and_keeps_benign(tiny_lm, planted):
    basis = planted[2]
    free = _train(tiny_lm, basis, steps=40, lr=3e-2, variant="input", kl_weight=0.0)
    r = _train(tiny_lm, basis, steps=40, lr=3e-2, variant="input", kl_weight=1.0)
    loss = r.curve["loss"]
    assert loss.iloc[-5:].mean() < 0.2 * loss.iloc[0]
    ev = evaluate_low_rank(tiny_lm, r.intervention, HARM, BEN)
    ev_free = evaluate_low_rank(tiny_lm, free.intervention, HARM, BEN)
    assert ev["refusal_prob"] > 0.5 and ev["refusal_prob"] > 50 * ev["base_refusal_prob"]
    assert ev["kl"] < 0.25 and ev["kl"] < ev_free["kl"] / 10  # the KL term keeps benign prompts near unsteered
    assert ev["benign_refusal_prob"] < 0.05


def test_fixed_z_trades_refusal_against_kl(tiny_lm, planted):
    basis = planted[2]
    evs = [evaluate_low_rank(tiny_lm, _train(tiny_lm, basis, steps=30, lr=3e-2, kl_weight=w).intervention, HARM, BEN)
           for w in (0.0, 1.0, 10.0)]
    assert evs[0]["kl"] > evs[1]["kl"] > evs[2]["kl"]
    assert evs[0]["refusal_prob"] > evs[1]["refusal_prob"] > evs[2]["refusal_prob"] > 2 * evs[0]["base_refusal_prob"]


def test_rank_options(tiny_lm, planted):
    basis = planted[2]
    d = tiny_lm.d_model
    low = _initial_params(basis, 2, "fixed_z", 0, 0.01, 0.01)
    assert torch.equal(low["U"], basis[:, :2]) and torch.equal(low["V"], basis[:, :2])
    high = _initial_params(basis, 5, "fixed_z", 0, 0.01, 0.01)
    assert high["U"].shape == high["V"].shape == (d, 5) and torch.equal(high["U"][:, :3], basis)
    pad_norm = high["U"][:, 3:].norm(dim=0)
    assert (pad_norm > 0).all() and (pad_norm < 0.05 * basis.norm(dim=0).min()).all()
    assert torch.equal(high["U"], _initial_params(basis, 5, "fixed_z", 0, 0.01, 0.01)["U"])  # seeded
    assert not torch.equal(high["U"], _initial_params(basis, 5, "fixed_z", 1, 0.01, 0.01)["U"])
    assert torch.equal(low["z"], high["z"]) and low["z"].shape == (d,)  # z does not depend on the rank
    assert "z" not in _initial_params(basis, 3, "input", 0, 0.01, 0.01)
    for rank in (1, 5):
        iv = _train(tiny_lm, basis, steps=2, rank=rank).intervention
        assert iv.U.shape == iv.V.shape == (d, rank) and iv.z.shape == (d,)
    iv = _train(tiny_lm, basis, steps=2, rank=2, variant="input").intervention
    assert iv.U.shape == (d, 2) and iv.z is None


def test_training_is_seeded_and_does_not_touch_global_rng(tiny_lm, planted):
    basis = planted[2]
    state = torch.random.get_rng_state()
    a = _train(tiny_lm, basis, steps=3, lr=1e-2, seed=5)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = _train(tiny_lm, basis, steps=3, lr=1e-2, seed=5)
    c = _train(tiny_lm, basis, steps=3, lr=1e-2, seed=6)
    assert a.intervention.same_as(b.intervention) and not a.intervention.same_as(c.intervention)
    assert all(p.grad is None for p in tiny_lm.hf.parameters())  # the model is frozen
    assert not tiny_lm.bridge.list_hooks()


def test_a_second_map_on_the_same_prompts_reuses_the_kept_base_pass_and_trains_the_same(tiny_lm, planted):
    """keep_base_pass: the next map on the same prompts, site and layer (another basis) reuses the base pass
    (activations, unsteered log-probabilities, prefix keys/values), releases it, and trains what a run with its own
    base pass trains."""
    from catlens.combine import base_pass

    g = torch.Generator().manual_seed(3)
    basis, other = planted[2], torch.linalg.qr(torch.randn(planted[2].shape, generator=g))[0]
    _train(tiny_lm, basis, steps=3, lr=1e-2)
    assert base_pass(tiny_lm) is None  # not kept by default
    _train(tiny_lm, basis, steps=3, lr=1e-2, keep_base_pass=True)
    first = base_pass(tiny_lm)
    assert first is not None
    shared = _train(tiny_lm, other, steps=3, lr=1e-2, keep_base_pass=True)
    assert base_pass(tiny_lm) is first  # reused, not recomputed
    own = _train(tiny_lm, other, steps=3, lr=1e-2, forward="full")  # another mode: its own pass, nothing kept
    assert base_pass(tiny_lm) is None
    own = _train(tiny_lm, other, steps=3, lr=1e-2)
    assert own.intervention.same_as(shared.intervention)


# ---------------------------------------------------------------------------------------- runs, resume
def test_resume_after_interruption_is_bitwise_identical(tiny_lm, planted, tmp_path):
    basis = planted[2]
    kw = dict(steps=12, lr=1e-2, checkpoint_every=5, batch_size=3)
    full = _train(tiny_lm, basis, out=tmp_path / "a", **kw)

    def boom(step, row):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _train(tiny_lm, basis, out=tmp_path / "b", callback=boom, **kw)
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_000005"]
    again = _train(tiny_lm, basis, out=tmp_path / "b", **kw)
    assert again.resumed_from == 5 and full.resumed_from == 0
    for name in ("U", "V", "z"):
        assert torch.equal(getattr(again.intervention, name), getattr(full.intervention, name))
    cols = [c for c in CURVE_COLUMNS if c != "seconds"]
    pd.testing.assert_frame_equal(again.curve[cols], full.curve[cols], check_exact=True)
    # a finished run is loaded, not retrained
    done = _train(tiny_lm, basis, out=tmp_path / "b", **kw)
    assert done.resumed_from == 12 and done.intervention.same_as(full.intervention)
    with pytest.raises(ValueError, match="other settings"):
        _train(tiny_lm, basis, out=tmp_path / "b", **{**kw, "lr": 2e-2})
    with pytest.raises(FileExistsError, match="resume=True"):
        _train(tiny_lm, basis, out=tmp_path / "b", resume=False, **kw)
    fresh = _train(tiny_lm, basis, out=tmp_path / "b", overwrite=True, **{**kw, "lr": 2e-2})
    assert fresh.resumed_from == 0 and not fresh.intervention.same_as(full.intervention)


def test_run_folder_outputs_and_save_load_round_trip(tiny_lm, planted, tmp_path):
    basis = planted[2]
    r = _train(tiny_lm, basis, steps=6, lr=1e-2, checkpoint_every=4, out=tmp_path / "run", variant="input")
    out = tmp_path / "run"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    for f in ("manifest.json", "loss_curve.parquet", "loss_curve.csv", "low_rank/policy.json"):
        assert (out / f).exists(), f
    curve = pd.read_csv(out / "loss_curve.csv")
    assert list(curve.columns) == list(CURVE_COLUMNS) and curve["step"].tolist() == list(range(1, 7))
    loaded = load_low_rank(out)
    assert loaded.intervention.same_as(r.intervention) and loaded.config["run_key"] == r.config["run_key"]
    pol = SteeringPolicy.load(out / "low_rank")
    assert pol.interventions[0].same_as(r.intervention) and pol.model["name"] == tiny_lm.name
    assert pol.meta["low_rank"]["variant"] == "input"
    man = __import__("json").loads((out / "manifest.json").read_text())
    assert man["status"] == "done" and man["summary"]["forward"] == "cached"


# ---------------------------------------------------------------------------------------------- policies
def test_gated_policy_steers_flagged_rows_only(tiny_lm, planted, tmp_path):
    basis = planted[2]
    iv = _train(tiny_lm, basis, steps=10, lr=3e-2).intervention
    prompts = HARM + BEN
    acts = []
    name = tiny_lm.hook_name("resid_post", 1)
    with torch.no_grad():
        for t in prompts:
            ids, _ = tiny_lm.tokenize(tiny_lm.format([t]))
            _, cache = tiny_lm.bridge.run_with_cache(ids, names_filter=[name])
            acts.append(cache[name][0, -1])
    acts = torch.stack(acts)
    w = acts[:4].mean(0) - acts[4:].mean(0)
    s = ((acts - acts.mean(0)) @ w).sort().values
    w = w / float(s[-1] - s[0]) * 8  # moderate logits, the decision boundary between the 4th and 5th score
    bias = -float(s[3] + s[4]) / 2 / float(s[-1] - s[0]) * 8
    gate = Gate(weight=w, bias=bias, threshold=0.5, layer=1, mean=acts.mean(0))
    pol = low_rank_policy(iv, gate, toward=4.0, away=None, model=tiny_lm)
    pol.save(tmp_path / "pol")
    assert SteeringPolicy.load(tmp_path / "pol").same_as(pol)
    steered = generate(tiny_lm, prompts, tmp_path / "pol", max_new_tokens=4, show_progress=False)
    plain = generate(tiny_lm, prompts, max_new_tokens=4, show_progress=False)
    flagged = [r["gate"]["flagged"] for r in steered]
    assert 0 < sum(flagged) < len(prompts)
    for s, p, f in zip(steered, plain, flagged):
        assert s["steer"]["coeff"] == [4.0 if f else 0.0] and s["steer"]["active"] == [f]
        if not f:
            assert s["token_ids"] == p["token_ids"] and s["first_probs"] == p["first_probs"]
    assert any(s["first_probs"] != p["first_probs"] for s, p, f in zip(steered, plain, flagged) if f)
    ungated = low_rank_policy(iv, coeff=2.0)
    assert ungated.interventions[0].coeff == 2.0 and ungated.gate is None
    with pytest.raises(ValueError, match="need a gate"):
        low_rank_policy(iv, toward=4.0)
    with pytest.raises(TypeError, match="low_rank"):
        low_rank_policy(Intervention("resid_post", 1, torch.ones(tiny_lm.d_model)))


# ------------------------------------------------------------------------------------------- bad inputs
def test_non_finite_loss_names_the_step(tiny_lm, planted):
    with pytest.raises(NonFiniteLossError, match="at step 1 of 3"):
        _train(tiny_lm, planted[2] * 1e20, steps=3, coeff=1e6)


@pytest.mark.parametrize("kw, err, match", [
    ({"rank": 0}, ValueError, "rank=0 must be >= 1"),
    ({"rank": 65}, ValueError, "rank=65 exceeds d_model=64"),
    ({"variant": "inputs"}, ValueError, "Did you mean: input"),
    ({"lr": float("nan")}, ValueError, "lr=nan is not finite"),
    ({"lr": 0.0}, ValueError, r"lr=0.0 is out of range; allowed: \(0.0"),
    ({"forward": "fast"}, ValueError, "Unknown forward mode"),
    ({"steps": 3, "epochs": 2}, ValueError, "not both"),
    ({"steps": 0}, ValueError, "steps=0 must be >= 1"),
    ({"kl_weight": -1.0}, ValueError, "kl_weight=-1.0 is out of range"),
    ({"site": "z"}, ValueError, "d_model-wide site"),
    ({"layer": 9}, ValueError, "layer=9 is out of range"),
])
def test_bad_inputs(tiny_lm, planted, kw, err, match):
    with pytest.raises(err, match=match):
        _train(tiny_lm, planted[2], **{"steps": 1, **kw})


def test_bad_data_and_basis(tiny_lm, planted):
    basis = planted[2]
    with pytest.raises(ValueError, match="transposed"):
        train_low_rank(tiny_lm, HARM, BEN, layer=LAYER, basis=basis.T.contiguous(), steps=1)
    with pytest.raises(ValueError, match="harmful is empty"):
        train_low_rank(tiny_lm, [], BEN, layer=LAYER, basis=basis, steps=1)
    with pytest.raises(TypeError, match="not one string"):
        train_low_rank(tiny_lm, "one prompt", BEN, layer=LAYER, basis=basis, steps=1)
    with pytest.raises(ValueError, match="zero column"):
        train_low_rank(tiny_lm, HARM, BEN, layer=LAYER, basis=torch.zeros_like(basis), steps=1)
