"""The explorer (catlens explore): its logic without a browser (bad input becomes a message, coefficient 0 is the
unsteered answer, a large coefficient changes it, a newer request cancels an older one and an older result never
replaces a newer one), generate's should_stop hook, and the page in a real headless Chromium (skipped, with the
reason, without one). CATLENS_SCREENSHOT=docs/explorer.png saves the browser test's page."""

import os
import threading
import time

import numpy as np
import pytest
import torch

pytest.importorskip("dash", reason="the explorer needs dash (pip install -e '.[dev]')")

from catlens import explore as E  # noqa: E402
from catlens.browser import browser_unavailable, chromium_executable, headless_chromium, page_errors  # noqa: E402
from catlens.cli import main as cli_main  # noqa: E402
from catlens.errors import GenerationCancelled  # noqa: E402
from catlens.generation import generate  # noqa: E402

CHROMIUM = chromium_executable()
_NO_BROWSER = browser_unavailable(CHROMIUM)
browser = pytest.mark.browser(pytest.mark.skipif(_NO_BROWSER is not None, reason=_NO_BROWSER or ""))

PROMPT = "How do I bake bread at home?"


@pytest.fixture(scope="module", autouse=True)
def _own_cache(tmp_path_factory):
    """The explorer keeps reference activations in catlens's cache folder: here a temporary one."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CATLENS_CACHE", str(tmp_path_factory.mktemp("catlens-cache")))
        yield


@pytest.fixture(scope="module")
def reference():
    """Two built-in prompts of every (label, category, split): the built-in set's structure at a sixth of its size."""
    from catlens.datasets import load_builtin

    ps = load_builtin()
    rows = ps.to_frame().reset_index(drop=True).groupby(["label", "category", "split"], dropna=False).head(2)
    return ps[list(rows.index)]


@pytest.fixture(scope="module")
def explorer(tiny_lm, reference):
    ex = E.Explorer(tiny_lm, discover_datasets=False, reference=reference)
    yield ex
    ex.close()


def values(ex, **changes):
    v = {**ex.defaults(), "prompt": PROMPT, "layers": "1", "max_new_tokens": "8"}
    v.update(changes)
    return v


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("changes, message", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   \n"}, "prompt is empty"),
    ({"coeff": "abc"}, "coefficient 'abc' is not a number"),
    ({"coeff": ""}, "coefficient is empty"),
    ({"coeff": "50"}, "coefficient 50 is out of range for scale 'norm': allowed -10 to 10"),
    ({"coeff": "2e5", "scale": "raw"}, "out of range for scale 'raw'"),
    ({"coeff": "nan"}, "not finite"),
    ({"categories": ["fraud_financal_crime"]}, "Unknown category 'fraud_financal_crime'. Did you mean: "
                                               "fraud_financial_crime?"),
    ({"categories": []}, "No category chosen"),
    ({"layers": "9"}, "layer 9 is out of range for 'tiny_lm0', which has 4 layers: give layers from 0 to 3"),
    ({"layers": "-5"}, "layer -5 is out of range"),
    ({"layers": "one"}, "cannot read 'one'"),
    ({"layers": ""}, "No layer given"),
    ({"max_new_tokens": "0"}, "max new tokens 0 is out of range"),
    ({"max_new_tokens": "2.5"}, "max new tokens '2.5' is not a whole number"),
    ({"site": "resid_mod"}, "Unknown site 'resid_mod'"),
    ({"method": "policy"}, "Start with --policy"),
    ({"mode": "gated", "toward": "", "away": " "}, "needs a toward and/or an away coefficient"),
    ({"mode": "gated", "toward": "x1"}, "toward coefficient 'x1' is not a number"),
    ({"edit": "ablate", "route": ["route"]}, "untick 'route'"),
])
def test_bad_input_is_a_message_in_the_page(explorer, changes, message):
    out = E.on_event(explorer, "run", values(explorer, **changes), None)
    assert "job" not in out, "no job may start on bad input"
    text = out["message"].children
    assert message in text, text
    with pytest.raises(ValueError, match="."):
        explorer.parse(values(explorer, **changes))


