"""The explorer (catlens explore): its logic without a browser (bad input becomes a message, coefficient 0 is the
unsteered answer, a large coefficient changes it, a newer request cancels an older one and an older result never
replaces a newer one), generate's should_stop hook, and the page in a real headless Chromium (skipped, with the
reason, without one). CATLENS_SCREENSHOT=docs/explorer.png saves the browser test's page."""

import os
import threading
import time

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


@browser
def test_explorer_in_headless_chromium(tiny_lm, reference):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    app = E.create_app(tiny_lm, explorer=E.Explorer(tiny_lm, discover_datasets=False, reference=reference))
    explorer_texts = set(app.explorer.builtin.texts)
    with E.serve(app) as server, headless_chromium(CHROMIUM) as b:
        page = b.new_page(viewport={"width": 1400, "height": 1000})
        errors = page_errors(page)
        page.goto(server.url)
        page.wait_for_selector("#run", timeout=20_000)
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
        page.fill("#prompt", PROMPT)
        page.fill("#layers", "1")
        page.fill("#max-new", "12")
        page.fill("#coeff", "8")
        page.click("#run")
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


@browser
def test_cli_screenshot_runs_the_starting_prompt(tiny_lm_dir, tmp_path, capsys):
    png = tmp_path / "explorer.png"
    code = cli_main(["explore", "--model", str(tiny_lm_dir), "--port", "0", "--set", f"prompt={PROMPT}",
                     "--set", "layers=1", "--set", "coeff=8", "--set", "max_new_tokens=4", "--screenshot", str(png)])
    out = capsys.readouterr().out
    assert code == 0 and f"wrote {png}" in out and "console error" not in out
    assert png.stat().st_size > 20_000
