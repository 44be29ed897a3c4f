"""Shared fixtures and the test tiers.

Tiers: a test that needs the real embedded model (the ``real_model`` fixture, or any load of a real-size checkpoint)
is ``slow``; everything else runs on tiny random models with their own offline tokenizer (:mod:`catlens.testing`)
and is the fast tier (``make test-fast``: ``pytest -m "not slow and not browser"``). Tests that request
``real_model`` are marked ``slow`` here; a test that is not marked and loads a real-size model anyway fails with a
message saying so, so the tiers cannot drift. The real model is loaded once per session (about 1 s from the
cache; the first conversion from GGUF takes about 40 s on a fresh machine)."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CATLENS_DATA_DIR", REPO.parent / "shared" / "data"))


REAL_SIZE = 256
"""A checkpoint whose ``hidden_size`` is at least this is a real model (the tiny test models are 64 wide)."""


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "real_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def _tier_guard(request, monkeypatch):
    """Outside the ``slow`` tier, loading a real-size or hub model fails the test with the fix."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import json

    import catlens.model as M

    boot = M._boot

    def guarded(location, *args, **kwargs):
        config = Path(location) / "config.json"
        width = json.loads(config.read_text()).get("hidden_size", 0) if config.is_file() else None
        if width is None or width >= REAL_SIZE:
            pytest.fail(f"{request.node.nodeid} loads a real model ({location}); use a tiny model "
                        f"(catlens.testing, the tiny_lm / tiny_model fixtures) or mark the test slow.")
        return boot(location, *args, **kwargs)

    monkeypatch.setattr(M, "_boot", guarded)


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    """Two threads, or the cores shared out among pytest-xdist's workers (``-n``), so workers do not oversubscribe."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M-Instruct (shared: tests must not leave hooks or change weights)."""
    from catlens.model import load_model

    model = load_model()
    yield model
    assert not model.bridge.list_hooks() if hasattr(model.bridge, "list_hooks") else True


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (d_model 64) with catlens.testing's offline tokenizer and no refusal tokens (an
    ordinary chat model), saved as a checkpoint folder."""
    from catlens.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), n_layers=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from catlens.model import load_model

    return load_model(tiny_model_dir)


@pytest.fixture(scope="session")
def small_gguf(tmp_path_factory) -> Path:
    """The embedded model's GGUF cut to its first block and first 1024 tokens (metadata, chat template and quantised
    tensors otherwise unchanged, :func:`catlens.testing.make_small_gguf`): converts like the real file, in seconds."""
    from catlens.testing import make_small_gguf

    return make_small_gguf(tmp_path_factory.mktemp("small_gguf") / "small.gguf", n_blocks=1, n_vocab=1024)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "TAXONOMY.md").exists():
        pytest.skip(f"benchmark data not found at {DATA_DIR}; set CATLENS_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def assert_float32_close():
    """Compare activations computed with different batch shapes: equal up to float32 rounding, measured against
    each vector's own scale (max |x| over the last dimension). Residual streams carry entries of several hundred,
    whose float32 spacing alone exceeds 1e-5, and CPUs differ in how they block a matmul for each batch shape; a
    wrong mask or position would differ by O(1) of that scale."""

    def check(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
        scale = expected.abs().amax(dim=-1, keepdim=True).clamp_min(1e-6)
        torch.testing.assert_close(actual / scale, expected / scale, rtol=0, atol=rel)

    return check


TINY_CATEGORIES = ("fraud", "hate", "privacy")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with its own tiny tokenizer and refusal tokens (no real model needed)."""
    from catlens.testing import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_lm"), categories=TINY_CATEGORIES)


@pytest.fixture(scope="session")
def tiny_lm(tiny_lm_dir):
    """The tiny model loaded through the ordinary folder route (shared: tests must not leave hooks)."""
    from catlens.model import load_model

    model = load_model(tiny_lm_dir)
    yield model
    assert not model.bridge.list_hooks()