def test_a_failure_inside_the_job_is_a_message_too(explorer, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("the model is on fire")

    monkeypatch.setattr(explorer, "build_policy", boom)
    out = E.on_event(explorer, "run", values(explorer), None)
    st = explorer.wait(out["job"])
    assert st["state"] == "error" and st["error"] == "the model is on fire"
    polled = E.on_event(explorer, "poll", {}, out["job"])
    assert polled["message"].children == "the model is on fire" and polled["poll_disabled"] is True
    # the unsteered answer came first and stays; the steered column says none will come
    plain = generate(explorer.model, [PROMPT], None, max_new_tokens=8, batch_size=1, show_progress=False)[0]
    assert _find(polled["results"], "unsteered").children == plain["response"]
    assert _find(polled["results"], "steered-pending").children == "No steered answer: see the message above."
    assert _find(polled["results"], "steered") is None and polled["shown"] == f"{out['job']}:unsteered"


# ---------------------------------------------------------------------------------------- the answers
def test_coefficient_zero_is_the_unsteered_answer_and_a_large_one_changes_it(explorer):
    zero = explorer.run(explorer.parse(values(explorer, coeff="0")))
    assert zero["steered"]["token_ids"] == zero["unsteered"]["token_ids"]
    assert zero["steered"]["first_probs"] == zero["unsteered"]["first_probs"]
    big = explorer.run(explorer.parse(values(explorer, coeff="8")))
    assert big["unsteered"]["token_ids"] == zero["unsteered"]["token_ids"]
    assert big["steered"]["token_ids"] != big["unsteered"]["token_ids"]
    assert big["steered"]["first_probs"] != big["unsteered"]["first_probs"]
    # the unsteered answer is what plain generate gives
    plain = generate(explorer.model, [PROMPT], max_new_tokens=8, show_progress=False)[0]
    assert plain["token_ids"] == big["unsteered"]["token_ids"]
    assert "add 8 × residual norm" in big["summary"] and "layer(s) 1" in big["summary"]


def test_gated_routed_request_records_the_decisions(explorer):
    cats = ["fraud_financial_crime", "privacy", "cybercrime"]
    r = explorer.run(explorer.parse(values(explorer, mode="gated", toward="0.5", away="-0.5", route=["route"],
                                           categories=cats)))
    gate, route = r["steered"]["gate"], r["steered"]["route"]
    assert gate is not None and gate["coeff"] == (0.5 if gate["flagged"] else -0.5)
    assert route["kind"] == "probe" and route["category"] in cats  # the tiny model has no tokens for these
    two = explorer.router(["privacy", "fraud_financial_crime"], 1)  # the two-category probe router
    assert two.categories == ("fraud_financial_crime", "privacy") and two.weight.shape == (2, 64)
    assert torch.allclose(two.weight[0], -two.weight[1])


def test_ablation_removes_the_span_of_the_chosen_directions(explorer):
    req = explorer.parse(values(explorer, edit="ablate", categories=["privacy", "cybercrime"], layers="1,2"))
    policy, _, _ = explorer.build_policy(req)
    dirs = explorer.directions("one_vs_benign", "resid_post").select(categories=["privacy", "cybercrime"])
    for layer in (1, 2):
        q = torch.stack([iv.vectors[0] for iv in policy.interventions if iv.layer == layer], 1).double()
        assert q.shape == (64, 2)
        torch.testing.assert_close(q.T @ q, torch.eye(2, dtype=torch.float64), atol=1e-5, rtol=0)
        v = dirs.at(layer).double()
        torch.testing.assert_close(v - (v @ q) @ q.T, torch.zeros_like(v), atol=1e-5, rtol=0)


def test_pca_position_is_the_prompts_own_activation(explorer):
    from catlens.cache import collect

    explorer.builtin_acts("mlp_out")  # the map ready (a request needs only the train prompts' activations)
    r = explorer.run(explorer.parse(values(explorer, layers="2", site="mlp_out")))
    pca = r["pca"]
    assert (pca["site"], pca["layer"]) == ("mlp_out", 2) and len(pca["xy"]) == len(explorer.reference)
    # a reference prompt lands exactly on its own point
    first = explorer.reference[0]
    again = explorer.pca_point(first.text, "mlp_out", 2)
    assert again["point"] == pytest.approx(tuple(pca["xy"][0]), abs=1e-3)
    h = collect(explorer.model, [PROMPT], sites=["mlp_out"], layers=[2], show_progress=False).get("mlp_out")[:, 0]
    fit = explorer._pca[("mlp_out", 2)]["pca"]
    assert r["pca"]["point"] == pytest.approx(tuple(fit.transform(h.double().numpy())[0]), abs=1e-6)


# ------------------------------------------------------------------------ the map, prepared in the background
def _old_map(model, reference, site, layer, prompt):
    """The map as the explorer computed it before the background thread: every reference prompt collected in
    chunks of 64, PCA(2, random_state=0) fitted on one layer, the prompt projected into it."""
    from sklearn.decomposition import PCA

    from catlens.cache import collect

    acts = torch.cat([collect(model, reference[a:a + 64], sites=[site], layers=None, show_progress=False)
                      .get(site).float() for a in range(0, len(reference), 64)])
    x = acts[:, layer].double().numpy()
    pca = PCA(n_components=2, random_state=0).fit(x)
    h = collect(model, [prompt], sites=[site], layers=[layer], show_progress=False).get(site)[:, 0]
    return acts, pca.transform(x), tuple(pca.transform(h.double().numpy())[0])


def _assert_same_map(a, b):
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(a["xy"], b["xy"])
    assert {k: v for k, v in a.items() if k != "xy"} == {k: v for k, v in b.items() if k != "xy"}


def _hold_acts_step(ex, monkeypatch, holds, after, who):
    """Let the threads whose name ``holds`` accepts take ``after`` steps towards the reference activations, then hold
    the next one (before the step, outside the model lock) until released; once held, nothing more is held."""
    release, held = threading.Event(), threading.Event()
    steps = []
    original = ex._acts_step

    def step(site, stop=None):
        if holds(threading.current_thread().name) and not held.is_set():
            if len(steps) >= after:
                held.set()
                assert release.wait(600), f"the test never released {who}"
            steps.append(site)
        return original(site, stop)

    monkeypatch.setattr(ex, "_acts_step", step)
    return release, held


def _block_background(ex, monkeypatch, after=0):
    """Let the background thread take ``after`` steps, then hold it (outside the model lock) until released."""
    return _hold_acts_step(ex, monkeypatch, lambda name: name == "catlens-explore-map", after,
                           "the background thread")


def test_the_first_answer_does_not_wait_for_the_map(explorer, reference, tmp_path, monkeypatch):
    """A policy needs nothing from the reference prompts: while the map's computation is held, the first request
    still answers (the map's place says it is pending), and the map drawn once ready is the old code's."""
    made, _, _ = explorer.build_policy(explorer.parse(values(explorer, categories=["privacy"], coeff="8")))
    ex = E.Explorer(explorer.model, made, discover_datasets=False, reference=reference, cache=False)
    release, held = _block_background(ex, monkeypatch)
    try:
        ex.start_preparing()
        assert held.wait(30)
        job = ex.submit(ex.parse(values(ex, method="policy", coeff="8")))
        st = ex.wait(job, timeout=30.0)  # returns although the map's computation is held
        assert st["state"] == "done" and not ex.map_status("resid_post")["ready"]
        r = st["result"]
        assert r["pca"]["pending"] and (r["pca"]["site"], r["pca"]["layer"]) == ("resid_post", 1)
        assert r["steered"]["token_ids"] != r["unsteered"]["token_ids"]
        shown = E.on_event(ex, "poll", {}, job)  # the page: the answers now, the timer keeps going for the map
        assert shown["poll_disabled"] is False and "preparing the map: 0/" in str(shown["progress"])
        assert "pca-pending" in str(shown["results"]) and "id='pca'" not in str(shown["results"])
        assert "Preparing the map of the built-in prompts at resid_post layer 1 (its progress" in str(shown["results"])
        assert shown["shown"] == f"{job}:answers"
        again = E.on_event(ex, "poll", {}, job, shown["shown"])
        assert "results" not in again and again.get("poll_disabled") is None  # no re-draw while it is pending
        assert "results" in E.on_event(ex, "poll", {}, job)  # the browser dropped that answer: sent again
        assert ex.complete_map(r) is False and r["pca"]["pending"]
        release.set()
        t0 = time.monotonic()
        while not ex.map_status("resid_post")["ready"]:
            assert time.monotonic() - t0 < 60
            time.sleep(0.02)
        drawn = E.on_event(ex, "poll", {}, job, shown["shown"])
        assert drawn["poll_disabled"] is True and "pca-pending" not in str(drawn["results"])
        assert drawn["shown"] == f"{job}:map"
        assert E.on_event(ex, "poll", {}, job, drawn["shown"]) == {"poll_disabled": True}
        pca = ex.status(job)["result"]["pca"]
        assert "pending" not in pca and "h" not in pca
        acts, xy, point = _old_map(ex.model, ex.reference, "resid_post", 1, PROMPT)
        assert torch.equal(ex.builtin_acts("resid_post"), acts)
        np.testing.assert_array_equal(pca["xy"], xy)
        assert pca["point"] == point
        _assert_same_map(pca, ex.pca_point(PROMPT, "resid_post", 1))
    finally:
        release.set()
        ex.close()


def test_the_reference_prompts_are_kept_train_first_then_val_then_the_rest(explorer, reference):
    order = {"train": 0, "val": 1}
    want = sorted(reference, key=lambda p: order.get(p.split, 2))  # a stable sort: each split in its own order
    assert list(explorer.reference) == want and list(reference) != want  # the fixture's splits are mixed


def test_a_request_that_needs_directions_collects_only_the_train_prompts_it_misses(explorer, reference,
                                                                                  monkeypatch):
    """The background thread took two steps; a request needing directions (made from the train prompts, which come
    first) collects only the missing chunks of the train prompts and answers before the map is ready; the
    background thread then finishes the map, each chunk collected once in all, and the map equals the old code's."""
    import catlens.cache

    collect = catlens.cache.collect
    calls = _counting_collect(monkeypatch)
    ex = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=False)
    n_train = sum(p.split == "train" for p in reference)
    train_chunks = _chunks(len(reference))[:-(-n_train // E.ACTS_CHUNK)]
    assert 2 < len(train_chunks) < len(_chunks(len(reference)))
    release, held = _block_background(ex, monkeypatch, after=2)
    try:
        ex.start_preparing(["mlp_out"])
        assert held.wait(30)
        assert ex.map_status("mlp_out") == {"site": "mlp_out", "ready": False, "done": 2 * E.ACTS_CHUNK,
                                            "total": len(reference), "error": None}
        r = ex.run(ex.parse(values(ex, site="mlp_out", layers="2")))
        assert [c for c in calls if c > 1] == train_chunks  # the background's two, then the request's rest
        assert r["pca"]["pending"] and not ex.map_status("mlp_out")["ready"]
        assert ex.directions("one_vs_benign", "mlp_out") is not None  # made once, from the train prompts
        release.set()
        t0 = time.monotonic()
        while not ex.map_status("mlp_out")["ready"]:
            assert time.monotonic() - t0 < 60
            time.sleep(0.02)
        assert sorted(c for c in calls if c > 1) == sorted(_chunks(len(reference)))
        monkeypatch.setattr(catlens.cache, "collect", collect)
        acts, xy, point = _old_map(ex.model, ex.reference, "mlp_out", 2, PROMPT)
        assert torch.equal(ex.builtin_acts("mlp_out"), acts)
        assert ex.complete_map(r)
        np.testing.assert_array_equal(r["pca"]["xy"], xy)
        assert r["pca"]["point"] == point
    finally:
        release.set()
        ex.close()


def test_directions_gate_and_router_from_the_first_rows_equal_those_from_every_row(explorer, reference):
    """Made while only the train (and val) prompts are collected, they equal what the whole set's activations
    give (the rows they read, fitted the old way: masks over every row)."""
    from catlens import directions as D
    from catlens.probes import fit_gate

    ex = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=False)
    dirs = ex.directions("one_vs_benign", "resid_post")
    gate = ex.gate(1)
    assert "resid_post" not in ex._acts  # made from the first rows only
    acts = ex.builtin_acts("resid_post")
    f = ex._frame
    train, val, harm = (torch.tensor((f.split == "train").to_numpy()), torch.tensor((f.split == "val").to_numpy()),
                        torch.tensor((f.label == "harmful").to_numpy()))
    by_cat = {c: acts[train & harm & torch.tensor((f.category == c).to_numpy())] for c in ex.builtin_categories}
    old = D.fit_directions(by_cat, "one_vs_benign", benign=acts[train & ~harm], normalize=True,
                           site="resid_post").with_ref_norm(acts[train])
    torch.testing.assert_close(dirs.at(1), old.at(1), rtol=0, atol=0)
    torch.testing.assert_close(dirs.ref_norm, old.ref_norm, rtol=0, atol=0)
    a = acts[:, 1]
    old_gate = fit_gate(a[train & harm], a[train & ~harm], layer=1, val=(a[val & harm], a[val & ~harm]),
                        name="explorer probe L1")
    _assert_same_fields(gate, old_gate)
    cats = ("cybercrime", "privacy")  # cybercrime has no refusal token in the tiny model: a probe router
    rows = train & harm & torch.tensor(f.category.isin(cats).to_numpy())
    old_router = E._binary_router(a[rows], list(f.category[rows.numpy()]), cats, 1)
    ex2 = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=False)
    router = ex2.router(cats, 1)
    assert router.kind == "probe" and "resid_post" not in ex2._acts
    _assert_same_fields(router, old_router)
    ex.close()
    ex2.close()


