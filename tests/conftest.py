"""Shared fixtures. The real embedded model is loaded once per session (about 1 s from the cache; the first
conversion from GGUF takes about 40 s on a fresh machine)."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("CATLENS_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _threads() -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))


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
def tiny_model_dir(tmp_path_factory, real_model) -> Path:
    """A randomly initialised 2-layer Llama with the real tokenizer, saved as a checkpoint folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(real_model.tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=real_model.tokenizer.bos_token_id,
                      eos_token_id=real_model.tokenizer.eos_token_id, pad_token_id=real_model.tokenizer.pad_token_id)
    model = LlamaForCausalLM(cfg)
    folder = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(folder)
    real_model.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from catlens.model import load_model

    return load_model(tiny_model_dir)


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
