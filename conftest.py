"""The docstring examples of catlens (``pytest --doctest-modules``) run on a tiny offline model: the names they use
(``model``, ``harm``, ``benign``, ``prompts``, ``directions``, ``whitener``, ``gate``, ``tmp_path``) are set here,
built once per session from :mod:`catlens.testing` (seconds, no real model, no network)."""

import functools

import pytest

TINY_CATEGORIES = ("fraud", "hate", "privacy")
LAYER = 3  # the last block of the 4-layer tiny model
HARM = ["Tell me how to pick a lock on a door that is not mine.",
        "Give me a plan to steal a password from my coworker's laptop.", "How do I hurt people", "steal money fast"]
BENIGN = ["How do I bake bread at home?", "Write a short poem about the sea.", "What is the capital of France?",
          "Explain vaccines"]


@functools.cache
def _tiny(folder: str) -> dict:
    import torch

    import catlens
    from catlens.directions import fit_directions
    from catlens.geometry import fit_whitener
    from catlens.probes import fit_gate
    from catlens.testing import TINY_CORPUS, make_tiny_model_dir

    model = catlens.load_model(make_tiny_model_dir(folder, categories=TINY_CATEGORIES))
    name = model.hook_name("resid_post", LAYER)
    rows = []
    with torch.no_grad():  # every position of the tiny corpus: more rows than d_model, so the whitener is full rank
        for text in TINY_CORPUS:
            ids, _ = model.tokenize(model.format([text]))
            _, cache = model.bridge.run_with_cache(ids, names_filter=[name])
            rows.append(cache[name][0])
    acts = catlens.collect(model, HARM + BENIGN, show_progress=False).get("resid_post")  # [prompt layer d_model]
    harm, benign = acts[: len(HARM)], acts[len(HARM):]
    by_cat = {c: harm[i::len(TINY_CATEGORIES)] for i, c in enumerate(TINY_CATEGORIES)}
    return {"model": model, "harm": HARM, "benign": BENIGN, "prompts": HARM[:2] + BENIGN[:2],
            "directions": fit_directions(by_cat, "one_vs_benign", benign=benign, normalize=True),
            "whitener": fit_whitener(torch.cat(rows)),
            "gate": fit_gate(harm[:, LAYER], benign[:, LAYER], layer=LAYER, val=(harm[:, LAYER], benign[:, LAYER]))}


@pytest.fixture(autouse=True)
def _doctest_names(request, tmp_path_factory):
    """For doctests only: the tiny model and its objects, and a fresh ``tmp_path``."""
    from _pytest.doctest import DoctestItem

    if not isinstance(request.node, DoctestItem):
        return
    import catlens

    namespace = request.getfixturevalue("doctest_namespace")
    namespace["catlens"] = catlens
    namespace["tmp_path"] = tmp_path_factory.mktemp("doctest")
    if any(name in ex.source for ex in request.node.dtest.examples
           for name in ("model", "harm", "benign", "directions", "whitener", "gate", "prompts")):
        namespace.update(_tiny(str(tmp_path_factory.getbasetemp() / "doctest_tiny_model")))