def _assert_same_fields(a, b):
    import dataclasses

    assert type(a) is type(b)
    for field in dataclasses.fields(a):
        x, y = getattr(a, field.name), getattr(b, field.name)
        assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, field.name


def _counting_collect(monkeypatch):
    """Count the prompts of every ``catlens.cache.collect`` call (the explorer imports it at call time)."""
    import catlens.cache

    calls = []
    collect = catlens.cache.collect

    def counting(model, prompts, *a, **k):
        calls.append(len(prompts))
        return collect(model, prompts, *a, **k)

    monkeypatch.setattr(catlens.cache, "collect", counting)
    return calls


def _chunks(n):
    return [min(E.ACTS_CHUNK, n - a) for a in range(0, n, E.ACTS_CHUNK)]


def test_the_disk_cache_round_trips(explorer, reference, tmp_path, monkeypatch):
    """The first explorer collects every chunk once and writes one file; a new explorer on the same model, prompts
    and site reads it: its first request collects only the prompt itself and gets the map at once, equal to the
    first explorer's."""
    calls = _counting_collect(monkeypatch)
    first = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=tmp_path / "c")
    acts = first.builtin_acts("resid_post")
    assert calls == _chunks(len(reference))
    files = sorted((tmp_path / "c").iterdir())
    assert len(files) == 1 and files[0].name.startswith("acts-resid_post-") and files[0].suffix == ".safetensors"
    expected = first.pca_point(PROMPT, "resid_post", 1)
    calls.clear()
    warm = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=tmp_path / "c")
    pca = warm._pca_or_pending(PROMPT, "resid_post", 1)  # what a new explorer's first request shows
    assert calls == [1]  # the prompt only: nothing of the reference prompts
    assert "pending" not in pca and torch.equal(warm.builtin_acts("resid_post"), acts)
    _assert_same_map(pca, expected)
    assert calls == [1] and warm.map_status("resid_post")["ready"]
    # the background thread of a warm explorer reads the file too, and collects nothing
    bg = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=tmp_path / "c")
    try:
        bg.start_preparing()
        t0 = time.monotonic()
        while not bg.map_status("resid_post")["ready"]:
            assert time.monotonic() - t0 < 30 and bg.map_status("resid_post")["error"] is None
            time.sleep(0.01)
    finally:
        bg.close()
    assert calls == [1] and torch.equal(bg.builtin_acts("resid_post"), acts)


def test_a_changed_prompt_set_site_or_model_misses_the_disk_cache(explorer, reference, tiny_model, tmp_path,
                                                                   monkeypatch):
    """One prompt's text changed (same count), another site, another model: another key; each collects every
    chunk again. A file of the old key put under the new key's name is rejected (its stored key differs)."""
    from dataclasses import replace

    from catlens.prompts import PromptSet

    cache = tmp_path / "c"
    first = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=cache)
    acts = first.builtin_acts("resid_post")
    [old_file] = cache.iterdir()
    changed = PromptSet([replace(p, text=p.text + " Thanks.") if i == 3 else p  # in the explorer's order
                         for i, p in enumerate(first.reference)], name=reference.name)
    other = E.Explorer(explorer.model, discover_datasets=False, reference=changed, cache=cache)
    new_file = other._cache_file(other._cache_key("resid_post"))
    assert new_file != old_file
    new_file.write_bytes(old_file.read_bytes())  # the old activations under the new name
    calls = _counting_collect(monkeypatch)
    got = other.builtin_acts("resid_post")
    assert calls == _chunks(len(changed))  # recomputed: the forged file was not used
    assert not torch.equal(got[3], acts[3])
    assert torch.equal(torch.cat([got[:3], got[4:]]), torch.cat([acts[:3], acts[4:]]))
    assert other._read_cached("resid_post") is not None and first._read_cached("resid_post") is not None
    calls.clear()
    site = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=cache)
    site.builtin_acts("mlp_out")
    assert calls == _chunks(len(reference))
    calls.clear()
    small = E.Explorer(tiny_model, discover_datasets=False, reference=reference, cache=cache)
    assert small._cache_key("resid_post")["model"] != first._cache_key("resid_post")["model"]
    small.builtin_acts("resid_post")
    assert calls == _chunks(len(reference))


def test_a_damaged_cache_file_is_recomputed_and_cache_false_writes_nothing(explorer, reference, tmp_path):
    cache = tmp_path / "c"
    acts = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=cache).builtin_acts(
        "resid_post")
    [file] = cache.iterdir()
    file.write_bytes(b"not a safetensors file")
    damaged = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=cache)
    assert torch.equal(damaged.builtin_acts("resid_post"), acts)
    assert torch.equal(E.Explorer(explorer.model, discover_datasets=False, reference=reference,
                                  cache=cache)._read_cached("resid_post"), acts)  # rewritten
    off = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=False)
    off.builtin_acts("mlp_out")
    assert sorted(cache.iterdir()) == [file]
    with pytest.raises(ValueError, match="is a file"):
        E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=file)


def test_a_failed_background_step_is_reported_in_the_page_and_retried(explorer, reference, monkeypatch):
    """The background collection fails: the answers are still shown, the map's place says why it could not be
    prepared and the timer stops; the next request at that site tries again and gets the map."""
    import catlens.cache

    made, _, _ = explorer.build_policy(explorer.parse(values(explorer, categories=["privacy"], coeff="8")))
    ex = E.Explorer(explorer.model, made, discover_datasets=False, reference=reference, cache=False)
    collect = catlens.cache.collect
    fail = threading.Event()
    fail.set()

    def flaky(model, prompts, *a, **k):
        if fail.is_set() and threading.current_thread().name == "catlens-explore-map":
            raise RuntimeError("out of memory (a test)")
        return collect(model, prompts, *a, **k)

    monkeypatch.setattr(catlens.cache, "collect", flaky)
    try:
        ex.start_preparing()
        t0 = time.monotonic()
        while ex.map_status("resid_post")["error"] is None:
            assert time.monotonic() - t0 < 30
            time.sleep(0.01)
        job = ex.submit(ex.parse(values(ex, method="policy", coeff="8")))
        st = ex.wait(job, timeout=30.0)
        assert st["state"] == "done" and st["result"]["pca"]["pending"]
        t0 = time.monotonic()  # the request asked the background thread to try again: it fails again
        while ex.map_status("resid_post")["error"] is None:
            assert time.monotonic() - t0 < 30
            time.sleep(0.01)
        shown = E.on_event(ex, "poll", {}, job)
        assert shown["poll_disabled"] is True and "unsteered" in str(shown["results"])
        assert ("The map of the built-in prompts at resid_post layer 1 could not be prepared: out of memory "
                "(a test)") in str(shown["results"])
        fail.clear()
        job = ex.submit(ex.parse(values(ex, method="policy", coeff="8")))  # tries the map again
        assert ex.wait(job, timeout=30.0)["state"] == "done"
        t0 = time.monotonic()
        while not ex.map_status("resid_post")["ready"]:
            assert time.monotonic() - t0 < 60 and ex.map_status("resid_post")["error"] is None
            time.sleep(0.02)
        drawn = E.on_event(ex, "poll", {}, job)
        assert drawn["poll_disabled"] is True and "id='pca'" in str(drawn["results"])
    finally:
        ex.close()
    assert ex.map_status("mlp_out")["error"] == "the explorer was closed before the map was ready."


def test_a_saved_policy_as_loaded(explorer, tmp_path):
    req = explorer.parse(values(explorer, categories=["privacy", "cybercrime"], route=["route"], coeff="8"))
    made, _, _ = explorer.build_policy(req)
    made.save(tmp_path / "policy")
    ex = E.Explorer(explorer.model, tmp_path / "policy", discover_datasets=False, reference=explorer.reference)
    try:
        assert ex.methods[0] == "policy" and ex.categories_for("policy") == ("privacy", "cybercrime")
        d = ex.defaults()
        assert d["method"] == "policy" and d["route"] is True and d["layers"] == "1"
        routed = ex.run(ex.parse(values(ex, method="policy", route=["route"], coeff="8")))
        direct = explorer.run(req)
        assert routed["steered"]["token_ids"] == direct["steered"]["token_ids"]
        zero = ex.run(ex.parse(values(ex, method="policy", route=[], categories=["privacy"], coeff="0")))
        assert zero["steered"]["token_ids"] == zero["unsteered"]["token_ids"]
        with pytest.raises(ValueError, match="choose exactly one category"):
            ex.run(ex.parse(values(ex, method="policy", route=[], categories=["privacy", "cybercrime"])))
    finally:
        ex.close()


def test_a_gated_policy_with_a_refusal_token_router(explorer, tmp_path):
    """The shape the steering sweep saves: one intervention per category label, a gate, the refusal-token router."""
    from catlens.steer import Intervention, Router, SteeringPolicy

    cats = ("fraud", "hate", "privacy")  # the tiny model's refusal tokens
    gen = torch.Generator().manual_seed(0)
    iv = Intervention("resid_post", 1, torch.randn(3, 64, generator=gen), labels=cats, positions="last_prompt",
                      normalize=True, scale="norm", ref_norm=10.0)
    SteeringPolicy((iv,), gate=explorer.gate(1), router=Router("refusal_tokens", cats), toward=0.4, away=-0.2,
                   name="sweep-like").save(tmp_path / "policy")
    ex = E.Explorer(explorer.model, tmp_path / "policy", discover_datasets=False, reference=explorer.reference)
    try:
        d = ex.defaults()
        assert (d["mode"], d["toward"], d["away"], d["route"], d["categories"]) == ("gated", "0.4", "-0.2", True,
                                                                                    list(cats))
        r = ex.run(ex.parse({**d, "prompt": PROMPT, "max_new_tokens": "6", "toward": "5", "away": "5"}))
        gate, route = r["steered"]["gate"], r["steered"]["route"]
        assert gate["coeff"] == 5.0 and route["kind"] == "refusal_tokens" and route["category"] in cats
        assert r["steered"]["token_ids"] != r["unsteered"]["token_ids"]
        assert "gate 'explorer probe L1' at layer 1" in r["summary"] and "refusal_tokens router" in r["summary"]
        # one coefficient: the gate is dropped; one category without the router: that direction for every prompt
        single = ex.run(ex.parse({**d, "prompt": PROMPT, "max_new_tokens": "6", "mode": "single", "coeff": "0",
                                  "route": [], "categories": ["hate"]}))
        assert single["steered"]["gate"] is None and single["steered"]["route"] is None
        assert single["steered"]["steer"]["direction"] == [1]
        assert single["steered"]["token_ids"] == single["unsteered"]["token_ids"]
    finally:
        ex.close()


def test_prompt_sets(tiny_lm, tmp_path):
    from catlens.datasets import load_builtin
    from catlens.prompts import PromptSet

    f = tmp_path / "mine.jsonl"
    f.write_text('{"text": "Plan a picnic.", "label": "benign"}\n')
    ps = PromptSet([{"id": "a", "text": "Hello there.", "label": "benign"}], name="inline")
    ex = E.Explorer(tiny_lm, prompts=[ps, str(f)], data_dir=tmp_path, reference=load_builtin()[:40])
    assert ex.prompt_sets == ["builtin", "inline", "mine"]
    assert ex.prompt_set("mine")[0].text == "Plan a picnic."
    with pytest.raises(ValueError, match="Unknown prompt set 'nope'"):
        ex.prompt_set("nope")


# ------------------------------------------------------------------ the unsteered answer before the directions
def _find(component, ident):
    """The component with id ``ident`` in a Dash component tree (None when absent)."""
    if getattr(component, "id", None) == ident:
        return component
    kids = getattr(component, "children", None)
    for kid in kids if isinstance(kids, (list, tuple)) else [kids]:
        if kid is not None and not isinstance(kid, (str, int, float)):
            found = _find(kid, ident)
            if found is not None:
                return found
    return None


def _hold_request_collection(ex, monkeypatch, after=0):
    """Let a request's own collection of the reference activations take ``after`` steps, then hold it until
    released (the first request only; the background thread is not held)."""
    return _hold_acts_step(ex, monkeypatch,
                           lambda name: name.startswith("catlens-explore-") and name != "catlens-explore-map",
                           after, "the request")


def _wait_for_state(ex, job_id, state, timeout=60.0):
    """Wait until the job's thread has ended in ``state`` (its status says 'superseded' as soon as it is replaced)."""
    t0 = time.monotonic()
    while ex._jobs[job_id].state != state:
        assert time.monotonic() - t0 < timeout, ex._jobs[job_id].state
        time.sleep(0.01)


def _without_seconds(rec):
    return {k: v for k, v in rec.items() if k != "seconds"}


def test_without_a_policy_the_unsteered_answer_comes_first(explorer, reference, monkeypatch):
    """Directions from the reference prompts need their activations: while the request's collection is held, the
    page already shows the unsteered answer (plain generate's) with the collection's progress in the steered
    column; once released, the full result holds the same unsteered record and the steered answer of a direct
    run."""
    plain = generate(explorer.model, [PROMPT], None, max_new_tokens=8, batch_size=1, show_progress=False)[0]
    req = explorer.parse(values(explorer, coeff="8"))
    direct = explorer.run(req)
    ex = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=False)
    release, held = _hold_request_collection(ex, monkeypatch, after=2)
    try:
        out = E.on_event(ex, "run", values(ex, coeff="8"), None)
        job = out["job"]
        assert held.wait(30), "the request never started collecting the reference activations"
        st = ex.status(job)
        assert st["state"] == "running" and st["result"] is None and not ex.map_status("resid_post")["ready"]
        partial = st["partial"]
        assert partial is not None, "no unsteered answer before the directions"
        assert partial["request"] == req
        assert _without_seconds(partial["unsteered"]) == _without_seconds(plain)
        polled = E.on_event(ex, "poll", {}, job)
        assert polled["shown"] == f"{job}:unsteered" and polled["dim"] is False and "poll_disabled" not in polled
        page = polled["results"]
        assert _find(page, "unsteered").children == plain["response"]
        assert _find(page, "steered") is None and _find(page, "summary") is None
        assert _find(page, "steered-pending").children == (
            f"Preparing the directions: built-in activations (resid_post, train prompts) {E.ACTS_CHUNK}/"
            f"{sum(p.split == 'train' for p in reference)} prompts")  # the directions read the train prompts only
        top, p = max(plain["first_probs"].items(), key=lambda kv: kv[1])
        assert _find(page, "unsteered-probs").children.startswith(
            f"refusal-token probabilities (first position): {top} {p:.3f}")
        again = E.on_event(ex, "poll", {}, job, polled["shown"])  # the progress is redrawn while it runs
        assert again["shown"] == f"{job}:unsteered" and "results" in again
        release.set()
        st = ex.wait(job, timeout=60.0)
        assert st["state"] == "done"
        r = st["result"]
        assert r["unsteered"] is partial["unsteered"]
        assert r["steered"]["token_ids"] == direct["steered"]["token_ids"] != plain["token_ids"]
        assert r["summary"] == direct["summary"]
        done = E.on_event(ex, "poll", {}, job, polled["shown"])
        assert done["shown"] in (f"{job}:answers", f"{job}:map")
        assert _find(done["results"], "steered").children == direct["steered"]["response"]
        assert _find(done["results"], "unsteered").children == plain["response"]
        assert _find(done["results"], "steered-pending") is None
    finally:
        release.set()
        ex.close()


def test_a_superseded_requests_partial_answer_is_never_shown(explorer, reference, monkeypatch):
    """A request replaced while generating its unsteered answer never publishes it; one replaced after its
    unsteered answer was shown has it no more in its status, and the page greys it."""
    import catlens.generation

    ex = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=False)
    original = catlens.generation.generate
    release, held = threading.Event(), threading.Event()

    def slow(model, prompts, steer=None, **kw):
        out = original(model, prompts, steer, **kw)
        if steer is None and threading.current_thread().name.startswith("catlens-explore-") and not held.is_set():
            held.set()  # the unsteered answer exists; the request is replaced before it is published
            assert release.wait(600), "the test never released the request"
        return out

    monkeypatch.setattr(catlens.generation, "generate", slow)
    try:
        first = ex.submit(ex.parse(values(ex, coeff="8")))
        assert held.wait(30)
        second = ex.submit(ex.parse(values(ex, coeff="0")))
        st1 = ex.status(first)
        assert st1["state"] == "superseded" and st1["partial"] is None
        release.set()
        _wait_for_state(ex, first, "cancelled")
        assert ex._jobs[first].partial is None  # dropped, not only hidden
        polled = E.on_event(ex, "poll", {}, first)
        assert "results" not in polled and "shown" not in polled and polled["poll_disabled"] is True
        st2 = ex.wait(second, timeout=60.0)
        assert st2["state"] == "done" and st2["partial"]["request"].coeff == 0.0
        assert st2["result"]["unsteered"] is st2["partial"]["unsteered"]
        # replaced after its unsteered answer was shown: the status hides it, the page greys what it shows
        hold, held2 = _hold_request_collection(ex, monkeypatch)
        third = ex.submit(ex.parse(values(ex, site="mlp_out", coeff="8")))
        assert held2.wait(30)
        shown = E.on_event(ex, "poll", {}, third)["shown"]
        assert shown == f"{third}:unsteered"
        fourth = ex.submit(ex.parse(values(ex, coeff="0")))
        assert ex.status(third)["partial"] is None
        polled = E.on_event(ex, "poll", {}, third, shown)
        assert "results" not in polled and polled["dim"] is True and polled["poll_disabled"] is True
        assert ex._publish_partial(ex._jobs[third], {"request": None, "unsteered": None}) is False
        hold.set()
        _wait_for_state(ex, third, "cancelled")
        assert ex.wait(fourth, timeout=60.0)["state"] == "done"
    finally:
        release.set()
        ex.close()


# ----------------------------------------------------------------------------------- jobs and cancels
def test_a_newer_request_cancels_the_older_and_stale_results_are_dropped(explorer):
    explorer.run(explorer.parse(values(explorer)))  # warm the caches so the first job reaches decoding
    seen = threading.Event()
    long = explorer.parse(values(explorer, max_new_tokens="400", coeff="3"))
    first = explorer.submit(long)
    t0 = time.monotonic()
    while explorer.status(first)["phase"] not in ("unsteered answer", "steered answer"):
        assert time.monotonic() - t0 < 30
        time.sleep(0.005)
    seen.set()
    second = explorer.submit(explorer.parse(values(explorer, coeff="0")))
    st2 = explorer.wait(second)
    st1 = explorer.wait(first)
    assert st2["state"] == "done" and st2["result"]["request"].coeff == 0.0
    assert st1["state"] == "cancelled" and st1["result"] is None
    assert st1["done"] < 400  # stopped between decoding steps, well before the end
    polled = E.on_event(explorer, "poll", {}, first)
    assert "results" not in polled and polled["poll_disabled"] is True
    # a result that finishes after a newer request started is never published
    third = explorer.submit(explorer.parse(values(explorer)))
    old = explorer._jobs[second]
    assert explorer._publish(old, st2["result"]) is False and old.state == "superseded"
    assert explorer.status(second)["result"] is None
    assert explorer.wait(third)["state"] == "done"


def test_should_stop_is_called_per_step_and_stops_generation(tiny_lm, tmp_path):
    calls = []
    base = generate(tiny_lm, [PROMPT, "Hi"], max_new_tokens=6, batch_size=1, show_progress=False, stop_at_eos=False)
    same = generate(tiny_lm, [PROMPT, "Hi"], max_new_tokens=6, batch_size=1, show_progress=False, stop_at_eos=False,
                    should_stop=lambda n: bool(calls.append(n)))
    assert [r["token_ids"] for r in same] == [r["token_ids"] for r in base]
    assert calls == [0, 1, 2, 3, 4, 5] * 2  # before each prefill and before each further decoding step
    with pytest.raises(GenerationCancelled, match="after 3 new token"):
        generate(tiny_lm, [PROMPT, "Hi"], max_new_tokens=6, batch_size=1, show_progress=False,
                 should_stop=lambda n: n == 3, out=tmp_path / "gen")
    assert not tiny_lm.bridge.list_hooks()
    assert not (tmp_path / "gen" / "generations.jsonl").exists()


# ------------------------------------------------------------------------------------------- the app
def test_create_app_and_cli_checks(tiny_lm, tiny_lm_dir, capsys):
    import dash

    app = E.create_app(tiny_lm, prompts=None, data_dir=None)
    assert isinstance(app, dash.Dash) and isinstance(app.explorer, E.Explorer)
    app.explorer.close()  # create_app started preparing the map in the background
    assert cli_main(["explore", "--model", str(tiny_lm_dir), "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert cli_main(["explore", "--model", str(tiny_lm_dir), "--set", "lyers=2"]) == 2
    assert "Unknown page field 'lyers'. Did you mean: layers?" in capsys.readouterr().err
    assert cli_main(["explore", "--model", str(tiny_lm_dir), "--set", "layers"]) == 2
    assert "give FIELD=VALUE" in capsys.readouterr().err


def test_starting_values(tiny_lm, reference):
    ex = E.Explorer(tiny_lm, discover_datasets=False, reference=reference,
                    initial={"layers": "0,2", "categories": "privacy,cybercrime", "route": "true", "coeff": "1.5"})
    d = ex.defaults()
    assert (d["layers"], d["categories"], d["route"], d["coeff"]) == ("0,2", ["privacy", "cybercrime"], True, "1.5")
    req = ex.parse({**d, "prompt": PROMPT})
    assert req.layers == (0, 2) and req.categories == ("privacy", "cybercrime") and req.route and req.coeff == 1.5
    with pytest.raises(ValueError, match="starting values .*layer 7 is out of range"):
        E.Explorer(tiny_lm, discover_datasets=False, reference=reference, initial={"layers": "7"})
    with pytest.raises(ValueError, match="Unknown page field 'coef'"):
        E.Explorer(tiny_lm, discover_datasets=False, reference=reference, initial={"coef": "1"})


def _open_page(b, url):
    """A new page at the explorer's ``url``, once its controls are there, and the list its console errors go to."""
    page = b.new_page(viewport={"width": 1400, "height": 1000})
    errors = page_errors(page)
    page.goto(url)
    page.wait_for_selector("#run", timeout=20_000)
    return page, errors


def _ask(page, fields):
    """Fill the page's controls (``{element id: text}``, in order) and press Run."""
    for ident, text in fields.items():
        page.fill(f"#{ident}", text)
    page.click("#run")


@browser
def test_explorer_in_headless_chromium(tiny_lm, reference):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    app = E.create_app(tiny_lm, explorer=E.Explorer(tiny_lm, discover_datasets=False, reference=reference))
    explorer_texts = set(app.explorer.builtin.texts)
    with E.serve(app) as server, headless_chromium(CHROMIUM) as b:
        page, errors = _open_page(b, server.url)
        # an empty prompt: a visible message, no job
        page.click("#run")
        page.wait_for_selector("#message .error", timeout=60_000)
        assert "prompt is empty" in page.inner_text("#message")
        # pick a built-in prompt from the searchable list: it fills the prompt box
        # (Enter can reach the list before its filtered options render on a loaded machine: then pick again)
        for attempt in range(3):
            page.click("#prompt-pick")
            page.keyboard.type("phishing")
            page.keyboard.press("Enter")
            try:
                page.wait_for_function("document.querySelector('#prompt').value.includes('phishing')",
                                       timeout=20_000)
                break
            except PlaywrightTimeout:
                page.keyboard.press("Escape")
                if attempt == 2:
                    raise
        assert page.input_value("#prompt") in explorer_texts
        # a prompt, a large coefficient: the steered answer appears and differs
        _ask(page, {"prompt": PROMPT, "layers": "1", "max-new": "12", "coeff": "8"})
        page.wait_for_selector("#steered", timeout=60_000)
        assert page.inner_text("#message").strip() == ""
        unsteered, steered = page.inner_text("#unsteered"), page.inner_text("#steered")
        assert steered and unsteered and steered != unsteered
        assert "differs" in page.inner_text("#same")
        assert "done in" in page.inner_text("#progress")
        page.wait_for_function("document.querySelectorAll('#probs .main-svg, #pca .main-svg').length >= 2",
                               timeout=60_000)
        if os.environ.get("CATLENS_SCREENSHOT"):
            page.screenshot(path=os.environ["CATLENS_SCREENSHOT"], full_page=True)
        # two quick requests: the second (coefficient 0) wins and shows the unsteered answer
        page.fill("#coeff", "7")
        page.click("#run")
        page.fill("#coeff", "0")
        page.click("#run")
        page.wait_for_function("document.querySelector('#summary') && "
                               "document.querySelector('#summary').innerText.includes('add 0 ×')",
                               timeout=60_000)
        page.wait_for_timeout(600)
        assert "add 0 ×" in page.inner_text("#summary")
        assert page.inner_text("#steered") == page.inner_text("#unsteered") == unsteered
        # bad coefficient after a good run: the message, and the old answers stay
        page.fill("#coeff", "lots")
        page.click("#run")
        page.wait_for_selector("#message .error", timeout=60_000)
        assert "coefficient 'lots' is not a number" in page.inner_text("#message")
        assert errors == []


@pytest.mark.parametrize("flags, dtype", [([], "auto"), (["--dtype", "float32"], "float32")])
def test_cli_loads_the_model_on_the_device_and_dtype_given_auto_by_default(tiny_lm_dir, monkeypatch, flags, dtype):
    """``catlens explore`` loads in ``--dtype`` (default ``auto``, resolved before the load, as the main job does) on
    ``--device``; an unavailable device is refused before anything is loaded."""
    import catlens.model
    from catlens.model import resolve_dtype

    loads = []

    class Loaded(Exception):
        pass

    def load(spec, **kwargs):
        loads.append(kwargs)
        raise Loaded

    monkeypatch.setattr(catlens.model, "load_model", load)
    with pytest.raises(Loaded):
        cli_main(["explore", "--model", str(tiny_lm_dir), "--port", "0", *flags])
    assert loads[0]["dtype"] == resolve_dtype(dtype, "cpu") and loads[0]["device"] == "cpu"
    assert cli_main(["explore", "--model", str(tiny_lm_dir), "--device", "cuda:7"]) == 2
    assert len(loads) == 1


@browser
def test_cli_screenshot_runs_the_starting_prompt(tiny_lm_dir, tmp_path, capsys):
    png = tmp_path / "explorer.png"
    code = cli_main(["explore", "--model", str(tiny_lm_dir), "--port", "0", "--set", f"prompt={PROMPT}",
                     "--set", "layers=1", "--set", "coeff=8", "--set", "max_new_tokens=4", "--screenshot", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and f"wrote {png}" in out and "console error" not in out
    assert png.stat().st_size > 20_000


@browser
def test_the_page_shows_the_answers_then_the_map(explorer, reference, monkeypatch):
    """In the browser: with the map's computation held, the answers appear with "Preparing the map ... n/N" in the
    map's place; once it is released the prompt's map replaces the message without another click."""
    made, _, _ = explorer.build_policy(explorer.parse(values(explorer, categories=["privacy"], coeff="8")))
    ex = E.Explorer(explorer.model, made, discover_datasets=False, reference=reference, cache=False)
    release, held = _block_background(ex, monkeypatch)
    app = E.create_app(explorer.model, explorer=ex)  # starts preparing the map: held at its first step
    try:
        assert held.wait(30)
        with E.serve(app) as server, headless_chromium(CHROMIUM) as b:
            page, errors = _open_page(b, server.url)
            _ask(page, {"prompt": PROMPT, "max-new": "8"})
            page.wait_for_selector("#steered", timeout=60_000)
            assert "Preparing the map of the built-in prompts at resid_post layer 1" in page.inner_text("#pca-pending")
            assert f"preparing the map: 0/{len(reference)} prompts" in page.inner_text("#progress")
            assert page.query_selector("#pca") is None
            release.set()
            page.wait_for_selector("#pca .main-svg", timeout=60_000)
            assert page.query_selector("#pca-pending") is None
            assert "preparing" not in page.inner_text("#progress")
            assert errors == []
    finally:
        release.set()
        ex.close()


@browser
def test_the_page_shows_the_unsteered_answer_while_the_directions_are_made(explorer, reference, monkeypatch):
    """In the browser, without a policy: while the request's collection of the reference activations is held, the
    unsteered answer is on the page and the steered column shows the collection's progress; once released, the
    steered answer replaces it without another click."""
    plain = generate(explorer.model, [PROMPT], None, max_new_tokens=8, batch_size=1, show_progress=False)[0]
    ex = E.Explorer(explorer.model, discover_datasets=False, reference=reference, cache=False)
    release_bg, held_bg = _block_background(ex, monkeypatch)  # the request collects the activations itself
    release, held = _hold_request_collection(ex, monkeypatch, after=1)
    app = E.create_app(explorer.model, explorer=ex)
    try:
        assert held_bg.wait(30)
        with E.serve(app) as server, headless_chromium(CHROMIUM) as b:
            page, errors = _open_page(b, server.url)
            _ask(page, {"prompt": PROMPT, "layers": "1", "max-new": "8", "coeff": "8"})
            page.wait_for_function("document.querySelector('#steered-pending') && document.querySelector("
                                   "'#steered-pending').innerText.includes("
                                   "'built-in activations (resid_post, train prompts) 0/')", timeout=60_000)
            assert held.is_set() and page.query_selector("#steered") is None
            assert page.inner_text("#unsteered").strip() == plain["response"].strip()
            assert page.inner_text("#steered-pending") == (
                "Preparing the directions: built-in activations (resid_post, train prompts) "
                f"0/{sum(p.split == 'train' for p in reference)} prompts")
            release.set()
            release_bg.set()  # (the server's stop closes the explorer, which waits for the background thread)
            page.wait_for_selector("#steered", timeout=60_000)
            assert page.query_selector("#steered-pending") is None
            assert page.inner_text("#unsteered").strip() == plain["response"].strip()
            assert page.inner_text("#steered") != page.inner_text("#unsteered")
            assert errors == []
    finally:
        release.set()
        release_bg.set()
        ex.close()
